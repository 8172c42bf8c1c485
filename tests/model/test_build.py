"""Tiny LLaVA from config; export (local, S3) and reload through the Auto classes; generate."""
from __future__ import annotations

import time

import numpy as np
import torch

from vlit.config import ModelConfig
from vlit.model.build import build_model_and_processor, export_model, load_exported


def _generate(model, processor) -> torch.Tensor:
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    inputs = processor(text=["<image>\nWhat is shown?"], images=[image], return_tensors="pt")
    return model.generate(**inputs, max_new_tokens=4, do_sample=False)


def test_build_export_reload_generate(tmp_path, s3):
    model, processor = build_model_and_processor(ModelConfig(preset="tiny"))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.hidden_size == 128 and model.config.vision_config.patch_size == 8
    model.eval()
    expected = _generate(model, processor)
    assert expected.shape[1] > 16 + 4  # 16 image tokens, the prompt, new tokens

    for uri in (str(tmp_path / "export"), "s3://vlit-test/models/tiny"):
        export_model(model, processor, uri)
        reloaded, reprocessor = load_exported(uri)
        assert type(reloaded).__name__ == "LlavaForConditionalGeneration"
        assert torch.equal(_generate(reloaded.eval(), reprocessor), expected)
    assert (tmp_path / "export" / "model.safetensors").exists()

    # model.path: the same export loaded as "real weights in HF format".
    loaded, _ = build_model_and_processor(ModelConfig(preset=None, path="s3://vlit-test/models/tiny"))
    assert torch.equal(_generate(loaded.eval(), processor), expected)


def test_reexport_to_the_same_s3_uri_is_not_served_from_a_stale_cache(s3, tmp_path, monkeypatch):
    from vlit.model import build

    monkeypatch.setattr(build, "MODEL_CACHE", str(tmp_path / "cache"))
    uri = "s3://vlit-test/models/reexported"
    model, processor = build_model_and_processor(ModelConfig(preset="tiny"))
    export_model(model, processor, uri)
    first = build.local_copy(uri)
    assert build.local_copy(uri) == first  # unchanged objects: the cached copy
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    time.sleep(1.1)  # S3 keeps modification times to the second; the sizes stay the same
    export_model(model, processor, uri)
    second = build.local_copy(uri)
    assert second != first
    reloaded, _ = load_exported(uri)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
