"""A LLaMA/Vicuna-style tokenizer built offline, for the model tests.

SentencePiece tokenizers (LLaMA, Vicuna; `LlamaTokenizerFast` with `legacy=False`) turn
spaces into "▁" and prepend one "▁" to the start of the input, but not after a special
token inside it (`Metaspace(prepend_scheme="first")`). So a later turn tokenized on its
own ("USER: ..." that follows "</s>") gains a "▁" it does not have in the whole
conversation: the case `labels.encode_row`'s per-turn check must not flag.

The tokenizer is a BPE trained on the Vision-Flan sample's texts and the vicuna_v1 role
tags, with the tiny processor's image settings (`vlit.model.build.tiny_processor`).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from vlit.model.build import TINY_PATCH_SIZE, tiny_processor
from vlit.model.templates import VICUNA_SYSTEM

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")  # LLaMA's order: unk, bos, eos


def sample_texts(sample_dir: Path) -> tuple[str, ...]:
    """Every human and gpt message of the sample's release-format annotation."""
    rows = json.loads((Path(sample_dir) / "annotation.json").read_text())
    return tuple(turn["value"] for r in rows for turn in r["conversations"])


@functools.lru_cache(maxsize=4)
def _train(texts: tuple[str, ...], vocab_size: int, split: bool) -> str:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=split)
    # decoders.Metaspace reads a "▁" only at a token's start; tokens merged across spaces
    # need LLaMA's own decoder (every "▁" a space, less the one prepended).
    tokenizer.decoder = (decoders.Metaspace(replacement="▁", prepend_scheme="first") if split else
                         decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def llama_style_tokenizer(texts, vocab_size: int = 2000, split: bool = True) -> PreTrainedTokenizerFast:
    """A Metaspace BPE over `texts` (+ the vicuna_v1 system prompt and role tags).
    `split=False` lets merges cross spaces (SentencePiece without whitespace splitting)."""
    texts = tuple(texts) + (VICUNA_SYSTEM, " USER: ", " ASSISTANT: ") * 20
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train(texts, vocab_size, split)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def llama_style_processor(texts, vocab_size: int = 2000, split: bool = True) -> LlavaProcessor:
    """`tiny_processor`'s LLaVA-1.5 processor over `llama_style_tokenizer(texts)`."""
    return LlavaProcessor(image_processor=tiny_processor().image_processor,
                          tokenizer=llama_style_tokenizer(texts, vocab_size, split), patch_size=TINY_PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
