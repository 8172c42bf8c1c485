"""Any OpenAI-compatible endpoint (a GPT-4V-class judge, a vLLM server, another vlit
Serve app) through the `openai` client.

The key comes from the environment variable named in config, read once when the replica
starts; it lives only inside the client object and is never logged or returned. Requests
of a batch go out concurrently (the endpoint does its own batching); an error answered
for one request stays with that request.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import openai

from vlit.config import OpenAIBackendConfig
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.serve import rubric
from vlit.serve.backends import Backend, Completion, Generation, GenerationRequest
from vlit.serve.protocol import RequestError, data_url


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, cfg: OpenAIBackendConfig):
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise RuntimeError(f"the openai backend reads its API key from ${cfg.api_key_env}, which is not set")
        self.cfg, self.model_name = cfg, cfg.model
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)
        self.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="openai")

    def __repr__(self) -> str:  # never the client (it holds the key)
        return f"OpenAIBackend(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    @staticmethod
    def _messages(req: GenerationRequest, extra: str = "") -> list[dict]:
        out = []
        for i, m in enumerate(req.messages):
            text = m.text.replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "")
            text += f"\n{extra}" if extra and i == len(req.messages) - 1 else ""
            if m.image and req.image is not None:
                content = [{"type": "image_url", "image_url": {"url": data_url(req.image)}},
                           {"type": "text", "text": text}]
            else:
                content = text
            out.append({"role": m.role, "content": content})
        return out

    def _call(self, **kwargs):
        try:
            return self.client.chat.completions.create(model=self.model_name, **kwargs)
        except openai.APIStatusError as e:
            # The endpoint's own message; its status says whose mistake it was.
            status = 400 if e.status_code in (400, 404, 413, 422) else 502
            raise RequestError(status, f"upstream endpoint answered {e.status_code}: {_message(e)}") from None
        except openai.APIError as e:
            raise RequestError(502, f"upstream endpoint failed: {type(e).__name__}: {e}") from None

    def _generate_one(self, req: GenerationRequest) -> Generation:
        kwargs = dict(messages=self._messages(req), temperature=req.temperature, top_p=req.top_p, n=req.n,
                      max_tokens=req.max_new_tokens)
        if req.seed is not None:
            kwargs["seed"] = req.seed
        if req.stop:
            kwargs["stop"] = req.stop
        resp = self._call(**kwargs)
        usage = resp.usage
        completions = [Completion(c.message.content or "", "stop" if c.finish_reason == "stop" else "length",
                                  0) for c in resp.choices]
        if usage and completions:
            for c in completions:
                c.tokens = usage.completion_tokens // len(completions)
        return Generation(completions, usage.prompt_tokens if usage else 0)

    def _distribution_one(self, req: GenerationRequest) -> list[float] | str:
        """P(1..5) from the first reply token's top log-probabilities; ratings outside the
        top ones count 0. None of them there: no distribution, and the tokens that were."""
        resp = self._call(messages=self._messages(req, rubric.RATING_ONLY), temperature=0.0, max_tokens=1,
                          logprobs=True, top_logprobs=self.cfg.top_logprobs)
        choice = resp.choices[0]
        top = choice.logprobs.content[0].top_logprobs if choice.logprobs and choice.logprobs.content else []
        mass = [0.0] * 5
        for t in top:
            tok = t.token.strip()
            if tok in ("1", "2", "3", "4", "5"):
                mass[int(tok) - 1] += math.exp(t.logprob)
        total = sum(mass)
        if total == 0.0:
            return f"no rating among the top tokens: {[t.token for t in top]} (reply {choice.message.content!r})"
        return [m / total for m in mass]

    def _each(self, fn, reqs: list) -> list:
        def safe(r):
            try:
                return fn(r)
            except Exception as e:  # the error stays with its request
                return e
        return list(self.pool.map(safe, reqs))

    def generate(self, reqs: list[GenerationRequest]) -> list[Generation | Exception]:
        return self._each(self._generate_one, reqs)

    def rating_distributions(self, reqs: list[GenerationRequest]) -> list[list[float] | str | Exception]:
        return self._each(self._distribution_one, reqs)


def _message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body)
    return str(err.get("message") if isinstance(err, dict) and err.get("message") else e.message)
