"""Trainable parts by stage and LoRA (model/parts.py), on the tiny model."""
from __future__ import annotations

import pytest

from vlit.config import Config, TrainConfig
from vlit.model import parts
from vlit.model.build import build_model_and_processor
from vlit.model.parts import select_trainable


def _cfg(tmp_path, **train) -> Config:
    return Config.model_validate({"corpus": {"out": str(tmp_path)}, "model": {"preset": "tiny", "max_len": 128},
                                  "train": {"output": str(tmp_path / "out"), **train}})


def _trainable_parts(model) -> set[str]:
    return {parts.part_of(n, "llava") for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("parts", [["projector"], ["projector", "llm"], ["vision", "projector", "llm"]])
def test_trainable_parts_by_stage(tmp_path, parts):
    model, _ = build_model_and_processor(_cfg(tmp_path).model)
    assert _trainable_parts(select_trainable(model, TrainConfig(output="x", trainable=parts))) == set(parts)


def test_lora_adapts_the_llm_and_keeps_the_projector_fully_trainable(tmp_path):
    model, _ = build_model_and_processor(_cfg(tmp_path).model)
    model = select_trainable(model, TrainConfig(output="x", trainable=["projector", "llm"], lora={"enabled": True}))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("language_model" in n for n in trainable if "lora_" in n) and any("lora_" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("lora_" not in n and "multi_modal_projector" not in n for n in trainable)
    with pytest.raises(ValueError, match="train.lora.enabled needs 'llm' or 'vision'"):
        select_trainable(build_model_and_processor(_cfg(tmp_path).model)[0],
                         TrainConfig(output="x", trainable=["projector"], lora={"enabled": True}))


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_text_only_batches_call_the_modules_of_image_batches_in_order(preset, tokenizers_dir):
    """ZeRO-3 prefetches parameters in the order the first step called modules, on every
    rank: a rank with a text-only batch must call what a rank with images calls, in the
    same order (else the ranks' all-gathers pair up wrong and training hangs), in the
    forward and in the backward (gradient checkpointing calls forwards again there)."""
    import numpy as np
    import torch
    from PIL import Image

    from model_helpers import row
    from vlit.config import LossConfig, ModelConfig
    from vlit.model.collate import collate
    from vlit.model.labels import IGNORE
    from vlit.model.packing import SFTTransform

    cfg = ModelConfig(preset=preset, max_len=1024,
                      tokenizer=str(tokenizers_dir / "qwen3") if preset != "tiny" else None)
    train = TrainConfig(output="x", trainable=["vision", "projector", "llm"], gradient_checkpointing=True)
    model, processor = build_model_and_processor(cfg)
    wrapped = parts.trainable_model(model.float(), train)
    calls: list[str] = []
    for name, module in wrapped.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
    transform = SFTTransform(cfg, LossConfig(), train, template_text=None, quarantine="/tmp/unused")
    transform.processor = processor

    def order(has_image: bool) -> list[str]:
        r = row("<image>\nWhat is this?" if has_image else "Say hi.", "A bus." if has_image else "Hi.", image=has_image)
        image = Image.fromarray(np.full((40, 60, 3), 128, np.uint8)) if has_image else None
        batch = collate(transform({"key": np.array([r["key"]]), "task": np.array(["t"]), "has_image": np.array([has_image]),
                                   "turns": np.array([r["turns"], None], dtype=object)[:1], "images": [image],
                                   "source": np.array(["s"]), "position": np.arange(1)}))
        calls.clear()
        wrapped.train()
        logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                         image_grid_thw=batch.get("image_grid_thw"))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                 ignore_index=IGNORE)
        calls.append("-- backward --")
        loss.backward()
        return list(calls)

    image, text = order(True), order(False)
    assert "-- backward --" in image and len(image) > image.index("-- backward --") + 1  # checkpointing recomputes
    assert text == image
