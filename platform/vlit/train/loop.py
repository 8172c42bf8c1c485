"""The one training loop of every stage (SFT, DPO): the worker skeleton and the driver.

    train_stage(cfg, SFTStep, data, dataset, ...)      driver
      -> TorchTrainer(worker)                            each Ray Train worker:
           setup: DeepSpeedStrategy, the stage's initial model made trainable, resume
           per micro-batch: step.loss(engine, batch) -> backward -> optimizer step
           per optimizer step: step.fields' sums all-reduced once -> metrics (step.metrics
               plus step, lr, step time, peak memory) to MLflow from rank 0 (in batches),
               and to Ray Train at most every REPORT_INTERVAL_S
           every train.checkpoint_every steps and at the end: a sharded checkpoint
      -> the last checkpoint as a Hugging Face export -> <train.output>/export
      -> the stage's summary, and its MLflow run closed

A stage supplies only a `Step`: its name, the sums one micro-batch adds, the metrics they
give, its collate function and any state its checkpoints carry. Resuming after a worker
failure reproduces the uninterrupted run: the stream's order is deterministic
(`preserve_order`), and a resumed worker skips the micro-batches its checkpoint already
trained on.
"""
from __future__ import annotations

import math
import os
import resource
import tempfile
import time

import ray.train
import torch

from vlit import lineage, storage
from vlit.config import Config
from vlit.model.build import initial_model
from vlit.model.parts import export_trained, trainable_model
from vlit.progress import Progress
from vlit.train.strategy import DeepSpeedStrategy, consolidated_state_dict, deepspeed_config

# Ray Train's controller takes one report per worker per poll (every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and `report` blocks until the previous
# one was taken: reporting each step of a sub-second step would pace training at the poll
# interval (measured: 20x slower on the tiny model). Steps report to Ray Train at most this
# often; MLflow gets every step, written in one batch at the same cadence.
REPORT_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


class NoTrainingData(RuntimeError):
    """Every row of the stage's input was quarantined before training; the message gives
    the counts per reason and where the quarantined rows are."""


def require_rows(dataset, data, quarantine: str) -> None:
    """Stop before training when the stream yields nothing: every row quarantined (all
    too long for model.max_len, say). Reads up to the first training row, so a stream
    that has one goes on at once."""
    if dataset.take(1):
        return
    from vlit.corpus.stream import quarantine_reasons

    reasons = quarantine_reasons(quarantine)
    raise NoTrainingData(f"every row of {data.uri} was quarantined before training: "
                         f"{', '.join(f'{r} {n}' for r, n in sorted(reasons.items())) or 'no reasons recorded'}; "
                         f"the rows and their reasons: {quarantine}")


class Step:
    """What one stage computes; built in each worker as `cls(cfg, worker_config)`."""

    name = "?"  # the stage's name in MLflow (vlit.stage) and its run's name
    data = "corpus"  # what its input version is (the MLflow dataset input's name)
    fields: tuple[str, ...] = ()  # the sums one micro-batch adds, in `loss`'s order

    def __init__(self, cfg: Config, config: dict):
        self.cfg, self.config = cfg, config

    def collate(self, dtype: torch.dtype):
        """Ray Data's collate hook for this stage's rows (runs in the prefetch threads)."""
        raise NotImplementedError

    def before_prepare(self, model: torch.nn.Module) -> None:
        """Called with the initial model before it is made trainable (DPO copies its reference)."""

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to back-propagate, the micro-batch's sums in `fields` order)."""
        raise NotImplementedError

    def metrics(self, totals: dict[str, float], seconds: float) -> dict:
        """The optimizer step's metrics from its sums over all micro-batches and workers."""
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint carries besides the step, for `load_state` on resume."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def checkpoint_metrics(self, metrics: dict) -> dict:
        """The metrics reported with a checkpoint (the last one's are the run's result)."""
        return metrics


