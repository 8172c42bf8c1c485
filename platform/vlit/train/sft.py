"""Supervised fine-tuning (stage 1: the task corpus; stage 2: the alignment set): what a
step computes, for the one training loop (`vlit.train.loop`).

    run_sft(cfg, version)   the corpus stream (packed sequences, `SFTTransform`) into
                            `train_stage(cfg, SFTStep, ...)`, then the supervision audit
    SFTStep                 per micro-batch: forward -> per-token loss and per-task sums;
                            per step: loss, per-task loss, tokens/s, real-token fraction;
                            the run's supervised tokens per task, carried in checkpoints
"""
from __future__ import annotations

import functools

import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from vlit import lineage, storage
from vlit.config import Config, require
from vlit.model.collate import collate
from vlit.model.labels import token_losses
from vlit.train.loop import Step, require_rows, total_steps, train_stage

AUDIT_PREFIX = "supervised_tokens/"


class _Collate(NumpyBatchCollateFn):
    """The model's `collate` as Ray Data's collate hook; `dtype` is the attention mask's;
    `varlen`: one flattened row for flash-attn's varlen kernel (model/collate.py)."""

    def __init__(self, dtype: torch.dtype, varlen: bool = False):
        self.dtype, self.varlen = dtype, varlen

    def __call__(self, batch: dict) -> dict:
        return collate(batch, self.dtype, self.varlen)


class SFTStep(Step):
    name, data = "sft", "corpus"

    def __init__(self, cfg: Config, config: dict):
        super().__init__(cfg, config)
        self.tasks = config["tasks"]
        self.task_index = {t: i for i, t in enumerate(self.tasks)}
        self.fields = ("loss_sum", "supervised", "tokens", "real", *(f"task_sum/{t}" for t in self.tasks),
                       *(f"task_count/{t}" for t in self.tasks))
        # Supervised tokens per task over the whole run, all workers: the supervision
        # audit. Carried in checkpoints so a resumed run's audit covers the whole run.
        self.supervised = [0.0] * len(self.tasks)

    def collate(self, dtype):
        return _Collate(dtype, varlen=self.cfg.model.attn_implementation == "flash_attention_2")

    def loss(self, engine, batch):
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                        image_grid_thw=batch.get("image_grid_thw"))
        loss, task_sum, task_count = token_losses(logits, batch, self.task_index)
        supervised = task_count.sum()
        tokens = torch.tensor(float(batch["segment_ids"].numel()), device=loss.device)
        real = (batch["segment_ids"] > 0).sum().float()  # segment 0 is padding
        return loss, torch.cat([torch.stack([loss.detach() * supervised, supervised, tokens, real]), task_sum, task_count])

    def metrics(self, totals, seconds):
        counts = [totals[f"task_count/{t}"] for t in self.tasks]
        self.supervised = [a + b for a, b in zip(self.supervised, counts)]
        metrics = {
            "loss": totals["loss_sum"] / max(totals["supervised"], 1),
            "tokens_per_s": totals["real"] / seconds,  # real (non-padding) tokens, all workers
            "real_token_fraction": totals["real"] / max(totals["tokens"], 1),
            "real_tokens": totals["real"],
            "supervised_tokens": totals["supervised"],
        }
        metrics.update({f"task_loss/{t}": totals[f"task_sum/{t}"] / c for t, c in zip(self.tasks, counts) if c})
        return metrics

    def state(self):
        return {"supervised": self.supervised}

    def load_state(self, state):
        self.supervised = state.get("supervised", self.supervised)

    def checkpoint_metrics(self, metrics):
        return {**metrics, **{f"{AUDIT_PREFIX}{t}": n for t, n in zip(self.tasks, self.supervised)}}


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


def sft_stream(cfg: Config, version):
    """The stage's training stream: sampled, rendered, decoded, encoded and packed rows."""
    from vlit.corpus.stream import build_stream, quarantine_uri
    from vlit.corpus.template_text import template_text
    from vlit.model.packing import SFTTransform

    corpus = cfg.corpus.model_copy(update={"stream": cfg.corpus.stream.model_copy(update={"quarantine": run_quarantine(cfg)})})
    templates = template_text(version, cfg.loss) if cfg.loss.target == "l2t" else None
    transform = functools.partial(SFTTransform, cfg.model, cfg.loss, cfg.train, template_text=templates,
                                  quarantine=quarantine_uri(version, corpus), epoch=0)
    holdout = cfg.eval.holdout if cfg.eval else None  # rows evaluation scores never train
    dataset = build_stream(version, corpus, epoch=0, transform=transform, holdout=holdout)
    if cfg.train.materialize:
        # In the streaming order, so a materialized run trains on the same batches.
        dataset.context.execution_options.preserve_order = True
        dataset = dataset.materialize()
    return dataset


def run_sft(cfg: Config, version, parent_run_id: str | None = None) -> dict:
    """Train one SFT stage on corpus `version` and export it to <train.output>/export; its
    MLflow run is nested under `parent_run_id` when given (the two-stage job's run)."""
    from vlit.corpus.sampling import SamplingPlan
    from vlit.runtime import init_ray

    require(cfg, "train", "an SFT stage", "workers, ZeRO stage, lr, output")
    tasks = list(SamplingPlan.build(version.task_counts).tasks)
    # An upper bound from the sampling plan (one row per sequence; packing makes fewer
    # sequences, so the schedule may not reach its end).
    sampling = cfg.corpus.tasks
    rows = int(SamplingPlan.build(version.task_counts, cap=sampling.cap, temperature=sampling.temperature).target.sum())

    def summarize(run: dict, metrics: dict) -> dict:
        audit = supervision_audit(cfg, metrics, tasks)
        lineage.log_audit(run, audit)
        return {"tokens_per_s": metrics.get("tokens_per_s"), "zero_supervised_rows": audit["zero_supervised_rows"],
                "quarantined": audit["quarantined"]}

    init_ray(cfg.ray, cfg.run.workdir)
    dataset = sft_stream(cfg, version)
    require_rows(dataset, version, run_quarantine(cfg))
    return train_stage(cfg, SFTStep, version, dataset, total_steps=total_steps(cfg, rows),
                       parent_run_id=parent_run_id, worker_config={"tasks": tasks}, summarize=summarize)
