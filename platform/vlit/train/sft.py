"""Supervised fine-tuning (stage 1: the task corpus; stage 2: the alignment set).

    run_sft(cfg, version)             driver: stream + TorchTrainer + export
      -> train_loop(config)           each Ray Train worker
           setup: DeepSpeedStrategy, the stage's initial model, resume from a checkpoint
           per micro-batch: collate -> forward -> per-token loss -> backward -> step
           per step: metrics (loss, per-task loss, tokens/s, real-token fraction, lr)
                     to MLflow from rank 0, and to Ray Train (at most every 2 s, see
                     REPORT_INTERVAL_S)
           every train.checkpoint_every steps and at the end: a sharded checkpoint
      -> export_checkpoint(last checkpoint) -> <train.output>/export

Resuming after a worker failure reproduces the uninterrupted run: the stream's order is
deterministic (`preserve_order`), and a resumed worker skips the micro-batches its
checkpoint already trained on.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import time

import ray.train
from ray.data.collate_fn import NumpyBatchCollateFn
import torch

from vlit import storage
from vlit.config import Config
from vlit.model.collate import collate
from vlit.model.labels import token_losses
from vlit.train import tracking
from vlit.train.strategy import DeepSpeedStrategy, deepspeed_config, export_checkpoint, load_initial_model


# Ray Train's controller takes one report per worker per poll (every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and `report` blocks until the previous
# one was taken: reporting each step of a sub-second step would pace training at the poll
# interval (measured: 20x slower on the tiny model). Steps report to Ray Train at most this
# often; MLflow gets every step, written in one batch at the same cadence.
REPORT_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))
AUDIT_PREFIX = "supervised_tokens/"


class StepMeter:
    """Sums over one optimizer step's micro-batches; `reduce` all-reduces them once."""

    def __init__(self, num_tasks: int, device):
        self.num_tasks, self.device = num_tasks, device
        self.last_report = 0.0
        # Supervised tokens per task over the whole run, all workers: the supervision
        # audit. Carried in checkpoints so a resumed run's audit covers the whole run.
        self.supervised = [0.0] * num_tasks
        self.start()

    def start(self) -> None:
        # [report due, loss x supervised tokens, supervised tokens, tokens, real tokens,
        #  per-task loss sums, per-task supervised tokens]
        self.sums = torch.zeros(5 + 2 * self.num_tasks, device=self.device)
        self.since = time.perf_counter()

    def add(self, loss, batch, task_sum, task_count) -> None:
        supervised = task_count.sum()
        tokens = torch.tensor(float(batch["segment_ids"].numel()), device=self.device)
        real = (batch["segment_ids"] > 0).sum().float()  # segment 0 is padding
        self.sums[1:] += torch.cat([torch.stack([loss.detach() * supervised, supervised, tokens, real]),
                                    task_sum, task_count])

    def reduce(self, strategy: DeepSpeedStrategy, tasks: list[str], step: int) -> tuple[dict, bool]:
        """The step's metrics over all workers, and whether to report them to Ray Train
        now: rank 0's clock decides, carried in the same all-reduce, since `report` is a
        barrier that every rank must reach equally often."""
        now = time.perf_counter()
        if strategy.rank == 0 and now - self.last_report >= REPORT_INTERVAL_S:
            self.sums[0] = 1.0
        sums = strategy.all_reduce(self.sums).tolist()
        due, (loss_sum, supervised, tokens, real) = sums[0] > 0, sums[1:5]
        task_sum, task_count = sums[5:5 + self.num_tasks], sums[5 + self.num_tasks:]
        self.supervised = [a + b for a, b in zip(self.supervised, task_count)]
        metrics = {
            "step": step,
            "loss": loss_sum / max(supervised, 1),
            "lr": strategy.lr(),
            "tokens_per_s": real / (now - self.since),  # real (non-padding) tokens, all workers
            "real_token_fraction": real / max(tokens, 1),
            "real_tokens": real,
            "supervised_tokens": supervised,
        }
        metrics.update({f"task_loss/{t}": s / c for t, s, c in zip(tasks, task_sum, task_count) if c})
        if due:
            self.last_report = now
        self.start()
        return metrics, due


