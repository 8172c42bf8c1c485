"""Preference pairs -> model inputs: the DPO stream, its transform and its collate.

    read pairs.parquet -> fetch + decode the image -> PairTransform -> collate_pairs

`PairTransform` encodes each pair as two conversations, prompt + chosen and prompt +
rejected, with `encode_row` and response-only labels (the log-probs DPO compares are
those of the response tokens), and processes the pair's image once. Rows come out at the
fixed length `model.max_len` (cheap for Ray Data to stack); a pair that cannot be
encoded (too long, a tokenization mismatch) goes to the stream's quarantine with the
source line of the pair, and the run goes on.

`collate_pairs` stacks a micro-batch of B pairs into 2B sequences, the chosen ones first,
then the rejected ones in the same order, and only the B images: the model encodes each
image once and fills both sequences with it (`EveryRankVision(repeat_images=2)`).
Pairs are not packed: each sequence's log-prob is a sum over its own response.
"""
from __future__ import annotations

import functools

import numpy as np
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from vlit import storage
from vlit.config import LossConfig, ModelConfig, StreamConfig
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.corpus.stream import _DecodeImages, _is_stateful, write_quarantine
from vlit.model.build import build_processor
from vlit.model.labels import IGNORE, encode_row
from vlit.model.templates import EncodeError

SIDES = ("chosen", "rejected")
PAIR_COLUMNS = ["pair_id", "prompt", "image", "chosen", "rejected", "source", "position"]
RESPONSE_ONLY = LossConfig(target="response")


def pair_turns(prompt: str, response: str, has_image: bool) -> list[dict]:
    """One side of a pair as a conversation. Released VLFeedback prompts carry no image
    placeholder: it goes first, as in LLaVA's single-image prompts."""
    if has_image and IMAGE_TOKEN not in prompt:
        prompt = f"{IMAGE_TOKEN}\n{prompt}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


class PairTransform:
    """The stream transform of DPO: pass `functools.partial(PairTransform, model_cfg,
    quarantine=URI)` to `pairs_stream`; each actor builds it (and its processor) once."""

    def __init__(self, model_cfg: ModelConfig, *, quarantine: str, epoch: int = 0):
        self.model_cfg, self.quarantine, self.epoch = model_cfg, quarantine, epoch
        self.processor = build_processor(model_cfg)
        crop = self.processor.image_processor.crop_size
        self.image_shape = (3, crop["height"], crop["width"])

    def __call__(self, batch: dict) -> dict:
        n, max_len = len(batch["pair_id"]), self.model_cfg.max_len
        out = {f"{side}_{k}": np.full((n, max_len), IGNORE if k == "labels" else 0, np.int64)
               for side in SIDES for k in ("input_ids", "labels")}
        out.update({f"{side}_length": np.zeros(n, np.int64) for side in SIDES})
        keep, failed, failures = [], [], []
        for i in range(n):
            try:
                for side in SIDES:
                    row = {"turns": pair_turns(str(batch["prompt"][i]), str(batch[side][i]), bool(batch["has_image"][i])),
                           "task": "preference", "has_image": bool(batch["has_image"][i])}
                    e = encode_row(row, self.processor, self.model_cfg, RESPONSE_ONLY, None)
                    out[f"{side}_input_ids"][i, :len(e.input_ids)] = e.input_ids
                    out[f"{side}_labels"][i, :len(e.labels)] = e.labels
                    out[f"{side}_length"][i] = len(e.input_ids)
                keep.append(i)
            except EncodeError as e:
                failed.append(i)
                failures.append((e.reason, f"pair {batch['pair_id'][i]} ({side}): {e.detail}"))
        if failures:
            columns = [c for c in batch if c not in ("pixels", "has_image")]
            write_quarantine(self.quarantine, self.epoch, [{c: batch[c][i] for c in columns} for i in failed], failures)
        has_image = np.asarray(batch["has_image"], bool)[keep]
        pixel_values = np.zeros((len(keep), *self.image_shape), np.float32)
        if has_image.any():
            images = [batch["pixels"][i] for i, has in zip(keep, has_image) if has]
            pixel_values[has_image] = self.processor.image_processor(images=images, return_tensors="np")["pixel_values"]
        out = {k: v[keep] for k, v in out.items()}
        return {"pair_id": np.asarray(batch["pair_id"], dtype=object)[keep], **out,
                "pixel_values": pixel_values, "has_image": has_image}


