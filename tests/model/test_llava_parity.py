"""LLaVA-1.5, token for token: vlit's input ids and labels against LLaVA's own
preprocessing (tests/model/llava_reference.py) on the 205 real Vision-Flan sample rows and
multi-turn conversations made from them, with the real LLaMA-2 tokenizer (../shared) in
both legacy modes, for the vicuna_v1 and plain templates."""
from __future__ import annotations

import json

import llava_reference as llava
import numpy as np
import pytest
from model_helpers import sample_version
from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

from vlit.config import LossConfig, ModelConfig
from vlit.model.labels import IGNORE, encode_row
from vlit.model.templates import EncodeError


def processor(tokenizer_dir, legacy: bool) -> LlavaProcessor:
    """LLaVA-1.5's: CLIP at 336 px, patch 14 (576 image tokens), `<image>` id 32000 and a pad
    token added to the LLaMA-2 vocabulary, as llava-hf's checkpoints hold them."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, legacy=legacy)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def collapsed(proc, ids: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """vlit's expanded image span as LLaVA's one IMAGE_INDEX placeholder."""
    out_ids, out_labels = [], []
    for i, (t, label) in enumerate(zip(ids.tolist(), labels.tolist())):
        if t == proc.image_token_id:
            if i and ids[i - 1] == proc.image_token_id:
                continue
            t = llava.IMAGE_INDEX
        out_ids.append(t)
        out_labels.append(label)
    return out_ids, out_labels


@pytest.fixture(scope="module")
def llama2(tokenizers_dir) -> str:
    return str(tokenizers_dir / "llama2")


@pytest.fixture(scope="module")
def rows(sample_dir, tmp_path_factory):
    """(canonical row, its release turns) for every sample row prepare kept."""
    version = sample_version(sample_dir, tmp_path_factory.mktemp("sample"))
    release = {r["id"]: r for r in json.loads((sample_dir / "annotation.json").read_text())}
    out = []
    for r in version.read_table(columns=["id", "task", "turns", "image"]).to_pylist():
        out.append(({"turns": r["turns"], "task": r["task"], "image": r["image"]}, release[r["id"]]["conversations"]))
    return out


def multi_turn(rows) -> list[tuple[dict, list[dict]]]:
    """Two exchanges from consecutive rows, the second without the image, as a multi-turn
    LLaVA-Instruct row would be."""
    out = []
    for (a, ra), (b, rb) in zip(rows[::2], rows[1::2]):
        second = [{**t, "value": t["value"].replace("<image>", "").strip()} for t in rb]
        turns = a["turns"] + [{"role": t["role"], "content": s["value"]} for t, s in zip(b["turns"], second)]
        out.append(({**a, "turns": turns}, ra + second))
    return out


def _compare(proc, pairs, template: str) -> tuple[int, list[str]]:
    model = ModelConfig(preset="tiny", template=template, max_len=8192)
    same, differ = 0, []
    for row, release in pairs:
        if template == "vicuna_v1":
            ref_ids, ref_labels = llava.vicuna_v1(release, proc.tokenizer, has_image=row["image"] is not None)
        else:
            ref_ids, ref_labels = llava.plain(release, proc.tokenizer)
        try:
            enc = encode_row(row, proc, model, LossConfig(target="response"), None)
        except EncodeError as e:
            differ.append(f"{row['task']}: vlit refused the row: {e}")
            continue
        ids, labels = collapsed(proc, enc.input_ids, enc.labels)
        if (ids, labels) == (ref_ids, ref_labels):
            same += 1
        else:
            at = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), None)
            lab = next((i for i, (a, b) in enumerate(zip(labels, ref_labels)) if a != b), None)
            differ.append(f"{row['task']}: ids differ at {at}, labels at {lab} (lengths {len(ids)}/{len(ref_ids)})")
    return same, differ


@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_v1_input_ids_and_labels_equal_llava_preprocess_v1(rows, llama2, legacy):
    proc = processor(llama2, legacy)
    assert proc.tokenizer("Hello world!").input_ids == [1, 15043, 3186, 29991]  # the real LLaMA-2 vocabulary
    same, differ = _compare(proc, rows, "vicuna_v1")
    assert not differ and same == len(rows) >= 204, differ[:5]
    # Every row supervises something: LLaVA's own mismatch rule masked none of them.
    assert all(any(label != IGNORE for label in llava.vicuna_v1(r, proc.tokenizer, True)[1]) for _, r in rows)


@pytest.mark.parametrize("legacy", [True, False])
def test_multi_turn_equals_llava_preprocess_v1(rows, llama2, legacy):
    proc = processor(llama2, legacy)
    pairs = multi_turn(rows)
    same, differ = _compare(proc, pairs, "vicuna_v1")
    assert not differ and same == len(pairs) >= 100, differ[:5]


@pytest.mark.parametrize("legacy", [True, False])
def test_plain_equals_llava_preprocess_plain(rows, llama2, legacy):
    proc = processor(llama2, legacy)
    same, differ = _compare(proc, rows, "plain")
    assert not differ and same == len(rows), differ[:5]


def test_image_moves_to_the_start_and_its_turn_is_stripped(rows, llama2):
    """118 of the sample rows have `<image>` last in the human turn; 3 end that turn with
    whitespace: LLaVA's preprocess_multimodal puts the image first and strips the turn."""
    last = [r for r, release in rows if release[0]["value"].rstrip().endswith("<image>")]
    padded = [r for r, release in rows if release[0]["value"] != release[0]["value"].strip()]
    assert len(last) >= 117 and len(padded) == 3
    proc = processor(llama2, True)
    enc = encode_row(last[0], proc, ModelConfig(preset="tiny", max_len=8192), LossConfig(), None)
    text = proc.tokenizer.decode(enc.input_ids[:60])
    assert "USER: <image>" in text and "curious user" in text and "the user's questions" in text