class _Collate(NumpyBatchCollateFn):
    """The model's `collate` as Ray Data's collate hook; `dtype` is the attention mask's."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, batch: dict) -> dict:
        return collate(batch, self.dtype)


def micro_batches(train, skip: int, dtype: torch.dtype, device: torch.device, collate_fn=None):
    """This worker's collated micro-batches over all epochs on `device`, less the first
    `skip`. Collation runs in Ray Data's prefetch threads, off the training step.
    `collate_fn`: another stage's collate hook (DPO's pairs); default SFT's `collate`."""
    shard = ray.train.get_dataset_shard("train")
    seen = 0
    for _ in range(train.epochs):
        # drop_last: every rank gets the same number of batches (the split is equal), so
        # no rank waits in a collective for a batch that another never gets.
        for batch in shard.iter_torch_batches(batch_size=train.micro_batch_size, drop_last=True, prefetch_batches=2,
                                              collate_fn=collate_fn or _Collate(dtype)):
            seen += 1
            if seen > skip:
                yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def resume_state(strategy: DeepSpeedStrategy) -> dict:
    """Load the latest reported checkpoint, if any; its client state (`step`: the
    optimizer steps it holds, plus what the loop saved with it), else {}."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as path:
        state = strategy.load_checkpoint(path)
    if strategy.rank == 0:  # a restarted worker or a re-run job says where it picks up
        print(f"[vlit train] resuming from checkpoint {checkpoint.path} at step {state.get('step', 0)}", flush=True)
    return state


def resume(strategy: DeepSpeedStrategy) -> int:
    """Load the latest reported checkpoint, if any; the optimizer steps it holds."""
    return resume_state(strategy).get("step", 0)


def save_and_report(strategy: DeepSpeedStrategy, metrics: dict, step: int, state: dict | None = None) -> None:
    """Each rank writes its shard (with `state` beside the step in the client state); Ray
    merges the ranks' files into one checkpoint."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="vlit-ckpt-") as path:
        strategy.save_checkpoint(path, client_state={**(state or {}), "step": step})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(path), checkpoint_dir_name=f"step-{step:07d}")
    # `report` returns once the report is queued; the controller registers the checkpoint
    # at its next poll (every ~2 s). A worker killed before then takes the report with it
    # and the restarted group would start from the previous checkpoint (or from scratch).
    # Wait until it is committed: at most one poll per checkpoint.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def audited(metrics: dict, meter: StepMeter, tasks: list[str]) -> dict:
    """A checkpoint's metrics with the run's supervised tokens per task so far."""
    return {**metrics, **{f"{AUDIT_PREFIX}{t}": n for t, n in zip(tasks, meter.supervised)}}


def train_loop(config: dict) -> None:
    """One Ray Train worker of an SFT stage. `config`: see `run_sft`."""
    cfg = Config.model_validate(config["cfg"])
    train, tasks = cfg.train, config["tasks"]
    task_index = {t: i for i, t in enumerate(tasks)}
    strategy = DeepSpeedStrategy(train, config["deepspeed"])
    strategy.setup_distributed()
    model, _ = load_initial_model(cfg)
    engine = strategy.prepare(model, total_steps=config["total_steps"])
    state = resume_state(strategy)
    step = state.get("step", 0)
    logger = tracking.StepLogger(config["mlflow"]) if strategy.rank == 0 else None
    meter = StepMeter(len(tasks), strategy.device)
    meter.supervised = state.get("supervised", meter.supervised)
    metrics, saved = None, step
    dtype = torch.bfloat16 if config["deepspeed"]["bf16"]["enabled"] else torch.float32
    for batch in micro_batches(train, step * train.grad_accum, dtype, strategy.device):
        if train.max_steps and step >= train.max_steps:
            break
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], pixel_values=batch["pixel_values"])
        loss, task_sum, task_count = token_losses(logits, batch, task_index)
        strategy.backward(loss)
        meter.add(loss, batch, task_sum, task_count)
        if not strategy.step():
            continue
        step += 1
        metrics, report_due = meter.reduce(strategy, tasks, step)
        if logger:
            logger.log(metrics, step)
            if report_due:
                logger.flush()
        if step % train.checkpoint_every == 0:
            save_and_report(strategy, audited(metrics, meter, tasks), step, {"supervised": meter.supervised})
            saved = step
        elif report_due:
            ray.train.report(metrics)
    if metrics is not None and saved != step:
        save_and_report(strategy, audited(metrics, meter, tasks), step, {"supervised": meter.supervised})
    if logger:
        logger.close()


