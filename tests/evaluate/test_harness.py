"""run_eval end to end on the untrained tiny model with a real MLflow store: metrics,
artifacts, eval-set lineage, forgetting deltas, gates that stop a stage with the reason,
promotion by registered-model alias, and the `vlit eval` command."""
import json

import pytest

from vlit.cli import main
from vlit.config import ConfigError, load_config
from vlit.evaluate.gates import GateFailed, gate_and_promote
from vlit.evaluate.harness import build_eval_sets, run_eval, score_predictions
from vlit.evaluate.report import log_comparison
from vlit import lineage

SMALL = ["eval.images=3", "eval.image_size=32", "eval.intro=false", "eval.batch_size=8"]


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config("configs/demo.yaml", [f"run.workdir={tmp_path}/work", f"corpus.out={tmp_path}/corpora",
                                             f"eval.out={tmp_path}/evals", *SMALL])


def _client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=lineage.tracking_uri(cfg))


def _new_run(cfg):
    import os

    os.makedirs(cfg.run.workdir, exist_ok=True)
    client = _client(cfg)
    experiment = client.create_experiment("eval-test")
    return client, client.create_run(experiment).info.run_id


def test_run_eval_logs_metrics_lineage_and_gates_promote(cfg, tmp_path):
    client, run_id = _new_run(cfg)
    sets = build_eval_sets(cfg)
    assert sorted(sets) == [f"synthetic.{s}" for s in ("circular", "forgetting", "mme", "pope", "tasks")]
    base = run_eval(cfg, None, sets, stage="base")
    after = run_eval(cfg, None, sets, stage="stage1", run_id=run_id, baseline=base)
    assert 0.0 <= base["synthetic.mme.acc_plus"] <= base["synthetic.mme.acc"] <= 1.0
    assert 0.0 <= base["synthetic.circular.accuracy"] <= 1.0
    assert {f"synthetic.{m}" for m in ("pope.random.f1", "pope.popular.f1", "pope.adversarial.f1",
                                       "forgetting.color.accuracy")} <= set(base)
    # The corpus's own tasks, each family's accuracy beside guessing among its choices.
    assert base["synthetic.tasks.object_counting.chance"] == pytest.approx(0.2)
    assert base["synthetic.tasks.object_existence.chance"] == 0.5
    assert 0.0 <= base["synthetic.tasks.accuracy"] <= 1.0 and 0.0 < base["synthetic.tasks.chance"] < 1.0
    # same model
    assert after["synthetic.forgetting.min_delta"] == 0.0 and after["synthetic.forgetting.color.delta"] == 0.0

    run = client.get_run(run_id)
    assert run.data.metrics["synthetic.mme.acc"] == after["synthetic.mme.acc"]
    assert run.data.metrics["synthetic.forgetting.min_delta"] == 0.0
    assert run.data.tags["vlit.eval.synthetic.mme.digest"] == sets["synthetic.mme"].digest
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs == {f"vlit-eval-{s}": es.digest for s, es in sets.items()}
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval/stage1")}
    assert {"eval/stage1/metrics.json", "eval/stage1/predictions-synthetic.pope.jsonl"} <= artifacts
    # The logged predictions are what was scored: MME's accuracy recomputed from them.
    logged = [json.loads(line) for line in open(client.download_artifacts(run_id, "eval/stage1/predictions-synthetic.mme.jsonl"))]
    by_task = {}
    for p in logged:
        by_task.setdefault(p["task"], []).append(p["prediction"] == p["answer"])
    assert after["synthetic.mme.acc"] == pytest.approx(sum(sum(v) / len(v) for v in by_task.values()) / len(by_task))
    # ... and so are the published prediction tables, re-scored without the model.
    tables = run.data.tags["vlit.eval.stage1.synthetic.mme.predictions"]
    assert score_predictions(tables) == {k: v for k, v in after.items() if k.startswith("synthetic.mme.")}

    # Gates: a failing gate stops the stage with the metric, its value and threshold, and
    # promotes nothing; passing gates move the alias to the model version.
    client.create_registered_model("tiny")
    version = client.create_model_version("tiny", source=str(tmp_path), run_id=run_id).version
    uri = lineage.tracking_uri(cfg)
    metric = "synthetic.mme.acc"
    acc, high = after[metric], after[metric] + 0.05
    with pytest.raises(GateFailed) as err:
        gate_and_promote(uri, after, {metric: high, "synthetic.pope.random.recall": -1.0}, stage="stage1",
                         model_name="tiny", version=version, alias="champion", run_id=run_id)
    assert err.value.reasons == [f"{metric} = {acc:.4f} is below its threshold {high:g}"]
    assert client.get_registered_model("tiny").aliases == {}
    assert client.get_run(run_id).data.tags["vlit.gate"] == "failed"
    gate_and_promote(uri, after, {metric: acc}, stage="stage1", model_name="tiny", version=version,
                     alias="champion", run_id=run_id)
    assert client.get_model_version_by_alias("tiny", "champion").version == version
    assert client.get_run(run_id).data.tags["vlit.gate"] == "passed"

    table = log_comparison(uri, run_id, {"base": base, "stage1": after})
    assert metric in table and json.loads(open(client.download_artifacts(run_id, "eval/comparison.json")).read())["base"] == base


def test_eval_section_is_required_and_validated(cfg):
    with pytest.raises(ConfigError, match="eval section"):
        run_eval(cfg.model_copy(update={"eval": None}), None)
    with pytest.raises(ConfigError, match="eval.first_image 3 lies inside the training pool"):
        load_config("configs/demo.yaml", ["eval.out=/x", "eval.first_image=3"])
    with pytest.raises(ConfigError, match="no suite 'mmx'"):
        load_config("configs/demo.yaml", ["eval.out=/x", "eval.gates={mmx.acc: 0.5}"])
    with pytest.raises(ConfigError, match="no suite 'synthetic.mmx'"):
        load_config("configs/demo.yaml", ["eval.out=/x", "eval.gates={synthetic.mmx.acc: 0.5}"])
    with pytest.raises(ConfigError, match="no suite 'mme'"):  # a benchmark that is not configured
        load_config("configs/demo.yaml", ["eval.out=/x", "eval.gates={mme.perception: 0.5}"])
    with pytest.raises(ConfigError, match="the tasks suite asks the synthetic corpus's own tasks"):
        load_config("configs/two_stage.yaml", ["eval.suites=[mme, tasks]", "eval.gates={}"])


def test_cli_sets_and_gate_exit_code(cfg, tmp_path, capsys):
    args = ["configs/demo.yaml", f"run.workdir={tmp_path}/work", f"eval.out={tmp_path}/evals", *SMALL,
            "eval.suites=[mme]", "eval.gates={}"]  # the demo's gates name other suites too
    assert main(["eval", "sets", *args]) == 0
    assert json.loads(capsys.readouterr().out)["synthetic.mme"]["rows"] == 3 * 4 * 2
    assert main(["eval", "run", *args]) == 0
    acc = json.loads(capsys.readouterr().out)["synthetic.mme.acc"]
    assert main(["eval", "run", *args, f"eval.gates={{synthetic.mme.acc: {acc}}}", "--gate"]) == 0
    capsys.readouterr()
    assert main(["eval", "run", *args, f"eval.gates={{synthetic.mme.acc: {acc + 0.05}}}", "--gate"]) == 3
    assert f"synthetic.mme.acc = {acc:.4f} is below its threshold {acc + 0.05:g}" in capsys.readouterr().err