class Meter:
    """Sums over one optimizer step's micro-batches; `reduce` all-reduces them once. Slot 0
    carries rank 0's decision to report to Ray Train: `report` is a barrier that every rank
    must reach equally often, so one clock decides for all."""

    def __init__(self, fields: tuple[str, ...], device):
        self.fields, self.device = fields, device
        self.last_report = 0.0
        self.start()

    def start(self) -> None:
        self.sums = torch.zeros(1 + len(self.fields), device=self.device)
        self.since = time.perf_counter()

    def add(self, sums: torch.Tensor) -> None:
        self.sums[1:] += sums.detach().to(self.sums.dtype)

    def reduce(self, strategy: DeepSpeedStrategy) -> tuple[dict[str, float], bool, float]:
        """(the sums over all workers by field, whether to report now, the step's seconds)."""
        now = time.perf_counter()
        if strategy.rank == 0 and now - self.last_report >= REPORT_INTERVAL_S:
            self.sums[0] = 1.0
        sums = strategy.all_reduce(self.sums).tolist()
        due, seconds = sums[0] > 0, now - self.since
        if due:
            self.last_report = now
        self.start()
        return dict(zip(self.fields, sums[1:])), due, seconds


def total_steps(cfg: Config, rows: int) -> int:
    """`train.max_steps`, else the optimizer steps of `train.epochs` over `rows` sequences."""
    train = cfg.train
    if train.max_steps:
        return train.max_steps
    return max(1, math.ceil(train.epochs * rows / (train.num_workers * train.micro_batch_size * train.grad_accum)))