def total_steps(cfg: Config, version) -> int:
    """`train.max_steps`, else an upper bound from the sampling plan (one row per
    sequence; packing makes fewer sequences, so the schedule may not reach its end)."""
    from vlit.corpus.sampling import SamplingPlan

    if cfg.train.max_steps:
        return cfg.train.max_steps
    tasks = cfg.corpus.tasks
    rows = SamplingPlan.build(version.task_counts, cap=tasks.cap, temperature=tasks.temperature).target.sum()
    train = cfg.train
    return max(1, math.ceil(train.epochs * rows / (train.num_workers * train.micro_batch_size * train.grad_accum)))


def run_quarantine(cfg: Config) -> str:
    """Where this stage's stream quarantines rows: `corpus.stream.quarantine` when set,
    else the run's own <train.output>/quarantine, so its audit counts only its rows."""
    return cfg.corpus.stream.quarantine or storage.join(cfg.train.output, "quarantine")


def supervision_audit(cfg: Config, metrics: dict, tasks: list[str]) -> dict:
    """What the loss saw: supervised tokens per task over the run, and the rows it never
    saw. A row with zero supervised tokens is never trained on (`encode_row` rejects it),
    so those rows are the stream's `no_supervised_tokens` quarantine."""
    from vlit.corpus.stream import quarantine_reasons

    quarantined = quarantine_reasons(run_quarantine(cfg))
    return {
        "supervised_tokens": {t: int(metrics.get(f"{AUDIT_PREFIX}{t}", 0)) for t in tasks},
        "zero_supervised_rows": quarantined.get("no_supervised_tokens", 0),
        "quarantined": quarantined,
        "quarantine": run_quarantine(cfg),
    }


def build_trainer(cfg: Config, version, loop_config: dict):
    from vlit.corpus.stream import build_stream, quarantine_uri
    from vlit.corpus.template_text import template_text
    from vlit.model.packing import SFTTransform

    train = cfg.train
    corpus = cfg.corpus.model_copy(update={"stream": cfg.corpus.stream.model_copy(update={"quarantine": run_quarantine(cfg)})})
    templates = template_text(version, cfg.loss) if cfg.loss.target == "l2t" else None
    transform = functools.partial(SFTTransform, cfg.model, cfg.loss, train, template_text=templates,
                                  quarantine=quarantine_uri(version, corpus), epoch=0)
    dataset = build_stream(version, corpus, epoch=0, transform=transform)
    if train.materialize:
        # In the streaming order, so a materialized run trains on the same batches.
        dataset.context.execution_options.preserve_order = True
        dataset = dataset.materialize()
    return torch_trainer(cfg, train_loop, loop_config, dataset)


def torch_trainer(cfg: Config, loop, loop_config: dict, dataset):
    """The TorchTrainer of a training stage (SFT, DPO): `train.num_workers` workers running
    `loop(loop_config)` on `dataset`, checkpoints and retries under <train.output>/ray."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = cfg.train
    # Deterministic order into each worker's shard, so a resumed run sees the same batches.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage.join(train.output, "ray"),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )


def run_sft(cfg: Config, version, parent_run_id: str | None = None) -> dict:
    """Train one SFT stage on `version` and export it to <train.output>/export; its MLflow
    run is nested under `parent_run_id` when given (the two-stage job's run)."""
    from vlit.corpus.sampling import SamplingPlan
    from vlit.runtime import init_ray

    if cfg.train is None:
        raise ValueError("run_sft needs a `train` section in the config")
    init_ray(cfg.ray, cfg.run.workdir)
    steps = total_steps(cfg, version)
    run = tracking.start_run(cfg, version, parent_run_id)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "deepspeed": deepspeed_config(cfg.train, cfg.model),
        "tasks": list(SamplingPlan.build(version.task_counts).tasks),
        "total_steps": steps,
        "mlflow": run,
    }
    result = build_trainer(cfg, version, loop_config).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"SFT run {cfg.run.name} reported no checkpoint (empty corpus {version.uri}?)")
    export = storage.join(cfg.train.output, "export")
    with result.checkpoint.as_directory() as path:
        export_checkpoint(cfg, path, export)
    audit = supervision_audit(cfg, result.metrics, loop_config["tasks"])
    tracking.log_audit(run, audit)
    summary = {"export": export, "checkpoint": result.checkpoint.path, "steps": result.metrics.get("step"),
               "loss": result.metrics.get("loss"), "tokens_per_s": result.metrics.get("tokens_per_s"),
               "mlflow_run_id": run["run_id"], "corpus": version.uri, "digest": version.digest,
               "zero_supervised_rows": audit["zero_supervised_rows"], "quarantined": audit["quarantined"]}
    tracking.finish_run(run, summary)
    return summary
