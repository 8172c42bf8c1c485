"""DPO's pieces without a cluster: the losses against their closed forms (sign
conventions included), sequence log-probs, one image encoding per pair, and pair encoding
with response-only labels."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlit.config import ModelConfig
from vlit.model.build import build_model_and_processor
from vlit.model.labels import IGNORE
from vlit.model.pairs import PairTransform, collate_pairs
from vlit.train.preference import for_loss, preference_loss, sequence_logps
from vlit.model.parts import EveryRankVision

# Fixed log-probs of 3 pairs: policy and reference, chosen and rejected.
PC, PR = [-10.0, -12.5, -7.0], [-11.0, -11.0, -9.5]
RC, RR = [-10.5, -12.0, -8.0], [-10.0, -11.5, -9.0]


def tensors():
    return [torch.tensor(x, dtype=torch.float64) for x in (PC, PR, RC, RR)]


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def closed_form(loss_type: str, beta: float, ls: float) -> float:
    """The mean loss written out pair by pair in plain floats."""
    losses = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        h = (pc - pr) - (rc - rr)  # chosen's log-ratio gain over rejected's
        if loss_type == "sigmoid":
            losses.append(-(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h))
        elif loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - beta * h))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("loss_type, beta, ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                                  ("ipo", 2.0, 0.0), ("hinge", 0.1, 0.0), ("hinge", 1.5, 0.0)])
def test_losses_match_their_closed_forms(loss_type, beta, ls):
    loss, metrics = preference_loss(*tensors(), loss_type=loss_type, beta=beta, label_smoothing=ls)
    assert abs(loss.item() - closed_form(loss_type, beta, ls)) < 1e-6
    chosen = [beta * (p - r) for p, r in zip(PC, RC)]
    rejected = [beta * (p - r) for p, r in zip(PR, RR)]
    assert metrics["rewards/chosen"].tolist() == pytest.approx(chosen, abs=1e-6)
    assert metrics["rewards/rejected"].tolist() == pytest.approx(rejected, abs=1e-6)
    assert metrics["rewards/margins"].tolist() == pytest.approx([c - r for c, r in zip(chosen, rejected)], abs=1e-6)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0, 1.0]  # margins 0.5b, -1.0b, 1.5b


def test_sign_conventions_of_chosen_and_rejected():
    pc, pr, rc, rr = tensors()
    # The policy favours chosen more than the reference does: below log 2, and it falls
    # further as the gap grows; swapping chosen and rejected raises it above log 2.
    better = pc.clone()
    better[1] = -10.0  # pair 1 now also favours chosen
    good, m = preference_loss(better, pr, rc, rr, "sigmoid", 0.1)
    swapped, m_swapped = preference_loss(pr, better, rr, rc, "sigmoid", 0.1)
    assert good.item() < math.log(2) < swapped.item() and m["rewards/accuracies"].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(m_swapped["rewards/margins"], -m["rewards/margins"])
    even, _ = preference_loss(rc, rr, rc, rr, "sigmoid", 0.1)  # policy == reference
    assert abs(even.item() - math.log(2)) < 1e-12
    # Label smoothing pulls toward the opposite label: at ls=0.5 the loss is symmetric.
    half, _ = preference_loss(better, pr, rc, rr, "sigmoid", 0.1, 0.5)
    half_swapped, _ = preference_loss(pr, better, rr, rc, "sigmoid", 0.1, 0.5)
    assert abs(half.item() - half_swapped.item()) < 1e-12
    # IPO is minimal at a log-ratio gap of exactly 1/(2 beta); hinge is zero past 1/beta.
    gap = torch.tensor([5.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    assert preference_loss(gap, zero, zero, zero, "ipo", 0.1)[0].item() == 0.0
    assert preference_loss(gap * 2.1, zero, zero, zero, "hinge", 0.1)[0].item() == 0.0
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        preference_loss(*tensors(), loss_type="kto")


def test_sequence_logps_sum_supervised_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, 6, 0]])
    sums, counts = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    expected = [logp[0, 1, 3] + logp[0, 2, 4], logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 6] + logp[1, 3, 0]]
    assert torch.allclose(sums, torch.stack(expected)) and counts.tolist() == [2, 4]
    assert torch.allclose(for_loss(sums, counts, "ipo"), sums / counts) and for_loss(sums, counts, "sigmoid") is sums


@pytest.fixture(scope="module")
def encoded_pairs(tmp_path_factory):
    """Three pairs (two with an image, one text-only) through the DPO stream's transform."""
    tmp = tmp_path_factory.mktemp("pairs")
    cfg = ModelConfig(preset="tiny", max_len=160)
    rng = np.random.default_rng(0)
    batch = {
        "pair_id": np.array(["p:0>1", "q:1>0", "r:0>2", "long:0>1"], dtype=object),
        "prompt": np.array(["What colour is the circle?", "Count the shapes.", "Say hello.", "Say it."], dtype=object),
        "chosen": np.array(["It is red.", "three", "hello", "ok"], dtype=object),
        "rejected": np.array(["It is blue, I think.", "two", "goodbye now", "word " * 200], dtype=object),
        "source": np.array(["f.jsonl"] * 4, dtype=object), "position": np.arange(4),
        "has_image": np.array([True, True, False, True]),
    }
    pixels = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    batch["images"] = [Image.fromarray(p) if has else None for p, has in zip(pixels, batch["has_image"])]
    transform = PairTransform(cfg, quarantine=str(tmp / "quarantine"))
    return transform, transform(batch), tmp


