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
