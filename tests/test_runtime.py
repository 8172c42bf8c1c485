"""Process settings of vlit.runtime, checked by their effect in a fresh process."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import pytest

# A training step's shape: tensors of 0.5-8 MB (activations, logits, the collated batch),
# all alive at once, then freed; repeated. Page faults per step, in the main thread.
STEPS = """
import json, resource, sys
import torch
torch.set_num_threads(1)  # the fill runs in this thread, so its faults count here
from vlit.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    tensors = [torch.ones(n // 4) for n in [8 << 20, 4 << 20, 4 << 20, 2 << 20, 1 << 20, 512 << 10] * 3]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _steps(mode: str) -> dict:
    env = dict(os.environ)
    if mode == "default":
        # glibc's mmap threshold starts at 128 KB and then adapts to what is freed, to
        # this pattern on some runs and not on others; pinned at its start value, the
        # default's behaviour is the same on every run.
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt only")
def test_keep_freed_memory_stops_each_step_faulting_its_memory_in_again():
    default, kept = _steps("default"), _steps("keep")
    assert kept["kept"] is True
    # With the 128 KB threshold glibc hands these blocks back to the kernel on free, so
    # every step faults ~58 MB of pages in again (~15k faults at 4 KiB).
    assert min(default["faults"][2:]) > 5000, default
    # Kept: after the first step the memory is reused.
    assert max(kept["faults"][2:]) < 0.05 * min(default["faults"][2:]), (default, kept)


@pytest.mark.timeout(120)
def test_embedded_ray_starts_under_a_workdir_too_long_for_its_sockets(tmp_path):
    workdir = tmp_path / ("w" * 60)  # <workdir>/ray/session_.../sockets/plasma_store > 107 bytes
    script = ("import sys, ray; from vlit.config import RayConfig; from vlit.runtime import init_ray; "
              "init_ray(RayConfig(num_cpus=1, object_store_mb=128), workdir=sys.argv[1]); "
              "print(ray.get(ray.put(41)) + 1); ray.shutdown()")
    run = subprocess.run([sys.executable, "-c", script, str(workdir)], capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "42"
    assert "too long for Ray's socket paths" in run.stderr


# Lines a two-stage job printed (Ray 2.60, DeepSpeed 0.19.8, torch 2.13), each known
# harmless (vlit.runtime.HARMLESS), and lines that must always show.
HARMLESS_LINES = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "WARNING: 16 PYTHON worker processes have been started on node: a760d5 with address: 192.0.2.2, which is 8x the "
    "maximum expected startup concurrency (2).",
    "[2026-12-06 04:26:01,310] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If you "
    "have GPU or other accelerator, we were unable to detect it.",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "[2026-12-06 04:26:12,495 E 13896 13938] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
    "_DecodeImages))' and ID: '34e8' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail.",
    "/x/site-packages/deepspeed/runtime/zero/linear.py:49: FutureWarning: `torch.cuda.amp.custom_fwd(args...)` is "
    "deprecated. Please use `torch.amp.custom_fwd(args..., device_type='cuda')` instead.",
    "  @autocast_custom_fwd",
    "Loading weights:   0%|          | 0/64 [00:00<?, ?it/s]",
]
REAL_LINES = [
    "[vlit sft] 12/400 steps (3%) loss 2.310 tokens/s 1234 eta 3m12s",
    "Traceback (most recent call last):",
    "ValueError: Failed to query Ray Train Controller actor state",  # an error, whatever its words
    "  File \"/x/site-packages/deepspeed/runtime/engine.py\", line 1, in step",
    "RuntimeError: CUDA out of memory",
]


def test_keep_lines_drops_the_known_harmless_lines_and_keeps_errors():
    from vlit.runtime import keep_lines

    assert keep_lines(HARMLESS_LINES) == []
    assert keep_lines(REAL_LINES) == REAL_LINES
    mixed = [HARMLESS_LINES[0], REAL_LINES[0], HARMLESS_LINES[5], HARMLESS_LINES[6], REAL_LINES[1], REAL_LINES[3]]
    assert keep_lines(mixed) == [REAL_LINES[0], REAL_LINES[1], REAL_LINES[3]]


# A Ray task prints harmless and real lines; Ray forwards them to the driver, whose
# output is what a person reads.
CHATTER = """
import json, sys, time, ray
from vlit.config import RayConfig
from vlit.runtime import init_ray
init_ray(RayConfig(num_cpus=1, object_store_mb=128), workdir=sys.argv[1])

@ray.remote
def chatter(lines):
    for line in lines:
        print(line, flush=True)
    print("vlit-test: the last line", flush=True)
    return 1

ray.get(chatter.remote(json.loads(sys.argv[2])))
# The raylet's warnings come through Ray's error channel, which prints them with this.
from ray._private import worker
worker.print_to_stdstream({"lines": json.loads(sys.argv[2]), "pid": "raylet", "is_err": False}, ignore_prefix=False)
time.sleep(4)  # Ray forwards worker output to the driver about every second
ray.shutdown()
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("verbose", [False, True])
def test_the_driver_shows_workers_real_lines_and_only_with_verbose_the_harmless_ones(tmp_path, verbose):
    env = {k: v for k, v in os.environ.items() if k != "VLIT_LOG_LEVEL"}
    if verbose:
        env["VLIT_LOG_LEVEL"] = "DEBUG"
    workdir = tempfile.mkdtemp(prefix="vlit-", dir="/tmp")  # short: Ray's socket paths
    try:
        run = subprocess.run([sys.executable, "-c", CHATTER, workdir, json.dumps(HARMLESS_LINES + REAL_LINES)],
                             capture_output=True, text=True, timeout=200, env=env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "vlit-test: the last line" in out, out[-3000:]
    for line in REAL_LINES:
        assert line in out
    shown = [line for line in HARMLESS_LINES if line in out]
    assert shown == (HARMLESS_LINES if verbose else []), shown
    raylet = [line for line in out.splitlines() if line.startswith(("(raylet)", "\x1b[33m(raylet)"))]
    assert len(raylet) == len(REAL_LINES) + (len(HARMLESS_LINES) if verbose else 0), raylet
