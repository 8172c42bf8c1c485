"""DPO of a VLM on preference pairs: what a step computes, for the one training loop
(`vlit.train.loop`).

    run_dpo(cfg, pairs)         dpo.reference=cached: the reference's log-probs, one Ray
                                Data pass reused by later runs; the pairs stream into
                                `train_stage(cfg, DPOStep, ...)`
    DPOStep                     per micro-batch of B pairs: 2B sequences (chosen, rejected)
                                sharing B image encodings -> response log-probs ->
                                reference log-probs -> preference_loss; per step: loss,
                                rewards/{chosen,rejected,margins,accuracies}, log-probs,
                                pairs/s, tokens/s

Everything but the loss is the loop's: the strategy (ZeRO 0-3, LoRA, trainable parts),
micro-batching, checkpoints and resume, the HF export (LoRA merged).
Silkie's recipe (configs/dpo.yaml): sigmoid loss, beta 0.1, lr 1e-5, 3 epochs, LoRA, the
vision tower frozen.
"""
from __future__ import annotations

import torch

from vlit.config import Config, require
from vlit.model.pairs import PairCollate, PairEncoder, pairs_quarantine, pairs_stream
from vlit.train.loop import Step, require_rows, total_steps, train_stage
from vlit.train.preference import for_loss, preference_loss, sequence_logps
from vlit.train.reference import build_reference, cache_reference_logps

# Per-step sums over pairs, all-reduced once per optimizer step.
FIELDS = ("pairs", "tokens", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
          "logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")


class DPOStep(Step):
    name, data, fields = "dpo", "pairs", FIELDS

    def collate(self, dtype):
        return PairCollate()

    def before_prepare(self, model):
        self.reference = build_reference(self.cfg, model, self.config["cache"])  # before LoRA is added

    def loss(self, engine, batch):
        dpo = self.cfg.dpo
        # The reference first: eval mode and no dropout, so it draws nothing from the RNG
        # and the policy's forward is the same whichever reference the run uses.
        ref, ref_counts = self.reference.logps(engine, batch)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                        image_grid_thw=batch.get("image_grid_thw"), repeat_images=2)
        policy, counts = sequence_logps(logits, batch["labels"])
        b = len(batch["pair_id"])
        ours, theirs = for_loss(policy, counts, dpo.loss), for_loss(ref, ref_counts, dpo.loss)
        loss, stats = preference_loss(ours[:b], ours[b:], theirs[:b], theirs[b:], dpo.loss, dpo.beta,
                                      dpo.label_smoothing)
        parts = [b, batch["attention_mask"].sum(), loss.detach() * b, stats["rewards/chosen"].sum(),
                 stats["rewards/rejected"].sum(), stats["rewards/accuracies"].sum(), policy[:b].detach().sum(),
                 policy[b:].detach().sum(), ref[:b].sum(), ref[b:].sum()]
        return loss, torch.stack([torch.as_tensor(p, dtype=torch.float32, device=logits.device) for p in parts])

    def metrics(self, totals, seconds):
        pairs, tokens = max(totals["pairs"], 1.0), totals["tokens"]
        metrics = {k: v / pairs for k, v in totals.items() if k not in ("pairs", "tokens")}
        metrics.update({"pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
                        "rewards/margins": metrics["rewards/chosen"] - metrics["rewards/rejected"]})
        return metrics


def run_dpo(cfg: Config, pairs, parent_run_id: str | None = None) -> dict:
    """Train one DPO stage on a pairs version (`vlit.versions.PairsVersion`) and export it
    to <train.output>/export; the stage's summary."""
    from vlit.runtime import init_ray

    require(cfg, "train", "a DPO stage", "workers, ZeRO stage, LoRA, lr, output")
    dpo = require(cfg, "dpo", "a DPO stage", "its pairs, loss and beta")
    init_ray(cfg.ray, cfg.run.workdir)
    cache = cache_reference_logps(cfg, pairs) if dpo.reference == "cached" else None

    def summarize(run: dict, metrics: dict) -> dict:
        return {"reward_accuracy": metrics.get("rewards/accuracies"), "reward_margin": metrics.get("rewards/margins"),
                "pairs": pairs.uri, "reference": dpo.reference, "reference_cache": cache}

    dataset = pairs_stream(pairs, dpo.stream, PairEncoder(cfg.model, pairs_quarantine(pairs)))
    require_rows(dataset, pairs, dpo.stream.quarantine or pairs_quarantine(pairs))
    return train_stage(cfg, DPOStep, pairs, dataset, total_steps=total_steps(cfg, pairs.rows), parent_run_id=parent_run_id,
                       worker_config={"cache": cache and cache["uri"]}, summarize=summarize)
