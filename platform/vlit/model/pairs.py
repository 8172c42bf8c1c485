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
from vlit.model.build import build_processor, model_config, resolved
from vlit.model.families import RopeIndex, pixel_shape
from vlit.model.labels import IGNORE, encode_row
from vlit.model.packing import ragged, processed_images
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
        self.model_cfg, self.quarantine, self.epoch = resolved(model_cfg), quarantine, epoch
        self.processor = build_processor(model_cfg)
        self.rope = RopeIndex(model_config(model_cfg))

    def __call__(self, batch: dict) -> dict:
        n, max_len = len(batch["pair_id"]), self.model_cfg.max_len
        rows = self.rope.rows
        out = {f"{side}_{k}": np.full((n, max_len), IGNORE if k == "labels" else 0, np.int64)
               for side in SIDES for k in ("input_ids", "labels")}
        out.update({f"{side}_position_ids": np.zeros((n, rows, max_len), np.int64) for side in SIDES})
        out.update({f"{side}_length": np.zeros(n, np.int64) for side in SIDES})
        images, failures = processed_images(self.processor, batch["images"])
        keep, failed = [], []
        for i in range(n):
            if i in failures:
                failed.append((i, failures[i]))
                continue
            has_image, image = bool(batch["has_image"][i]), images[i]
            try:
                for side in SIDES:
                    row = {"turns": pair_turns(str(batch["prompt"][i]), str(batch[side][i]), has_image),
                           "task": "preference", "has_image": has_image}
                    e = encode_row(row, self.processor, self.model_cfg, RESPONSE_ONLY, None,
                                   image.tokens if image is not None else None)
                    length = len(e.input_ids)
                    out[f"{side}_input_ids"][i, :length] = e.input_ids
                    out[f"{side}_labels"][i, :length] = e.labels
                    out[f"{side}_position_ids"][i, :, :length] = self.rope(e.input_ids, (image.grids or []) if image is not None else [])
                    out[f"{side}_length"][i] = length
                keep.append(i)
            except EncodeError as e:
                failed.append((i, (e.reason, f"pair {batch['pair_id'][i]} ({side}): {e.detail}")))
        if failed:
            columns = [c for c in batch if c not in ("images", "has_image")]
            write_quarantine(self.quarantine, self.epoch, [{c: batch[c][i] for c in columns} for i, _ in failed],
                             [why for _, why in failed])
        out = {k: v[keep] for k, v in out.items()}
        if rows == 1:
            out = {k: v[:, 0] if k.endswith("_position_ids") else v for k, v in out.items()}
        shape = pixel_shape(self.processor)
        pixels = [np.concatenate(images[i].values) if images[i] is not None and rows > 1 else
                  np.stack(images[i].values) if images[i] is not None else np.zeros((0, *shape), np.float32)
                  for i in keep]
        result = {"pair_id": np.asarray(batch["pair_id"], dtype=object)[keep], **out, "pixel_values": ragged(pixels),
                  "has_image": np.asarray([images[i] is not None for i in keep], bool)}
        if rows > 1:
            result["image_grid_thw"] = ragged([np.array(images[i].grids if images[i] is not None else [], np.int64)
                                                .reshape(-1, 3) for i in keep])
        return result


def collate_pairs(rows: dict) -> dict:
    """B encoded pairs -> 2B sequences (chosen, then rejected), trimmed to the longest;
    `pixel_values` holds the pairs' images once each (None when no pair has one)."""
    lengths = np.concatenate([np.asarray(rows[f"{side}_length"]) for side in SIDES])
    width = int(lengths.max())
    ids, labels, positions = (np.concatenate([np.asarray(rows[f"{side}_{k}"])[..., :width] for side in SIDES])
                              for k in ("input_ids", "labels", "position_ids"))
    has_image = np.asarray(rows["has_image"], bool)
    images = [np.asarray(p, np.float32) for p, has in zip(rows["pixel_values"], has_image) if has]
    out = {
        "input_ids": torch.as_tensor(ids),
        "labels": torch.as_tensor(labels),
        # Right padding: a causal model never attends to it, so a sequence's log-prob
        # does not depend on what it was batched with.
        "attention_mask": torch.as_tensor(np.arange(width)[None, :] < lengths[:, None]).long(),
        # [2B, L] (LLaVA) or Qwen-VL's mRoPE rows as the model takes them, [3, 2B, L].
        "position_ids": torch.as_tensor(positions if positions.ndim == 2 else positions.transpose(1, 0, 2)),
        "pixel_values": torch.as_tensor(np.concatenate(images)) if images else None,
        "pair_id": [str(p) for p in rows["pair_id"]],
    }
    if "image_grid_thw" in rows:
        grids = [np.asarray(g, np.int64).reshape(-1, 3) for g, has in zip(rows["image_grid_thw"], has_image) if has]
        out["image_grid_thw"] = torch.as_tensor(np.concatenate(grids)) if grids else None
    return out


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
