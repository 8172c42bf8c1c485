"""Install vLLM's Python layer, without its compiled kernels or CUDA, into a folder of its
own (default .venv/vllm-python): what `ray.serve.llm` imports, so a CPU test can build
Ray Serve LLM deployments from vlit's serve config without starting an engine
(tests/serve/test_llm.py). The version is the one `ray[llm]==2.60.0` pins; the GPU
serving image installs the whole package (cluster/Dockerfile).

    python tests/support/vllm_python.py [TARGET]
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VLLM = "vllm==0.29.0"
TARGET = Path(__file__).resolve().parents[2] / ".venv" / "vllm-python"
# The pure-Python (or self-contained wheel) imports of vllm's protocol, config and
# argument modules, at the versions the probe that chose them found.
DEPENDENCIES = ["cbor2==6.3.0", "httpx==0.29.0", "msgspec==0.23.0", "openai-harmony==0.0.8", "pybase64==1.5.1",
                "pyzmq==27.3.0", "partial-json-parser==0.2.1.1.post7"]


def install(target: str) -> None:
    shutil.rmtree(target, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*pip, "download", "--no-deps", VLLM, "-d", tmp], check=True)
        with zipfile.ZipFile(glob.glob(f"{tmp}/vllm-*.whl")[0]) as wheel:
            for name in wheel.namelist():
                if name.endswith(".py") or ".dist-info/" in name:
                    wheel.extract(name, target)
    subprocess.run([*pip, "install", "--no-deps", "--target", target, *DEPENDENCIES], check=True)


def run_python(code: str, *args: str, timeout: float = 170) -> str:
    """`python -c code args...` with vLLM's Python layer importable and a short Ray temp
    folder (Ray's socket paths must stay short) as its last argument; its stdout. Fails
    with the child's stderr when it does."""
    assert (TARGET / "vllm").is_dir(), f"vLLM's Python layer is not at {TARGET}: run `make setup`"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TARGET), os.environ.get("PYTHONPATH", "")])}
    temp = tempfile.mkdtemp(prefix="vlit-", dir="/tmp")
    try:
        run = subprocess.run([sys.executable, "-c", code, *args, temp], env=env, capture_output=True, text=True,
                             timeout=timeout)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


if __name__ == "__main__":
    install(sys.argv[1] if len(sys.argv) > 1 else str(TARGET))
