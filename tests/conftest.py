"""Shared fixtures: a real S3 endpoint on 127.0.0.1, a real local Ray, the real sample data."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
# Ray workers import test helpers from here.
sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """One real instance per Vision-Flan task, with real images (../shared)."""
    path = Path(os.environ.get("VLIT_SAMPLE_DIR", REPO.parent / "shared" / "vision-flan-sample"))
    assert (path / "annotation.json").exists(), f"Vision-Flan sample not found at {path}"
    return path


@pytest.fixture(scope="session")
def tokenizers_dir() -> Path:
    """The real LLaMA-2 and Qwen3 tokenizers (../shared/tokenizers; see its README)."""
    path = Path(os.environ.get("VLIT_TOKENIZERS_DIR", REPO.parent / "shared" / "tokenizers"))
    assert (path / "llama2" / "tokenizer.json").exists(), f"tokenizers not found at {path}"
    return path


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 with a `vlit-test` bucket; AWS_* env set for the session."""
    from support.s3 import LocalS3

    with LocalS3(buckets=("vlit-test",)) as server:
        yield server


@pytest.fixture(scope="session")
def ray_local(s3):
    """An embedded Ray with more logical CPUs than cores (see vlit.runtime). Started after
    the S3 endpoint, because Ray workers see the environment of the moment Ray starts."""
    import shutil
    import tempfile

    import ray

    from vlit.config import RayConfig
    from vlit.runtime import init_ray

    # A short path: Ray's Unix sockets live under it and socket paths max out at ~107 chars.
    workdir = tempfile.mkdtemp(prefix="vlit-", dir="/tmp")
    init_ray(RayConfig(num_cpus=4, object_store_mb=512), workdir=workdir)
    yield ray
    ray.shutdown()
    shutil.rmtree(workdir, ignore_errors=True)
