"""Starting or joining Ray: the settings that keep it healthy on a small machine live here."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys

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
    quiet_logs(state_api=bool(address) or cfg.include_dashboard)
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
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.DEBUG if is_verbose() else logging.WARNING)


# ---- quiet logs: known-harmless lines filtered; `--verbose` / VLIT_LOG_LEVEL=DEBUG shows all

# Each pattern is a line known to be harmless here, and why. Matched against the lines
# Ray forwards from its workers and the driver's own log records and warnings; a line
# that names an error or a traceback is never dropped (`_harmless`).
HARMLESS = (
    # Ray Train V2's PlacementGroupCleaner polls its controller through the state API,
    # which runs in the dashboard: an embedded cluster has none, so every poll fails
    # (67 lines in a demo). It acts only when the controller dies uncleanly, and an
    # embedded cluster ends with the driver anyway.
    r"Failed to query Ray Train Controller actor state",
    # The raylet notes that Train, Data and Serve start more Python workers at once than
    # this machine has cores: a remark on startup speed, not a fault.
    r"PYTHON worker processes have been started on node",
    # Ray's core notes that its own restartable actors (Ray Data's map workers, Train's
    # PreemptionWatcher) took constructor arguments through the object store; Ray keeps
    # them while the actors live.
    r"has constructor arguments in the object store and max_restarts > 0",
    # Ray Data's progress bars are off on purpose (vlit.progress shows progress), its
    # usage tips, per-dataset timings, Train's worker-group start-up and the token-auth
    # notice of a cluster that listens on 127.0.0.1 only.
    r"Progress bars disabled\. To enable", r"Tip: Use `take_batch\(\)`", r"Dataset \S+ execution finished in",
    r"Requesting resources: \{", r"Attempting to start training worker group", r"Started training worker group",
    r"^- \(ip=\S+, pid=\d+\) world_rank=", r"Setting up process group for: env://",
    r"Token authentication is enabled for this Ray cluster",
    # Ray Data's own use of its deprecated ExecutionOptions.exclude_resources.
    r"ExecutionOptions\.exclude_resources` is deprecated", r"^\s+self\.exclude_resources = exclude_resources",
    # DeepSpeed on a machine without a GPU (CPU is what we ask for), and loading the
    # shared-memory op `make setup` prebuilt.
    r"Setting accelerator to CPU", r"deepspeed_shm_comm_op built successfully",
    # torch and DeepSpeed warning about APIs they call themselves (torch.cuda.amp and
    # the like), which a newer release of theirs replaces; nothing this code calls.
    r"site-packages/(torch|deepspeed)/\S+:\d+: (Future|Deprecation|User)Warning: .*deprecated",
    # MLflow creating or upgrading its sqlite tables, once per process that opens them.
    r"MLflow database tables|mlflow\.store\.db\.utils: Updating database tables",
    # `serve.shutdown()` kills Serve's controller while its own graceful-shutdown call is
    # queued, and the GCS then fails to kill replicas that already exited: Serve is down,
    # as asked.
    r"Task ServeController\.graceful_shutdown failed.*killed by `ray\.kill`",
    r"Failed to kill actor \w+, return status: .*Socket closed",
    # transformers' bars loading or writing weights in workers (the driver turns them off):
    # vlit's progress reports the steps.
    r"(Loading weights|Loading checkpoint shards|Writing model shards): +\d+%\|",
    # Ray Train's note on each worker's checkpoint upload: the stage's record and its MLflow
    # run say which checkpoints exist; a resume prints the one it takes.
    r"Checkpoint successfully created at: Checkpoint\(",
    # Blank lines workers print between their lines.
    r"^\s*$",
)
_HARMLESS = re.compile("|".join(f"(?:{p})" for p in HARMLESS))
# A traceback, or the line naming an exception that ends one: never dropped.
_NEVER = re.compile(r"Traceback \(most recent call last\)|^\s*[\w.]*(Error|Exception)\b")
# Actors whose every line is harmless on this cluster (set by `quiet_logs`).
_QUIET_ACTORS: set[str] = set()


def is_verbose() -> bool:
    """Everything shown: `--verbose` on a job, or VLIT_LOG_LEVEL=DEBUG."""
    return os.environ.get("VLIT_LOG_LEVEL", "").upper() == "DEBUG"


def _harmless(line: str) -> bool:
    return bool(_HARMLESS.search(line)) and not _NEVER.search(line)


def keep_lines(lines: list[str]) -> list[str]:
    """`lines` less the known-harmless ones; a Python warning's source line (indented,
    next after it) goes with it."""
    kept, dropped = [], False
    for line in lines:
        dropped = _harmless(line) or (dropped and line.startswith("  ") and not _NEVER.search(line))
        if not dropped:
            kept.append(line)
    return kept


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _harmless(record.getMessage())


def quiet_logs(state_api: bool = True, verbose: bool = False) -> None:
    """Filter the known-harmless lines (HARMLESS) out of this driver's output: the lines
    Ray forwards from its workers (all of them: Train, Data, Serve, detached actors, the
    raylet), this process's Ray, MLflow and DeepSpeed log records and its Python
    warnings. Transformers' weight-loading bars go too: vlit.progress shows progress.
    Without a state API (an embedded cluster with no dashboard), Ray Train's
    PlacementGroupCleaner can only fail (see HARMLESS), tracebacks of its monitor thread
    included: all its lines go. `verbose=True` (a job's --verbose) turns it off for the
    process and the stages it runs; so does `is_verbose()`. Safe to call again."""
    import warnings

    if verbose:
        os.environ["VLIT_LOG_LEVEL"] = "DEBUG"
    if is_verbose():
        return
    if not state_api:
        _QUIET_ACTORS.add("PlacementGroupCleaner")
    # On the handlers (records of child loggers pass them) and on the loggers themselves
    # (DeepSpeed's gets its handler only when deepspeed is imported, later).
    for name in ("", "ray", "ray.data", "ray.train", "ray.serve", "mlflow", "DeepSpeed"):
        for where in (logging.getLogger(name), *logging.getLogger(name).handlers):
            if not any(isinstance(f, _Quiet) for f in where.filters):
                where.addFilter(_Quiet())
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources` is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|deepspeed)(\..*)?$")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    _filter_forwarded_lines()


@contextlib.contextmanager
def quiet_prints():
    """What the block prints to stdout, shown only when it raises or `is_verbose()`: for
    libraries that report routine steps with print() (DeepSpeed's checkpoint
    consolidation)."""
    if is_verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        sys.stdout.write(buffer.getvalue())
        raise


def _filter_forwarded_lines() -> None:
    """Filter, with `keep_lines`, the two ways worker output reaches this driver: the
    printer of forwarded worker logs (a handler of Ray's log dispatcher) and the raylet's
    warnings (Ray's error channel, printed through `print_to_stdstream`). Ray has no public
    filter for either (`log_to_driver` is all or nothing; a worker-side hook would miss the
    raylet's and detached actors' lines): on another Ray layout the lines stay as they are."""
    try:
        from ray._private import worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if not getattr(worker.print_to_stdstream, "vlit_quiet", False):
        worker.print_to_stdstream = _filtered(worker.print_to_stdstream)
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    for name, handle in handlers:
        if name == "ray_print_logs" and not getattr(handle, "vlit_quiet", False):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, _filtered(handle))


def _filtered(print_fn):
    """`print_fn(data, ...)` of Ray's forwarded output, less the harmless lines."""
    def quiet(data, *args, **kwargs):
        if data.get("actor_name") in _QUIET_ACTORS:
            return
        lines = keep_lines(data.get("lines", []))
        if lines:
            print_fn({**data, "lines": lines}, *args, **kwargs)

    quiet.vlit_quiet = True
    return quiet
