"""The two-stage job's driver killed mid-stage (SIGKILL to the driver and the embedded Ray
it started): the same command run again skips the finished stages and resumes the
unfinished one from its last checkpoint, and the job completes."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.jobs import job_summary  # noqa: E402
from test_two_stage import job_env, small  # noqa: E402


@pytest.mark.timeout(900)
def test_killed_driver_resumes_at_the_unfinished_stage(tmp_path):
    # 240 rows: enough packed sequences for 12 steps of one worker.
    args = [*small(tmp_path, "[sft1]"), "corpus.synth.instances=240", "train.max_steps=12", "train.checkpoint_every=3"]
    cmd = [sys.executable, "jobs/two_stage.py", "--config", "configs/demo.yaml", *args]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=REPO, env=job_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    # Kill once stage 1 has a checkpoint registered on storage (Ray Train writes its
    # snapshot after the checkpoint), and before the stage finishes.
    pattern = f"{tmp_path}/store/jobs/sft1-*/ray/*/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 600
    while not glob.glob(pattern):
        assert first.poll() is None, open(tmp_path / "first.log").read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 10 min"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(60)
    text = open(tmp_path / "first.log").read()
    assert "[vlit corpus] running" in text and "[vlit sft1] running" in text
    assert not glob.glob(f"{tmp_path}/store/jobs/ledger/sft1-*.json")  # sft1 never finished

    again = subprocess.run(cmd, cwd=REPO, env=job_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-6000:] + again.stdout[-2000:]
    out = again.stdout + again.stderr
    assert "[vlit corpus] skipped: finished" in out and "[vlit eval_base] skipped: finished" in out
    assert "[vlit sft1] running" in out
    resumed = [line for line in out.splitlines() if "[vlit train] resuming from checkpoint" in line]
    assert resumed and int(resumed[0].rsplit(" ", 1)[-1]) >= 3
    s = job_summary(again.stdout)
    assert s["ran"] == ["sft1", "eval_sft1"] and s["stages"]["sft1"]["steps"] == 12
