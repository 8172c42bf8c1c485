"""What a person sees in a browser: headless Chromium's DOM and screenshot of a page, and
an MLflow server to open pages of."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from support.s3 import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root Chromium needs --no-sandbox; the rest keep it off the network this machine
# refuses (it would otherwise retry those hosts until the budget runs out).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars"]

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make setup` installs it)")


def _chromium(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="vlit-chromium-") as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout)


def page(url: str, screenshot: Path, *, budget_ms: int = 15000, size: str = "1400,2400", timeout: int = 120) -> str:
    """The page's DOM after `budget_ms` of virtual time (scripts run), and its screenshot."""
    shot = _chromium([f"--virtual-time-budget={budget_ms}", f"--window-size={size}", f"--screenshot={screenshot}", url],
                     timeout)
    assert screenshot.exists(), shot.stderr[-2000:]
    dom = _chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a sqlite store, as a context manager."""

    def __init__(self, db: str, artifacts: str, timeout_s: float = 90):
        self.port, self.timeout_s = free_port(), timeout_s
        self.url = f"http://127.0.0.1:{self.port}"
        mlflow = str(Path(sys.executable).parent / "mlflow")
        self.cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", artifacts]

    def __enter__(self) -> "MlflowServer":
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.proc = subprocess.Popen(self.cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"mlflow server did not come up on {self.url}")
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        # The server's process group: mlflow starts uvicorn workers beside itself.
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=20)
