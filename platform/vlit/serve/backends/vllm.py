"""vLLM backend (GPU). vLLM is not part of the pinned CPU set: vllm 0.33 pins its own torch
(2.14) and transformers (<5.21), so it goes into the GPU serving image (see README,
"Serve"). It is imported here only, when a config chooses `kind: vllm`.

vLLM batches continuously inside one `generate` call and honours a seed per request, so
a Serve batch goes in whole. Rating distributions come from the top log-probabilities of
the one token after the rubric prompt.
"""
from __future__ import annotations

import math
import tempfile

from vlit.config import VLLMBackendConfig
from vlit.serve.backends import Backend, Completion, Generation, GenerationRequest, render_prompt

try:
    import vllm
except ImportError as e:  # the error names what to do, not only what failed
    raise ImportError(
        "the vllm backend needs the `vllm` package, which is not installed; install it in the GPU "
        "serving image (pip install vllm==0.33.0, with its own torch) or choose the hf backend"
    ) from e


class VLLMBackend(Backend):
    kind = "vllm"
    TOP_LOGPROBS = 20

    def __init__(self, cfg: VLLMBackendConfig):
        self.cfg = cfg
        if cfg.model.preset == "tiny":
            # vLLM loads folders only: export the tiny model once for it.
            from vlit.model.build import build_model_and_processor, export_model

            self._tmp = tempfile.TemporaryDirectory(prefix="vlit-vllm-")
            export_model(*build_model_and_processor(cfg.model), self._tmp.name)
            path = self._tmp.name
        else:
            from vlit.model.build import local_copy

            path = local_copy(cfg.model.path)
        self.llm = vllm.LLM(model=path, tensor_parallel_size=cfg.tensor_parallel_size,
                            gpu_memory_utilization=cfg.gpu_memory_utilization,
                            max_model_len=cfg.max_model_len or cfg.model.max_len, dtype=cfg.model.dtype)
        self.tokenizer = self.llm.get_tokenizer()

    def _prompt(self, req: GenerationRequest) -> dict:
        text = render_prompt(req.messages, self.cfg.model.template, self.tokenizer.eos_token)
        if req.answer_prefix:
            text = f"{text} {req.answer_prefix}"
        prompt = {"prompt": text}
        if req.image is not None:
            prompt["multi_modal_data"] = {"image": req.image}
        return prompt

    def generate(self, reqs: list[GenerationRequest]) -> list[Generation]:
        params = [vllm.SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                                      seed=r.seed, stop=r.stop or None) for r in reqs]
        outs = self.llm.generate([self._prompt(r) for r in reqs], params, use_tqdm=False)
        return [
            Generation([Completion(c.text, "stop" if c.finish_reason == "stop" else "length", len(c.token_ids))
                        for c in o.outputs], len(o.prompt_token_ids))
            for o in outs
        ]

    def rating_distributions(self, reqs: list[GenerationRequest]) -> list[list[float] | str]:
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.TOP_LOGPROBS)
        outs = self.llm.generate([self._prompt(r) for r in reqs], params, use_tqdm=False)
        result = []
        for o in outs:
            top = o.outputs[0].logprobs[0] if o.outputs[0].logprobs else {}
            mass = [0.0] * 5
            for lp in top.values():
                tok = (lp.decoded_token or "").strip()
                if tok in ("1", "2", "3", "4", "5"):
                    mass[int(tok) - 1] += math.exp(lp.logprob)
            total = sum(mass)
            result.append([m / total for m in mass] if total else
                          f"no rating among the top tokens: {[lp.decoded_token for lp in top.values()]}")
        return result