def collate_pairs(rows: dict) -> dict:
    """B encoded pairs -> 2B sequences (chosen, then rejected), trimmed to the longest;
    `pixel_values` holds the pairs' images once each (None when no pair has one)."""
    lengths = np.concatenate([np.asarray(rows[f"{side}_length"]) for side in SIDES])
    width = int(lengths.max())
    ids, labels = (np.concatenate([np.asarray(rows[f"{side}_{k}"])[:, :width] for side in SIDES])
                   for k in ("input_ids", "labels"))
    has_image = np.asarray(rows["has_image"], bool)
    return {
        "input_ids": torch.as_tensor(ids),
        "labels": torch.as_tensor(labels),
        # Right padding: a causal model never attends to it, so a sequence's log-prob
        # does not depend on what it was batched with.
        "attention_mask": torch.as_tensor(np.arange(width)[None, :] < lengths[:, None]).long(),
        "position_ids": torch.arange(width).expand(len(ids), width).clone(),
        "pixel_values": torch.as_tensor(np.asarray(rows["pixel_values"])[has_image]) if has_image.any() else None,
        "pair_id": [str(p) for p in rows["pair_id"]],
    }


class PairCollate(NumpyBatchCollateFn):
    """`collate_pairs` as Ray Data's collate hook (runs in the prefetch threads)."""

    def __call__(self, batch: dict) -> dict:
        return collate_pairs(batch)


@functools.lru_cache(maxsize=4)
def _transform(model_json: str, quarantine: str) -> PairTransform:
    return PairTransform(ModelConfig.model_validate_json(model_json), quarantine=quarantine)


class PairEncoder:
    """`PairTransform` for Ray Data tasks rather than actors: each worker process builds
    the transform (processor, tokenizer) once and keeps it. Ray Data runs a fresh
    execution of the stream every epoch; an actor pool would start new processes each
    time (about 15 s per epoch on 2 cores, measured), while tasks reuse warm workers."""

    def __init__(self, model_cfg: ModelConfig, quarantine: str):
        self.model_json, self.quarantine = model_cfg.model_dump_json(), quarantine

    def __call__(self, batch: dict) -> dict:
        return _transform(self.model_json, self.quarantine)(batch)


def pairs_quarantine(pairs) -> str:
    """Where the DPO stream of a pairs version quarantines pairs."""
    return storage.join(pairs.uri, "stream_quarantine")


def pairs_stream(pairs, stream: StreamConfig, transform, **resources) -> ray.data.Dataset:
    """The lazily executed stream of a pairs version (`vlit.versions.PairsVersion`):
    pairs in file order, images decoded and `transform` applied by `stream.decode_concurrency`
    workers: tasks for a plain callable (`PairEncoder`), actors that build it once for a
    class or a `functools.partial` of one (a reference model). `resources` (num_gpus=...)
    go to those workers. Ray must be up."""
    fs, path = storage.filesystem(pairs.pairs_uri)
    decode_args = (stream.image_size, stream.quarantine or pairs_quarantine(pairs), 0, transform)
    if _is_stateful(transform):
        decode, kwargs = _DecodeImages, {"fn_constructor_args": decode_args,
                                         "compute": ray.data.ActorPoolStrategy(size=stream.decode_concurrency)}
    else:
        decode, kwargs = _DecodeImages(*decode_args), {"compute": ray.data.TaskPoolStrategy(size=stream.decode_concurrency)}
    return (
        ray.data.read_parquet(path, filesystem=fs, columns=PAIR_COLUMNS)
        # One file, one read task: without this, one decode worker would get every pair.
        .repartition(target_num_rows_per_block=stream.block_rows)
        .map_batches(decode, batch_format="pyarrow", batch_size=stream.block_rows, **kwargs, **resources)
    )
