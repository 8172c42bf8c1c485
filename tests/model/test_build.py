"""Tiny LLaVA from config; export (local, S3) and reload through the Auto classes; generate;
a checkpoint's tokenizer class kept."""
from __future__ import annotations

import time

import numpy as np
import pytest
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


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_an_export_keeps_the_checkpoint_tokenizer_class_and_its_ids(family, tokenizers_dir, tmp_path):
    """A checkpoint whose tokenizer_config.json names LlamaTokenizer (llava-hf's, legacy
    mode) or Qwen2Tokenizer: its export names the same class and mode, and that class
    loads the export to the checkpoint's token ids, as vlit's own reload does."""
    import json

    from transformers import (AutoTokenizer, CLIPImageProcessorPil, LlamaTokenizer, LlavaConfig, LlavaProcessor,
                              Qwen2Tokenizer)

    from vlit.model.build import load_processor

    folder = tmp_path / "checkpoint"
    if family == "llava":
        tokenizer = AutoTokenizer.from_pretrained(tokenizers_dir / "llama2")
        tokenizer.add_tokens(["<image>"], special_tokens=True)
        image = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=14,
                       vision_feature_select_strategy="default").save_pretrained(folder)
        LlavaConfig(text_config={"vocab_size": len(tokenizer), "num_hidden_layers": 1, "hidden_size": 32,
                                 "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2},
                    vision_config={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                   "num_attention_heads": 2, "image_size": 336, "patch_size": 14},
                    image_token_id=32000).save_pretrained(folder)
        # The checkpoint's tokenizer_config.json says its mode, as llava-hf's do.
        legacy = json.loads((tokenizers_dir / "llama2" / "tokenizer_config.json").read_text())["legacy"]
        saved = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**saved, "legacy": legacy}))
        cls, keys = LlamaTokenizer, {"tokenizer_class": "LlamaTokenizer", "legacy": legacy}
    else:
        _, processor = build_model_and_processor(ModelConfig(preset="tiny-qwen2.5-vl", tokenizer=str(tokenizers_dir / "qwen3")))
        tokenizer = processor.tokenizer
        from vlit.model.build import model_config

        model_config(ModelConfig(preset="tiny-qwen2.5-vl", tokenizer=str(tokenizers_dir / "qwen3"))).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
        cls, keys = Qwen2Tokenizer, {"tokenizer_class": "Qwen2Tokenizer"}
    loaded = load_processor(str(folder))
    text = "Hello world! <image>\nHow many?"
    assert loaded.tokenizer(text).input_ids == tokenizer(text).input_ids
    model = load_exported_model_class(folder)
    export_model(model, loaded, str(tmp_path / "export"))
    saved = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert {k: saved.get(k) for k in keys} == keys
    assert cls.from_pretrained(tmp_path / "export")(text).input_ids == tokenizer(text).input_ids
    _, reloaded = load_exported(str(tmp_path / "export"))
    assert reloaded.tokenizer(text).input_ids == tokenizer(text).input_ids


def load_exported_model_class(folder):
    """A randomly initialised model of the folder's config (the weights do not matter here)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