def micro_batches(train, skip: int, collate_fn, device: torch.device):
    """This worker's collated micro-batches over all epochs on `device`, less the first
    `skip` (those a resumed checkpoint already trained on)."""
    shard = ray.train.get_dataset_shard("train")
    seen = 0
    for _ in range(train.epochs):
        # drop_last: every rank gets the same number of batches (the split is equal), so
        # no rank waits in a collective for a batch that another never gets.
        for batch in shard.iter_torch_batches(batch_size=train.micro_batch_size, drop_last=True, prefetch_batches=2,
                                              collate_fn=collate_fn):
            seen += 1
            if seen > skip:
                yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def resume(strategy: DeepSpeedStrategy) -> dict:
    """Load the latest reported checkpoint, if any; its client state (`step`: the optimizer
    steps it holds, plus the stage's own state), else {}."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as path:
        state = strategy.load_checkpoint(path)
    if strategy.rank == 0:  # a restarted worker or a re-run job says where it picks up
        print(f"[vlit train] resuming from checkpoint {checkpoint.path} at step {state.get('step', 0)}", flush=True)
    return state


def save_and_report(strategy: DeepSpeedStrategy, metrics: dict, step: int, state: dict) -> None:
    """Each rank writes its shard (with `state` beside the step in the client state); Ray
    merges the ranks' files into one checkpoint."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="vlit-ckpt-") as path:
        strategy.save_checkpoint(path, client_state={**state, "step": step})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(path), checkpoint_dir_name=f"step-{step:07d}")
    # `report` returns once the report is queued; the controller registers the checkpoint
    # at its next poll (every ~2 s). A worker killed before then takes the report with it
    # and the restarted group would start from the previous checkpoint (or from scratch).
    # Wait until it is committed: at most one poll per checkpoint.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def worker(config: dict) -> None:
    """One Ray Train worker of a stage; `config` is `train_stage`'s worker config."""
    cfg = Config.model_validate(config["cfg"])
    train = cfg.train
    strategy = DeepSpeedStrategy(train, config["deepspeed"])
    strategy.setup_distributed()
    step_fn = config["step"](cfg, config)
    model, _ = initial_model(cfg)
    step_fn.before_prepare(model)
    engine = strategy.prepare(trainable_model(model, train), total_steps=config["total_steps"])
    state = resume(strategy)
    step = state.get("step", 0)
    step_fn.load_state(state)
    logger = lineage.StepLogger(config["mlflow"]) if strategy.rank == 0 else None
    # Rank 0 only: one progress line per interval for the stage, not one per worker.
    # Packed SFT makes fewer steps than its rows-based total (sft.run_sft): shown as a bound.
    bound = step_fn.name == "sft" and train.packing and not train.max_steps
    progress = Progress(step_fn.name, config["total_steps"], "steps", done=step, bound=bound) \
        if strategy.rank == 0 else None
    meter = Meter(step_fn.fields, strategy.device)
    metrics, saved = None, step
    collate_fn = step_fn.collate(torch.bfloat16 if strategy.bf16 else torch.float32)
    for batch in micro_batches(train, step * train.grad_accum, collate_fn, strategy.device):
        if train.max_steps and step >= train.max_steps:
            break
        loss, sums = step_fn.loss(engine, batch)
        strategy.backward(loss)
        meter.add(sums)
        if not strategy.step():
            continue
        step += 1
        totals, due, seconds = meter.reduce(strategy)
        metrics = {"step": step, "lr": strategy.lr(), **step_fn.metrics(totals, seconds), "step_seconds": seconds,
                   # This worker's peak resident memory (Linux reports KiB).
                   "memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            metrics["memory/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if logger:
            logger.log(metrics, step)
            if due:
                logger.flush()
            progress.update(1, loss=metrics.get("loss", float("nan")), **{"tokens/s": metrics.get("tokens_per_s", 0.0)})
        if step % train.checkpoint_every == 0:
            save_and_report(strategy, step_fn.checkpoint_metrics(metrics), step, step_fn.state())
            saved = step
        elif due:
            ray.train.report(metrics)
    if metrics is not None and saved != step:
        save_and_report(strategy, step_fn.checkpoint_metrics(metrics), step, step_fn.state())
    if logger:
        logger.close()
        progress.close()


def torch_trainer(cfg: Config, loop_config: dict, dataset):
    """`train.num_workers` workers running `worker(loop_config)` on `dataset`, checkpoints
    and retries under <train.output>/ray."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = cfg.train
    # Deterministic order into each worker's shard, so a resumed run sees the same batches.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=train.resources_per_worker),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage.join(train.output, "ray"),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )


def train_stage(cfg: Config, step_cls: type[Step], data, dataset, *, total_steps: int,
                parent_run_id: str | None = None, worker_config: dict | None = None, summarize=None) -> dict:
    """Train one stage on `data` (the input version, streamed as `dataset`) and export it to
    <train.output>/export. Its MLflow run (nested under `parent_run_id` when given) gets the
    config, the input version, every step's metrics and, at the end, the summary:
    export, checkpoint, steps, loss, the input's URI and digest, plus `summarize(run,
    metrics)` (the stage's own fields)."""
    from vlit.runtime import init_ray

    init_ray(cfg.ray, cfg.run.workdir)
    run = lineage.start_run(cfg, data, parent_run_id, stage=step_cls.name, data=step_cls.data)
    loop_config = {"cfg": cfg.model_dump(mode="json"), "deepspeed": deepspeed_config(cfg.train, cfg.model),
                   "step": step_cls, "total_steps": total_steps, "mlflow": run, **(worker_config or {})}
    result = torch_trainer(cfg, loop_config, dataset).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{step_cls.name} run {cfg.run.name} reported no checkpoint (no batch in {data.uri}?)")
    export = storage.join(cfg.train.output, "export")
    with result.checkpoint.as_directory() as path:
        export_trained(cfg, consolidated_state_dict(path, cfg.train.zero_stage), export)
    metrics = result.metrics
    summary = {"export": export, "checkpoint": result.checkpoint.path, "steps": metrics.get("step"),
               "loss": metrics.get("loss"), "mlflow_run_id": run["run_id"], "corpus": data.uri,
               "digest": data.digest, **(summarize(run, metrics) if summarize else {})}
    lineage.finish_run(run, summary)
    return summary
