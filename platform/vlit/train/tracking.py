"""MLflow for training stages: the driver opens one run per stage, rank 0 appends metrics.

The tracking URI comes from `MLFLOW_TRACKING_URI`, else `sqlite:///<run.workdir>/mlflow.db`
(made absolute, since Ray workers run elsewhere). Parameters are the run's config minus
`storage` and `ray` (addresses, not experiment settings); the config schema has no field
for credentials, so nothing logged can hold one.
"""
from __future__ import annotations

import os
import re
import time

from vlit.config import Config

_UNSAFE = re.compile(r"[^\w./\- :]")  # MLflow metric and param names allow only these


def tracking_uri(cfg: Config) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(cfg.run.workdir)}/mlflow.db"


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
        return uri, experiment.experiment_id
    # With the default sqlite store, artifacts go beside it (MLflow's default is ./mlruns
    # of whatever folder the job started in); a server decides for itself.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else \
        "file://" + os.path.join(os.path.abspath(cfg.run.workdir), "mlartifacts")
    return uri, client.create_experiment(cfg.run.name, artifact_location=location)


def log_params(uri: str, run_id: str, cfg: Config, extra: dict | None = None) -> None:
    """The config as params, minus `storage` and `ray` (addresses, not experiment settings),
    plus the object-store retry policy the run's reads and writes went through."""
    from mlflow.entities import Param

    from vlit import storage

    params = {**_flatten(cfg.model_dump(mode="json", exclude={"storage", "ray"})),
              **{f"storage.{k}": v for k, v in storage.retry_settings().items()}, **(extra or {})}
    # MLflow caps a batch at 100 params.
    items = [Param(_UNSAFE.sub("_", k), str(v)[:6000]) for k, v in sorted(params.items())]
    client = _client(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def start_run(cfg: Config, version, parent_run_id: str | None = None) -> dict:
    """A new run in experiment `run.name`, with the config and corpus version as params;
    nested under `parent_run_id` (the pipeline's run) when given."""
    uri, experiment = experiment_id(cfg)
    client = _client(uri)
    tags = {"vlit.stage": "sft", "vlit.corpus.digest": version.digest}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment, run_name=f"sft-{os.path.basename(cfg.train.output.rstrip('/'))}", tags=tags)
    log_params(uri, run.info.run_id, cfg, {"corpus.version": version.uri})
    client.log_inputs(run.info.run_id, datasets=[dataset_input("corpus", version.digest, version.uri)])
    return {"uri": uri, "run_id": run.info.run_id}


def dataset_input(name: str, digest: str, uri: str, context: str = "training"):
    """An MLflow dataset input naming a vlit dataset version by its content digest: the
    first link of the lineage from data to checkpoint."""
    import json

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
    client = _client(run["uri"])
    client.log_dict(run["run_id"], audit, "supervision_audit.json")
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    counts = {"audit/zero_supervised_rows": audit["zero_supervised_rows"],
              **{f"audit/quarantined/{k}": v for k, v in audit["quarantined"].items()},
              **{f"audit/supervised_tokens/{k}": v for k, v in audit["supervised_tokens"].items()}}
    client.log_batch(run["run_id"], metrics=[Metric(_UNSAFE.sub("_", k), float(v), now, 0) for k, v in counts.items()])


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


def set_model_alias(uri: str, name: str, version, alias: str) -> None:
    """Point registered model `name`'s `alias` at `version` (promotion)."""
    _client(uri).set_registered_model_alias(name, alias, str(version))
