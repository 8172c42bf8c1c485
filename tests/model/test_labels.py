"""Templates and label masks: vicuna_v1 and plain text, response-only and L2T masks
(token by token, on real Vision-Flan rows), tokenization mismatches (byte-level BPE and a
LLaMA-style SentencePiece tokenizer), too-long rows."""
from __future__ import annotations

import numpy as np
import pytest
from llama_style import llama_style_processor, sample_texts
from model_helpers import row, sample_version
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from vlit.config import LossConfig, ModelConfig
from vlit.corpus.template_text import sentence_spans
from vlit.model.build import tiny_processor
from vlit.model.families import num_image_tokens
from vlit.model.labels import IGNORE, encode_row
from vlit.model.templates import VICUNA_SYSTEM, EncodeError, image_first, render

VICUNA, PLAIN = ModelConfig(), ModelConfig(template="plain")
RESPONSE, L2T = LossConfig(), LossConfig(target="l2t")


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _targets(processor, enc) -> str:
    return processor.tokenizer.decode(enc.input_ids[enc.labels != IGNORE])


def test_vicuna_v1_multi_turn_text_and_response_mask(processor):
    r = row("<image>\nWhat is it?", "A dog.", "And its colour?", "Brown.")
    enc = encode_row(r, processor, VICUNA, RESPONSE, None)
    text = processor.tokenizer.decode(enc.input_ids[enc.input_ids != processor.image_token_id])
    assert text == f"<s>{VICUNA_SYSTEM} USER: \nWhat is it? ASSISTANT: A dog.</s>USER: And its colour? ASSISTANT: Brown.</s>"
    assert _targets(processor, enc) == " A dog.</s> Brown.</s>"
    assert (enc.input_ids == processor.image_token_id).sum() == num_image_tokens(processor) == 16
    assert enc.has_image and enc.labels.dtype == np.int64

    # The same ids as LlavaProcessor's own expansion of the rendered text (lengths post-expansion).
    rendered = f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A dog.</s>USER: And its colour? ASSISTANT: Brown.</s>"
    ids = processor(text=[rendered], images=[np.zeros((32, 32, 3), np.uint8)])["input_ids"][0]
    assert enc.input_ids[1:].tolist() == list(ids)

    text_only = encode_row(row("Name a colour.", "Red.", image=False), processor, VICUNA, RESPONSE, None)
    assert not text_only.has_image and processor.image_token_id not in text_only.input_ids
    assert _targets(processor, text_only) == " Red.</s>"


def test_plain_renders_image_and_caption(processor):
    enc = encode_row(row("<image>\nDescribe the image.", "A red bus."), processor, PLAIN, L2T, None)
    assert processor.tokenizer.decode(enc.input_ids[17:]) == "A red bus.\n"
    assert enc.input_ids[0] == processor.tokenizer.bos_token_id and (enc.input_ids[1:17] == 4).all()
    assert _targets(processor, enc) == "A red bus.\n"  # the instruction is dropped in plain
    with pytest.raises(EncodeError) as err:
        encode_row(row("<image>\nq", "a", "q2", "a2"), processor, PLAIN, RESPONSE, None)
    assert err.value.reason == "bad_turns"


def test_l2t_masks_instruction_but_not_template_sentences(processor):
    r = row("<image>\nWhat is it? Answer briefly.", "A dog.", task="t")
    enc = encode_row(r, processor, VICUNA, L2T, {"t": {"Answer briefly."}, "other": {"What is it?"}})
    assert _targets(processor, enc) == "\nWhat is it? A dog.</s>"
    # Without the task's template text, every instruction token is a target.
    assert _targets(processor, encode_row(r, processor, VICUNA, L2T, None)) == "\nWhat is it? Answer briefly. A dog.</s>"


def _expected_l2t(processor, content: str, response: str, templates: set[str]):
    """Oracle: each span of the conversation tokenized on its own, whitespace glued to the
    span after it, labelled by what the span is; images expanded."""
    tok = processor.tokenizer
    spans = [(VICUNA_SYSTEM, False), (" USER:", False)]
    cursor = 0
    bounds = sorted([(lo, hi, content[lo:hi] not in templates) for lo, hi in sentence_spans(content)]
                    + [(i, i + 7, False) for i in [content.find("<image>")] if i >= 0])
    for lo, hi, on in bounds:
        spans.append((content[cursor:hi] if cursor else " " + content[:hi], on))
        cursor = hi
    spans += [(content[cursor:] + " ASSISTANT:", False), (" " + response + "</s>", True)]
    ids, labels = [tok.bos_token_id], [IGNORE]
    for text, on in spans:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += [i if on and i != processor.image_token_id else IGNORE for i in piece]
    n = num_image_tokens(processor)
    reps = [n if i == processor.image_token_id else 1 for i in ids]
    return np.repeat(ids, reps), np.repeat(labels, reps)


