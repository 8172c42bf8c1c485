"""The Qwen-VL family, packed: rows with images of different sizes and text-only rows in
one sequence (per-segment mRoPE positions, a block mask) give the loss and the gradients
of the same rows run alone through the model's own processor and forward (whose
`get_rope_index` computes the positions), for Qwen2.5-VL and Qwen3-VL, every trainable
part included: vision tower and merger."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model_helpers import row
from vlit.config import LossConfig, ModelConfig, TrainConfig
from vlit.model.build import build_model_and_processor
from vlit.model.collate import collate
from vlit.model.labels import IGNORE, encode_row
from vlit.model.packing import SFTTransform
from vlit.model.parts import EveryRankVision, part_of, select_trainable
from vlit.model.templates import _messages

ROWS = [
    row("<image>\nWhat is shown here?", "A red bus.", task="caption"),
    row("Name a colour.", "Red.", "Another one?", "Blue.", task="chat", image=False),
    row("How many people are there? <image>", "Three.", task="count"),
    row("Say hello.", "Hello.", task="chat", image=False),
]
SIZES = [(60, 90), None, (100, 50), None]  # (height, width): two aspect ratios, two text rows
ALL = TrainConfig(output="/tmp/x", trainable=["vision", "projector", "llm"])


def _images():
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)) if hw else None for hw in SIZES]


@pytest.fixture(scope="module", params=["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def family(request, tokenizers_dir):
    cfg = ModelConfig(preset=request.param, tokenizer=str(tokenizers_dir / "qwen3"), max_len=1024)
    model, processor = build_model_and_processor(cfg)
    return cfg, model.float(), processor


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chat_template_labels_supervise_the_replies_and_their_end(family):
    cfg, _, processor = family
    enc = encode_row(ROWS[1], processor, cfg, LossConfig(), None)
    on = np.flatnonzero(enc.labels != IGNORE)
    runs = [processor.tokenizer.decode(enc.input_ids[r]) for r in np.split(on, np.flatnonzero(np.diff(on) > 1) + 1)]
    assert runs == ["Red.<|im_end|>", "Blue.<|im_end|>"]
    l2t = encode_row(ROWS[1], processor, cfg, LossConfig(target="l2t"), None)
    text = processor.tokenizer.decode(l2t.input_ids[l2t.labels != IGNORE])
    assert text == "Name a colour.Red.<|im_end|>Another one?Blue.<|im_end|>"  # no system prompt, no role markup


def test_packed_equals_unpacked_loss_and_gradients(family):
    cfg, model, processor = family
    images = _images()
    n = len(ROWS)
    batch = {"key": np.array([r["key"] for r in ROWS]), "task": np.array([r["task"] for r in ROWS]),
             "turns": np.array([r["turns"] for r in ROWS] + [None], dtype=object)[:n],
             "has_image": np.array([im is not None for im in images]), "images": images,
             "source": np.array(["src"] * n), "position": np.arange(n)}
    transform = SFTTransform(cfg, LossConfig(), ALL.model_copy(update={"packing": True, "group_by_modality_length": False}),
                             template_text=None, quarantine="/tmp/unused")
    packed = transform(batch)
    assert len(packed["input_ids"]) == 1 and packed["num_images"].tolist() == [2]  # one sequence, both images
    inputs = collate(packed)
    assert inputs["position_ids"].shape[0] == 3 and inputs["image_grid_thw"].shape == (2, 3)

    wrapped = EveryRankVision(select_trainable(model, ALL))
    model.zero_grad()
    logits = wrapped(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"])
    labels = inputs["labels"]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE)
    loss.backward()
    packed_loss, packed_grads = float(loss), _grads(model)

    # Unpacked: each row alone through the processor (the chat template's text, its own
    # image expansion) and the model's own forward, which computes the 3-D positions.
    model.zero_grad()
    total, count = 0.0, 0
    for r, image in zip(ROWS, images):
        text = processor.apply_chat_template(_messages([(t["role"], t["content"]) for t in r["turns"]]), tokenize=False)
        alone = processor(text=[text], images=[image] if image else None, return_tensors="pt")
        enc = encode_row(r, processor, cfg, LossConfig(), None,
                         [int(alone["image_grid_thw"][0].prod()) // 4] if image else None)
        assert alone["input_ids"][0].tolist() == enc.input_ids.tolist()  # vlit's tokens are the processor's
        out = model(**alone).logits
        target = torch.as_tensor(enc.labels)[None]
        total = total + torch.nn.functional.cross_entropy(out[:, :-1].transpose(1, 2), target[:, 1:],
                                                          ignore_index=IGNORE, reduction="sum")
        count += int((target[:, 1:] != IGNORE).sum())
    (total / count).backward()
    assert abs(packed_loss - float(total / count)) < 1e-5
    alone_grads = _grads(model)
    seen = set()
    for name, g in alone_grads.items():
        p = packed_grads[name]
        if g.abs().max() == 0:
            continue
        seen.add(part_of(name, wrapped.family))
        cos = float(torch.nn.functional.cosine_similarity(g.flatten(), p.flatten(), dim=0))
        assert cos >= 0.99999, (name, cos)
        assert float((g - p).abs().max()) <= 1e-5 * float(g.abs().max()), name
    assert seen == {"vision", "projector", "llm"}
