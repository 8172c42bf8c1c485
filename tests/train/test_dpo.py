"""DPO on Ray Train + DeepSpeed, tiny model, 2 CPU workers (ZeRO-2), on preference pairs
made from the synthetic corpus: the loss falls and reward accuracy rises above 0.5 on the
training pairs; a live reference gives the cached run's first step (to 1e-5); a second
run reuses the cache; the live references score exactly what the cache holds."""
from __future__ import annotations

import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from vlit import storage
from vlit.config import Config, TrainConfig
from vlit.corpus.images import decode_image
from vlit.world import synth_corpus
from vlit.model.build import build_model_and_processor, load_exported
from vlit.model.pairs import PairTransform, collate_pairs
from vlit.loops.feedback import build_pairs
from vlit.loops.feedback_synth import JUDGE, synth_feedback
from vlit.train.dpo import run_dpo
from vlit.train.preference import sequence_logps
from vlit.train.reference import AdaptersDisabled, CachedReference, FrozenCopy
from vlit.model.parts import EveryRankVision, select_trainable
from vlit.lineage import tracking_uri
from vlit.versions import PairsVersion

EPOCHS = 3  # 54 pairs, 27 per worker: 6 micro-batches of 4 pairs per epoch -> 18 steps
IMAGE_SIZE = 32


def config(tmp: str, pairs: PairsVersion, name: str, reference: str = "cached", **train) -> Config:
    """Full fine-tuning of projector + LLM: the tiny model learns the preference within a
    few epochs (LoRA on it learns too slowly for a short test)."""
    return Config.model_validate({
        "run": {"name": name, "workdir": f"{tmp}/work"},
        "corpus": {"out": f"{tmp}/corpora"},
        "model": {"preset": "tiny", "max_len": 512},
        "train": {"output": f"{tmp}/{name}", "trainable": ["projector", "llm"], "zero_stage": 2, "lr": 3e-3,
                  "warmup_ratio": 0.0, "micro_batch_size": 4, "num_workers": 2, "checkpoint_every": 100, **train},
        # beta 0.5: the tiny model's short replies give small log-ratio margins, and at the
        # usual 0.1 the loss moves too little in 18 steps to tell learning from noise.
        "dpo": {"pairs": pairs.uri, "reference": reference, "reference_batch_size": 4, "cache": f"{tmp}/reference_cache",
                "beta": 0.5,
                "stream": {"image_size": IMAGE_SIZE, "block_rows": 32, "decode_concurrency": 1}},
    })


def history(cfg: Config, result: dict, key: str) -> list[float]:
    metrics = MlflowClient(tracking_uri(cfg)).get_metric_history(result["mlflow_run_id"], key)
    return [m.value for m in sorted(metrics, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dpo"))
    synth = synth_corpus(f"{tmp}/src", instances=96, tasks=4, image_pool=8, image_size=IMAGE_SIZE)
    made = synth_feedback(synth["annotation"], prompts=16)
    version = build_pairs([made["feedback"]], f"{tmp}/pairs", judge=JUDGE)
    assert version["pairs"] == 54 and version["ties"] > 0 and version["unparseable"] > 0
    return tmp, PairsVersion.open(version["version"])


@pytest.fixture(scope="module")
def cached_run(ray_local, pairs):
    tmp, version = pairs
    cfg = config(tmp, version, "dpo-cached", epochs=EPOCHS)
    return cfg, run_dpo(cfg, version)


@pytest.mark.timeout(420)
def test_cached_run_loss_falls_and_reward_accuracy_rises(cached_run, pairs):
    cfg, result = cached_run
    _, version = pairs
    assert result["steps"] == 6 * EPOCHS and not result["reference_cache"]["reused"]
    cache = result["reference_cache"]
    assert cache["rows"] == version.rows and cache["uri"].endswith(f"/{version.digest}-{cache['reference_digest']}")
    losses, accuracy = history(cfg, result, "loss"), history(cfg, result, "rewards/accuracies")
    assert len(losses) == len(accuracy) == result["steps"]
    assert abs(losses[0] - math.log(2)) < 1e-5  # the policy starts as the reference
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])
    assert last < first - 0.1, losses
    assert np.mean(accuracy[-6:]) > 0.5 and accuracy[0] == 0.0, accuracy
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "step_seconds", "memory/peak_rss_mb"):
        assert len(history(cfg, result, key)) == result["steps"], key
    run = MlflowClient(tracking_uri(cfg)).get_run(result["mlflow_run_id"])
    assert run.data.tags["vlit.stage"] == "dpo" and run.data.tags["vlit.pairs.digest"] == version.digest
    assert run.info.run_name == "dpo-dpo-cached"
    exported, _ = load_exported(result["export"])
    initial, _ = build_model_and_processor(cfg.model)
    name = "model.multi_modal_projector.linear_1.weight"
    assert not torch.allclose(exported.state_dict()[name], initial.state_dict()[name])


