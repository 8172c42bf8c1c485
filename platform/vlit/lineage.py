"""Lineage in MLflow, from dataset version to registered model: the one module that
talks to MLflow.

The tracking URI comes from `MLFLOW_TRACKING_URI`, else `sqlite:///<run.workdir>/mlflow.db`
(made absolute, since Ray workers run elsewhere). Parameters are the run's config minus
`storage` and `ray` (addresses, not experiment settings); the config schema has no field
for credentials, so nothing logged can hold one.

    pipeline run (one per job invocation; tags: the job's stage keys and what it skipped)
      +- nested stage runs (corpus, sft1, align, sft2, dpo, eval): inputs as MLflow
         dataset inputs (name, digest = the version's content digest, source URI),
         outputs as `vlit.out.*` tags
    registered model <name>-<stage>, one version per training run, made from the HF
    export's LoggedModel (an external model of the stage's run; source models:/<id>,
    tag vlit.export), tags = the run, checkpoint and input dataset digests; the
    `eval.alias` alias marks the version that passed its gates

`chain(uri, "demo-sft2@champion")` walks it back: model version -> run -> checkpoint ->
input dataset versions -> their sources (and, for versions vlit made, their own inputs).
"""
from __future__ import annotations

import json
import os
import re
import time

from vlit import storage
from vlit.config import Config

_UNSAFE = re.compile(r"[^\w./\- :]")  # MLflow metric and param names allow only these
# The kind of experiment vlit's are: MLflow 3 UIs open an experiment by it (on the runs,
# not the GenAI overview where training runs sit under "Evaluation runs"); 3.17's UI,
# whose GenAI / Model training switch overrides it, needs `ui_path`'s URL as well.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(cfg: Config) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(cfg.run.workdir)}/mlflow.db"


def check_reachable(uri: str) -> None:
    """Fail fast, naming the URI, when a tracking server (http[s]://) does not answer its
    health check: the job checks it before its first stage, so no stage trains and then
    fails to register. Database URIs are opened by the first call that needs them."""
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
            r.read()
    except OSError as e:
        raise storage.Unreachable(f"cannot reach the MLflow tracking server {uri}: {e}") from None


def _client(uri: str):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # it would otherwise try to reach the internet
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def experiment_id(cfg: Config) -> tuple[str, str]:
    """(tracking URI, id of experiment `run.name`, created when missing)."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
    client = _client(uri)
    experiment = client.get_experiment_by_name(cfg.run.name)
    if experiment:
        if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # made before vlit tagged its experiments
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return uri, experiment.experiment_id
    # With the default sqlite store, artifacts go beside it (MLflow's default is ./mlruns
    # of whatever folder the job started in); a server decides for itself.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else \
        "file://" + os.path.join(os.path.abspath(cfg.run.workdir), "mlartifacts")
    return uri, client.create_experiment(cfg.run.name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def ui_path(experiment: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment's runs table (or of one run), after its
    server's address. MLflow 3.17's UI ignores the experiment kind tag when its
    GenAI / Model training switch is shown (always, in 3.17) and opens on GenAI unless the
    URL or the browser's last choice says otherwise: this URL says so."""
    return f"/#/experiments/{experiment}" + (f"/runs/{run_id}" if run_id else "") + "?workflowType=machine_learning"


def log_params(uri: str, run_id: str, cfg: Config, extra: dict | None = None) -> None:
    """The config as params, minus `storage` and `ray` (addresses, not experiment settings),
    plus the object-store retry policy the run's reads and writes went through."""
    from mlflow.entities import Param

    params = {**_flatten(cfg.model_dump(mode="json", exclude={"storage", "ray"})),
              **{f"storage.{k}": v for k, v in storage.retry_settings().items()}, **(extra or {})}
    # MLflow caps a batch at 100 params.
    items = [Param(_UNSAFE.sub("_", k), str(v)[:6000]) for k, v in sorted(params.items())]
    client = _client(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def start_run(cfg: Config, version, parent_run_id: str | None = None, stage: str = "sft",
              data: str = "corpus") -> dict:
    """A training stage's run in experiment `run.name`: the config as params, its input
    `version` (a corpus or pairs version, named `data`) as a dataset input and tags; nested
    under `parent_run_id` (the pipeline's run) when given."""
    uri, experiment = experiment_id(cfg)
    client = _client(uri)
    tags = {"vlit.stage": stage, f"vlit.{data}.digest": version.digest, f"vlit.{data}.version": version.uri}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment, run_name=f"{stage}-{os.path.basename(cfg.train.output.rstrip('/'))}", tags=tags)
    log_params(uri, run.info.run_id, cfg, {f"{data}.version": version.uri})
    client.log_inputs(run.info.run_id, datasets=[dataset_input(data, version.digest, version.uri)])
    return {"uri": uri, "run_id": run.info.run_id}


