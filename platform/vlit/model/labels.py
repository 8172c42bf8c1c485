"""Rows to token ids and label masks; per-task loss.

`encode_row` renders a row with its conversation template, tokenizes the whole text
once, and labels each token from what its characters are (`templates.Piece` kinds):

- `loss.target: response`: assistant responses (and their end-of-turn token) only;
- `loss.target: l2t`: instruction text too, except the system prompt, role tags, the
  image and the task's template sentences (`corpus/template_text.py`).

Whitespace takes the supervision of the text that follows it, because BPE and
SentencePiece tokenizers both glue a leading space to the next word; a run of whitespace
that ends a piece with a newline keeps its piece's own (ChatML's "assistant\\n" before a
reply is the template's, and tokenizers keep newlines apart from the next word). A token whose
characters disagree (one token spanning a role tag and a response) means the pieces do
not tokenize on their own as they do together; so does a conversation whose per-turn
tokenization differs from its whole-text tokenization (LLaVA masks such rows entirely
and trains on nothing). Both raise `EncodeError("tokenization_mismatch")`: the row is
quarantined and counted, never trained with a wrong or all-masked label.

Each turn after the first is tokenized in its context: after the characters of the
whole-text token just before it (`</s>` whole, or the user turn's last word), whose
tokens are then dropped by their offsets. So a SentencePiece tokenizer's "▁" prepended
to the start of the input (LLaMA, Vicuna) lands on the context, not on "USER:" after
"</s>", and needs no per-tokenizer length offsets as in LLaVA; a token that spans a turn
boundary, in the whole text or in the turn's own tokenization, is still a mismatch.

Text is tokenized a stretch between image placeholders at a time, each stretch on its
own, as LLaVA's `tokenizer_image_token` does: a SentencePiece tokenizer prepends its "▁"
to the text after an image too (`legacy: false` would not, in one pass over the whole
text). The image placeholder is expanded to the processor's image-token count after
tokenization, so lengths are the model's real sequence lengths. A row longer than
`model.max_len` is quarantined as `too_long` rather than truncated: cutting inside the
image span breaks the model's image-feature count, and cutting the response leaves a
partial target.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlit.config import LossConfig, ModelConfig
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.corpus.template_text import sentence_spans
from vlit.model.build import resolved
from vlit.model.families import image_token, num_image_tokens
from vlit.model.templates import CHAT, INSTRUCTION, RESPONSE, EncodeError, render, resolve

IGNORE = -100  # the label transformers' losses skip
TEMPLATE = "template"  # instruction sentences that are task-template text


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # int64 [n], image placeholder expanded
    labels: np.ndarray  # int64 [n], IGNORE where not supervised
    has_image: bool
    task: str
    text: str = ""  # the rendered conversation, image placeholders unexpanded


def _turns(row: dict) -> list[tuple[str, str]]:
    return [(t["role"], t["content"]) for t in row["turns"]]


def _has_image(row: dict) -> bool:
    if "has_image" in row:
        return bool(row["has_image"])
    return row.get("image") is not None


def _check_image_tokens(turns: list[tuple[str, str]], has_image: bool) -> None:
    count = sum(content.count(IMAGE_TOKEN) for _, content in turns)
    if has_image and count != 1:
        reason = "image_without_token" if count == 0 else "multiple_image_tokens"
        raise EncodeError(reason, f"a row with an image needs one {IMAGE_TOKEN} placeholder, found {count}")
    if not has_image and count:
        raise EncodeError("image_token_without_image", f"{count} {IMAGE_TOKEN} placeholder(s) in a text-only row")


def _char_supervision(pieces, target: str, templates: set[str]) -> np.ndarray:
    """One bool per character of the rendered text: is it a training target?"""
    masks = []
    for piece in pieces:
        on = piece.kind == RESPONSE or (piece.kind == INSTRUCTION and target == "l2t")
        mask = np.full(len(piece.text), on)
        if piece.kind == INSTRUCTION:
            # Template sentences are counted on the first user turn only (template_text.py).
            for lo, hi in sentence_spans(piece.text) if on and piece.turn == 0 else ():
                if piece.text[lo:hi] in templates:
                    mask[lo:hi] = False
            start = piece.text.find(IMAGE_TOKEN)
            if start >= 0:
                mask[start:start + len(IMAGE_TOKEN)] = False
        masks.append(mask)
    mask = np.concatenate(masks) if masks else np.zeros(0, bool)
    # Whitespace takes the value of the next non-whitespace character (see module doc);
    # trailing whitespace (plain's "\n") keeps its own, and so does a run that ends its
    # piece with a newline.
    text = "".join(p.text for p in pieces)
    ends = set(np.cumsum([len(p.text) for p in pieces]).tolist())
    following, run_end = None, None
    for i in range(len(text) - 1, -1, -1):
        if not text[i].isspace():
            following, run_end = mask[i], None
            continue
        if run_end is None:
            run_end = i + 1
        own = run_end in ends and "\n" in text[i:run_end]
        mask[i] = mask[i] if following is None or own else following
    return mask


def _tokenize(tokenizer, text: str, placeholder: str = IMAGE_TOKEN) -> tuple[list[int], np.ndarray]:
    """Token ids and character offsets [n, 2] of `text`, each stretch between image
    placeholders tokenized on its own and each placeholder one token (see module doc)."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for k, chunk in enumerate(text.split(placeholder)):
        if k:
            ids.append(tokenizer.convert_tokens_to_ids(placeholder))
            offsets.append((at, at + len(placeholder)))
            at += len(placeholder)
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            offsets += [(a + at, b + at) for a, b in enc["offset_mapping"]]
        at += len(chunk)
    return ids, np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def _mismatch(tokenizer, a: list[int], b: list[int], what: str) -> EncodeError:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return EncodeError(
        "tokenization_mismatch",
        f"{what} at token {at}: {tokenizer.decode(a[max(0, at - 3):at + 3])!r} vs {tokenizer.decode(b[max(0, at - 3):at + 3])!r}",
    )


