"""The job's preflight: an unreachable tracking server or S3 endpoint, or a missing bucket,
stops the job before its first stage with the URI in the message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.s3 import free_port

from vlit import storage
from vlit.config import load_config
from vlit.two_stage import preflight

REPO = Path(__file__).resolve().parents[1]


def demo(*overrides: str):
    return load_config(str(REPO / "configs/demo.yaml"), list(overrides))


@pytest.mark.timeout(180)
def test_unreachable_tracking_server_stops_the_job_before_any_stage(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    r = subprocess.run([sys.executable, "jobs/two_stage.py", "--config", "configs/demo.yaml",
                        f"run.workdir={tmp_path}/work", f"pipeline.out={tmp_path}/jobs",
                        f"corpus.out={tmp_path}/corpora"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"cannot reach the MLflow tracking server {uri}" in r.stderr and "Traceback" not in r.stderr
    assert "running" not in r.stdout + r.stderr and not list(tmp_path.iterdir())  # no stage, no file


@pytest.mark.timeout(120)
def test_unreachable_s3_endpoint_names_the_uri_and_the_endpoint(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    cfg = demo("pipeline.out=s3://vlit-nowhere/jobs")
    with pytest.raises(storage.Unreachable, match=f"cannot reach s3://vlit-nowhere/jobs at endpoint {endpoint}"):
        preflight(cfg)


@pytest.mark.timeout(120)
def test_missing_bucket_fails_and_reachable_stores_pass(s3, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    preflight(demo("pipeline.out=s3://vlit-test/jobs", "corpus.out=s3://vlit-test/corpora"))
    with pytest.raises(storage.Unreachable, match="bucket of s3://vlit-missing/corpora does not exist"):
        preflight(demo("pipeline.out=s3://vlit-test/jobs", "corpus.out=s3://vlit-missing/corpora"))
