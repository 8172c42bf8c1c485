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
        temp = os.path.abspath(os.path.join(workdir, "ray"))
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
