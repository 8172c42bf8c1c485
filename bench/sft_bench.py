"""SFT tokens/s of the platform (Ray Train + DeepSpeed, world size 1) against a bare torch loop.

Both sides train the same tiny LLaVA (projector + LLM trainable, AdamW, gradient clipping
1.0) on the same micro-batches. The platform runs `vlit.train.sft.run_sft` (Ray Data
decode + SFTTransform + collate in the prefetch threads, the DeepSpeed engine, per-step
metrics, Ray Train reports, MLflow logging, a final checkpoint) twice:
- streaming (stage 1's mode): the data plane works while the model trains, on the same
  cores;
- `train.materialize=true` (stage 2's mode): the stream is run into the object store
  before the first step, as the bare loop's batches are built before its first step.
The bare loop gets the same collated batches from memory and runs forward, loss,
backward and step in one process. Throughput is real (non-padding) tokens over the wall
time of the steps after the first --warmup ones. Each platform run is measured against
the mean of the bare runs just before and just after it, since the machine's own speed
drifts by more than the gap being measured.

    python bench/sft_bench.py [--instances 2000 --steps 80 --warmup 5 --micro-batch 4 --zero-stage 2 --repeats 3]
    python bench/sft_bench.py --deepspeed-only    # DeepSpeed's engine alone against the bare loop
"""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from vlit.config import Config, PrepareConfig, RayConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.corpus.stream import build_stream, quarantine_uri
from vlit.world import synth_corpus
from vlit.versions import CorpusVersion
from vlit.model.build import build_model_and_processor
from vlit.model.labels import IGNORE
from vlit.model.packing import SFTTransform
from vlit.runtime import init_ray
from vlit.train import sft
from vlit.model.parts import PARTS, trainable_model
from vlit.lineage import tracking_uri


def config(work: str, version: CorpusVersion, args, materialize: bool) -> Config:
    return Config.model_validate({
        "run": {"name": "sft-bench", "workdir": f"{work}/work"},
        "corpus": {"out": version.uri, "stream": {"image_size": 32, "block_rows": 128, "decode_concurrency": 1}},
        "model": {"preset": "tiny", "max_len": 512},
        "train": {"output": f"{work}/run-{'materialized' if materialize else 'streaming'}",
                  "materialize": materialize, "lr": 1e-3, "warmup_ratio": 0.0, "micro_batch_size": args.micro_batch,
                  "num_workers": 1, "zero_stage": args.zero_stage, "max_steps": args.steps,
                  "checkpoint_every": args.steps},
    })


def same_batches(cfg: Config, version: CorpusVersion, n: int) -> list[dict]:
    """The first `n` micro-batches the platform's single worker trains on, collated."""
    transform = functools.partial(SFTTransform, cfg.model, cfg.loss, cfg.train, template_text=None,
                                  quarantine=quarantine_uri(version, cfg.corpus), epoch=0)
    ds = build_stream(version, cfg.corpus, transform=transform)
    batches = []
    for batch in ds.iter_torch_batches(batch_size=cfg.train.micro_batch_size, drop_last=True,
                                       collate_fn=sft._Collate(torch.float32)):
        batches.append(batch)
        if len(batches) == n:
            return batches
    raise SystemExit(f"the corpus gives only {len(batches)} micro-batches; raise --instances")


def platform_rate(cfg: Config, version: CorpusVersion, warmup: int) -> float:
    from mlflow.tracking import MlflowClient

    result = sft.run_sft(cfg, version)
    client = MlflowClient(tracking_uri(cfg))
    history = {k: {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], k)}
               for k in ("real_tokens", "tokens_per_s")}
    steps = [s for s in sorted(history["real_tokens"]) if s > warmup]
    tokens = sum(history["real_tokens"][s] for s in steps)
    return tokens / sum(history["real_tokens"][s] / history["tokens_per_s"][s] for s in steps)


def bare_rate(cfg: Config, batches: list[dict], warmup: int) -> float:
    model, _ = build_model_and_processor(cfg.model)
    trainable = tuple(p for part in cfg.train.trainable for p in PARTS["llava"][part])
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    tokens, seconds = 0, 0.0
    for step, batch in enumerate(batches, start=1):
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > warmup:
            seconds += time.perf_counter() - start
            tokens += int((batch["segment_ids"] > 0).sum())
    return tokens / seconds


