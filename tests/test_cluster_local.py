"""The two-stage job on a real topology on this machine (tests/support/topology.py): a Ray
head and two worker nodes, S3 on loopback as the only shared storage, MLflow on
PostgreSQL with S3 artifacts, the job submitted with `ray job submit --working-dir`.

Checks that the whole job finishes with training on the worker nodes, that nothing but S3
and temp folders was written, that a second submission skips every stage, that the
lineage resolves through the tracking server, that the credentials of the nodes reach no
log, param or runtime env, and that SIGKILL to the worker node training sft1 ends, after
the group restarts on the other worker node from the last S3 checkpoint, with the
weights of the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.jobs import job_summary
from support.s3 import free_port
from support.topology import BUCKET, REPO, STORE, TEST_SIZE, LocalTopology, job_args

pytestmark = pytest.mark.slow

# Stand-ins for real keys, in the nodes' environment only.
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAVLITSENTINEL0101", "AWS_SECRET_ACCESS_KEY": "vlit-sentinel-secret-0102"}
ALL = ["corpus", "eval_base", "sft1", "eval_sft1", "align", "sft2", "eval_sft2", "dpo", "eval_dpo"]
STEPS = 8  # sft1's steps in TEST_SIZE


def job(jobs: str, *extra: str) -> list[str]:
    return job_args(jobs, *TEST_SIZE, f"serve.http.port={free_port()}", *extra)


def files(root: str | Path, skip=(".git", ".venv", "__pycache__", ".pytest_cache")) -> set[str]:
    out = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        out |= {os.path.relpath(os.path.join(folder, n), root) for n in names}
    return out


def s3_keys(prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def export_weights(export: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    from vlit import storage

    return load(storage.read_bytes(storage.join(export, "model.safetensors")))


@pytest.fixture(scope="module")
def topo():
    with LocalTopology(env=SECRETS) as t:
        yield t


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the working tree (git's files, tracked or not ignored) to submit from: the
    job must add nothing to it, and other work in the shared checkout cannot blur that."""
    import shutil
    import subprocess

    copy = tmp_path_factory.mktemp("tree")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True, timeout=60).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, copy / rel)
    return copy


@pytest.fixture(scope="module")
def first(topo, tree):
    repo_before = files(tree)
    started = time.monotonic()
    r = topo.submit(*job(f"{STORE}/jobs"), timeout=1200, cwd=tree)
    seconds = time.monotonic() - started
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-8000:] + r.stderr[-3000:]
    summary = job_summary(r.stdout)
    print(f"\n[cluster] whole job on 3 nodes: {seconds:.0f} s; stages (s): "
          f"{ {k: v.get('seconds') for k, v in summary['stages'].items()} }")
    return {"run": r, "summary": summary, "seconds": seconds, "repo_before": repo_before}


@pytest.mark.timeout(1500)
def test_whole_job_trains_on_worker_nodes_and_writes_only_to_s3(topo, first, tree):
    s = first["summary"]
    assert s["ran"] == ALL and s["skipped"] == []
    # Training ran on the worker nodes only (they alone offer the `train` resource).
    trained_on = set(topo.actor_nodes("RayTrainWorker"))
    assert trained_on and trained_on <= {"w0", "w1"}, trained_on
    # The driver (under Ray's job supervisor) and Ray Train's controller on the head.
    assert set(topo.actor_nodes("JobSupervisor")) == set(topo.actor_nodes("TrainController")) == {"head"}
    # Every output is an s3:// URI; MLflow's artifacts went to S3 through the server.
    for stage in ("sft1", "sft2", "dpo"):
        assert s["stages"][stage]["export"].startswith(f"{STORE}/jobs/")
    assert any(k.startswith("mlartifacts/") for k in s3_keys("mlartifacts/"))
    assert any(k.startswith("store/jobs/ledger/") for k in s3_keys("store/jobs/"))
    # Nothing in any node's (or the MLflow server's) working folder, nothing new in the
    # tree the job was submitted from, and nothing in any node's copy of the job's working
    # dir (the driver's and the train workers' working folder) that the upload did not bring.
    for name in ("head", "w0", "w1", "mlflow"):
        assert files(os.path.join(topo.root, f"cwd-{name}")) == set(), name
    assert files(tree) == first["repo_before"]
    copies = [c for n in topo.nodes
              for c in Path(n.temp, "session_latest", "runtime_resources", "working_dir_files").glob("*")]
    assert len(copies) >= 2  # the head's and the training node's
    for copy in copies:
        assert files(copy) - first["repo_before"] == set(), copy


