"""A Qwen2.5-VL checkpoint folder, laid out as the released ones are (config + safetensors,
tokenizer, chat template, preprocessor_config.json), trained on the real Vision-Flan
sample: `python jobs/sft.py --config configs/sft_tiny.yaml model.preset=null
model.path=DIR` with packing, 2 workers and ZeRO-2; ZeRO-3 on the same rows (image and
text-only rows mixed: every rank runs the vision tower); each export reloads with the
Auto classes and generates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from support.jobs import job_summary
from vlit.config import Config, ModelConfig, PrepareConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.lineage import tracking_uri
from vlit.model.build import build_model_and_processor, load_exported
from vlit.train import sft
from vlit.versions import CorpusVersion

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizers_dir) -> str:
    """The tiny Qwen2.5-VL preset saved as a released checkpoint is laid out."""
    out = tmp_path_factory.mktemp("qwen2.5-vl")
    model, processor = build_model_and_processor(
        ModelConfig(preset="tiny-qwen2.5-vl", tokenizer=str(tokenizers_dir / "qwen3")))
    model.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json
    (out / "chat_template.jinja").write_text(processor.chat_template)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(os.listdir(out))
    return str(out)


@pytest.fixture(scope="module")
def sample(sample_dir, tmp_path_factory) -> str:
    """The real sample, every third row text-only (its image and <image> taken out)."""
    rows = json.loads((sample_dir / "annotation.json").read_text())
    for r in rows[::3]:
        r["image"] = None
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "").strip()
    path = tmp_path_factory.mktemp("sample") / "annotation.json"
    path.write_text(json.dumps(rows))
    return str(path)


def _overrides(tmp: Path, checkpoint: str, sample: str, images: Path, **extra) -> list[str]:
    settings = {"model.preset": "null", "model.path": checkpoint, "model.max_len": 768, "corpus.synth": "null",
                "corpus.prepare.sources": f"[{sample}]", "corpus.prepare.image_root": images,
                "corpus.prepare.max_bad_fraction": 0.05, "corpus.out": tmp / "corpora", "run.workdir": tmp / "work",
                "train.output": tmp / "run", "train.max_steps": STEPS, "train.micro_batch_size": 1,
                "train.grad_accum": 1, "train.trainable": "[vision, projector, llm]", **extra}
    return [f"{k}={v}" for k, v in settings.items()]


def _generates(export: str) -> None:
    model, processor = load_exported(export)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "What is shown?"}]}], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (60, 40), (200, 30, 30))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def _losses(cfg, run_id: str) -> list[float]:
    history = MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, "loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_jobs_sft_trains_a_qwen_checkpoint_folder_with_zero2(checkpoint, sample, sample_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    run = subprocess.run([sys.executable, "jobs/sft.py", "--config", "configs/sft_tiny.yaml",
                          *_overrides(tmp_path, checkpoint, sample, sample_dir, **{"train.zero_stage": 2})],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=560)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = job_summary(run.stdout)
    assert summary["steps"] == STEPS
    cfg = Config.model_validate({"run": {"workdir": str(tmp_path / "work")}, "corpus": {"out": "x"}})
    losses = _losses(cfg, summary["mlflow_run_id"])
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    _generates(summary["export"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_with_image_and_text_only_rows(ray_local, checkpoint, sample, sample_dir, tmp_path):
    prep = PrepareConfig(sources=[sample], image_root=str(sample_dir), max_bad_fraction=0.05)
    version = CorpusVersion.open(prepare_corpus(prep, str(tmp_path / "corpora"))["version"])
    assert version.rows >= 200
    from vlit.config import load_config

    cfg = load_config(str(REPO / "configs" / "sft_tiny.yaml"),
                      _overrides(tmp_path, checkpoint, sample, sample_dir,
                                 **{"train.zero_stage": 3, "corpus.out": version.uri}))
    result = sft.run_sft(cfg, version)
    assert result["steps"] == STEPS
    losses = _losses(cfg, result["mlflow_run_id"])
    assert losses[-1] < losses[0], losses
    exported, _ = load_exported(result["export"])
    initial, _ = build_model_and_processor(cfg.model)
    name = "model.visual.merger.mlp.0.weight"
    assert not torch.allclose(exported.state_dict()[name], initial.state_dict()[name])  # the merger trained
    assert np.isfinite(losses).all()
    _generates(result["export"])