def deepspeed_rate(cfg: Config, batches: list[dict], warmup: int) -> float:
    """The bare loop's batches through the platform's DeepSpeed engine in this process (no
    Ray, no data plane): what DeepSpeed alone costs against the bare loop. The process
    group (world size 1) is made by the first call and kept: DeepSpeed caches its groups."""
    from vlit.train.strategy import DeepSpeedStrategy, deepspeed_config

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("VLIT_BENCH_PORT", "29533")})
    strategy = DeepSpeedStrategy(cfg.train, deepspeed_config(cfg.train, cfg.model))
    strategy.setup_distributed()
    model, _ = build_model_and_processor(cfg.model)
    engine = strategy.prepare(trainable_model(model, cfg.train), total_steps=len(batches))
    tokens, seconds = 0, 0.0
    for step, batch in enumerate(batches, start=1):
        start = time.perf_counter()
        # The engine runs the model inside `EveryRankVision`, which returns the logits.
        logits = engine(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                        attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE)
        strategy.backward(loss)
        strategy.step()
        if step > warmup:
            seconds += time.perf_counter() - start
            tokens += int((batch["segment_ids"] > 0).sum())
    return tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=2000)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from timing")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of (streaming, materialized), each platform run between two bare runs")
    p.add_argument("--deepspeed-only", action="store_true",
                   help="rounds of (DeepSpeed engine in this process, bare) on the same batches: no Ray, "
                        "no data plane, so the gap is DeepSpeed's alone")
    args = p.parse_args()
    print("$ " + " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]), flush=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import ray

    work = tempfile.mkdtemp(prefix="vlit-sft-bench-", dir="/tmp")
    synth = synth_corpus(f"{work}/src", instances=args.instances, tasks=8, image_pool=32, image_size=32)
    version = CorpusVersion.open(prepare_corpus(PrepareConfig(sources=[synth["annotation"]]), f"{work}/versions")["version"])
    cfg = config(work, version, args, materialize=False)
    init_ray(RayConfig(num_cpus=4, object_store_mb=512), workdir=work)
    batches = same_batches(cfg, version, args.steps)
    print(f"tiny LLaVA, {version.rows} rows, {args.steps} steps of {args.micro_batch} packed sequences "
          f"(max_len 512), first {args.warmup} untimed, ZeRO-{args.zero_stage}, {os.cpu_count()} cores", flush=True)

    if args.deepspeed_only:
        ray.shutdown()
        torch.set_num_threads(1)
        pairs = []
        for r in range(args.repeats):
            ds, bare = deepspeed_rate(cfg, batches, args.warmup), bare_rate(cfg, batches, args.warmup)
            pairs.append(ds / bare)
            print(f"round {r + 1}: DeepSpeed engine {ds:8.1f}, bare {bare:8.1f} tokens/s; ratio {ds / bare:.2f}",
                  flush=True)
        print(f"ratio DeepSpeed/bare over {len(pairs)} round(s), median [min, max]: {np.median(pairs):.2f} "
              f"[{min(pairs):.2f}, {max(pairs):.2f}]")
        return

    # The machine's speed drifts between runs (the bare loop alone moves 5-15% within
    # minutes), and a run measured first or last in a sequence is biased by it. So every
    # platform run is sandwiched between two bare runs and measured against their mean:
    # bare, streaming, bare, materialized, bare, streaming, ... Ray is up only for the
    # platform runs: each bare run gets the machine to itself.
    def bare() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the Ray worker (1 CPU: OMP_NUM_THREADS=1)
        try:
            return bare_rate(cfg, batches, args.warmup)
        finally:
            torch.set_num_threads(threads)

    ray.shutdown()
    before = bare()
    ratios = {"streaming": [], "materialized": []}
    for r in range(args.repeats):
        for mode in ratios:
            init_ray(RayConfig(num_cpus=4, object_store_mb=512), workdir=work)
            rate = platform_rate(config(f"{work}/r{r}", version, args, materialize=mode == "materialized"), version,
                                 args.warmup)
            ray.shutdown()
            after = bare()
            ratios[mode].append(rate / ((before + after) / 2))
            print(f"round {r + 1}: bare {before:8.1f}, platform {mode:12s} {rate:8.1f}, bare {after:8.1f} tokens/s; "
                  f"ratio {ratios[mode][-1]:.2f}", flush=True)
            before = after
    summary = {mode: (np.median(v), min(v), max(v)) for mode, v in ratios.items()}
    print(f"ratio platform/bare (against the mean of the bare runs either side) over {args.repeats} round(s), "
          "median [min, max]: materialized {:.2f} [{:.2f}, {:.2f}] (goal >= 0.90), ".format(*summary["materialized"]) +
          "streaming {:.2f} [{:.2f}, {:.2f}] (data plane on the same {} cores)".format(*summary["streaming"], os.cpu_count()))


if __name__ == "__main__":
    main()
