"""The flash-attn layout (`collate(..., varlen=True)`: one flattened row, no mask, the
positions restarting per segment) gives the logits of the 4D block-mask layout at every
real token, for LLaVA and both Qwen-VL families, packed and padded batches. On CPU
transformers builds the block mask from the restarting positions under SDPA, the same
segments flash-attn's varlen kernel reads from them on GPU (bench/gpu_check.py checks
that kernel)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model_helpers import row
from vlit.config import LossConfig, ModelConfig, TrainConfig
from vlit.model.build import build_model_and_processor
from vlit.model.collate import collate
from vlit.model.labels import IGNORE
from vlit.model.packing import SFTTransform
from vlit.model.parts import EveryRankVision, select_trainable

ROWS = [
    row("<image>\nWhat is shown here?", "A red bus.", task="caption"),
    row("Name a colour.", "Red.", "Another one?", "Blue.", task="chat", image=False),
    row("How many people are there? <image>", "Three.", task="count"),
    row("Say hello.", "Hello.", task="chat", image=False),
]
SIZES = [(60, 90), None, (100, 50), None]


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def family(request, tokenizers_dir):
    if request.param == "tiny-llava":
        cfg = ModelConfig(max_len=1024)
    else:
        cfg = ModelConfig(preset=request.param, tokenizer=str(tokenizers_dir / "qwen3"), max_len=1024)
    model, processor = build_model_and_processor(cfg)
    wrapped = EveryRankVision(select_trainable(model.float(), TrainConfig(output="/tmp/x")))  # the training forward
    return cfg, wrapped.eval(), processor


def _sequences(cfg, processor, packing: bool) -> dict:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)) if hw else None for hw in SIZES]
    n = len(ROWS)
    batch = {"key": np.array([r["key"] for r in ROWS]), "task": np.array([r["task"] for r in ROWS]),
             "turns": np.array([r["turns"] for r in ROWS] + [None], dtype=object)[:n],
             "has_image": np.array([im is not None for im in images]), "images": images,
             "source": np.array(["src"] * n), "position": np.arange(n)}
    train = TrainConfig(output="/tmp/x", packing=packing, group_by_modality_length=False)
    transform = SFTTransform(cfg, LossConfig(), train, template_text=None, quarantine="/tmp/unused")
    transform.processor = processor
    return transform(batch)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs.get("image_grid_thw"))


@pytest.mark.parametrize("packing", [True, False])
def test_varlen_layout_gives_the_block_mask_logits(family, packing):
    cfg, model, processor = family
    sequences = _sequences(cfg, processor, packing)
    masked, flat = collate(sequences), collate(sequences, varlen=True)
    assert flat["attention_mask"] is None and flat["input_ids"].shape[0] == 1
    real = masked["segment_ids"] > 0
    assert flat["input_ids"].shape[1] == int(real.sum())
    assert len(set(flat["segment_ids"][0].tolist())) == len(ROWS)  # every row its own segment
    for key in ("input_ids", "labels", "token_task"):
        assert torch.equal(flat[key][0], masked[key][real]), key
    # Each segment's first label is ignored, so the flattened shift never predicts across rows.
    starts = torch.cat([torch.tensor([True]), flat["segment_ids"][0, 1:] != flat["segment_ids"][0, :-1]])
    assert (flat["labels"][0][starts] == IGNORE).all()

    expected, got = _logits(model, masked)[real], _logits(model, flat)[0]
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())

    # The layout is load-bearing: the same flattened row with plain positions (no restarts)
    # lets the rows attend to each other, and the logits move.
    crossed = dict(flat)
    n = flat["input_ids"].shape[1]
    crossed["position_ids"] = (torch.arange(n)[None] if flat["position_ids"].ndim == 2 else
                               torch.cat([torch.arange(n).expand(1, 1, n), flat["position_ids"][1:]]))
    assert float((_logits(model, crossed)[0] - expected).abs().max()) > 1e-3
