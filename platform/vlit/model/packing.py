"""Rows -> training sequences: encode, group by modality and length, pack.

`SFTTransform` is the `transform` of `vlit.corpus.stream.build_stream`: it runs in the
stream's actor pool on each decoded block, so tokenization, image preprocessing and
packing happen off the training workers. Each output row is one training sequence of
fixed length `model.max_len` (Ray Data stacks fixed shapes into tensors cheaply):

    input_ids, labels, position_ids, segment_ids   int64[max_len]
        segment_ids: 1..k for the k rows packed in the sequence, 0 for padding;
        position_ids restart at 0 for every row (the rotary positions of the row alone)
    pixel_values    float32[n_images, 3, H, W]  processor-ready, in segment order
                    (a ragged tensor column: n_images varies, 0 for text-only sequences)
    num_images      int64
    segment_tasks, segment_keys   list<string>: task and row key of each segment

Grouping: image rows and text-only rows never share a sequence or (within a block) a
micro-batch, so text-only batches skip the vision tower; micro-batches hold sequences
of similar length, and their order is shuffled, seeded, so lengths do not form a
curriculum. Packing is first-fit decreasing within each modality.
"""
from __future__ import annotations

import zlib

import numpy as np

from vlit.config import LossConfig, ModelConfig, TrainConfig
from vlit.corpus.stream import write_quarantine
from vlit.model.build import build_processor
from vlit.model.labels import IGNORE, Encoded, encode_row
from vlit.model.templates import EncodeError


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of total length <= capacity (each length <= capacity)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        slot = next((b for b, r in enumerate(room) if r >= n), None)
        if slot is None:
            bins.append([int(i)])
            room.append(capacity - n)
        else:
            bins[slot].append(int(i))
            room[slot] -= n
    return bins


def modality_length_batches(lengths: np.ndarray, has_image: np.ndarray, batch_size: int,
                            rng: np.random.Generator) -> list[list[int]]:
    """Micro-batches of indices: one modality each, similar lengths, in shuffled order."""
    batches = []
    for modality in (True, False):
        idx = np.flatnonzero(has_image == modality)
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        batches += [idx[i:i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def assemble(encoded: list[Encoded], keys: list[str], pixel_values: list[np.ndarray | None],
             groups: list[list[int]], max_len: int, image_shape: tuple[int, ...]) -> dict:
    """One fixed-shape output row per group of encoded rows (see the module doc)."""
    n = len(groups)
    out = {name: np.zeros((n, max_len), np.int64) for name in ("input_ids", "position_ids", "segment_ids")}
    out["labels"] = np.full((n, max_len), IGNORE, np.int64)
    images, tasks, seg_keys = [], [], []
    for s, group in enumerate(groups):
        at = 0
        for seg, i in enumerate(group, start=1):
            e, end = encoded[i], at + len(encoded[i].input_ids)
            out["input_ids"][s, at:end] = e.input_ids
            out["labels"][s, at:end] = e.labels
            # The model's loss shifts labels by one: the first token of a segment is never a
            # target, so the previous row's last token is not trained to predict this row.
            out["labels"][s, at] = IGNORE
            out["position_ids"][s, at:end] = np.arange(end - at)
            out["segment_ids"][s, at:end] = seg
            at = end
        pixels = [pixel_values[i] for i in group if pixel_values[i] is not None]
        images.append(np.stack(pixels) if pixels else np.zeros((0, *image_shape), np.float32))
        tasks.append([encoded[i].task for i in group])
        seg_keys.append([keys[i] for i in group])
    out["num_images"] = np.array([len(x) for x in images], np.int64)
    out["pixel_values"] = _ragged(images)
    out["segment_tasks"], out["segment_keys"] = _ragged(tasks), _ragged(seg_keys)
    return out


def _ragged(items: list) -> np.ndarray:
    # An object array of per-row values: Ray Data stores it as a list or ragged tensor column.
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


class SFTTransform:
    """The stream transform for supervised fine-tuning. Pass it to `build_stream` as
    `functools.partial(SFTTransform, model_cfg, loss_cfg, train_cfg, template_text=...,
    quarantine=quarantine_uri(version, corpus_cfg), epoch=epoch)`; each actor builds it once."""

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig, *,
                 template_text: dict[str, set[str]] | None, quarantine: str, epoch: int = 0):
        self.model_cfg, self.loss_cfg, self.train_cfg = model_cfg, loss_cfg, train_cfg
        self.template_text, self.quarantine, self.epoch = template_text, quarantine, epoch
        self.processor = build_processor(model_cfg)
        crop = self.processor.image_processor.crop_size
        self.image_shape = (3, crop["height"], crop["width"])

    def __call__(self, batch: dict) -> dict:
        encoded, keep, failed, failures = [], [], [], []
        for i in range(len(batch["key"])):
            row = {"turns": batch["turns"][i], "task": batch["task"][i], "has_image": batch["has_image"][i]}
            try:
                encoded.append(encode_row(row, self.processor, self.model_cfg, self.loss_cfg, self.template_text))
                keep.append(i)
            except EncodeError as e:
                failed.append(i)
                failures.append((e.reason, e.detail))
        if failures:
            columns = [c for c in batch if c not in ("pixels", "has_image")]
            rows = [{c: batch[c][i] for c in columns} for i in failed]
            write_quarantine(self.quarantine, self.epoch, rows, failures)

        has_image = np.array([e.has_image for e in encoded], dtype=bool)
        pixel_values: list[np.ndarray | None] = [None] * len(encoded)
        with_image = np.flatnonzero(has_image)
        if with_image.size:
            images = [batch["pixels"][keep[j]] for j in with_image]
            processed = self.processor.image_processor(images=images, return_tensors="np")["pixel_values"]
            for j, pixels in zip(with_image, processed):
                pixel_values[j] = pixels.astype(np.float32)
        keys = [str(batch["key"][i]) for i in keep]
        return assemble(encoded, keys, pixel_values, self.sequences(encoded, has_image, keys),
                        self.model_cfg.max_len, self.image_shape)

    def sequences(self, encoded: list[Encoded], has_image: np.ndarray, keys: list[str]) -> list[list[int]]:
        """Groups of encoded rows, one per output sequence, in output order."""
        cfg = self.train_cfg
        lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
        # Seeded by the block's content, so a re-run of the same block gives the same order.
        rng = np.random.default_rng([cfg.seed, self.epoch, zlib.crc32("".join(keys).encode())])
        grouped = has_image if cfg.group_by_modality_length else np.zeros_like(has_image)
        if not cfg.packing:
            if cfg.group_by_modality_length:
                return [[i] for b in modality_length_batches(lengths, has_image, cfg.micro_batch_size, rng) for i in b]
            return [[int(i)] for i in rng.permutation(len(encoded))]
        packs, pack_len, pack_image = [], [], []
        for modality in np.unique(grouped):
            idx = np.flatnonzero(grouped == modality)
            for bin_ in first_fit_decreasing(lengths[idx], self.model_cfg.max_len):
                packs.append([int(idx[b]) for b in bin_])
                pack_len.append(int(lengths[packs[-1]].sum()))
                pack_image.append(bool(modality))
        order = modality_length_batches(np.array(pack_len), np.array(pack_image), cfg.micro_batch_size, rng)
        return [packs[i] for b in order for i in b]
