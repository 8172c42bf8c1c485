"""Answering evaluation questions by likelihood: the model picks the choice it finds
most probable after the prompt, so nothing depends on how a small model phrases a reply.

A choice's score is the log of the total probability of its surface forms ("Yes" and
"yes") as the assistant's reply, each form's tokens scored whole (no length
normalization: forms of one question are a word or a letter). Prompt and forms are
tokenized by `labels.encode_row`, the training path, so the tokens scored are the tokens
trained (vicuna_v1: the space after "ASSISTANT:" belongs to the reply).

One forward pass per question: the prompt is followed by every form's tokens, each form
seeing the prompt and itself only (a block mask, as packing uses), with positions that
restart where the prompt ends. The prompt (~250 tokens with the image) is computed once
instead of once per form (2-4 forms of 1-3 tokens each).

Where it runs: `predict_local` in the calling process, or `predict_ray` as a Ray Data
map_batches over one model actor. On a 2-core CPU machine the local path is the faster
one for these sets (a few thousand rows, the tiny model answers ~500 questions/s): it
skips Ray's start-up (5-7 s) and moving rows and images to an actor; the Ray path is
for a cluster, where an actor with a GPU holds the big model.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from vlit import storage
from vlit.config import LossConfig, ModelConfig
from vlit.corpus.images import decode_image
from vlit.model.families import RopeIndex, pixels
from vlit.model.labels import IGNORE, encode_row
from vlit.progress import Progress


class PredictError(ValueError):
    """A row that cannot be scored; the message names it."""


class ChoiceScorer:
    def __init__(self, model, processor, model_cfg: ModelConfig, batch_size: int = 16):
        self.model, self.processor, self.model_cfg = model.eval(), processor, model_cfg
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rope = RopeIndex(model.config)
        self._forms: dict[str, np.ndarray] = {}  # form -> its tokens after the prompt

    @classmethod
    def load(cls, model_uri: str | None, model_cfg: ModelConfig, batch_size: int = 16) -> "ChoiceScorer":
        """An exported model (HF folder or s3:// prefix), or `model_cfg`'s own model when
        `model_uri` is None (the untrained tiny preset: the 'before' of a first stage)."""
        from vlit.model.build import build_model_and_processor

        if model_uri is not None:
            model_cfg = model_cfg.model_copy(update={"preset": None, "path": model_uri})
        model, processor = build_model_and_processor(model_cfg)
        return cls(model, processor, model_cfg, batch_size)

    def _encode(self, key: str, prompt: str, forms: list[str], tokens: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(prompt ids, each form's ids); the image takes `tokens` tokens. A form's tokens are
        the same after any prompt that ends with the template's role tag, so each distinct
        form is encoded once."""
        def encode(form: str):
            row = {"turns": [{"role": "user", "content": prompt}, {"role": "assistant", "content": form}],
                   "task": "eval", "has_image": True}
            try:
                enc = encode_row(row, self.processor, self.model_cfg, LossConfig(), None,
                                 None if tokens is None else [tokens])
            except ValueError as e:
                raise PredictError(f"eval row {key}: {e}") from None
            supervised = np.flatnonzero(enc.labels != IGNORE)
            reply = enc.input_ids[supervised[0]:supervised[-1] + 1]
            if reply[-1] in self._ends:
                reply = reply[:-1]  # a prefix's probability: "Yes, there is..." also says yes
            return enc.input_ids[:supervised[0]], reply

        prompt_ids, first = encode(forms[0])
        self._forms.setdefault(forms[0], first)
        for form in forms[1:]:
            if form not in self._forms:
                self._forms[form] = encode(form)[1]
        return prompt_ids, [self._forms[f] for f in forms]

    @property
    def _ends(self) -> set[int]:
        tok = self.processor.tokenizer
        return {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None, tok.unk_token_id}

    def _batch(self, encoded: list[tuple[np.ndarray, list[np.ndarray]]], grids: list):
        """Sequences prompt + form_1 + ... + form_K, their block masks and positions (each
        form continues the prompt's positions), and for every form token the position
        whose logits predict it."""
        length = max(len(p) + sum(map(len, fs)) for p, fs in encoded)
        ids = torch.zeros(len(encoded), length, dtype=torch.long)
        positions = torch.zeros(self.rope.rows, len(encoded), length, dtype=torch.long)
        allowed = torch.eye(length, dtype=torch.bool).repeat(len(encoded), 1, 1)
        targets = []  # (row, form index, predicting position, token)
        for b, ((prompt, forms), grid) in enumerate(zip(encoded, grids)):
            n = len(prompt)
            ids[b, :n] = torch.as_tensor(prompt)
            prompt_positions = torch.as_tensor(self.rope(prompt, grid))
            positions[:, b, :n] = prompt_positions
            after = int(prompt_positions.max()) + 1
            allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            start = n
            for f, form in enumerate(forms):
                m = len(form)
                ids[b, start:start + m] = torch.as_tensor(form)
                positions[:, b, start:start + m] = torch.arange(after, after + m)
                allowed[b, start:start + m, :n] = True
                allowed[b, start:start + m, start:start + m] = torch.ones(m, m, dtype=torch.bool).tril()
                for j, token in enumerate(form.tolist()):
                    targets.append((b, f, n - 1 if j == 0 else start + j - 1, token))
                start += m
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill(~allowed, torch.finfo(self.dtype).min)
        return ids, mask[:, None], positions[0] if self.rope.rows == 1 else positions, targets

    @torch.inference_mode()
    def choice_scores(self, rows: list[dict], images: list) -> list[list[float]]:
        """Per row, per choice: log P(choice) (log-sum over its surface forms). Rows need
        key, prompt and choices (a list of surface-form lists); `images` decoded RGB."""
        out = []
        progress = Progress("eval", len(rows), "questions")
        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo:lo + self.batch_size]
            px = pixels(self.processor, images[lo:lo + self.batch_size])
            flat = [[form for choice in r["choices"] for form in choice] for r in chunk]
            grids = [[g] for g in px.grids] if px.grids is not None else [[] for _ in chunk]
            ids, mask, positions, targets = self._batch(
                [self._encode(r["key"], r["prompt"], forms, n) for r, forms, n in zip(chunk, flat, px.tokens)], grids)
            values = torch.as_tensor(np.concatenate(px.values) if px.grids is not None else np.stack(px.values))
            extra = {"image_grid_thw": torch.as_tensor(px.grids).to(self.device)} if px.grids is not None else {}
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device),
                                pixel_values=values.to(self.device, self.dtype), **extra).logits
            b, f, at, token = (torch.tensor(c) for c in zip(*targets))
            logp = torch.log_softmax(logits[b, at].float(), dim=-1)[torch.arange(len(token)), token].cpu()
            form_logp = [[0.0] * len(forms) for forms in flat]
            for row, form, value in zip(b.tolist(), f.tolist(), logp.tolist()):
                form_logp[row][form] += value
            for r, scores in zip(chunk, form_logp):
                choices, k = [], 0
                for choice in r["choices"]:
                    choices.append(float(torch.logsumexp(torch.tensor(scores[k:k + len(choice)]), 0)))
                    k += len(choice)
                out.append(choices)
            progress.update(len(chunk))
        progress.close()
        return out

    def predict(self, rows: list[dict], image_root: str) -> list[str]:
        """The label of the most probable choice of each row (rows as in EVAL_SCHEMA)."""
        images = []
        for r in rows:
            try:
                images.append(decode_image(storage.read_bytes(storage.join(image_root, r["image"]))))
            except Exception as e:
                raise PredictError(f"eval row {r['key']}: image {r['image']} under {image_root}: {e}") from None
        return [r["labels"][int(np.argmax(s))] for r, s in zip(rows, self.choice_scores(rows, images))]


