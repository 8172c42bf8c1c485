"""Packing and collation: packed loss and gradients equal the unpacked rows'; modality and
length grouping; mixed and text-only batches; the supervision audit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model_helpers import row
from vlit.config import LossConfig, ModelConfig, TrainConfig
from vlit.model.build import build_model_and_processor
from vlit.model.collate import MODEL_INPUTS, collate
from vlit.model.labels import encode_row, token_losses
from vlit.model.packing import SFTTransform, best_fit_packs, modality_length_batches

MODEL = ModelConfig(max_len=640)
ROWS = [
    row("<image>\nWhat is shown?", "A red bus.", task="caption"),
    row("Name a colour.", "Red.", "Another one?", "Blue.", task="chat", image=False),
    row("<image>\nHow many people?", "Three.", task="count"),
    row("Say hello.", "Hello.", task="chat", image=False),
]


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model_and_processor(MODEL)
    return model.float(), processor


def _batch(rows: list[dict], processor, **train) -> dict:
    """The stream's numpy batch for `rows`: random images, then the transform."""
    rng = np.random.default_rng(0)
    n = len(rows)
    pixels = rng.integers(0, 255, (n, 40, 40, 3), dtype=np.uint8)
    batch = {
        "key": np.array([r["key"] for r in rows]),
        "task": np.array([r["task"] for r in rows]),
        "turns": np.array([r["turns"] for r in rows] + [None], dtype=object)[:n],
        "has_image": np.array([r["image"] is not None for r in rows]),
        "images": [Image.fromarray(p) if r["image"] is not None else None for p, r in zip(pixels, rows)],
        "pixels": pixels,
        "source": np.array(["src"] * n),
        "position": np.arange(n),
    }
    transform = SFTTransform(MODEL, LossConfig(target="l2t"), TrainConfig(output="/tmp/x", **train),
                             template_text=None, quarantine="/tmp/unused")
    transform.processor = processor
    return transform(batch), batch


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_packed_loss_and_grads_equal_unpacked_rows(tiny):
    model, processor = tiny
    packed_rows, batch = _batch(ROWS, processor, packing=True, group_by_modality_length=False)
    assert len(packed_rows["input_ids"]) == 1  # four rows, one sequence
    inputs = collate(packed_rows)
    assert inputs["attention_mask"].shape[1:] == (1, inputs["input_ids"].shape[1], inputs["input_ids"].shape[1])
    model.zero_grad()
    out = model(**{k: inputs[k] for k in MODEL_INPUTS})
    out.loss.backward()
    packed_loss, packed_grads = out.loss.detach(), _grads(model)

    # Unpacked: each row alone, no padding, no mask; token-weighted mean over all rows.
    model.zero_grad()
    pixels = {r["key"]: p for r, p in zip(ROWS, processor.image_processor(images=list(batch["pixels"]), return_tensors="pt")["pixel_values"])}
    total, tokens, losses = 0.0, 0, []
    for r in ROWS:
        enc = encode_row(r, processor, MODEL, LossConfig(target="l2t"), None)
        n = int((enc.labels[1:] != -100).sum())
        loss = model(input_ids=torch.as_tensor(enc.input_ids)[None], labels=torch.as_tensor(enc.labels)[None],
                     pixel_values=pixels[r["key"]][None] if enc.has_image else None).loss
        losses.append((loss, n))
        tokens += n
    total = sum(loss * n for loss, n in losses) / tokens
    total.backward()
    assert torch.allclose(packed_loss, total.detach(), atol=1e-5, rtol=0)
    for a, b in zip(packed_grads, _grads(model)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)

    loss, task_sum, task_count = token_losses(out.logits, inputs, {t: i for i, t in enumerate(sorted(set(inputs["tasks"])))})
    assert torch.allclose(loss.detach(), packed_loss, atol=1e-5)
    assert int(task_count.sum()) == tokens
    assert torch.allclose(task_sum.sum() / tokens, packed_loss, atol=1e-5)


