"""One small interface in front of every way of running a model.

A backend takes a batch and returns one result per item, in order; an item's result may
be an exception (a `RequestError` for that item alone), so one bad item never fails the
rest of its batch. Backends are built inside Serve replicas by `make_backend`, which
imports only the chosen one: `vllm` and `openai` are not imported unless chosen.

- `generate`: chat requests to completions (the generator pool, the judge's `generate` mode).
- `rating_distributions`: P(rating = 1..5) at the token after a rubric prompt (the judge's
  `logprob` mode); a string instead of a distribution says why there is none.
- `judge`: the VLFeedback rubric on top of those two; `reference` replaces it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlit.config import BackendConfig
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.model.templates import CHAT, RESPONSE, SYSTEM, EncodeError, _messages, render
from vlit.serve import rubric
from vlit.serve.protocol import AspectScore, RequestError


@dataclass
class Message:
    role: str  # system | user | assistant
    text: str
    # This message carries the request's image: at the image placeholder in `text`, or
    # else at its start (LLaVA's convention).
    image: bool = False


@dataclass
class GenerationRequest:
    messages: list[Message]
    image: Any = None  # a decoded RGB PIL image, or None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    reference: str | None = None  # the known answer (reference backend)
    # Text the reply is made to start with; the judge's logprob mode scores the next token.
    answer_prefix: str = ""
    # Text in the prompt that many requests share up to its end (the judge's rubric): a
    # backend may compute that part of the prompt once and reuse it (prefix caching).
    cache_prefix: str = ""


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length
    tokens: int


@dataclass
class Generation:
    completions: list[Completion]
    prompt_tokens: int


@dataclass
class JudgeItem:
    instruction: str
    response: str
    image: Any
    reference: str | None
    aspects: list[str]
    mode: str  # logprob | generate
    max_new_tokens: int


def render_prompt(messages: list[Message], template: str, eos: str, processor=None) -> str:
    """The prompt text of a conversation under a vlit template (or the checkpoint's chat
    template, with its generation prompt), ending where the model writes its reply. An
    image goes where the text has the placeholder, else first in its message, and every
    template places it as training did (templates.py)."""
    system, turns = None, []
    for m in messages:
        text = f"{IMAGE_TOKEN}\n{m.text}" if m.image and IMAGE_TOKEN not in m.text else m.text
        if m.role == "system":
            if turns or system is not None:
                raise RequestError(400, "a system message may come only once, first")
            system = text
        else:
            turns.append((m.role, text))
    if not turns or turns[-1][0] != "user":
        raise RequestError(400, "the last message must be the user's")
    if template == CHAT:
        chat = ([{"role": "system", "content": system}] if system is not None else []) + _messages(turns)
        return processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    try:
        pieces = render(turns + [("assistant", "")], template, eos)
    except EncodeError as e:
        raise RequestError(400, f"messages: {e.detail}") from None
    while pieces and pieces[-1].kind == RESPONSE and pieces[-1].turn == len(turns):
        pieces.pop()  # the empty reply and its end-of-sequence
    if system is not None and pieces and pieces[0].kind == SYSTEM:
        pieces[0] = type(pieces[0])(system, SYSTEM, 0)
    return "".join(p.text for p in pieces).rstrip(" ")


def judge_prompt(item: JudgeItem, aspect: str) -> GenerationRequest:
    logprob = item.mode == "logprob"
    has_image = item.image is not None
    return GenerationRequest(
        messages=[Message("user", rubric.prompt(aspect, item.instruction, item.response, has_image), image=has_image)],
        image=item.image,
        temperature=0.0,  # a judge is deterministic
        n=1,
        max_new_tokens=1 if logprob else item.max_new_tokens,
        answer_prefix=rubric.ANSWER_PREFIX if logprob else "",
        cache_prefix=rubric.prompt_head(aspect),
    )


def run_isolated(fn, items: list) -> list:
    """fn(items), and when the batch as a whole fails, each item alone: the failure then
    stays with the item that caused it."""
    try:
        return fn(items)
    except Exception as e:
        if len(items) == 1:
            return [e]
    out = []
    for item in items:
        try:
            out.append(fn([item])[0])
        except Exception as e:
            out.append(e)
    return out


class Backend:
    kind = "?"

    def check(self, req: GenerationRequest) -> None:
        """Cheap checks of one request before it joins a batch; raises RequestError."""

    def generate(self, reqs: list[GenerationRequest]) -> list[Generation | Exception]:
        raise NotImplementedError

    def rating_distributions(self, reqs: list[GenerationRequest]) -> list[list[float] | str | Exception]:
        raise RequestError(400, f"the {self.kind} backend has no logprob mode; use mode=generate")

    def check_judge(self, item: JudgeItem) -> None:
        for aspect in item.aspects:
            self.check(judge_prompt(item, aspect))

    def judge(self, items: list[JudgeItem]) -> list[dict[str, AspectScore] | Exception]:
        """The rubric, one prompt per aspect; all prompts of the batch in one backend call
        per mode."""
        results: list[dict | Exception] = [{} for _ in items]
        for mode in ("logprob", "generate"):
            keys = [(i, a) for i, item in enumerate(items) if item.mode == mode for a in item.aspects]
            if not keys:
                continue
            prompts = [judge_prompt(items[i], a) for i, a in keys]
            outs = self.rating_distributions(prompts) if mode == "logprob" else self.generate(prompts)
            for (i, aspect), out in zip(keys, outs):
                if isinstance(results[i], Exception):
                    continue
                if isinstance(out, Exception):
                    results[i] = out
                elif mode == "logprob":
                    results[i][aspect] = distribution_score(out)
                else:
                    results[i][aspect] = reply_score(out.completions[0].text)
        return results

    def check_health(self) -> None:
        """Raise when this backend cannot serve (Serve then replaces the replica)."""


def distribution_score(dist: list[float] | str) -> AspectScore:
    if isinstance(dist, str):
        return AspectScore(status="unparseable", raw=dist)
    return AspectScore(status="ok", rating=rubric.expected_rating(dist), distribution=dist)


def reply_score(text: str) -> AspectScore:
    parsed = rubric.parse_reply(text)
    if parsed is None:
        return AspectScore(status="unparseable", raw=text)
    return AspectScore(status="ok", rating=float(parsed[0]), rationale=parsed[1], raw=text)


def make_backend(cfg: BackendConfig, engine=None, model: str | None = None) -> Backend:
    """The backend of a config, importing only its own module (and libraries). `engine`:
    the LLMServer deployment handle of a vllm backend, serving `model` (vlit.serve.llm)."""
    if cfg.kind == "hf":
        from vlit.serve.backends.hf import HFBackend
        return HFBackend(cfg)
    if cfg.kind == "vllm":
        from vlit.serve.backends.llm import LLMServerBackend
        return LLMServerBackend(cfg, engine, model)
    if cfg.kind == "openai":
        from vlit.serve.backends.openai import OpenAIBackend
        return OpenAIBackend(cfg)
    from vlit.serve.backends.reference import ReferenceBackend
    return ReferenceBackend(cfg)