def test_l2t_token_by_token_on_real_vision_flan_rows(processor, sample_dir, tmp_path):
    rows = sample_version(sample_dir, tmp_path).read_table(columns=["task", "turns", "image"]).to_pylist()
    assert len(rows) >= 200
    model_cfg = ModelConfig(max_len=4096)
    masked_template = supervised_instruction = 0
    for r in rows:
        # As vicuna_v1 renders it: the image first, the turn stripped (templates.image_first).
        content, response = image_first(r["turns"][0]["content"]), r["turns"][1]["content"]
        # The task's template text: its first sentence (the sample has one row per task, too
        # few for the frequency pass; that pass is tested on its own).
        first = content[slice(*sentence_spans(content)[0])]
        enc = encode_row(r, processor, model_cfg, L2T, {r["task"]: {first}})
        ids, labels = _expected_l2t(processor, content, response, {first})
        assert enc.input_ids.tolist() == ids.tolist(), r["task"]
        assert enc.labels.tolist() == labels.tolist(), r["task"]
        response_only = encode_row(r, processor, model_cfg, RESPONSE, None)
        assert _targets(processor, response_only) == f" {response}</s>"
        first_ids = processor.tokenizer(first, add_special_tokens=False)["input_ids"]
        masked_template += len(first_ids)
        supervised_instruction += int((enc.labels != IGNORE).sum() - (response_only.labels != IGNORE).sum())
    assert masked_template > 1000 and supervised_instruction > 1000


