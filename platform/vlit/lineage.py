"""Lineage in MLflow, from dataset version to registered model.

    pipeline run (one per job invocation; tags: the job's stage keys and what it skipped)
      +- nested stage runs (corpus, sft1, align, sft2, dpo, eval): inputs as MLflow
         dataset inputs (name, digest = the version's content digest, source URI),
         outputs as `vlit.out.*` tags
    registered model <name>-<stage>, one version per training run: source = the HF
    export, tags = the run, checkpoint and input dataset digests; the `eval.alias`
    alias marks the version that passed its gates

`chain(uri, "demo-sft2@champion")` walks it back: model version -> run -> checkpoint ->
input dataset versions -> their sources (and, for versions vlit made, their own inputs).
"""
from __future__ import annotations

import json

from vlit import storage
from vlit.config import Config
from vlit.train import tracking


def start_pipeline(cfg: Config, key: str) -> dict:
    """The job's parent run in experiment `run.name`, with the config as params."""
    uri, experiment = tracking.experiment_id(cfg)
    client = tracking._client(uri)
    run = client.create_run(experiment, run_name=f"two_stage-{key[:8]}",
                            tags={"vlit.stage": "pipeline", "vlit.pipeline.key": key})
    tracking.log_params(uri, run.info.run_id, cfg)
    return {"uri": uri, "run_id": run.info.run_id}


def start_stage(cfg: Config, parent: dict, stage: str, key: str, inputs: list[tuple[str, str, str]],
                context: str = "training") -> dict:
    """A nested run for a stage the job runs itself (corpus, align, eval); `inputs`:
    (name, digest, uri) of each dataset version it reads."""
    client = tracking._client(parent["uri"])
    run = client.create_run(client.get_run(parent["run_id"]).info.experiment_id, run_name=f"{stage}-{key[:8]}",
                            tags={"mlflow.parentRunId": parent["run_id"], "vlit.stage": stage, "vlit.stage.key": key})
    if inputs:
        client.log_inputs(run.info.run_id, datasets=[tracking.dataset_input(n, d, u, context) for n, d, u in inputs])
    return {"uri": parent["uri"], "run_id": run.info.run_id}


def set_tags(run: dict, tags: dict) -> None:
    from mlflow.entities import RunTag

    tracking._client(run["uri"]).log_batch(run["run_id"], tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_text(run: dict, text: str, path: str) -> None:
    tracking._client(run["uri"]).log_text(run["run_id"], text, path)


def log_files(run: dict, folder: str, path: str) -> None:
    """A local folder's files as the run's artifacts under `path` (an s3:// folder stays
    where it is: its URI is in the run's tags)."""
    if not storage.is_s3(folder):
        tracking._client(run["uri"]).log_artifacts(run["run_id"], folder, path)


def finish(run: dict, status: str = "FINISHED") -> None:
    tracking._client(run["uri"]).set_terminated(run["run_id"], status=status)


def register_model(uri: str, name: str, source: str, run_id: str, tags: dict) -> str:
    """A new version of registered model `name` whose source is the export; returns it."""
    from mlflow.exceptions import MlflowException

    client = tracking._client(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=storage.normalize(source), run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def _model_version(client, ref: str):
    """NAME (latest version), NAME@ALIAS or NAME/VERSION."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name='{ref}'")
    if not versions:
        raise LookupError(f"no registered model named {ref!r}")
    return max(versions, key=lambda v: int(v.version))


def _dataset_origin(source_uri: str, depth: int) -> list[dict]:
    """What a vlit dataset version was made from, read from its manifest or summary:
    prepared corpora list their source files; a source file inside another vlit version
    (the alignment set's annotation.json) leads on to that version's own inputs."""
    if depth > 4:
        return []
    out = []
    manifest = storage.join(source_uri, "manifest.json")
    if storage.exists(manifest):
        m = storage.read_json(manifest)
        for src in m.get("sources", []):
            uri = src["uri"] if isinstance(src, dict) else src
            out.append({"source": uri, "from": _dataset_origin(storage.parent(uri), depth + 1)})
    summary = storage.join(source_uri, "summary.json")
    if not out and storage.exists(summary):
        settings = storage.read_json(summary).get("settings", {})
        for key in ("corpus", "sources", "responses"):
            values = settings.get(key)
            for uri in [values] if isinstance(values, str) else values or []:
                out.append({"source": uri, "from": _dataset_origin(uri, depth + 1)})
    return out


def chain(uri: str, ref: str) -> dict:
    """The lineage of model version `ref` as a nested dict (see module doc)."""
    client = tracking._client(uri)
    mv = _model_version(client, ref)
    run = client.get_run(mv.run_id)
    inputs = [{"name": d.dataset.name, "digest": d.dataset.digest,
               "uri": json.loads(d.dataset.source).get("uri", d.dataset.source) if d.dataset.source.startswith("{")
               else d.dataset.source}
              for d in run.inputs.dataset_inputs]
    for d in inputs:
        d["from"] = _dataset_origin(d["uri"], 0)
    return {"model": mv.name, "version": str(mv.version), "aliases": list(mv.aliases or []), "source": mv.source,
            "tags": dict(mv.tags),
            "run": {"id": run.info.run_id, "name": run.info.run_name, "stage": run.data.tags.get("vlit.stage"),
                    "parent": run.data.tags.get("mlflow.parentRunId"), "checkpoint": run.data.tags.get("vlit.checkpoint"),
                    "export": run.data.tags.get("vlit.export")},
            "inputs": inputs}


def format_chain(c: dict) -> str:
    aliases = f" (aliases: {', '.join(c['aliases'])})" if c["aliases"] else ""
    r = c["run"]
    lines = [f"model {c['model']} version {c['version']}{aliases}",
             f"  source      {c['source']}",
             f"  run         {r['id']} ({r['name']}, stage {r['stage']}, pipeline run {r['parent'] or '-'})",
             f"  checkpoint  {r['checkpoint']}"]

    def origin(items: list[dict], indent: str) -> None:
        for o in items:
            lines.append(f"{indent}<- {o['source']}")
            origin(o["from"], indent + "   ")

    for d in c["inputs"]:
        lines.append(f"  input       {d['name']} {d['digest']} {d['uri']}")
        origin(d["from"], "                ")
    return "\n".join(lines) + "\n"