def dataset_input(name: str, digest: str, uri: str, context: str = "training"):
    """An MLflow dataset input naming a vlit dataset version by its content digest: the
    first link of the lineage from data to checkpoint."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = "s3" if uri.startswith("s3://") else "local"
    dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps({"uri": uri}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


class StepLogger:
    """Rank 0's per-step metrics, written in batches (`flush`, on the loop's reporting
    cadence) and asynchronously: a database write per step takes CPU from the step."""

    def __init__(self, run: dict):
        self.client, self.run_id = _client(run["uri"]), run["run_id"]
        self.pending = []

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(_UNSAFE.sub("_", k), float(v), now, step) for k, v in metrics.items() if k != "step"]

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending, synchronous=False)
            self.pending = []

    def close(self) -> None:
        import mlflow

        self.flush()
        mlflow.flush_async_logging()


def log_audit(run: dict, audit: dict) -> None:
    """The stage's supervision audit: `supervision_audit.json` plus its counts as metrics."""
    _client(run["uri"]).log_dict(run["run_id"], audit, "supervision_audit.json")
    log_eval(run, {"audit/zero_supervised_rows": audit["zero_supervised_rows"],
                   **{f"audit/quarantined/{k}": v for k, v in audit["quarantined"].items()},
                   **{f"audit/supervised_tokens/{k}": v for k, v in audit["supervised_tokens"].items()}})


def finish_run(run: dict, summary: dict) -> None:
    """Close the stage's run with where its export and checkpoint are."""
    client = _client(run["uri"])
    for key in ("export", "checkpoint", "corpus"):
        client.set_tag(run["run_id"], f"vlit.{key}", str(summary[key]))
    client.set_terminated(run["run_id"])


# ---- evaluation (vlit/evaluate): results and eval-set lineage on a stage's run, promotion

def log_eval(run: dict, metrics: dict | None = None, *, step: int = 0, texts: dict | None = None,
             tags: dict | None = None, datasets: list[dict] | None = None) -> None:
    """Evaluation results on `run`: metrics at `step`, text artifacts (path -> text), tags,
    and the evaluation sets as MLflow dataset inputs ({name, digest, source}), so the run
    names the exact questions it was scored on."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunTag

    client = _client(run["uri"])
    now = int(time.time() * 1000)
    client.log_batch(run["run_id"], metrics=[Metric(_UNSAFE.sub("_", k), float(v), now, step) for k, v in (metrics or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    for path, text in (texts or {}).items():
        client.log_text(run["run_id"], text, path)
    if datasets:
        context = [InputTag("mlflow.data.context", "eval")]
        client.log_inputs(run["run_id"], [DatasetInput(Dataset(d["name"], d["digest"], "vlit-eval", d["source"]), context)
                                          for d in datasets])


def metric_history(run: dict, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """Each of `keys`' (step, value) points on `run`, by step (absent keys: none)."""
    client = _client(run["uri"])
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run["run_id"], k)) for k in keys}


def set_model_alias(uri: str, name: str, version, alias: str) -> None:
    """Point registered model `name`'s `alias` at `version` (promotion)."""
    _client(uri).set_registered_model_alias(name, alias, str(version))


# ---- the job's runs, the registry and the chain back from a model version

def start_pipeline(cfg: Config, key: str) -> dict:
    """The job's parent run in experiment `run.name`, with the config as params."""
    uri, experiment = experiment_id(cfg)
    client = _client(uri)
    run = client.create_run(experiment, run_name=f"two_stage-{key[:8]}",
                            tags={"vlit.stage": "pipeline", "vlit.pipeline.key": key})
    log_params(uri, run.info.run_id, cfg)
    return {"uri": uri, "run_id": run.info.run_id}


