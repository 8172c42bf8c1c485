"""The two-stage job end to end on small sizes, as a user runs it: directly (embedded Ray)
and through `ray job submit` to a `ray start --head` cluster on this machine. Checks the
stages and their MLflow lineage through the client, the registry and `vlit lineage`, that
a re-run skips every stage, and that a failing gate stops the job with its reason."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.jobs import job_summary
from support.s3 import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def workdir(tmp: Path) -> Path:
    """A short folder for Ray's sockets (paths max out at ~107 chars) and MLflow's db,
    one per `tmp`, linked from it so a test finds it again."""
    link = tmp / "work"
    if not link.exists():
        link.symlink_to(tempfile.mkdtemp(prefix="vlit-", dir="/tmp"))
    return link.resolve()


def small(tmp: Path, stages: str = "[sft1,align,sft2]") -> list[str]:
    """The demo config at test size, everything under `tmp`."""
    return [
        f"run.workdir={workdir(tmp)}", f"corpus.out={tmp}/store/corpora", f"pipeline.out={tmp}/store/jobs",
        f"loops.out={tmp}/store/synth", f"eval.out={tmp}/store/evals", f"serve.images.uri_roots=[{tmp}/store]",
        f"pipeline.stages={stages}",
        "corpus.synth.instances=160", "corpus.synth.tasks=8", "corpus.synth.image_pool=32",
        "train.max_steps=4", "train.checkpoint_every=2", "train.num_workers=1",
        "pipeline.overrides.sft2={train.max_steps: 2, train.materialize: true, train.micro_batch_size: 1}",
        "pipeline.overrides.dpo={train.max_steps: 2}",
        "loops.feedback.prompts=12", "loops.alignment.size=8",
        "eval.images=2", "eval.batch_size=8", "eval.gates={synthetic.mme.acc: 0.0}",
        f"dpo.pairs_out={tmp}/store/pairs", f"dpo.cache={tmp}/store/reference_cache",
        f"serve.http.port={free_port()}",
    ]


# Stand-ins for real keys in the job's environment: no log, MLflow param, tag or artifact,
# summary, manifest or quarantine file may contain them (checked below).
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAVLITSENTINEL0001", "AWS_SECRET_ACCESS_KEY": "vlit-sentinel-secret-0002",
           "OPENAI_API_KEY": "sk-vlit-sentinel-0003"}


def job_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    return {**env, **SECRETS}


ALL_STAGES = "pipeline.stages=[sft1,align,sft2,dpo]"


def run_job(tmp: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "jobs/two_stage.py", "--config", "configs/demo.yaml", *small(tmp), *extra]
    return subprocess.run(cmd, cwd=REPO, env=job_env(tmp), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_stage")
    r = run_job(tmp, ALL_STAGES)
    assert r.returncode == 0, r.stderr[-6000:] + r.stdout[-3000:]
    return {"tmp": tmp, "first": r, "summary": job_summary(r.stdout),
            "uri": f"sqlite:///{workdir(tmp)}/mlflow.db"}


@pytest.mark.timeout(900)
def test_job_runs_every_stage_and_prints_its_table(job):
    s, out = job["summary"], job["first"].stdout
    assert s["ran"] == ["corpus", "eval_base", "sft1", "eval_sft1", "align", "sft2", "eval_sft2", "dpo", "eval_dpo"]
    assert s["skipped"] == []
    stages = s["stages"]
    # Stage 2 trains on the alignment set, prepared as its own corpus version, from stage 1's export.
    assert stages["sft2"]["data_digest"] == stages["align"]["digest"] != stages["corpus"]["digest"]
    assert 0 < stages["align"]["rows"] <= 8
    # The table: one line per stage with its data version, rows, loss and accuracies.
    for stage in ("sft1", "sft2", "dpo"):
        line = next(l for l in out.splitlines() if l.startswith(stage + " "))
        assert stages[stage]["data_digest"][:12] in line and re.search(r"\d\.\d{3}", line)
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    # Ray Train's per-report log (every report's whole metrics dict) is kept out of the output.
    assert "Reporting training result" not in out + job["first"].stderr


@pytest.mark.timeout(900)
def test_job_shows_progress_quietly_and_ends_with_its_tables_and_report(job):
    from support.browser import CHROMIUM, page

    s, out, err = job["summary"], job["first"].stdout, job["first"].stderr
    # Progress: the job's stage n of m, and training steps (rank 0's plain lines through
    # Ray's log forwarding; this size's evaluations end before a progress interval).
    assert "[vlit sft1] running (stage 3/9, key" in out and "[vlit eval_dpo] running (stage 9/9, key" in out
    assert re.search(r"\[vlit sft\] \d+/4 steps \(\d+%\) loss \d\.\d{3} tokens/s \d", out), out[-3000:]
    # Quiet: none of the known-harmless lines (vlit.runtime.HARMLESS), in either stream.
    for noise in ("PlacementGroupCleaner", "PYTHON worker processes have been started", "Setting accelerator to CPU",
                  "FutureWarning", "Processing zero checkpoint", "Loading weights:"):
        assert noise not in out + err, [line for line in (out + err).splitlines() if noise in line][:3]
    # The output ends with the tables, where the report is and how to open the runs.
    tail = out.rstrip().splitlines()[-3:]
    assert tail[0].startswith("[vlit report] ") and tail[1].startswith("[vlit done] ") or \
        tail[1].startswith("[vlit report] ") and tail[2].startswith("[vlit done] "), tail
    assert s["report"] == str(job["tmp"] / "store" / "jobs" / "report.html") and os.path.exists(s["report"])
    assert f"[vlit report] {s['report']}" in out
    assert "?workflowType=machine_learning" in out  # the runs table, not MLflow's GenAI overview
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make setup` installs it)")
    dom = page(Path(s["report"]).as_uri(), job["tmp"] / "report.png")
    # Training, held-out accuracy per family, the alignment set's two pictures, DPO.
    assert 'data-charts-rendered="5" data-charts="5"' in dom, dom[:3000]
    for title in ("Stages", "Training", "Held-out accuracy per family", "Alignment set", "DPO", "Lineage"):
        assert f"<h2>{title}</h2>" in dom
    dpo = s["stages"]["dpo"]
    assert f"reward accuracy {dpo['reward_accuracy']:.3f}" in dom and f"{dpo['loss']:.4f}" in dom
    assert "model demo-sft2 version 1" in dom and s["stages"]["align"]["digest"] in dom
    assert dom.index("model demo-sft1 ") < dom.index("model demo-sft2 ") < dom.index("model demo-dpo ")  # job order


@pytest.mark.timeout(900)
def test_lineage_in_mlflow_from_dataset_version_to_model(job):
    from mlflow.tracking import MlflowClient

    from vlit.cli import main

    s, client = job["summary"], MlflowClient(tracking_uri=job["uri"])
    parent = client.get_run(s["pipeline_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["vlit.stages.skipped"] == "-"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["vlit.stage"] for r in children) == ["align", "corpus", "dpo", "eval-base", "sft", "sft"]
    stages = s["stages"]
    for stage, data in (("sft1", "corpus"), ("sft2", "align")):
        run = client.get_run(stages[stage]["mlflow_run_id"])
        assert [d.dataset.digest for d in run.inputs.dataset_inputs if d.dataset.name == "corpus"] == \
            [stages[data]["digest"]]
        metric = "synthetic.mme.acc"
        assert run.data.metrics[metric] == stages[stage]["metrics"][metric]  # evaluated on its own run
        mv = client.get_model_version(f"demo-{stage}", stages[stage]["model_version"])
        # Registered from the export's LoggedModel, which the run lists among its outputs.
        assert mv.run_id == run.info.run_id and mv.tags["vlit.export"] == stages[stage]["export"]
        assert mv.source.startswith("models:/m-") and mv.source[len("models:/"):] in \
            [o.model_id for o in run.outputs.model_outputs]
        assert mv.tags["vlit.input.digest"] == stages[data]["digest"] and mv.tags["vlit.checkpoint"]
        # Gates (synthetic.mme.acc >= 0) passed: the version carries the alias.
        assert client.get_model_version_by_alias(f"demo-{stage}", "champion").version == mv.version

    chain_json = job["tmp"] / "chain.json"
    with open(chain_json, "w") as f:
        import contextlib

        with contextlib.redirect_stdout(f):
            assert main(["lineage", "demo-sft2@champion", "--tracking-uri", job["uri"], "--json"]) == 0
    chain = json.loads(chain_json.read_text())
    assert chain["run"]["id"] == stages["sft2"]["mlflow_run_id"] and chain["run"]["parent"] == s["pipeline_run_id"]
    corpus_input = next(d for d in chain["inputs"] if d["name"] == "corpus")
    assert corpus_input["digest"] == stages["align"]["digest"]
    # stage-2 corpus <- the alignment set's annotation.json <- the stage-1 corpus and the judged responses
    alignment = corpus_input["from"][0]
    assert alignment["source"] == f"{stages['align']['alignment']}/annotation.json"
    assert stages["corpus"]["version"] in [o["source"] for o in alignment["from"]]
    assert main(["lineage", "demo-nosuch", "--tracking-uri", job["uri"]]) == 2


@pytest.mark.timeout(300)
def test_dpo_trains_on_pairs_from_the_align_stage_judged_responses(job, capsys):
    """model version -> pairs version -> the align stage's judged responses -> the corpus."""
    from vlit.cli import main
    from vlit.versions import PairsVersion

    stages = job["summary"]["stages"]
    pairs = PairsVersion.open(stages["dpo"]["data"])
    responses = stages["align"]["responses"]
    assert pairs.manifest["responses"] == responses and pairs.manifest["judge"] == "reference"
    assert pairs.manifest["generators"] == ["tiny", "oracle"] and pairs.rows > 0
    # The demo's judge rates two aspects: pairs by their mean, ethics null in the ratings.
    assert pairs.manifest["aspects"] == ["Helpfulness", "Visual Faithfulness"]
    chosen = pairs.read_table().to_pylist()[0]
    assert chosen["chosen_ratings"][2] is None and chosen["chosen_score"] > chosen["rejected_score"]
    assert 0.0 <= stages["dpo"]["reward_accuracy"] <= 1.0
    line = next(l for l in job["first"].stdout.splitlines() if l.startswith("dpo "))
    assert f"{stages['dpo']['reward_accuracy']:.3f}" in line

    assert main(["lineage", "demo-dpo@champion", "--tracking-uri", job["uri"], "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    pairs_input = next(d for d in chain["inputs"] if d["name"] == "pairs")
    assert pairs_input["digest"] == pairs.digest
    (jsonl,) = pairs_input["from"]
    assert jsonl["source"] == f"{responses}/responses.jsonl"
    assert [o["source"] for o in jsonl["from"]] == [stages["corpus"]["version"]]


@pytest.mark.timeout(900)
def test_rerun_skips_every_stage_and_a_failing_gate_stops_the_job(job):
    from mlflow.tracking import MlflowClient

    again = run_job(job["tmp"], ALL_STAGES)
    assert again.returncode == 0, again.stderr[-4000:]
    s = job_summary(again.stdout)
    assert s["ran"] == [] and len(s["skipped"]) == 9
    assert again.stdout.count("skipped: finished") == 9
    client = MlflowClient(tracking_uri=job["uri"])
    assert len(client.search_model_versions("name='demo-sft1'")) == 1  # nothing retrained or re-registered

    # Same stages (all skipped), a gate no model passes: exit 3 with the metric, value and
    # threshold; the stage's run records the verdict.
    failed = run_job(job["tmp"], ALL_STAGES, "eval.gates={synthetic.mme.acc: 1.01}")
    assert failed.returncode == 3
    assert "stage sft1 failed its evaluation gates: synthetic.mme.acc = " in failed.stderr and "threshold 1.01" in failed.stderr
    run = client.get_run(job["summary"]["stages"]["sft1"]["mlflow_run_id"])
    assert run.data.tags["vlit.gate"] == "failed"


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_job_on_a_started_cluster(tmp_path):
    ray = str(VENV_BIN / "ray")
    gcs, dashboard = free_port(), free_port()
    env = job_env(tmp_path)
    # `ray start` turns on Ray's token auth (the token in ~/.ray/auth_token); the job CLI
    # sends it only in token mode.
    env["RAY_AUTH_MODE"] = "token"
    raytmp = tempfile.mkdtemp(prefix="vlit-ray-", dir="/tmp")  # short: socket paths
    start = [ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             "--node-ip-address=127.0.0.1", "--num-cpus=6", "--include-dashboard=true", "--disable-usage-stats",
             f"--temp-dir={raytmp}", "--object-store-memory=600000000",
             # Free ports for the node's agents: the defaults (52365, ...) may be held by
             # another Ray on the machine, and the job agent then never registers.
             *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "metrics-export-port", "runtime-env-agent-port",
                                                      "ray-client-server-port"))]
    # --block: the head's processes live in this process's group and go with it, so the
    # test stops its own cluster only (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen([*start, "--block"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while subprocess.run([ray, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"], env=env,
                         capture_output=True, timeout=60).returncode != 0:
        assert time.monotonic() < deadline and head.poll() is None, "ray start --head did not come up"
        time.sleep(2)
    try:
        submit = [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".", "--",
                  "python", "jobs/two_stage.py", "--config", "configs/demo.yaml",
                  # Stage 1 only: the job's whole path (driver on the cluster, Ray Train,
                  # evaluation, MLflow, registry) runs; the other stages run in the direct test.
                  *small(tmp_path, "[sft1]")]
        for _ in range(30):  # the head answers before its node's job agent has registered
            r = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=780)
            if "No available agent to submit job" not in r.stderr:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout
        assert '"ran": [\n    "corpus"' in r.stdout or '"ran": ["corpus"' in r.stdout
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{workdir(tmp_path)}/mlflow.db")
        assert str(client.get_model_version_by_alias("demo-sft1", "champion").version) == "1"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_no_secret_reaches_logs_mlflow_or_outputs(job):
    """Every file the job wrote (stores, ledger, quarantines, manifests, MLflow's database
    with params, tags and artifacts, Ray's logs) and everything it printed."""
    seen = [job["first"].stdout, job["first"].stderr]
    files = 0
    for root in (job["tmp"], workdir(job["tmp"])):
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink() and not path.is_socket():
                seen.append(path.read_bytes().decode("latin-1"))
                files += 1
    assert files > 100
    for name, value in SECRETS.items():
        assert not [i for i, text in enumerate(seen) if value in text], f"{name}'s value leaked"