def predict_local(scorer: ChoiceScorer, table: pa.Table, image_root: str) -> list[dict]:
    """Rows of `table` with their `prediction`, answered in this process."""
    rows = table.to_pylist()
    for row, prediction in zip(rows, scorer.predict(rows, image_root)):
        row["prediction"] = prediction
    return rows


class _ScoreBlock:
    """One Ray Data actor: the model, loaded once, answering blocks of rows."""

    def __init__(self, model_uri: str | None, model_cfg: dict, batch_size: int, image_root: str):
        self.scorer = ChoiceScorer.load(model_uri, ModelConfig.model_validate(model_cfg), batch_size)
        self.image_root = image_root

    def __call__(self, block: pa.Table) -> pa.Table:
        predictions = self.scorer.predict(block.to_pylist(), self.image_root)
        return pa.table({"key": block.column("key"), "prediction": pa.array(predictions, pa.string())})


def predict_ray(model_uri: str | None, model_cfg: ModelConfig, table: pa.Table, image_root: str,
                batch_size: int = 16, num_gpus: float = 0.0) -> list[dict]:
    """`predict_local`'s result through Ray Data: one actor holds the model (on a GPU
    when `num_gpus` > 0) and answers blocks of `4 * batch_size` rows."""
    import ray

    predicted = (ray.data.from_arrow(table)
                 .map_batches(_ScoreBlock, batch_format="pyarrow", batch_size=4 * batch_size,
                              compute=ray.data.ActorPoolStrategy(size=1),
                              num_cpus=0 if num_gpus else 1, num_gpus=num_gpus,
                              fn_constructor_kwargs={"model_uri": model_uri, "model_cfg": model_cfg.model_dump(),
                                                     "batch_size": batch_size, "image_root": image_root})
                 .to_arrow_refs())
    by_key = {}
    for ref in predicted:
        part = ray.get(ref)
        by_key.update(zip(part.column("key").to_pylist(), part.column("prediction").to_pylist()))
    rows = table.to_pylist()
    for row in rows:
        row["prediction"] = by_key[row["key"]]
    return rows