def start_stage(cfg: Config, parent: dict, stage: str, key: str, inputs: list[tuple[str, str, str]],
                context: str = "training") -> dict:
    """A nested run for a stage the job runs itself (corpus, align, eval); `inputs`:
    (name, digest, uri) of each dataset version it reads."""
    client = _client(parent["uri"])
    run = client.create_run(client.get_run(parent["run_id"]).info.experiment_id, run_name=f"{stage}-{key[:8]}",
                            tags={"mlflow.parentRunId": parent["run_id"], "vlit.stage": stage, "vlit.stage.key": key})
    if inputs:
        client.log_inputs(run.info.run_id, datasets=[dataset_input(n, d, u, context) for n, d, u in inputs])
    return {"uri": parent["uri"], "run_id": run.info.run_id}


def set_tags(run: dict, tags: dict) -> None:
    from mlflow.entities import RunTag

    _client(run["uri"]).log_batch(run["run_id"], tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_text(run: dict, text: str, path: str) -> None:
    _client(run["uri"]).log_text(run["run_id"], text, path)


def log_files(run: dict, folder: str, path: str) -> None:
    """A local folder's files as the run's artifacts under `path` (an s3:// folder stays
    where it is: its URI is in the run's tags)."""
    if not storage.is_s3(folder):
        _client(run["uri"]).log_artifacts(run["run_id"], folder, path)


def finish(run: dict, status: str = "FINISHED") -> None:
    _client(run["uri"]).set_terminated(run["run_id"], status=status)


def log_model(uri: str, name: str, source: str, run_id: str, tags: dict) -> str:
    """The export as an MLflow LoggedModel of `run_id` (its weights stay at `source`: an
    external model, whose MLmodel file only points there); returns its model id. The run
    page lists it under "Logged models", and its page links back to the run."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    client = _client(uri)
    mlflow.set_tracking_uri(uri)  # create_external_model talks to the default client
    model = mlflow.create_external_model(name=name, source_run_id=run_id, model_type="hf-export",
                                         experiment_id=client.get_run(run_id).info.experiment_id,
                                         tags={"vlit.export": storage.normalize(source),
                                               **{k: str(v) for k, v in tags.items()}})
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def register_model(uri: str, name: str, source: str, run_id: str, tags: dict) -> str:
    """A new version of registered model `name` made from the export's LoggedModel
    (`log_model`), so the version, model and run pages link up; returns it."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = _client(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = log_model(uri, name, source, run_id, tags)
    # As mlflow.register_model("models:/<id>") does, without its prints: the version's
    # source names the LoggedModel (the UI links the two through it; the export's URI is
    # the version's vlit.export tag), and the model lists its versions in a tag.
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                          tags={"vlit.export": storage.normalize(source),
                                                **{k: str(v) for k, v in tags.items()}})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
        [{"name": name, "version": version.version}])})
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
            # A source is a file in a version's folder, or a version itself (the corpus a
            # responses version's prompts came from).
            folder = uri if storage.exists(storage.join(uri, "manifest.json")) else storage.parent(uri)
            out.append({"source": uri, "from": _dataset_origin(folder, depth + 1)})
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
    client = _client(uri)
    mv = _model_version(client, ref)
    run = client.get_run(mv.run_id)
    inputs = [{"name": d.dataset.name, "digest": d.dataset.digest,
               "uri": json.loads(d.dataset.source).get("uri", d.dataset.source) if d.dataset.source.startswith("{")
               else d.dataset.source}
              for d in run.inputs.dataset_inputs]
    for d in inputs:
        d["from"] = _dataset_origin(d["uri"], 0)
    return {"model": mv.name, "version": str(mv.version), "aliases": list(mv.aliases or []),
            "source": mv.tags.get("vlit.export", mv.source),
            "logged_model": mv.source if mv.source.startswith("models:/") else None,
            "tags": dict(mv.tags),
            "run": {"id": run.info.run_id, "name": run.info.run_name, "stage": run.data.tags.get("vlit.stage"),
                    "parent": run.data.tags.get("mlflow.parentRunId"), "checkpoint": run.data.tags.get("vlit.checkpoint"),
                    "export": run.data.tags.get("vlit.export")},
            "inputs": inputs}


def format_chain(c: dict) -> str:
    aliases = f" (aliases: {', '.join(c['aliases'])})" if c["aliases"] else ""
    r = c["run"]
    lines = [f"model {c['model']} version {c['version']}{aliases}",
             f"  source      {c['source']}" + (f" ({c['logged_model']})" if c["logged_model"] else ""),
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
