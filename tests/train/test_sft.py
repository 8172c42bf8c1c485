"""SFT on Ray Train + DeepSpeed, tiny model, 2 CPU workers: loss goes down (ZeRO-2, and
ZeRO-3 on batches with and without images), resume after a worker failure matches the
uninterrupted run, and the export reloads with Auto classes and generates."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from safetensors.numpy import load_file

import train_helpers
from vlit.model.build import build_model_and_processor
from vlit.train import loop, sft
from vlit.lineage import tracking_uri

# Ray workers do not share the driver's sys.path: ship the helpers by value.
cloudpickle.register_pickle_by_value(train_helpers)
STEPS = 8


def _losses(result: dict, cfg) -> list[float]:
    history = MlflowClient(tracking_uri(cfg)).get_metric_history(result["mlflow_run_id"], "loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _weights(export: str) -> dict[str, np.ndarray]:
    return load_file(f"{export}/model.safetensors")


@pytest.fixture(scope="module")
def zero2_run(ray_local, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("zero2"))
    version = train_helpers.corpus(tmp)
    cfg = train_helpers.config(tmp, version, max_steps=STEPS, checkpoint_every=2, zero_stage=2)
    return cfg, version, sft.run_sft(cfg, version)


@pytest.mark.timeout(240)
def test_zero2_loss_goes_down_with_per_task_metrics(zero2_run):
    cfg, version, result = zero2_run
    assert result["steps"] == STEPS
    losses = _losses(result, cfg)
    assert len(losses) == STEPS and losses[-1] < 0.8 * losses[0], losses
    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["train.zero_stage"] == "2" and run.data.tags["vlit.corpus.digest"] == version.digest
    assert 0 < run.data.metrics["real_token_fraction"] <= 1 and run.data.metrics["tokens_per_s"] > 0
    assert any(k.startswith("task_loss/") for k in run.data.metrics)
    # The corpus version is the run's dataset input, named by its content digest.
    [dataset] = [d.dataset for d in run.inputs.dataset_inputs]
    assert (dataset.name, dataset.digest) == ("corpus", version.digest) and version.uri in dataset.source


@pytest.mark.timeout(180)
def test_export_reloads_with_auto_classes_and_generates(zero2_run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg, _, result = zero2_run
    model = AutoModelForImageTextToText.from_pretrained(result["export"])
    processor = AutoProcessor.from_pretrained(result["export"])
    image = np.full((32, 32, 3), 200, np.uint8)
    inputs = processor(images=image, text="<image>\nWhat color is the circle?", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    assert isinstance(processor.decode(out[0, -5:]), str)
    # The trained weights were exported, not the initial ones.
    initial, _ = build_model_and_processor(cfg.model)
    name = "model.multi_modal_projector.linear_1.weight"
    assert not torch.allclose(model.state_dict()[name], initial.state_dict()[name])


@pytest.mark.timeout(300)
def test_resume_after_worker_failure_matches_uninterrupted_run(zero2_run, tmp_path, monkeypatch):
    cfg, version, uninterrupted = zero2_run
    marker = tmp_path / "failed-once"
    # Rank 1 is SIGKILLed after step 3, one step past the checkpoint at step 2.
    monkeypatch.setattr(loop, "worker", functools.partial(train_helpers.failing_train_loop, fail_at=3,
                                                          marker=str(marker)))
    # Materialized (stage 2's mode) while the reference run streamed: the same batches in
    # the same order either way, so the weights must match as well.
    resumed_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"output": str(tmp_path / "resumed"), "materialize": True})})
    resumed = sft.run_sft(resumed_cfg, version)
    assert marker.exists() and resumed["steps"] == STEPS
    # The restarted group was handed the step-2 checkpoint (not a restart from scratch,
    # which would end with the same weights too).
    assert (tmp_path / "failed-once.starts").read_text().split() == ["none", "step-0000002"]
    expected, got = _weights(uninterrupted["export"]), _weights(resumed["export"])
    assert expected.keys() == got.keys()
    worst = max(float(np.abs(expected[k] - got[k]).max()) for k in expected)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run by up to {worst}"


@pytest.mark.timeout(300)
def test_zero3_mixed_image_and_text_batches_train_without_hanging(ray_local, tmp_path):
    # Every 2nd row is text-only; the transform never mixes modalities in a micro-batch,
    # so at many steps one rank has images and the other has none.
    version = train_helpers.corpus(str(tmp_path), text_only_every=2)
    cfg = train_helpers.config(str(tmp_path), version, name="sft-zero3", max_steps=STEPS, zero_stage=3,
                               trainable=["vision", "projector", "llm"])
    result = sft.run_sft(cfg, version)
    losses = _losses(result, cfg)
    assert result["steps"] == STEPS and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.timeout(300)
def test_lora_with_gradient_checkpointing_trains_audits_and_exports_merged(ray_local, tmp_path):
    version = train_helpers.corpus(str(tmp_path), too_long=2)
    cfg = train_helpers.config(str(tmp_path), version, name="sft-lora", max_steps=STEPS, zero_stage=2,
                               gradient_checkpointing=True, lr=1e-2,
                               lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0})
    result = sft.run_sft(cfg, version)
    losses = _losses(result, cfg)
    assert result["steps"] == STEPS and losses[-1] < losses[0], losses
    # The export is a plain model: adapters merged into the LLM's weights, none left over.
    from transformers import AutoModelForImageTextToText

    assert not any("lora_" in k for k in _weights(result["export"]))
    exported = {k: v.numpy() for k, v in AutoModelForImageTextToText.from_pretrained(result["export"]).state_dict().items()}
    initial, _ = build_model_and_processor(cfg.model)
    initial = {k: v.numpy() for k, v in initial.state_dict().items()}
    assert exported.keys() == initial.keys()
    changed = {k for k in exported if not np.allclose(exported[k], initial[k])}
    assert any(".q_proj." in k for k in changed) and any("multi_modal_projector" in k for k in changed), sorted(changed)
    # Outside LoRA's targets and the projector, nothing moved.
    assert all(".q_proj." in k or ".k_proj." in k or ".v_proj." in k or ".o_proj." in k or "multi_modal_projector" in k
               for k in changed), sorted(changed)
    # The supervision audit, logged with the run: every task was supervised, the run's
    # supervised tokens are its steps' (all workers), and the two over-long rows never
    # reached the loss: quarantined with their reason, not cut.
    client = MlflowClient(tracking_uri(cfg))
    audit = json.load(open(client.download_artifacts(result["mlflow_run_id"], "supervision_audit.json", str(tmp_path))))
    assert set(audit["supervised_tokens"]) == set(version.task_counts) and all(audit["supervised_tokens"].values())
    steps = client.get_metric_history(result["mlflow_run_id"], "supervised_tokens")
    assert sum(audit["supervised_tokens"].values()) == sum(m.value for m in steps)
    assert audit["quarantined"] == {"too_long": 2} and audit["zero_supervised_rows"] == 0
    assert result["quarantined"] == {"too_long": 2}
    metrics = client.get_run(result["mlflow_run_id"]).data.metrics
    assert metrics["audit/quarantined/too_long"] == 2 and metrics["audit/zero_supervised_rows"] == 0