@pytest.mark.timeout(300)
def test_live_reference_gives_the_cached_runs_first_step(cached_run, pairs):
    cfg, cached = cached_run
    tmp, version = pairs
    live_cfg = config(tmp, version, "dpo-live", reference="copy", max_steps=1)
    live = run_dpo(live_cfg, version)
    assert live["reference_cache"] is None and live["steps"] == 1
    assert abs(history(live_cfg, live, "loss")[0] - history(cfg, cached, "loss")[0]) < 1e-5
    # The step's pairs are the same: the reference's log-probs of them match too.
    for key in ("ref_logps/chosen", "ref_logps/rejected", "logps/chosen"):
        assert history(live_cfg, live, key)[0] == pytest.approx(history(cfg, cached, key)[0], rel=1e-6, abs=1e-4), key


@pytest.mark.timeout(300)
def test_second_run_reuses_the_cache(cached_run, pairs):
    _, first = cached_run
    tmp, version = pairs
    files = storage.list_files(first["reference_cache"]["uri"])
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    again = run_dpo(config(tmp, version, "dpo-again", max_steps=1), version)
    assert again["reference_cache"]["reused"] and again["reference_cache"]["uri"] == first["reference_cache"]["uri"]
    assert {f: os.stat(f).st_mtime_ns for f in storage.list_files(first["reference_cache"]["uri"])} == stamps


class _Engine(torch.nn.Module):
    """The part of a DeepSpeed engine the live references use: `module`, `device`, calling it."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module, self.device = module, torch.device("cpu")

    def forward(self, **inputs):
        return self.module(**inputs)


def _first_pairs(cfg: Config, version: PairsVersion, n: int) -> dict:
    """The first `n` pairs, encoded and collated as the stream and the workers do."""
    rows = version.read_table().slice(0, n).to_pylist()
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("pair_id", "prompt", "chosen", "rejected")}
    batch["has_image"] = np.ones(n, bool)
    batch["images"] = [decode_image(storage.read_bytes(r["image"])) for r in rows]
    return collate_pairs(PairTransform(cfg.model, quarantine="unused")(batch))


@pytest.mark.timeout(120)
def test_live_references_score_what_the_cache_holds(cached_run, pairs):
    cfg, result = cached_run
    _, version = pairs
    batch = _first_pairs(cfg, version, 6)
    cached = CachedReference(result["reference_cache"]["uri"]).logps(_Engine(torch.nn.Identity()), batch)
    model, _ = build_model_and_processor(cfg.model)
    copy = FrozenCopy(model, torch.float32).logps(_Engine(torch.nn.Identity()), batch)
    # The policy with trained adapters: disabling them must give the base model's scores.
    policy = select_trainable(model, TrainConfig(output="x", trainable=["llm"], lora={"enabled": True}))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    engine = _Engine(EveryRankVision(policy)).train()
    disabled = AdaptersDisabled().logps(engine, batch)
    assert engine.training  # back in train mode for the policy's forward
    for sums, counts in (copy, disabled):
        assert torch.allclose(sums, cached[0], atol=1e-4) and torch.equal(counts, cached[1])
    with torch.no_grad():
        adapted = engine.eval()(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values")},
                                repeat_images=2)
    assert not torch.allclose(sequence_logps(adapted, batch["labels"])[0], cached[0], atol=1e-2)
    assert pq.read_table(storage.join(result["reference_cache"]["uri"], "data")).num_rows == version.rows