def test_pair_transform_labels_responses_only_and_quarantines_long_pairs(encoded_pairs):
    transform, rows, tmp = encoded_pairs
    assert list(rows["pair_id"]) == ["p:0>1", "q:1>0", "r:0>2"] and rows["has_image"].tolist() == [True, True, False]
    tokenizer = transform.processor.tokenizer
    for i, (chosen, rejected) in enumerate([("It is red.", "It is blue, I think."), ("three", "two"), ("hello", "goodbye now")]):
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            labels = rows[f"{side}_labels"][i]
            # The space after "ASSISTANT:" is glued to the response's first token (labels.py).
            assert tokenizer.decode(labels[labels != IGNORE]) == f" {text}{tokenizer.eos_token}"
    image_token = transform.processor.image_token_id
    assert (rows["chosen_input_ids"][0] == image_token).sum() == 16 and (rows["chosen_input_ids"][2] == image_token).sum() == 0
    quarantined = pq.read_table(str(tmp / "quarantine")).to_pylist()
    assert [(q["reason"], q["source_ref"]) for q in quarantined] == [("too_long", "f.jsonl#3")]
    assert "pair long:0>1 (rejected)" in quarantined[0]["detail"]


def test_collate_puts_chosen_first_and_each_image_once(encoded_pairs):
    _, rows, _ = encoded_pairs
    batch = collate_pairs(rows)
    n = len(rows["pair_id"])
    width = int(max(rows["chosen_length"].max(), rows["rejected_length"].max()))
    assert batch["input_ids"].shape == (2 * n, width) and batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["input_ids"][n + 1, :rows["rejected_length"][1]],
                       torch.as_tensor(rows["rejected_input_ids"][1, :rows["rejected_length"][1]]))
    assert batch["attention_mask"].sum(1).tolist() == rows["chosen_length"].tolist() + rows["rejected_length"].tolist()


def test_one_image_encoding_serves_chosen_and_rejected(encoded_pairs):
    _, rows, _ = encoded_pairs
    batch = collate_pairs(rows)
    model, _ = build_model_and_processor(ModelConfig(preset="tiny", max_len=160))
    wrapped = EveryRankVision(model).eval()
    calls = []
    model.model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        shared = wrapped(**inputs, pixel_values=batch["pixel_values"], repeat_images=2)
        twice = wrapped(**inputs, pixel_values=torch.cat([batch["pixel_values"]] * 2))
    assert calls == [2, 4]  # 2 images encoded for 6 sequences, against 4 without sharing
    assert torch.allclose(shared, twice, atol=1e-5)
