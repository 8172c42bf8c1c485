"""A backend that forwards to a Ray Serve LLM engine (`vlit.serve.llm`): chat requests to
the `LLMServer` deployment's OpenAI-compatible `chat`, through its deployment handle.

Requests and replies are the OpenAI chat API's, so everything but the transport is the
openai backend's: messages with the image as a data URL, completions, and the judge's
rating distribution from the first reply token's top log-probabilities. Requests of a
batch go out concurrently; the engine batches them (and everyone else's) continuously.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from vlit.config import VLLMBackendConfig
from vlit.serve.backends.openai import OpenAIBackend
from vlit.serve.protocol import RequestError


class LLMServerBackend(OpenAIBackend):
    kind = "vllm"

    def __init__(self, cfg: VLLMBackendConfig, engine, model: str):
        from vlit.serve.llm import serve_llm

        serve_llm()  # what `_call` sends is vLLM's request type
        if engine is None:
            raise ValueError(f"the vllm backend of {model!r} forwards to a Ray Serve LLM engine: build it with "
                             "vlit.serve.app.build_app, which makes one")
        self.cfg, self.model_name = cfg, model
        self.engine = engine.options(stream=True)  # LLMServer.chat is an async generator
        self.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="llm")

    def __repr__(self) -> str:
        return f"LLMServerBackend(model={self.model_name!r})"

    def _call(self, **kwargs):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        request = ChatCompletionRequest(model=self.model_name, **kwargs)
        for out in self.engine.chat.remote(request, None):  # not streamed: one reply
            error = getattr(out, "error", None)
            if error is not None:
                status = error.code if 400 <= (error.code or 0) < 500 else 502
                raise RequestError(status, f"the engine answered {error.code}: {error.message}")
            return out
        raise RequestError(502, "the engine closed the stream without a reply")
