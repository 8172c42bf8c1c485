"""The two-stage job's wall time on one node and on the local multi-node topology, same config.

Both runs: configs/demo.yaml at test size (tests/support/topology.py TEST_SIZE), every
store in S3 on loopback (moto), fresh stores. One node: `python jobs/two_stage.py` with an
embedded Ray and MLflow in sqlite. Multi-node: a Ray head and two worker nodes started
with `ray start`, MLflow server on PostgreSQL with S3 artifacts, `ray job submit`; train
workers on the worker nodes. Prints one line per run.

    python bench/cluster_bench.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.s3 import LocalS3, free_port  # noqa: E402
from support.topology import BUCKET, TEST_SIZE, LocalTopology, job_args  # noqa: E402


def single_node(store: str) -> float:
    """The same job as one node, before the topology starts: embedded Ray (no `train`
    resource there, so no resources_per_worker), MLflow in sqlite, S3 on loopback."""
    work = tempfile.mkdtemp(prefix="vb-", dir="/tmp")
    cmd = [sys.executable, *job_args(f"{store}/jobs", *TEST_SIZE, f"serve.http.port={free_port()}",
                                     f"run.workdir={work}", "train.resources_per_worker=null", store=store)]
    try:
        with LocalS3(buckets=(BUCKET,)):  # sets the AWS variables of its endpoint here
            env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
            env.update(MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            started = time.monotonic()
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
            seconds = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return seconds


def main() -> None:
    one = single_node(f"s3://{BUCKET}/single")
    print(f"one node (embedded Ray, 6 logical CPUs): {one:.0f} s", flush=True)
    with LocalTopology() as topo:
        multi = f"s3://{BUCKET}/multi"
        started = time.monotonic()
        r = topo.submit(*job_args(f"{multi}/jobs", *TEST_SIZE, f"serve.http.port={free_port()}", store=multi),
                        timeout=3600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        print(f"three nodes (head {topo.head_cpus} CPUs, 2 workers x {topo.worker_cpus} CPUs, ray job submit): "
              f"{time.monotonic() - started:.0f} s", flush=True)
    print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
