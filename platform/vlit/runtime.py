"""Starting or joining Ray: the settings that keep it healthy on a small machine live here."""
from __future__ import annotations

import os

from vlit.config import RayConfig

# Set before `import ray` anywhere in the process: keep Ray (and gloo rendezvous) on
# 127.0.0.1 instead of the machine's external address, and send no usage stats.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402


# Ray puts Unix sockets at <temp>/session_<date>_<time>_<pid>/sockets/plasma_store, and a
# socket path holds at most 107 bytes: the session part takes up to 63 of them.
_SOCKET_TAIL = len("/session_2026-12-04_20-11-57_759466_4194304/sockets/plasma_store")


def _ray_temp(workdir: str) -> str:
    """<workdir>/ray, or, where that is too long for Ray's sockets, a short folder in the
    system temp named after it (the same workdir always gets the same one)."""
    import hashlib
    import sys
    import tempfile

    temp = os.path.abspath(os.path.join(workdir, "ray"))
    if len(temp) + _SOCKET_TAIL <= 107:
        return temp
    short = os.path.join(tempfile.gettempdir(), "vlit-ray-" + hashlib.sha1(temp.encode()).hexdigest()[:10])
    print(f"[vlit] {temp} is too long for Ray's socket paths; Ray's session files go to {short}",
          file=sys.stderr, flush=True)
    return short


def init_ray(cfg: RayConfig, workdir: str = ".vlit") -> None:
    """Join the configured cluster (or the job's, under `ray job submit`), or start an
    embedded one sized for this machine."""
    if ray.is_initialized():
        return
    # A driver started by `ray job submit` finds its cluster in RAY_ADDRESS: join it.
    address = cfg.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cores = os.cpu_count() or 2
        temp = _ray_temp(workdir)
        os.makedirs(temp, exist_ok=True)
        ray.init(
            num_cpus=cfg.num_cpus or max(4, 2 * cores),
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            include_dashboard=cfg.include_dashboard,
            # An embedded cluster talks to itself only: keep every Ray service on loopback.
            _node_ip_address="127.0.0.1",
            _temp_dir=temp,
            log_to_driver=True,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = cfg.target_max_block_mb * 1024 * 1024
    # Progress bars flood logs of jobs and CI without telling anything the metrics don't.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc keep the memory a training step frees, for the next step to reuse.

    Each step allocates and frees the same large tensors (activations, logits, the
    collated batch). By default glibc returns blocks over its mmap threshold to the kernel
    and trims freed heap tops, so the next step faults the same pages in again, zeroed:
    measured in a Ray Train worker on the tiny model, ~2,700-6,000 page faults and ~5% of
    the step in the kernel, against ~600 and 2% with these settings. 32 MB is glibc's
    largest mmap threshold; freed memory up to the 1 GB trim threshold stays in the
    process, bounded by what a step used at its peak.
    Returns False where the C library is not glibc (nothing is changed there)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def quiet_train_reports() -> None:
    """Stop Ray Train logging every report of every worker at INFO.

    Ray Train 2.60 logs each `ray.train.report` with its whole metrics dict, which with
    per-task losses and the supervision audit is ~200 entries per checkpoint in the job's
    output. Its logger is named by its source file's path, outside the `ray.train`
    hierarchy, so `RunConfig(logging_config=...)` does not reach it. The metrics are in
    MLflow and in the job's summary; warnings and errors still show."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
