"""What the generator and judge deployments share: running a batch off the event loop,
per-item failures, batch statistics and the health check.

The batch runs in a one-thread executor, not on the replica's event loop: the loop stays
free to take requests into the next batch and to answer Serve's health checks while the
model computes.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from vlit.config import DeploymentConfig
from vlit.serve.backends import Backend, run_isolated

# A batch running longer than this marks the replica unhealthy, and Serve replaces it:
# a wedged model (a hung GPU kernel, a dead remote) must not hold requests forever.
MAX_BATCH_SECONDS = 600.0


class ReplicaCore:
    def __init__(self, name: str, backend: Backend, cfg: DeploymentConfig):
        self.name, self.backend, self.cfg = name, backend, cfg
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._running_since: float | None = None
        self.batches = 0
        self.items = 0
        self.largest_batch = 0
        self.busy_s = 0.0  # time spent inside batches: the model's share of the wall time

    def configure(self, batched_method) -> None:
        """Apply the configured batch size and wait to a `@serve.batch` method."""
        batched_method.set_max_batch_size(self.cfg.batch.max_batch_size)
        batched_method.set_batch_wait_timeout_s(self.cfg.batch.wait_timeout_s)

    async def run(self, fn, items: list) -> list:
        self.batches += 1
        self.items += len(items)
        self.largest_batch = max(self.largest_batch, len(items))
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn, items)

    def _run(self, fn, items: list) -> list:
        self._running_since = started = time.monotonic()
        try:
            return run_isolated(fn, items)
        finally:
            self._running_since = None
            self.busy_s += time.monotonic() - started

    def check_health(self) -> None:
        self.backend.check_health()
        if self._running_since is not None and time.monotonic() - self._running_since > MAX_BATCH_SECONDS:
            raise RuntimeError(f"{self.name}: a batch has been running for over {MAX_BATCH_SECONDS:.0f} s")

    def stats(self) -> dict:
        return {"name": self.name, "backend": self.backend.kind, "batches": self.batches, "items": self.items,
                "largest_batch": self.largest_batch, "max_batch_size": self.cfg.batch.max_batch_size,
                "busy_s": round(self.busy_s, 3)}


def unwrap(result):
    """A batch item's result; an item's own failure is raised for that caller only."""
    if isinstance(result, BaseException):
        raise result
    return result
