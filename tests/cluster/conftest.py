"""The KubeRay CRDs beside the repository (../shared/kuberay-crds), like the sample data,
and the manifest checker, which lives beside the manifests (cluster/kubecheck)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
sys.path.insert(0, str(CLUSTER))


@pytest.fixture(scope="session")
def crd_dir() -> str:
    path = Path(os.environ.get("VLIT_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
    assert (path / "ray.io_rayjobs.yaml").exists(), f"KubeRay CRDs not found at {path}"
    return str(path)