def _no_split_processor() -> LlavaProcessor:
    """A BPE that merges across spaces (like SentencePiece without pre-splitting), trained
    so that a user turn's end and the next role tag become one token."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["Why? ASSISTANT: Because."] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    base = tiny_processor()
    return LlavaProcessor(image_processor=base.image_processor, tokenizer=fast, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_tokenization_mismatch_is_reported_not_masked():
    with pytest.raises(EncodeError) as err:
        encode_row(row("<image>\nWhy?", "Because."), _no_split_processor(), VICUNA, RESPONSE, None)
    assert err.value.reason == "tokenization_mismatch" and "per-turn" in err.value.detail


def test_too_long_rows_are_quarantined_never_cut(processor):
    r = row("<image>\n" + "Describe every object. " * 40, "Done.")
    full = encode_row(r, processor, ModelConfig(max_len=4096), RESPONSE, None)
    with pytest.raises(EncodeError) as err:
        encode_row(r, processor, ModelConfig(max_len=len(full.input_ids) - 1), RESPONSE, None)
    assert err.value.reason == "too_long"
    fits = encode_row(r, processor, ModelConfig(max_len=len(full.input_ids)), RESPONSE, None)
    assert (fits.input_ids == processor.image_token_id).sum() == 16


def test_image_placeholder_must_match_the_image(processor):
    for r, reason in ((row("What?", "No."), "image_without_token"),
                      (row("<image> What?", "No.", image=False), "image_token_without_image"),
                      (row("<image><image> What?", "No."), "multiple_image_tokens")):
        with pytest.raises(EncodeError) as err:
            encode_row(r, processor, VICUNA, RESPONSE, None)
        assert err.value.reason == reason


# A LLaMA/Vicuna-style tokenizer (SentencePiece "▁", prepended to the input's start): each
# later turn is tokenized in its context, so "USER:" after "</s>" gains no "▁" (labels.py).

@pytest.fixture(scope="module")
def llama_processor(sample_dir):
    return llama_style_processor(sample_texts(sample_dir))


@pytest.fixture(scope="module")
def sample_rows(sample_dir, tmp_path_factory):
    return sample_version(sample_dir, tmp_path_factory.mktemp("sample")).read_table(columns=["task", "turns", "image"]).to_pylist()


def _multi_turn(rows: list[dict]) -> list[dict]:
    """Two-exchange conversations from consecutive sample rows (the second without image)."""
    return [row(*[t["content"] for t in a["turns"]], *[t["content"].replace("<image>", "").strip() for t in b["turns"]],
                task=a["task"]) for a, b in zip(rows[::2], rows[1::2])]


def _target_runs(processor, enc) -> list[str]:
    """The supervised tokens, decoded run by run."""
    on = np.flatnonzero(enc.labels != IGNORE)
    runs = np.split(on, np.flatnonzero(np.diff(on) > 1) + 1)
    return [processor.tokenizer.decode(enc.input_ids[run]) for run in runs]


def _whole_vs_each_turn_alone(tokenizer, r: dict) -> bool:
    """The old rule: does each turn tokenized on its own give the whole-text tokens?"""
    pieces = render([(t["role"], t["content"]) for t in r["turns"]], "vicuna_v1", tokenizer.eos_token)
    alone = [i for turn in sorted({p.turn for p in pieces})
             for i in tokenizer("".join(p.text for p in pieces if p.turn == turn), add_special_tokens=False)["input_ids"]]
    return alone == tokenizer("".join(p.text for p in pieces), add_special_tokens=False)["input_ids"]


def test_llama_style_later_turns_would_gain_a_prepended_space(llama_processor):
    tok = llama_processor.tokenizer
    alone = tok.convert_ids_to_tokens(tok("USER: Why?", add_special_tokens=False)["input_ids"])
    after_eos = tok.convert_ids_to_tokens(tok("</s>USER: Why?", add_special_tokens=False)["input_ids"])
    assert alone[0].startswith("▁") and after_eos[0] == "</s>" and not after_eos[1].startswith("▁")
    r = row("<image>\nWhat is it?", "A dog.", "And its colour?", "Brown.")
    assert not _whole_vs_each_turn_alone(tok, r)  # the old rule flagged this row
    enc = encode_row(r, llama_processor, VICUNA, RESPONSE, None)
    assert _target_runs(llama_processor, enc) == ["A dog.</s>", "Brown.</s>"]
    assert enc.input_ids[0] == tok.bos_token_id and (enc.input_ids == llama_processor.image_token_id).sum() == 16


def test_llama_style_real_rows_encode_with_response_labels(llama_processor, sample_rows):
    assert len(sample_rows) >= 200
    model_cfg = ModelConfig(max_len=4096)
    multi = _multi_turn(sample_rows)
    # Each turn alone disagrees with the whole text on every multi-turn row (the old rule's flags).
    assert sum(not _whole_vs_each_turn_alone(llama_processor.tokenizer, r) for r in multi) == len(multi)
    for r in sample_rows + multi:
        responses = [t["content"] for t in r["turns"] if t["role"] == "assistant"]
        enc = encode_row(r, llama_processor, model_cfg, RESPONSE, None)  # no tokenization_mismatch
        assert _target_runs(llama_processor, enc) == [f"{response}</s>" for response in responses], r["task"]


def test_llama_style_turn_boundary_merged_into_one_token_is_reported(sample_dir):
    """SentencePiece without whitespace splitting, trained so that a user turn's end and the
    next role tag become one token: the boundary does not hold, in any turn."""
    processor = llama_style_processor(sample_texts(sample_dir) + ("Why? ASSISTANT: Because.",) * 200, split=False)
    for r, turns in ((row("<image>\nWhy?", "Because."), "turns 0 and 1"),
                     (row("<image>\nDescribe it.", "A dog.", "Why?", "Because."), "turns 2 and 3")):
        with pytest.raises(EncodeError) as err:
            encode_row(r, processor, VICUNA, RESPONSE, None)
        assert err.value.reason == "tokenization_mismatch" and "per-turn" in err.value.detail
        assert f"spans the boundary of {turns}" in err.value.detail and "? ASSISTANT:" in err.value.detail


def test_turn_inseparable_from_its_context_is_reported():
    """A turn whose tokens, after its context, start inside a context token cannot be
    checked: reported, even though here only the context's prepended "▁" ("▁y" before
    "y?") lets "?" merge with the turn's leading space."""
    text = VICUNA_SYSTEM + " USER: \nWhy? ASSISTANT: Because."
    chars = sorted(set(text.replace(" ", "▁")))
    merges = [("▁", "y"), ("y", "?"), ("?", "▁")]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", *chars, *("".join(m) for m in merges)])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(image_processor=tiny_processor().image_processor, tokenizer=fast, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    assert "y?" in fast.convert_ids_to_tokens(fast(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(EncodeError) as err:
        encode_row(row("<image>\nWhy?", "Because."), processor, VICUNA, RESPONSE, None)
    assert err.value.reason == "tokenization_mismatch"
    assert "turn 1 tokenized after its context 'y?' starts inside token '? '" in err.value.detail