def _turn_starts(pieces) -> list[int]:
    """The character offset at which each turn starts in the rendered text."""
    starts, at = {}, 0
    for piece in pieces:
        starts.setdefault(piece.turn, at)
        at += len(piece.text)
    return [starts[turn] for turn in sorted(starts)]


def _check_per_turn(tokenizer, pieces, ids: list[int], offsets: np.ndarray, placeholder: str) -> None:
    """Raise `tokenization_mismatch` unless the turns, each tokenized in its context (see
    module doc), give the whole-text tokens `ids` (character `offsets` [n, 2])."""
    what = "per-turn vs whole-conversation tokenization"
    text = "".join(p.text for p in pieces)
    starts = _turn_starts(pieces)
    per_turn: list[int] = []
    for turn, (lo, hi) in enumerate(zip(starts, starts[1:] + [len(text)])):
        context = ""
        if lo > 0:
            before = np.flatnonzero(offsets[:, 0] < lo)
            across = before[offsets[before, 1] > lo]
            if across.size:
                a, b = offsets[across[0]]
                raise EncodeError("tokenization_mismatch", f"{what}: token {text[a:b]!r} (chars {a}:{b}) spans "
                                  f"the boundary of turns {turn - 1} and {turn} (char {lo})")
            if before.size:
                context = text[offsets[before[-1], 0]:lo]
        own_ids, own = _tokenize(tokenizer, context + text[lo:hi], placeholder)
        n = len(context)
        across = np.flatnonzero((own[:, 0] < n) & (own[:, 1] > n))
        if across.size:
            a, b = own[across[0]]
            raise EncodeError("tokenization_mismatch", f"{what}: turn {turn} tokenized after its context "
                              f"{context!r} starts inside token {(context + text[lo:hi])[a:b]!r}")
        # Tokens that start in the context cover only the context: drop them.
        per_turn += [i for i, start in zip(own_ids, own[:, 0]) if start >= n]
    if per_turn != ids:
        raise _mismatch(tokenizer, per_turn, ids, what)