@pytest.mark.timeout(900)
def test_second_submission_skips_every_stage_and_lineage_resolves_through_the_server(topo, first, tree):
    from mlflow.tracking import MlflowClient

    from vlit.cli import main

    again = topo.submit(*job(f"{STORE}/jobs"), timeout=600, cwd=tree)
    assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-3000:]
    s = job_summary(again.stdout)
    assert s["ran"] == [] and s["skipped"] == ALL

    stages = first["summary"]["stages"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["lineage", "demo-sft2@champion", "--tracking-uri", topo.tracking_uri, "--json"]) == 0
    chain = json.loads(out.getvalue())
    assert chain["run"]["id"] == stages["sft2"]["mlflow_run_id"]
    corpus_input = next(d for d in chain["inputs"] if d["name"] == "corpus")
    assert corpus_input["digest"] == stages["align"]["digest"]
    assert stages["corpus"]["version"] in [o["source"] for o in corpus_input["from"][0]["from"]]

    # The nodes' credentials are in no job log, MLflow param or tag, nor in the job's runtime env.
    client = MlflowClient(tracking_uri=topo.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id], max_results=1000)
    jobs = json.dumps(topo.list("jobs"))
    seen = [first["run"].stdout, first["run"].stderr, again.stdout, again.stderr, jobs,
            *(json.dumps([r.data.params, r.data.tags]) for r in runs)]
    assert len(runs) >= 7 and '"working_dir"' in jobs
    for name, value in SECRETS.items():
        assert not [i for i, text in enumerate(seen) if value in text], f"{name}'s value leaked"


@pytest.mark.timeout(900)
def test_worker_node_killed_during_sft1_resumes_on_the_other_with_equal_weights(topo, first, tree):
    """Same sft1 as the first job's (same corpus, settings and key) in a fresh ledger;
    once its first checkpoint is registered in S3, SIGKILL to every process of the
    worker node its train group runs on."""
    jobs = f"{STORE}/killed"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(r=topo.submit(
        *job(jobs, "pipeline.stages=[sft1]", "eval=null"), timeout=800, cwd=tree)))
    runner.start()
    deadline = time.monotonic() + 600
    while not any(k.endswith("checkpoint_manager_snapshot.json") for k in s3_keys("store/killed/sft1-")):
        assert runner.is_alive() and time.monotonic() < deadline, result.get("r")
        time.sleep(0.5)
    victim = next(n for n in topo.nodes if n.name != "head" and n.runs("RayTrainWorker"))
    survivor = next(n for n in topo.nodes if n.name not in ("head", victim.name))
    assert victim.kill()
    runner.join(800)
    r = result["r"]
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    resumed = [line for line in out.splitlines() if "[vlit train] resuming from checkpoint" in line]
    assert resumed and 2 <= int(resumed[-1].rsplit(" ", 1)[-1]) < STEPS, out[-4000:]
    print(f"\n[cluster] killed {victim.name}; {resumed[-1].strip()}")
    s = job_summary(r.stdout)
    assert s["ran"] == ["corpus", "sft1"] and s["stages"]["sft1"]["steps"] == STEPS
    assert s["stages"]["sft1"]["key"] == first["summary"]["stages"]["sft1"]["key"]
    assert topo.alive_nodes() == 2
    assert survivor.name in topo.actor_nodes("RayTrainWorker")
    # The same world size on the survivor (it has train slots for the whole group), the
    # same deterministic stream: the weights of the uninterrupted run.
    expected = export_weights(first["summary"]["stages"]["sft1"]["export"])
    got = export_weights(s["stages"]["sft1"]["export"])
    assert expected.keys() == got.keys()
    worst = max(float(np.abs(expected[k] - got[k]).max()) for k in expected)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run by up to {worst}"