def test_modality_grouping_and_mixed_batches(tiny):
    model, processor = tiny
    rows = [row(f"<image>\nQuestion {i}?" + " More." * i, f"Answer {i}.", task="img") for i in range(6)]
    rows += [row(f"Text question {i}?", f"Answer {i}.", task="txt", image=False) for i in range(5)]
    out, _ = _batch(rows, processor, packing=True, micro_batch_size=2)
    # Packs never mix modalities; every row lands in exactly one sequence.
    for tasks, n_images, seg in zip(out["segment_tasks"], out["num_images"], out["segment_ids"]):
        assert len(set(tasks)) == 1 and n_images == (len(tasks) if tasks[0] == "img" else 0)
        assert seg.max() == len(tasks)
    assert sorted(k for keys in out["segment_keys"] for k in keys) == sorted(r["key"] for r in rows)
    assert (out["input_ids"][out["segment_ids"] == 0] == 0).all()

    unpacked, _ = _batch(rows, processor, packing=False, micro_batch_size=2)
    assert len(unpacked["input_ids"]) == 11
    lengths = np.array([7, 3, 9, 1, 5, 8, 2, 6, 4, 0, 10])
    order = modality_length_batches(lengths, np.array([r["image"] is not None for r in rows]), 2, np.random.default_rng(0))
    assert sorted(len(b) for b in order) == [1, 2, 2, 2, 2, 2]
    assert all(len({rows[i]["task"] for i in b}) == 1 for b in order)
    assert sorted(i for b in order for i in b) == list(range(11))
    # Within a modality, lengths run down across consecutive batches: neighbours in length.
    assert all(min(lengths[b]) >= max(lengths[c]) or max(lengths[b]) <= min(lengths[c])
               for b in order for c in order if b is not c and rows[b[0]]["task"] == rows[c[0]]["task"])

    # A batch mixing an image sequence and a text-only sequence, and a text-only batch.
    image_seq = int(np.flatnonzero(out["num_images"] > 0)[0])
    text_seq = int(np.flatnonzero(out["num_images"] == 0)[0])
    for pick in ([image_seq, text_seq], [text_seq]):
        inputs = collate({k: v[pick] for k, v in out.items()})
        assert (inputs["pixel_values"] is None) == (pick == [text_seq])
        loss = model(**{k: inputs[k] for k in MODEL_INPUTS}).loss
        assert torch.isfinite(loss)
        # Every task of the batch has supervised tokens, counted where the loss counts them.
        _, _, count = token_losses(model(**{k: inputs[k] for k in MODEL_INPUTS if k != "labels"}).logits, inputs,
                                   {t: i for i, t in enumerate(inputs["tasks"])})
        assert (count > 0).all() and int(count.sum()) == int((inputs["labels"][:, 1:] != -100).sum())


def test_best_fit_packs_fill_bins():
    lengths = np.array([90, 60, 50, 40, 30, 20, 10])
    bins = best_fit_packs(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(lengths[b].sum() <= 100 for b in bins) and len(bins) == 3
    # Rows of a third of the capacity: three to a bin where first-fit-decreasing puts the
    # two longest together and the room left takes no third.
    thirds = np.array([36, 36, 34, 33, 31, 30])  # first-fit-decreasing: 72, 98, 30
    assert [int(thirds[b].sum()) for b in best_fit_packs(thirds, 100)] == [100, 100]


def test_transform_quarantines_rows_it_cannot_encode(tiny, tmp_path):
    import pyarrow.parquet as pq

    _, processor = tiny
    rows = ROWS[:2] + [row("<image>\n" + "Long question. " * 200, "Yes.", task="long")]
    transform = SFTTransform(MODEL, LossConfig(), TrainConfig(output="/tmp/x"), template_text=None,
                             quarantine=str(tmp_path / "q"), epoch=3)
    _, batch = _batch(rows, processor)
    out = transform(batch)
    assert sorted(k for keys in out["segment_keys"] for k in keys) == sorted(r["key"] for r in ROWS[:2])
    quarantined = pq.read_table(str(tmp_path / "q")).to_pylist()
    assert [q["reason"] for q in quarantined] == ["too_long"] and quarantined[0]["source_ref"] == "src#2"
