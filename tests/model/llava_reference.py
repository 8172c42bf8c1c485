"""LLaVA-1.5's own preprocessing, as an oracle for the parity tests: what
haotian-liu/LLaVA's `train.py` (`preprocess_multimodal`, `preprocess_v1`,
`preprocess_plain`), `conversation.py` (`conv_vicuna_v1`, `conv_llava_plain`) and
`mm_utils.tokenizer_image_token` compute for one Vision-Flan release row, restated in
this project's words. Nothing of vlit is used, so the tests compare vlit with LLaVA, not
with itself.

- multimodal: the sentence holding `<image>` loses it and its surrounding whitespace,
  and gets it back at its start followed by a newline;
- vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." (the v1 system prompt);
- tokenization: the prompt split at `<image>`, each piece tokenized on its own (with
  BOS, which all but the first drop), the image as one IMAGE_INDEX between them;
- labels (v1): the BOS and each round's instruction (up to and including "ASSISTANT: ")
  masked, by token counts of the round's pieces, less one per later round for a
  `legacy: false` tokenizer; a row whose counted length disagrees is masked whole;
- plain: "<image>" + caption + "\\n", the image and BOS masked.
"""
from __future__ import annotations

IMAGE = "<image>"
IMAGE_INDEX = -200
IGNORE = -100
SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def multimodal(turns: list[dict]) -> list[dict]:
    out = []
    for t in turns:
        value = t["value"]
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append({**t, "value": value})
    return out


def image_tokens(text: str, tokenizer) -> list[int]:
    chunks = [tokenizer(c).input_ids for c in text.split(IMAGE)]
    bos = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = [tokenizer.bos_token_id] if bos else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE_INDEX)
        ids += chunk[bos:]  # every piece's own BOS dropped
    return ids


def vicuna_v1(turns: list[dict], tokenizer, has_image: bool) -> tuple[list[int], list[int]]:
    if has_image:
        turns = multimodal(turns)
    prompt = SYSTEM_V1 + " "
    for i, t in enumerate(turns):
        role = "USER" if t["from"] == "human" else "ASSISTANT"
        prompt += f"{role}: {t['value']}" + (" " if i % 2 == 0 else "</s>")
    tok = (lambda s: image_tokens(s, tokenizer)) if has_image else (lambda s: tokenizer(s).input_ids)
    ids = tok(prompt)
    labels = list(ids)
    at = 1
    labels[:at] = [IGNORE] * at
    sep = " ASSISTANT: "
    for i, rnd in enumerate(prompt.split("</s>")):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = len(tok(rnd)), len(tok(parts[0])) - 2
        if i != 0 and not tokenizer.legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[at:at + instruction_len] = [IGNORE] * len(labels[at:at + instruction_len])
        at += round_len
    labels[at:] = [IGNORE] * len(labels[at:])
    if at != len(ids):  # LLaVA's "tokenization mismatch": nothing of the row is trained
        labels = [IGNORE] * len(ids)
    return ids, labels


def plain(turns: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    text = IMAGE + turns[1]["value"] + "\n"
    ids = image_tokens(text, tokenizer)
    masked = len(image_tokens(IMAGE, tokenizer))
    return ids, [IGNORE] * masked + ids[masked:]
