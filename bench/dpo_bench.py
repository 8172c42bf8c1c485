"""DPO step time with cached reference log-probs against a live reference model.

Both runs train the same tiny LLaVA (projector + LLM, ZeRO-2, one Ray Train worker) on
the same synthetic preference pairs in the same order, through `vlit.train.dpo.run_dpo`:
the cached run looks the reference's log-probs up (computed once by the Ray Data pass,
timed apart), the live run runs a frozen copy of the reference forward every step. Step
time is the median of the per-step wall time the trainer logs to MLflow, after the first
--warmup steps; peak memory is the train worker's peak RSS.

    python bench/dpo_bench.py [--prompts 96 --steps 40 --warmup 5 --micro-batch 8]
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile

from vlit.config import Config, RayConfig
from vlit.world import synth_corpus
from vlit.runtime import init_ray
from vlit.loops.feedback import build_pairs
from vlit.versions import PairsVersion
from vlit.loops.feedback_synth import JUDGE, synth_feedback
from vlit.train.dpo import run_dpo
from vlit.lineage import tracking_uri


def config(work: str, pairs: PairsVersion, reference: str, args) -> Config:
    return Config.model_validate({
        "run": {"name": f"dpo-bench-{reference}", "workdir": f"{work}/work"},
        "corpus": {"out": f"{work}/corpora"},
        "model": {"preset": "tiny", "max_len": 512},
        "train": {"output": f"{work}/{reference}", "trainable": ["projector", "llm"], "zero_stage": 2, "lr": 1e-3,
                  "warmup_ratio": 0.0, "micro_batch_size": args.micro_batch, "num_workers": 1, "epochs": 100,
                  "max_steps": args.steps, "checkpoint_every": args.steps},
        "dpo": {"pairs": pairs.uri, "reference": reference, "cache": f"{work}/reference_cache",
                "reference_batch_size": args.micro_batch,
                "stream": {"image_size": 32, "block_rows": 64, "decode_concurrency": 1}},
    })


def measure(cfg: Config, pairs: PairsVersion, warmup: int) -> tuple[dict, float, float]:
    """(summary, median step seconds after warmup, peak RSS of the worker in MB)."""
    from mlflow.tracking import MlflowClient

    result = run_dpo(cfg, pairs)
    client = MlflowClient(tracking_uri(cfg))
    steps = {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], "step_seconds")}
    rss = max(m.value for m in client.get_metric_history(result["mlflow_run_id"], "memory/peak_rss_mb"))
    return result, statistics.median(v for s, v in steps.items() if s > warmup), rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from timing")
    p.add_argument("--micro-batch", type=int, default=8, help="pairs per step (2x sequences)")
    args = p.parse_args()
    print("$ " + " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]), flush=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    work = tempfile.mkdtemp(prefix="vlit-dpo-bench-", dir="/tmp")
    synth = synth_corpus(f"{work}/src", instances=4 * args.prompts, tasks=8, image_pool=32, image_size=32)
    feedback = synth_feedback(synth["annotation"], prompts=args.prompts)
    pairs = PairsVersion.open(build_pairs([feedback["feedback"]], f"{work}/pairs", judge=JUDGE)["version"])
    init_ray(RayConfig(num_cpus=4, object_store_mb=512), workdir=work)
    print(f"tiny LLaVA, {pairs.rows} pairs, {args.steps} steps of {args.micro_batch} pairs "
          f"({2 * args.micro_batch} sequences, {args.micro_batch} image encodings), first {args.warmup} untimed, "
          f"ZeRO-2, 1 worker, {os.cpu_count()} cores", flush=True)

    cached, cached_s, cached_rss = measure(config(work, pairs, "cached", args), pairs, args.warmup)
    print(f"reference cache pass (Ray Data, once) : {cached['reference_cache']['seconds']:6.1f} s "
          f"for {cached['reference_cache']['rows']} pairs", flush=True)
    print(f"cached reference log-probs : {1000 * cached_s:7.1f} ms/step, worker peak RSS {cached_rss:7.1f} MB", flush=True)
    _, live_s, live_rss = measure(config(work, pairs, "copy", args), pairs, args.warmup)
    print(f"live reference (frozen copy): {1000 * live_s:7.1f} ms/step, worker peak RSS {live_rss:7.1f} MB", flush=True)
    print(f"step time cached/live: {cached_s / live_s:.2f} (goal <= 0.80); "
          f"peak memory cached/live: {cached_rss / live_rss:.2f}")


if __name__ == "__main__":
    main()
