"""VIGC: visual instruction generation (VIG) and correction (VIC).

VIG: for each image and instruction type (conversation, detailed description, complex
reasoning) the generator writes `Question: ... Answer: ...`; `parse_qa` is strict, and a
reply that does not parse is quarantined with its reason.

VIC: the answer is rebuilt sentence by sentence. Each round re-prompts with the
instruction, the question and the answer so far, and keeps only the first new sentence
of the reply (`new_sentence`: a reply that repeats the answer so far before continuing
counts from where it stops repeating). The loop stops when a reply adds no sentence (the
end of the answer) or after R rounds. Both answers are kept, with provenance.

Every round goes through Serve on Ray Data (`serve_calls`); `correct` takes any
`complete(prompts) -> replies` so the loop itself is checked with a scripted generator.
"""
from __future__ import annotations

import re
import zlib
from typing import Callable

from vlit.config import VIGCConfig
from vlit.loops.dataset import Prompt, corpus_prompts
from vlit.serve.client import chat_texts, serve_calls, user_message
from vlit.versions import publish_rows, quarantine_row

VIG_PROMPTS = {
    "conversation": "Look at the image and write one question a person might ask about it in a conversation, "
                    "and its answer.",
    "detailed_description": "Look at the image and write a request for a detailed description of it, "
                            "and the detailed description.",
    "complex_reasoning": "Look at the image and write a question that needs reasoning about what it shows, "
                         "and an answer that explains the reasoning step by step.",
}
VIG_FORMAT = "Reply exactly in the form:\nQuestion: <the question>\nAnswer: <the answer>"
VIC_PROMPT = ("{instruction}\nQuestion: {question}\nAnswer so far: {answer}\n"
              "Continue the answer with its next sentence, true to the image. Reply with nothing when the answer "
              "is complete.")

_QA = re.compile(r"\A\s*Question:\s*(?P<q>.+?)\s*\n?\s*Answer:\s*(?P<a>.+?)\s*\Z", re.S)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class ParseError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def parse_qa(text: str) -> tuple[str, str]:
    """(question, answer) of a VIG reply, or ParseError(reason, detail)."""
    if not isinstance(text, str) or not text.strip():
        raise ParseError("empty_reply", "the reply is empty")
    for marker in ("Question:", "Answer:"):
        n = text.count(marker)
        if n != 1:
            raise ParseError("not_question_answer", f"{marker!r} appears {n} times; expected once")
    m = _QA.match(text)
    if not m:
        raise ParseError("not_question_answer", "expected 'Question: ...' followed by 'Answer: ...'")
    question, answer = m["q"].strip(), m["a"].strip()
    if not question or not answer:
        raise ParseError("not_question_answer", "the question or the answer is empty")
    return question, answer


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if s]


def _norm(text: str) -> str:
    return " ".join(text.split())


def new_sentence(answer: str, reply: str) -> str | None:
    """The first sentence the reply adds to the answer so far, or None at the end."""
    rest = _norm(reply)
    done = _norm(answer)
    if done and rest.startswith(done):
        rest = rest[len(done):].strip()
    found = sentences(rest)
    return found[0] if found else None


def correct(items: list[dict], complete: Callable[[list[dict]], list[str | None]], rounds: int) -> list[dict]:
    """VIC for each item {instruction, question, ...}: sets `vic_answer`, `vic_rounds`,
    `vic_stop` ("end", "rounds" or "error: ...")."""
    state = [{**it, "vic_answer": "", "vic_rounds": 0, "vic_stop": None} for it in items]
    for _ in range(rounds):
        active = [s for s in state if s["vic_stop"] is None]
        if not active:
            break
        replies = complete(active)
        for s, reply in zip(active, replies):
            s["vic_rounds"] += 1
            if reply is None:
                s["vic_stop"] = "error"
                continue
            sentence = new_sentence(s["vic_answer"], reply)
            if sentence is None:
                s["vic_stop"] = "end"
            else:
                s["vic_answer"] = f"{s['vic_answer']} {sentence}".strip()
    for s in state:
        s["vic_stop"] = s["vic_stop"] or "rounds"
    return state


def vic_prompt(item: dict) -> str:
    return VIC_PROMPT.format(instruction=item["instruction"], question=item["question"], answer=item["vic_answer"])


def serve_complete(model: str, cfg: VIGCConfig, app_name: str) -> Callable[[list[dict]], list[str | None]]:
    """VIC's `complete` through Serve: one Ray Data pass per round."""
    def complete(active: list[dict]) -> list[str | None]:
        # Seeded per item and round, so a sampled correction (temperature > 0) repeats too.
        reqs = [{"model": model, "messages": [user_message(vic_prompt(s), s["image"])], "n": 1,
                 "temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
                 "seed": cfg.seed * 100003 + zlib.crc32(f"{s['id']}#{s['vic_rounds']}".encode())} for s in active]
        return [(chat_texts(r) or [None])[0] for r, _ in serve_calls(reqs, method="chat", app_name=app_name)]
    return complete


def generate(prompts: list[Prompt], cfg: VIGCConfig, app_name: str = "vlit") -> tuple[list[dict], list[dict]]:
    """VIG then VIC; (rows, quarantine)."""
    reqs, where = [], []
    for i, p in enumerate(prompts):
        for kind in cfg.types:
            reqs.append({"model": cfg.generator, "n": cfg.samples, "temperature": cfg.temperature,
                         "max_tokens": cfg.max_tokens, "seed": cfg.seed * 100003 + i,
                         "messages": [user_message(f"{VIG_PROMPTS[kind]}\n{VIG_FORMAT}", p.image)]})
            where.append((p, kind))
    items, quarantine = [], []
    for (p, kind), (result, error) in zip(where, serve_calls(reqs, method="chat", app_name=app_name)):
        ref = f"{p.id}#{kind}"
        if error:
            quarantine.append(quarantine_row("generation_failed", error, ref, None))
        for k, text in enumerate(chat_texts(result)):
            try:
                question, answer = parse_qa(text)
            except ParseError as e:
                quarantine.append(quarantine_row(e.reason, e.detail, f"{ref}#{k}", text))
                continue
            items.append({"id": f"{p.id}-{kind}-{k}", "source_id": p.id, "source_task": p.task, "image": p.image,
                          "type": kind, "instruction": VIG_PROMPTS[kind], "question": question,
                          "vig_answer": answer, "vig_model": cfg.generator, "sample": k})
    corrector = cfg.corrector or cfg.generator
    rows = correct(items, serve_complete(corrector, cfg, app_name), cfg.rounds)
    for r in rows:
        r["vic_model"] = corrector
        if r["vic_stop"] == "error":
            quarantine.append(quarantine_row("correction_failed", f"VIC round {r['vic_rounds']} got no reply",
                                             r["id"], r["vic_answer"]))
    return [r for r in rows if r["vic_stop"] != "error"], quarantine


def vigc_dataset(cfg: VIGCConfig, corpus_version: str, out_root: str, app_name: str = "vlit",
                 holdout=None) -> dict:
    """VIGC on `cfg.images` images of a corpus version (none of `holdout`'s rows) -> a
    versioned dataset under OUT_ROOT."""
    prompts = corpus_prompts(corpus_version, cfg.images, cfg.seed, holdout=holdout)
    rows, quarantine = generate(prompts, cfg, app_name)
    rows.sort(key=lambda r: r["id"])
    return publish_rows(out_root, "vigc", rows, quarantine, cfg.model_dump(mode="json"))
