"""DPO of a VLM on preference pairs: the SFT trainer with a preference loss.

    run_dpo(cfg, pairs)               driver
      -> cache_reference_logps        dpo.reference=cached: one Ray Data pass, reused later
      -> train_loop(config)           each Ray Train worker
           setup: DeepSpeedStrategy, the initial model, its reference, resume
           per micro-batch of B pairs: 2B sequences (chosen, rejected) sharing B image
               encodings -> response log-probs -> reference log-probs -> preference_loss
           per step: loss, rewards/{chosen,rejected,margins,accuracies}, log-probs, lr,
               pairs/s, step time, peak memory: MLflow from rank 0, Ray Train every ~2 s
           every train.checkpoint_every steps and at the end: a sharded checkpoint
      -> export_checkpoint(last checkpoint) -> <train.output>/export

Everything but the loss is SFT's: the strategy (ZeRO 0-3, LoRA, trainable parts),
micro-batching, checkpoints and resume (`vlit.train.sft`), the HF export (LoRA merged).
Silkie's recipe (configs/dpo.yaml): sigmoid loss, beta 0.1, lr 1e-5, 3 epochs, LoRA, the
vision tower frozen.
"""
from __future__ import annotations

import math
import resource
import time

import ray.train
import torch

from vlit import storage
from vlit.config import Config
from vlit.model.pairs import PairCollate, PairEncoder, pairs_quarantine, pairs_stream
from vlit.train import tracking
from vlit.train.preference import for_loss, preference_loss, sequence_logps
from vlit.train.reference import build_reference, cache_reference_logps
from vlit.train.sft import REPORT_INTERVAL_S, micro_batches, resume, save_and_report, torch_trainer
from vlit.train.strategy import DeepSpeedStrategy, deepspeed_config, export_checkpoint, load_initial_model

# Per-step sums, all-reduced once per optimizer step. "due" carries rank 0's decision to
# report to Ray Train (see sft.REPORT_INTERVAL_S); the rest are sums over pairs.
FIELDS = ("due", "pairs", "tokens", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
          "logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")


class PairMeter:
    """The step's metrics over all workers, from per-pair sums."""

    def __init__(self, device):
        self.device, self.last_report = device, 0.0
        self.start()

    def start(self) -> None:
        self.sums = torch.zeros(len(FIELDS), device=self.device)
        self.since = time.perf_counter()

    def add(self, loss, stats: dict, policy: torch.Tensor, ref: torch.Tensor, tokens) -> None:
        """`policy`, `ref`: response log-prob sums of the 2B sequences (chosen, rejected)."""
        b = len(stats["rewards/chosen"])
        parts = [b, tokens, loss.detach() * b, stats["rewards/chosen"].sum(), stats["rewards/rejected"].sum(),
                 stats["rewards/accuracies"].sum(), policy[:b].detach().sum(), policy[b:].detach().sum(),
                 ref[:b].sum(), ref[b:].sum()]
        self.sums[1:] += torch.stack([torch.as_tensor(p, dtype=torch.float32, device=self.device) for p in parts])

    def reduce(self, strategy: DeepSpeedStrategy, step: int) -> tuple[dict, bool]:
        now = time.perf_counter()
        if strategy.rank == 0 and now - self.last_report >= REPORT_INTERVAL_S:
            self.sums[0] = 1.0
        totals = dict(zip(FIELDS, strategy.all_reduce(self.sums).tolist()))
        due, pairs, tokens = totals.pop("due") > 0, max(totals.pop("pairs"), 1.0), totals.pop("tokens")
        seconds = now - self.since
        metrics = {"step": step, **{k: v / pairs for k, v in totals.items()}, "lr": strategy.lr(),
                   "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds, "step_seconds": seconds,
                   # This worker's peak resident memory (Linux reports KiB).
                   "memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        if torch.cuda.is_available():
            metrics["memory/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if due:
            self.last_report = now
        self.start()
        return metrics, due


def publish(strategy, logger, metrics: dict, due: bool, step: int, checkpoint_every: int) -> bool:
    """The step's metrics to MLflow (rank 0) and, when due, to Ray Train; a checkpoint
    every `checkpoint_every` steps. True when this step was checkpointed."""
    if logger:
        logger.log(metrics, step)
        if due:
            logger.flush()
    if step % checkpoint_every == 0:
        save_and_report(strategy, metrics, step)
        return True
    if due:
        ray.train.report(metrics)
    return False


def train_loop(config: dict) -> None:
    """One Ray Train worker of a DPO stage. `config`: see `run_dpo`."""
    cfg = Config.model_validate(config["cfg"])
    train, dpo = cfg.train, cfg.dpo
    strategy = DeepSpeedStrategy(train, config["deepspeed"])
    strategy.setup_distributed()
    model, _ = load_initial_model(cfg)
    reference = build_reference(cfg, model, config["cache"])  # before prepare() adds LoRA
    engine = strategy.prepare(model, total_steps=config["total_steps"])
    step = resume(strategy)
    logger = tracking.StepLogger(config["mlflow"]) if strategy.rank == 0 else None
    meter = PairMeter(strategy.device)
    metrics, saved = None, step
    batches = micro_batches(train, step * train.grad_accum, torch.float32, strategy.device, collate_fn=PairCollate())
    for batch in batches:
        if train.max_steps and step >= train.max_steps:
            break
        # The reference first: eval mode and no dropout, so it draws nothing from the RNG
        # and the policy's forward is the same whichever reference the run uses.
        ref, ref_counts = reference.logps(engine, batch)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], pixel_values=batch["pixel_values"], repeat_images=2)
        policy, counts = sequence_logps(logits, batch["labels"])
        b = len(batch["pair_id"])
        ours, theirs = for_loss(policy, counts, dpo.loss), for_loss(ref, ref_counts, dpo.loss)
        loss, stats = preference_loss(ours[:b], ours[b:], theirs[:b], theirs[b:], dpo.loss, dpo.beta,
                                      dpo.label_smoothing)
        strategy.backward(loss)
        meter.add(loss, stats, policy, ref, batch["attention_mask"].sum())
        if not strategy.step():
            continue
        step += 1
        metrics, due = meter.reduce(strategy, step)
        if publish(strategy, logger, metrics, due, step, train.checkpoint_every):
            saved = step
    if metrics is not None and saved != step:
        save_and_report(strategy, metrics, step)
    if logger:
        logger.close()