def encode_row(row: dict, processor, model_cfg: ModelConfig, loss_cfg: LossConfig,
               template_text: dict[str, set[str]] | None, image_tokens: list[int] | None = None) -> Encoded:
    """A canonical row (turns, task, image or has_image) -> ids and labels; raises
    `EncodeError(reason, detail)` for rows to quarantine. `image_tokens`: the token count
    of each of the row's images (`families.pixels`); default LLaVA's fixed count."""
    tokenizer = processor.tokenizer
    model_cfg = resolved(model_cfg)
    turns, has_image = _turns(row), _has_image(row)
    _check_image_tokens(turns, has_image)
    template = resolve(model_cfg.template, processor)
    placeholder = image_token(processor)
    if template != CHAT and placeholder != IMAGE_TOKEN:
        raise EncodeError("template_image_token", f"the {template} template writes {IMAGE_TOKEN} for an image, and "
                          f"this processor's image token is {placeholder}: use model.template chat_template")
    pieces = render(turns, template, tokenizer.eos_token, processor)
    text = "".join(p.text for p in pieces)
    templates = (template_text or {}).get(row["task"], set()) if loss_cfg.target == "l2t" else set()
    supervised = _char_supervision(pieces, loss_cfg.target, templates)

    ids, offsets = _tokenize(tokenizer, text, placeholder)
    _check_per_turn(tokenizer, pieces, ids, offsets, placeholder)

    # Supervised characters per token; a token is a target when all of its characters are.
    counts = np.concatenate([[0], np.cumsum(supervised)])
    on = counts[offsets[:, 1]] - counts[offsets[:, 0]]
    width = offsets[:, 1] - offsets[:, 0]
    straddle = np.flatnonzero((on > 0) & (on < width))
    if straddle.size:
        lo, hi = offsets[straddle[0]]
        raise EncodeError("tokenization_mismatch", f"token {tokenizer.decode([ids[straddle[0]]])!r} "
                          f"(chars {lo}:{hi}) spans supervised and unsupervised text")
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.where((on > 0) & (on == width), ids, IGNORE)

    if tokenizer.bos_token_id is not None:  # as the tokenizer's own special tokens would add it
        ids, labels = np.concatenate([[tokenizer.bos_token_id], ids]), np.concatenate([[IGNORE], labels])
    image_at = np.flatnonzero(ids == processor.image_token_id)
    if image_at.size:  # the processor's expansion: one placeholder -> N image tokens, never targets
        counts = image_tokens if image_tokens is not None else [num_image_tokens(processor)] * image_at.size
        if len(counts) != image_at.size:
            raise ValueError(f"{image_at.size} image placeholders in the row and token counts for {len(counts)} images")
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[image_at] = counts
        labels = np.where(ids == processor.image_token_id, IGNORE, labels)
        ids, labels = np.repeat(ids, repeats), np.repeat(labels, repeats)
    if len(ids) > model_cfg.max_len:
        raise EncodeError("too_long", f"{len(ids)} tokens (images expanded) > model.max_len {model_cfg.max_len}")
    if not (labels != IGNORE).any():
        raise EncodeError("no_supervised_tokens", f"nothing to train on under loss.target={loss_cfg.target}")
    return Encoded(ids.astype(np.int64), labels.astype(np.int64), has_image, row["task"], text)


def token_losses(logits, batch: dict, task_index: dict[str, int]):
    """Mean next-token loss over supervised tokens, and per-task (sum, count) of it over
    all of the run's tasks (`task_index`: name -> position), from one cross-entropy pass.

    Labels are aligned with the inputs (Hugging Face convention): position t predicts
    label t+1. `batch["token_task"]` indexes the batch's own `tasks` list.
    """
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    on = labels != IGNORE
    per_token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    loss = per_token.sum() / on.sum().clamp(min=1)
    to_run = torch.tensor([task_index[t] for t in batch["tasks"]], dtype=torch.long, device=labels.device)
    tasks = to_run[batch["token_task"][:, 1:][on]]
    zeros = torch.zeros(len(task_index), device=labels.device)
    task_sum = zeros.index_add(0, tasks, per_token[on].detach())
    task_count = zeros.index_add(0, tasks, torch.ones(len(tasks), device=labels.device))
    return loss, task_sum, task_count