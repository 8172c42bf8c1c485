"""One preprocessing and one prompt per model family, in every path: the pixel tensors an
image becomes are the same in SFT's stream transform, DPO's, evaluation and the Serve hf
backend (LLaVA: padded to a square of the image mean, as LLaVA-1.5 trains; Qwen-VL: its
dynamic resolution), and the tiny Qwen-VL presets answer, score and judge through them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlit.config import HFBackendConfig, ModelConfig
from vlit.evaluate.predict import ChoiceScorer
from vlit.model import families
from vlit.model.build import build_model_and_processor
from vlit.model.packing import processed_images
from vlit.model.pairs import PairTransform, collate_pairs
from vlit.model.parts import EveryRankVision
from vlit.serve.backends import GenerationRequest, JudgeItem, Message, make_backend
from vlit.train.preference import sequence_logps

WIDE = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 64, 3), dtype=np.uint8))  # not square


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def family(request, tokenizers_dir):
    tokenizer = str(tokenizers_dir / "qwen3") if "qwen" in request.param else None
    cfg = ModelConfig(preset=request.param, tokenizer=tokenizer, max_len=512)
    model, processor = build_model_and_processor(cfg)
    return cfg, model.eval(), processor


def test_llava_pads_to_a_square_of_the_image_mean():
    _, processor = build_model_and_processor(ModelConfig())
    (square,) = families.prepare(processor, [WIDE])
    assert square.size == (64, 64)
    mean = tuple(int(round(255 * m)) for m in processor.image_processor.image_mean)
    assert square.getpixel((0, 0)) == mean and square.getpixel((32, 32)) == WIDE.getpixel((32, 20))


def test_every_path_makes_the_same_pixels(family):
    cfg, _, processor = family
    expected = families.pixels(processor, [WIDE])
    # SFT's stream transform and DPO's take the block's decoded images.
    (sft, _), _ = processed_images(processor, [WIDE, None])
    pairs = PairTransform(cfg, quarantine="/tmp/unused")({
        "pair_id": np.array(["p:0>1"], dtype=object), "prompt": np.array(["What is it?"], dtype=object),
        "chosen": np.array(["A cat."], dtype=object), "rejected": np.array(["A dog."], dtype=object),
        "source": np.array(["f"], dtype=object), "position": np.arange(1), "has_image": np.array([True]),
        "images": [WIDE]})
    # The Serve hf backend: the processor's call on the family's prepared images.
    backend = make_backend(HFBackendConfig(kind="hf", model=cfg))
    served = backend._inputs([GenerationRequest([Message("user", "What is it?", image=True)], image=WIDE)])
    def flat(values) -> np.ndarray:
        return np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in values])

    for got in (sft.values, [pairs["pixel_values"][0]], [served["pixel_values"].numpy()]):
        assert np.array_equal(flat(got), flat(expected.values))
    assert sft.tokens == expected.tokens
    if expected.grids is not None:
        assert served["image_grid_thw"].tolist() == [list(g) for g in expected.grids] and sft.grids == expected.grids


def test_family_generates_judges_and_scores_choices(family):
    cfg, model, processor = family
    backend = make_backend(HFBackendConfig(kind="hf", model=cfg))
    req = GenerationRequest([Message("user", "How many shapes are there?", image=True)], image=WIDE,
                            temperature=0.0, max_new_tokens=4)
    (gen,) = backend.generate([req])
    assert len(gen.completions) == 1 and gen.completions[0].tokens <= 4 and gen.prompt_tokens > 0
    (scores,) = backend.judge([JudgeItem("How many shapes?", "Two.", WIDE, None, ["helpfulness"], "logprob", 16)])
    dist = scores["helpfulness"].distribution
    assert scores["helpfulness"].status == "ok" and abs(sum(dist) - 1) < 1e-5
    # Evaluation: packed choice scores equal one plain forward per surface form.
    scorer = ChoiceScorer(model, processor, cfg, batch_size=2)
    rows = [{"key": f"k{i}", "prompt": "<image>\nIs there a circle?", "choices": [["Yes", "yes"], ["No"]]}
            for i in range(3)]
    packed = scorer.choice_scores(rows, [WIDE] * 3)
    px = families.pixels(processor, [WIDE])
    prompt, forms = scorer._encode("k", rows[0]["prompt"], ["Yes", "yes", "No"], px.tokens[0])
    plain = []
    with torch.inference_mode():
        for form in forms:
            ids = torch.as_tensor(np.concatenate([prompt, form]))[None]
            if px.grids is None:  # LLaVA: one image [1, 3, H, W]
                logits = model(input_ids=ids, pixel_values=torch.as_tensor(px.values[0])[None]).logits
            else:  # Qwen-VL: the model computes its own 3-D positions
                logits = model(input_ids=ids, pixel_values=torch.as_tensor(np.concatenate(px.values)),
                               image_grid_thw=torch.as_tensor(px.grids),
                               mm_token_type_ids=(ids == processor.image_token_id).int()).logits
            logp = torch.log_softmax(logits[0].float(), -1)
            plain.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(form.tolist())))
    yes = float(torch.logsumexp(torch.tensor(plain[:2]), 0))
    # Rows 0 and 2 ask the same in batches of other shapes (2 rows, then 1): equal to float
    # rounding of differently shaped kernels, not bit for bit (a 1e-6 difference was seen).
    assert np.allclose(packed[0], [yes, plain[2]], atol=1e-4) and np.allclose(packed[0], packed[2], atol=1e-5)


def test_dpo_pairs_share_one_image_encoding(family):
    cfg, model, _ = family
    transform = PairTransform(cfg, quarantine="/tmp/unused")
    rows = transform({"pair_id": np.array(["p:0>1", "q:0>1"], dtype=object),
                      "prompt": np.array(["What is it?", "Say hi."], dtype=object),
                      "chosen": np.array(["A cat.", "Hi."], dtype=object),
                      "rejected": np.array(["A dog, I think.", "Bye."], dtype=object),
                      "source": np.array(["f", "f"], dtype=object), "position": np.arange(2),
                      "has_image": np.array([True, False]), "images": [WIDE, None]})
    batch = collate_pairs(rows)
    wrapped = EveryRankVision(model).eval()
    with torch.no_grad():
        together, _ = sequence_logps(wrapped(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids",
                                                                     "pixel_values")},
                                             image_grid_thw=batch.get("image_grid_thw"), repeat_images=2),
                                     batch["labels"])
        # Each of the 4 sequences alone, its image encoded for it.
        alone = []
        for k in range(4):
            pair = k % 2
            has = bool(rows["has_image"][pair])
            positions = batch["position_ids"][..., k:k + 1, :] if batch["position_ids"].ndim == 3 else \
                batch["position_ids"][k:k + 1]
            kwargs = {}
            if has:
                kwargs["pixel_values"] = batch["pixel_values"]
                if batch.get("image_grid_thw") is not None:
                    kwargs["image_grid_thw"] = batch["image_grid_thw"]
            logits = wrapped(input_ids=batch["input_ids"][k:k + 1], attention_mask=batch["attention_mask"][k:k + 1],
                             position_ids=positions, **kwargs)
            alone.append(float(sequence_logps(logits, batch["labels"][k:k + 1])[0]))
    assert np.allclose(together.numpy(), alone, atol=1e-4)
