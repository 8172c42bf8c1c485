"""jobs/serve.py as a user runs it: its own Ray, Serve on loopback, serving until SIGINT."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_job_serves_until_interrupted():
    import openai

    port = free_port()
    workdir = tempfile.mkdtemp(prefix="vlit-", dir="/tmp")  # short: Ray's socket paths live under it
    # The shipped CPU config, with known-answer backends only: the job's plumbing is under
    # test here, not the model (tests/serve/test_serve.py covers that).
    overrides = [
        f"run.workdir={workdir}", f"serve.http.port={port}", "ray.num_cpus=2",
        "serve.generators={oracle: {backend: {kind: reference, replies: [hello]}, deployment: {num_cpus: 0.1}}}",
        "serve.judges={reference: {backend: {kind: reference}, mode: generate, deployment: {num_cpus: 0.1}}}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "jobs/serve.py", "--config", "configs/serve/tiny.yaml", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []  # stderr, read as it comes (pipes must not fill up)
    out_lines: list[str] = []

    def drain(stream, into):
        for line in stream:
            into.append(line)

    readers = [threading.Thread(target=drain, args=(proc.stderr, lines), daemon=True),
               threading.Thread(target=drain, args=(proc.stdout, out_lines), daemon=True)]
    for r in readers:
        r.start()
    try:
        # Ready when the job says so: every deployment is up (the ingress answers earlier).
        deadline = time.monotonic() + 200
        while not any(f"serving vlit at http://127.0.0.1:{port}/v1" in line for line in lines):
            assert proc.poll() is None, "the job exited early:\n" + "".join(lines[-40:])
            assert time.monotonic() < deadline, "the job did not start serving in time"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model="oracle", messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content == "hello"
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
        for r in readers:
            r.join(30)
        stdout = "".join(out_lines)
        assert proc.returncode == 0, "".join(lines[-40:])
        summary = json.loads(stdout[stdout.index("{"):])
        assert summary["generators"] == ["oracle"] and summary["judges"] == ["reference"]
        assert summary["url"] == f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def test_serve_job_without_a_serve_section_says_so():
    r = subprocess.run([sys.executable, "jobs/serve.py", "--config", "configs/sft_tiny.yaml"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "serve: the serve job needs a serve section" in r.stderr
