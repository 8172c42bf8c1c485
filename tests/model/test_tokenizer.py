"""The tiny offline tokenizer: special tokens, determinism, round trips."""
from __future__ import annotations

import pickle

from vlit.model import tokenizer as tiny
from vlit.model.tokenizer import build_tiny_tokenizer


def test_special_tokens_are_single_ids():
    tok = build_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<unk>", "<image>")}
    assert ids == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4}
    assert tok.pad_token_id == 0 and tok.eos_token == "</s>" and tok.image_token_id == 4
    encoded = tok("<image>\nWhat is shown?").input_ids
    assert encoded[0] == 4 and encoded.count(4) == 1


def test_byte_level_round_trip_without_unk():
    tok = build_tiny_tokenizer()
    text = "Options: (a) 7\\sqrt{3} (b) café 😀 — 東京"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_deterministic_and_cached_but_independent_objects():
    a = build_tiny_tokenizer(vocab_size=400)
    tiny._train.cache_clear()
    b = build_tiny_tokenizer(vocab_size=400)
    assert a.get_vocab() == b.get_vocab() and len(a) == 400
    assert a is not b  # callers may add tokens to their copy
    a.add_tokens(["<extra>"])
    assert "<extra>" not in build_tiny_tokenizer(vocab_size=400).get_vocab()
    assert pickle.loads(pickle.dumps(b))("hello").input_ids == b("hello").input_ids


def test_custom_texts_change_merges():
    tok = build_tiny_tokenizer(texts=["zebra zebra zebra zebra"] * 10, vocab_size=300)
    assert len(tok("zebra").input_ids) == 1
