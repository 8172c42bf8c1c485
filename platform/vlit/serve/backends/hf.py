"""transformers backend (CPU or GPU): `generate` for completions, one forward pass for
rating distributions.

Generation batches are left-padded (`generate` numbers positions from the attention mask).
Rating distributions use prefix caching: judge prompts start with the same rubric text
(per aspect), whose keys and values are computed once per replica; only each request's
own part (image, instruction, response) runs per batch, right-padded after the shared
prefix, with explicit position ids, and each row's logits are read at its own last token.
The rubric is ~500 of the ~550 tokens of a tiny-model judge prompt. A request's scores do
not depend on what it was batched with (tested to 1e-5).

Sampling in one `generate` call shares temperature and top_p, so a batch is split into
groups by those. A request with a seed runs in a call of its own, seeded: it then returns
the same text whatever else is in flight (torch has one RNG per device, not per row).
"""
from __future__ import annotations

import copy
import threading
from collections import defaultdict

import torch
from transformers import DynamicCache

from vlit.config import HFBackendConfig
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.model.build import build_model_and_processor, resolved
from vlit.model.families import LLAVA, prepare, processor_family
from vlit.model.templates import CHAT, resolve
from vlit.serve.backends import Backend, Completion, Generation, GenerationRequest, render_prompt
from vlit.serve.protocol import RequestError

# Shared prompt prefixes whose keys and values are kept (the judge has one per aspect).
PREFIX_CACHE_ENTRIES = 8