def total_steps(cfg: Config, pairs) -> int:
    """`train.max_steps`, else the optimizer steps of `train.epochs` over the pairs."""
    train = cfg.train
    if train.max_steps:
        return train.max_steps
    return max(1, math.ceil(train.epochs * pairs.rows / (train.num_workers * train.micro_batch_size * train.grad_accum)))


def start_run(cfg: Config, pairs, parent_run_id: str | None = None) -> dict:
    """The stage's MLflow run: SFT's (config as params, the data's digest as a tag), named
    and tagged as a DPO stage on a pairs version."""
    run = tracking.start_run(cfg, pairs, parent_run_id)
    client = tracking._client(run["uri"])
    tags = {"mlflow.runName": f"dpo-{storage.normalize(cfg.train.output).rsplit('/', 1)[-1]}", "vlit.stage": "dpo",
            "vlit.pairs.digest": pairs.digest, "vlit.pairs.version": pairs.uri}
    for key, value in tags.items():
        client.set_tag(run["run_id"], key, value)
    return run


def run_dpo(cfg: Config, pairs, parent_run_id: str | None = None) -> dict:
    """Train one DPO stage on a pairs version (`vlit.synth.feedback.PairsVersion`) and
    export it to <train.output>/export; the stage's summary."""
    from vlit.runtime import init_ray

    if cfg.train is None or cfg.dpo is None:
        raise ValueError("run_dpo needs `train` and `dpo` sections in the config")
    init_ray(cfg.ray, cfg.run.workdir)
    cache = cache_reference_logps(cfg, pairs) if cfg.dpo.reference == "cached" else None
    run = start_run(cfg, pairs, parent_run_id)
    loop_config = {"cfg": cfg.model_dump(mode="json"), "deepspeed": deepspeed_config(cfg.train, cfg.model),
                   "total_steps": total_steps(cfg, pairs), "mlflow": run, "cache": cache and cache["uri"]}
    dataset = pairs_stream(pairs, cfg.dpo.stream, PairEncoder(cfg.model, pairs_quarantine(pairs)))
    result = torch_trainer(cfg, train_loop, loop_config, dataset).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"DPO run {cfg.run.name} reported no checkpoint (no pairs in {pairs.uri}?)")
    export = storage.join(cfg.train.output, "export")
    with result.checkpoint.as_directory() as path:
        export_checkpoint(cfg, path, export)
    metrics = result.metrics
    summary = {"export": export, "checkpoint": result.checkpoint.path, "steps": metrics.get("step"),
               "loss": metrics.get("loss"), "reward_accuracy": metrics.get("rewards/accuracies"),
               "reward_margin": metrics.get("rewards/margins"), "mlflow_run_id": run["run_id"],
               "corpus": pairs.uri, "pairs": pairs.uri, "digest": pairs.digest, "reference": cfg.dpo.reference,
               "reference_cache": cache}
    tracking.finish_run(run, summary)
    return summary
