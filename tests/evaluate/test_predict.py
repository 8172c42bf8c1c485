"""Likelihood answering: the one-pass block-masked scores equal plain per-form forward
passes, tokens are the training path's, and the Ray Data path answers like the local one."""
import numpy as np
import pytest
import torch

from vlit.config import ModelConfig
from vlit.evaluate.predict import ChoiceScorer, PredictError, predict_local, predict_ray
from vlit.evaluate.sets import EvalSpec, build_eval_set
from vlit.model import families
from vlit.model.build import build_model_and_processor, export_model

SPEC = EvalSpec(seed=0, first_image=2_000_000, images=3, image_size=32, intro=False)


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig()
    model, processor = build_model_and_processor(cfg)
    return model, processor, cfg


def _pixels(scorer, es, rows):
    """The rows' images, decoded (what the scorer takes)."""
    from vlit import storage
    from vlit.corpus.images import decode_image

    return [decode_image(storage.read_bytes(es.image_uri(r["image"]))) for r in rows]


@torch.inference_mode()
def _plain_scores(scorer, rows, pixels):
    """log P(choice) from one ordinary causal forward pass per surface form."""
    out = []
    for row, pix in zip(rows, pixels):
        forms = [f for choice in row["choices"] for f in choice]
        prompt, conts = scorer._encode(row["key"], row["prompt"], forms)
        pv = torch.as_tensor(families.pixels(scorer.processor, [pix]).values[0])[None]
        form_logp = []
        for cont in conts:
            ids = torch.as_tensor(np.concatenate([prompt, cont]))[None]
            logp = torch.log_softmax(scorer.model(input_ids=ids, pixel_values=pv).logits[0].float(), -1)
            form_logp.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont.tolist())))
        scores, k = [], 0
        for choice in row["choices"]:
            scores.append(float(torch.logsumexp(torch.tensor(form_logp[k:k + len(choice)]), 0)))
            k += len(choice)
        out.append(scores)
    return out


@pytest.mark.parametrize("suite", ["mme", "circular", "forgetting"])
def test_packed_scores_equal_plain_forward_passes(tmp_path, tiny, suite):
    model, processor, cfg = tiny
    es = build_eval_set(suite, SPEC, str(tmp_path))
    rows = es.read_table().to_pylist()[:7]
    scorer = ChoiceScorer(model, processor, cfg, batch_size=3)  # batches of mixed lengths, with padding
    pixels = _pixels(scorer, es, rows)
    packed = scorer.choice_scores(rows, pixels)
    plain = _plain_scores(scorer, rows, pixels)
    assert [len(s) for s in packed] == [len(s) for s in plain] == [len(r["choices"]) for r in rows]
    assert np.allclose(np.concatenate(packed), np.concatenate(plain), atol=1e-4)


def test_forms_are_the_trained_reply_tokens(tiny):
    model, processor, cfg = tiny
    scorer = ChoiceScorer(model, processor, cfg)
    prompt, (yes, no) = scorer._encode("k", "<image>\nIs there a red circle in the image?", ["Yes", "no"])
    tokens = processor.tokenizer.convert_ids_to_tokens
    # vicuna_v1: "... ASSISTANT: Yes</s>" -> the reply's space is its own, and no </s>.
    assert tokens(yes.tolist()) == ["Ġ", "Yes"] and tokens(no.tolist()) == ["Ġno"]
    assert processor.tokenizer.decode(prompt).endswith("? ASSISTANT:")
    with pytest.raises(PredictError, match="eval row bad-row: .*placeholder"):
        scorer._encode("bad-row", "no image token here", ["Yes"])


def test_ray_path_answers_like_the_local_one(tmp_path, tiny, ray_local):
    model, processor, cfg = tiny
    export = str(tmp_path / "export")
    export_model(model, processor, export)
    es = build_eval_set("forgetting", SPEC, str(tmp_path))
    table = es.read_table()
    local = predict_local(ChoiceScorer.load(export, cfg, 4), table, es.uri)
    remote = predict_ray(export, cfg, table, es.uri, batch_size=2)
    assert [r["prediction"] for r in remote] == [r["prediction"] for r in local]
    assert [r["key"] for r in remote] == table.column("key").to_pylist()
