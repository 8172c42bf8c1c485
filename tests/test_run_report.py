"""The run report and the MLflow UI as a person sees them, in headless Chromium: a job's
record made of real lineage calls (no Ray: a training stage's run with its step metrics,
its evaluation, its export registered through a LoggedModel), its report's charts and
numbers, `vlit report`, and the run, model and experiment pages of `mlflow server`.
The two-stage job's own report is checked in test_two_stage.py."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from support.browser import MlflowServer, needs_chromium, page

FAMILIES = {"object_counting": (0.2, 0.25, 0.75), "color_identification": (1 / 6, 0.0, 0.5)}  # chance, base, sft1


def _tasks_metrics(i: int) -> dict:
    m = {}
    for family, values in FAMILIES.items():
        m[f"synthetic.tasks.{family}.chance"] = values[0]
        m[f"synthetic.tasks.{family}.accuracy"] = values[1 + i]
    m["synthetic.tasks.accuracy"] = sum(m[f"synthetic.tasks.{f}.accuracy"] for f in FAMILIES) / len(FAMILIES)
    m["synthetic.tasks.chance"] = sum(v[0] for v in FAMILIES.values()) / len(FAMILIES)
    return m


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """What a one-stage job records: its parent run, an SFT run with 12 steps of loss and
    lr, evaluations of the base model and the stage, the export registered; job.json and
    the report written by run_report."""
    from train.train_helpers import config, corpus

    from vlit import lineage, run_report
    from vlit.ledger import stage_key
    from vlit.two_stage import TwoStageJob

    tmp = tmp_path_factory.mktemp("report")
    version = corpus(str(tmp / "data"), instances=40)
    cfg = config(str(tmp), version, name="report-test")
    cfg = cfg.model_validate({**cfg.model_dump(mode="json"), "pipeline": {"out": str(tmp / "jobs"), "stages": ["sft1"]}})
    key = stage_key("pipeline", {}, {"test": 1})
    parent = lineage.start_pipeline(cfg, key)
    run = lineage.start_run(cfg, version, parent["run_id"], stage="sft")
    steps = lineage.StepLogger(run)
    for step in range(1, 13):
        steps.log({"loss": 3.0 * math.exp(-step / 5), "lr": 1e-3 * min(1.0, step / 4)}, step)
    steps.close()
    export = tmp / "sft1" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    lineage.finish_run(run, {"export": str(export), "checkpoint": str(tmp / "sft1" / "ckpt"), "corpus": version.uri})
    lineage.log_eval(run, _tasks_metrics(1))
    model_version = lineage.register_model(lineage.tracking_uri(cfg), "report-test-sft1", str(export), run["run_id"],
                                           {"vlit.input.digest": version.digest})
    lineage.finish(parent)
    stages = {"corpus": {"version": version.uri, "digest": version.digest, "rows": version.rows},
              "base": {"metrics": _tasks_metrics(0)},
              "sft1": {"export": str(export), "steps": 12, "loss": 3.0 * math.exp(-12 / 5), "mlflow_run_id": run["run_id"],
                       "model_name": "report-test-sft1", "model_version": model_version, "data": version.uri,
                       "data_digest": version.digest, "rows": version.rows, "metrics": _tasks_metrics(1)}}
    job = TwoStageJob(cfg)
    job.done = stages
    summary = {"pipeline_run_id": parent["run_id"], "ran": ["corpus", "eval_base", "sft1", "eval_sft1"], "skipped": [],
               "stages": stages, "seconds": 42, "table": job.table(), "job_key": key,
               "tracking_uri": lineage.tracking_uri(cfg), "mlflow_ui": "mlflow ui"}
    report = run_report.write_job_report(cfg.pipeline.out, summary)
    return {"tmp": tmp, "cfg": cfg, "summary": summary, "report": report, "run": run, "version": version,
            "model_version": model_version}


@needs_chromium
@pytest.mark.timeout(300)
def test_report_shows_its_charts_and_the_jobs_numbers(recorded):
    from mlflow.tracking import MlflowClient

    shot = recorded["tmp"] / "report.png"
    dom = page(Path(recorded["report"]).as_uri(), shot)
    # Every chart decoded with a size (counted by the page's script): training curves
    # and held-out accuracy per family.
    charts = re.search(r'data-charts-rendered="(\d+)" data-charts="(\d+)"', dom)
    assert charts and charts.group(1) == charts.group(2) and int(charts.group(1)) == 2, dom[:2000]
    for title in ("Stages", "Training", "Held-out accuracy per family", "Lineage"):
        assert f"<h2>{title}</h2>" in dom
    assert "Alignment set" not in dom and "<h2>DPO</h2>" not in dom  # no such stage ran
    # The table's numbers, as the job printed them: loss and per-family accuracy.
    s = recorded["summary"]
    assert f"{s['stages']['sft1']['loss']:.4f}" in dom
    family = next(l for l in dom.splitlines() if l.startswith("object_counting"))
    assert family.split() == ["object_counting", "0.200", "0.250", "0.750"]
    # The lineage chain: model version -> run -> input corpus digest.
    assert f"model report-test-sft1 version {recorded['model_version']}" in dom
    assert recorded["version"].digest in dom
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    client = MlflowClient(tracking_uri=s["tracking_uri"])
    assert "report.html" in [a.path for a in client.list_artifacts(s["pipeline_run_id"])]


def test_vlit_report_rebuilds_the_report(recorded, capsys):
    from vlit.cli import main

    report = Path(recorded["report"])
    report.unlink()
    assert main(["report", str(report.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(report)
    assert "Held-out accuracy per family" in report.read_text()
    assert main(["report", str(recorded["tmp"])]) == 2  # no job.json there


@needs_chromium
@pytest.mark.timeout(300)
def test_mlflow_ui_opens_on_the_runs_and_the_run_page_shows_its_data_and_model(recorded):
    from mlflow.tracking import MlflowClient

    from vlit import lineage

    cfg, run = recorded["cfg"], recorded["run"]
    client = MlflowClient(tracking_uri=run["uri"])
    experiment = client.get_experiment_by_name(cfg.run.name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The export is a LoggedModel of the run, and the registered version is made from it.
    [model] = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert model.source_run_id == run["run_id"] and model.name == "report-test-sft1"
    mv = client.get_model_version("report-test-sft1", recorded["model_version"])
    assert mv.source == f"models:/{model.model_id}" and mv.run_id == run["run_id"]
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "report-test-sft1", "version": mv.version}]
    assert model.tags["vlit.export"] == mv.tags["vlit.export"] == recorded["summary"]["stages"]["sft1"]["export"]

    db = run["uri"][len("sqlite:///"):]
    with MlflowServer(db, str(recorded["tmp"] / "artifacts")) as server:
        exp, tmp = experiment.experiment_id, recorded["tmp"]
        dom = page(server.url + lineage.ui_path(exp, run["run_id"]), tmp / "run.png")
        # The run's dataset (name and digest), its registered version and its logged model.
        assert "corpus" in dom and recorded["version"].digest in dom, dom[-3000:]
        assert "Logged models (1)" in dom and "report-test-sft1" in dom, dom[-3000:]
        # The experiment opens on its runs table (the job's run, its stage's run nested
        # under it), not the GenAI overview.
        experiment_page = page(server.url + lineage.ui_path(exp), tmp / "experiment.png")
        job_run = f"two_stage-{recorded['summary']['job_key'][:8]}"
        assert job_run in experiment_page and "matching runs" in experiment_page, experiment_page[-3000:]
        # The version page names the run it came from.
        version_page = page(f"{server.url}/#/models/report-test-sft1/versions/{mv.version}", tmp / "version.png")
        assert "sft-report-test" in version_page or run["run_id"] in version_page, version_page[-3000:]