class HFBackend(Backend):
    kind = "hf"

    def __init__(self, cfg: HFBackendConfig):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.model, self.processor = build_model_and_processor(cfg.model)
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model.to(self.device).eval()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.max_len = resolved(cfg.model).max_len
        self.template = resolve(cfg.model.template, self.processor)
        # LLaVA's positions are 0..n-1, so a shared prompt prefix's keys and values can be
        # reused; Qwen-VL's mRoPE positions come from the whole prompt (the model's own).
        self.llava = processor_family(self.processor) == LLAVA
        self.rating_ids, self.rating_sep = self._rating_tokens()
        self._lock = threading.Lock()  # one batch at a time on the model (and its RNG)
        # `check` runs on the replica's event loop while a batch pads on the executor thread;
        # a Rust tokenizer is not to be shared between those (padding mutates it).
        self._check_tokenizer = copy.deepcopy(self.tokenizer)
        self._prefix_cache: dict[str, tuple[int, list]] = {}

    # ---- prompts -------------------------------------------------------------------------

    def _text(self, req: GenerationRequest) -> str:
        text = render_prompt(req.messages, self.template, self.tokenizer.eos_token, self.processor)
        if not req.answer_prefix:
            return text
        space = "" if self.template == CHAT else " "  # a chat template's generation prompt ends the line
        return f"{text}{space}{req.answer_prefix}{self.rating_sep}"

    def _image_tokens(self, image) -> int:
        """Tokens the request's image takes beyond its one placeholder."""
        if image is None:
            return 0
        (square,) = prepare(self.processor, [image])
        return self.processor._get_num_multimodal_tokens(image_sizes=[square.size[::-1]]).num_image_tokens[0] - 1

    def _rating_tokens(self) -> tuple[list[int], str]:
        """Ids of the tokens "1".."5" as they follow the answer prefix, and the separator
        the prompt must end with for them to be single tokens (" 4" or, after "Rating: ",
        "4")."""
        from vlit.serve.rubric import ANSWER_PREFIX

        for sep in ("", " "):
            base = self.tokenizer(ANSWER_PREFIX + sep, add_special_tokens=False)["input_ids"]
            ids = []
            for k in "12345":
                full = self.tokenizer(f"{ANSWER_PREFIX} {k}", add_special_tokens=False)["input_ids"]
                if full[: len(base)] == base and len(full) == len(base) + 1:
                    ids.append(full[-1])
            if len(ids) == 5:
                return ids, sep
        raise ValueError("this tokenizer does not encode the ratings 1..5 as single tokens after 'Rating:'")

    def check(self, req: GenerationRequest) -> None:
        n = len(self._check_tokenizer(self._text(req))["input_ids"]) + self._image_tokens(req.image)
        if n + req.max_new_tokens > self.max_len:
            raise RequestError(
                400, f"this model's context is {self.max_len} tokens; the request needs {n} for the prompt "
                     f"and {req.max_new_tokens} for the reply", param="max_tokens")

    def _inputs(self, reqs: list[GenerationRequest]):
        texts = [self._text(r) for r in reqs]
        images = prepare(self.processor, [r.image for r in reqs if r.image is not None])
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}

    # ---- generate ------------------------------------------------------------------------

    def generate(self, reqs: list[GenerationRequest]) -> list[Generation]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(reqs):
            if r.temperature == 0:
                groups[("greedy",)].append(i)
            elif r.seed is not None:
                groups[("seeded", i)].append(i)
            else:
                groups[("sample", r.temperature, r.top_p)].append(i)
        out: list = [None] * len(reqs)
        with self._lock:
            for key, idx in groups.items():
                for i, gen in zip(idx, self._generate_group([reqs[i] for i in idx], seed=reqs[idx[0]].seed if key[0] == "seeded" else None)):
                    out[i] = gen
        return out

    @torch.inference_mode()
    def _generate_group(self, reqs: list[GenerationRequest], seed: int | None) -> list[Generation]:
        rows = [r for r in reqs for _ in range(r.n)]  # n samples of a request: n rows
        inputs = self._inputs(rows)
        first = reqs[0]
        sampling = first.temperature > 0
        kwargs = dict(do_sample=sampling, max_new_tokens=max(r.max_new_tokens for r in reqs),
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if sampling:
            kwargs.update(temperature=first.temperature, top_p=first.top_p, top_k=0)  # OpenAI semantics: no top-k
        if seed is not None:
            torch.manual_seed(seed)
        sequences = self.model.generate(**inputs, **kwargs)
        new = sequences[:, inputs["input_ids"].shape[1]:].tolist()
        prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
        results, row = [], 0
        for r in reqs:
            completions = [self._completion(new[row + k], r) for k in range(r.n)]
            results.append(Generation(completions, int(prompt_lens[row])))
            row += r.n
        return results

    def _completion(self, ids: list[int], req: GenerationRequest) -> Completion:
        ids = ids[: req.max_new_tokens]
        reason = "length"
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
            reason = "stop"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.index(s) for s in req.stop if s and s in text]
        if cuts:
            text, reason = text[: min(cuts)], "stop"
        return Completion(text, reason, len(ids))

    # ---- rating distributions ------------------------------------------------------------

    def _split(self, req: GenerationRequest) -> tuple[str, str]:
        """(shared prefix, the request's own rest) of its prompt text."""
        text = self._text(req)
        at = text.find(req.cache_prefix) if req.cache_prefix and self.llava else -1
        if at < 0 or IMAGE_TOKEN in text[: at + len(req.cache_prefix)]:
            return "", text
        cut = at + len(req.cache_prefix)
        return text[:cut], text[cut:]

    def _prefix_kv(self, prefix: str) -> tuple[int, list]:
        """Token count and per-layer keys/values of a shared prefix, computed once."""
        if prefix not in self._prefix_cache:
            if len(self._prefix_cache) >= PREFIX_CACHE_ENTRIES:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            ids = self.tokenizer(prefix, return_tensors="pt")["input_ids"].to(self.device)
            cache = self.model(input_ids=ids, use_cache=True).past_key_values
            self._prefix_cache[prefix] = (ids.shape[1], [(layer.keys, layer.values) for layer in cache.layers])
        return self._prefix_cache[prefix]

    @torch.inference_mode()
    def rating_distributions(self, reqs: list[GenerationRequest]) -> list[list[float]]:
        """P(1..5) at the token after each prompt: one forward pass per shared prefix. The
        prefix's keys and values are reused, the rest is right-padded, and each row's
        logits are read at its own last token."""
        parts = [self._split(r) for r in reqs]
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (prefix, _) in enumerate(parts):
            groups[prefix].append(i)
        out: list = [None] * len(reqs)
        with self._lock:
            for prefix, idx in groups.items():
                probs = self._score([parts[i][1] for i in idx], [reqs[i].image for i in idx], prefix)
                for i, p in zip(idx, probs):
                    out[i] = p
        return out

    def _score(self, rests: list[str], images: list, prefix: str) -> list[list[float]]:
        images = prepare(self.processor, [im for im in images if im is not None])
        inputs = self.processor(text=rests, images=images or None, padding=True, padding_side="right",
                                add_special_tokens=not prefix, return_tensors="pt")
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        rows, length = inputs["input_ids"].shape
        own_mask = inputs["attention_mask"]
        shared, kv = self._prefix_kv(prefix) if prefix else (0, [])
        if shared:
            inputs["past_key_values"] = DynamicCache(
                ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv])
            inputs["attention_mask"] = torch.cat([own_mask.new_ones(rows, shared), own_mask], dim=1)
        if self.llava:
            inputs["position_ids"] = torch.arange(shared, shared + length, device=self.device).expand(rows, length)
        logits = self.model(**inputs).logits
        last = own_mask.sum(dim=1) - 1
        rating_logits = logits[torch.arange(rows, device=self.device), last][:, self.rating_ids]
        return torch.softmax(rating_logits.float(), dim=-1).cpu().tolist()
