"""Rows -> training sequences: encode, group by modality and length, pack.

`SFTTransform` is the `transform` of `vlit.corpus.stream.build_stream`: it runs in the
stream's actor pool on each decoded block, so tokenization, image preprocessing and
packing happen off the training workers. Each output row is one training sequence of
fixed length `model.max_len` (Ray Data stacks fixed shapes into tensors cheaply):

    input_ids, labels, segment_ids   int64[max_len]
        segment_ids: 1..k for the k rows packed in the sequence, 0 for padding
    position_ids    int64[max_len] (LLaVA) or int64[3, max_len] (Qwen-VL's mRoPE): each
                    row's own rope positions, as if it were alone (families.RopeIndex)
    pixel_values    float32, processor-ready, in segment order: LLaVA [n_images, 3, H, W],
                    Qwen-VL [patches, C*T*P*P] (a ragged tensor column; none for text-only)
    image_grid_thw  int64[n_images, 3] (Qwen-VL: each image's patch grid)
    num_images      int64
    segment_tasks, segment_keys   list<string>: task and row key of each segment

Images come decoded as they are (`images`) and go through the family's own
preprocessing (`families.pixels`), which also says how many tokens each takes.

Grouping: image rows and text-only rows never share a sequence or (within a block) a
micro-batch, so text-only batches skip the vision tower; micro-batches hold sequences
of similar length, and their order is shuffled, seeded, so lengths do not form a
curriculum. Packing is `best_fit_packs` within each modality.
"""
from __future__ import annotations

import bisect
import zlib

import numpy as np

from vlit.config import LossConfig, ModelConfig, TrainConfig
from vlit.corpus.stream import write_quarantine
from vlit.model.build import build_processor, model_config, resolved
from vlit.model.families import Pixels, RopeIndex, pixel_shape, pixels
from vlit.model.labels import IGNORE, Encoded, encode_row
from vlit.model.templates import EncodeError


def best_fit_packs(lengths, capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of total length <= capacity (each length <= capacity).

    Each bin takes the longest row left, then the one or two rows of the rest that fill its
    room best (a two-pointer search over the rows sorted by length), then, longest first,
    any row that still fits. Rows of about a third of the capacity (LLaVA-1.5's ~700
    tokens at 2048) go three to a bin where first-fit-decreasing puts the long ones two to
    a bin and strands the room: 97% of the capacity filled against 90% on the Vision-Flan
    sample (BENCHMARKS.md). Ties in length keep index order, so a block packs the same
    way every time."""
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    left, ids = [int(lengths[i]) for i in order], list(order)  # ascending
    bins: list[list[int]] = []
    while left:
        room = capacity - left.pop()
        members = [ids.pop()]
        fits = bisect.bisect_right(left, room)
        best, pick = (left[fits - 1], (fits - 1,)) if fits else (0, ())
        lo, hi = 0, fits - 1
        while lo < hi:  # the pair of rows closest to the room, from below
            total = left[lo] + left[hi]
            if total > room:
                hi -= 1
                continue
            if total > best:
                best, pick = total, (lo, hi)
            lo += 1
        for k in sorted(pick, reverse=True):
            room -= left.pop(k)
            members.append(ids.pop(k))
        while (fits := bisect.bisect_right(left, room)) > 0:
            room -= left.pop(fits - 1)
            members.append(ids.pop(fits - 1))
        bins.append(members)
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


def assemble(encoded: list[Encoded], keys: list[str], images: list[Pixels | None], positions: list[np.ndarray],
             groups: list[list[int]], max_len: int, pixel_shape: tuple[int, ...]) -> dict:
    """One fixed-shape output row per group of encoded rows (see the module doc);
    `images[i]` is row i's processed image (None for text-only rows), `positions[i]` its
    rope positions [rows, n]; `pixel_shape` one image's (or patch's) pixels."""
    n, rope_rows = len(groups), positions[0].shape[0] if positions else 1
    out = {name: np.zeros((n, max_len), np.int64) for name in ("input_ids", "segment_ids")}
    out["labels"] = np.full((n, max_len), IGNORE, np.int64)
    out["position_ids"] = np.zeros((n, rope_rows, max_len), np.int64)
    pixel_values, grids, counts, tasks, seg_keys = [], [], [], [], []
    for s, group in enumerate(groups):
        at = 0
        for seg, i in enumerate(group, start=1):
            e, end = encoded[i], at + len(encoded[i].input_ids)
            out["input_ids"][s, at:end] = e.input_ids
            out["labels"][s, at:end] = e.labels
            # The model's loss shifts labels by one: the first token of a segment is never a
            # target, so the previous row's last token is not trained to predict this row.
            out["labels"][s, at] = IGNORE
            out["position_ids"][s, :, at:end] = positions[i]
            out["segment_ids"][s, at:end] = seg
            at = end
        mine = [images[i] for i in group if images[i] is not None]
        values = [v for p in mine for v in p.values]
        # Qwen-VL's patches concatenate ([patches, dim] per image); LLaVA's images stack.
        pixel_values.append(None if not values else np.concatenate(values) if rope_rows > 1 else np.stack(values))
        grids.append(np.array([g for p in mine for g in (p.grids or [])], np.int64).reshape(-1, 3))
        counts.append(sum(len(p.values) for p in mine))
        tasks.append([encoded[i].task for i in group])
        seg_keys.append([keys[i] for i in group])
    if rope_rows == 1:
        out["position_ids"] = out["position_ids"][:, 0]
    else:
        out["image_grid_thw"] = ragged(grids)
    out["num_images"] = np.array(counts, np.int64)
    out["pixel_values"] = ragged([np.zeros((0, *pixel_shape), np.float32) if v is None else v for v in pixel_values])
    out["segment_tasks"], out["segment_keys"] = ragged(tasks), ragged(seg_keys)
    return out


def ragged(items: list) -> np.ndarray:
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
        self.model_cfg, self.loss_cfg, self.train_cfg = resolved(model_cfg), loss_cfg, train_cfg
        self.template_text, self.quarantine, self.epoch = template_text, quarantine, epoch
        self.processor = build_processor(model_cfg)
        self.rope = RopeIndex(model_config(model_cfg))

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        images, failures = processed_images(self.processor, batch["images"])
        encoded, keep, rows_images = [], [], []
        for i in range(n):
            if i in failures:
                continue
            row = {"turns": batch["turns"][i], "task": batch["task"][i], "has_image": batch["has_image"][i]}
            try:
                encoded.append(encode_row(row, self.processor, self.model_cfg, self.loss_cfg, self.template_text,
                                          images[i].tokens if images[i] is not None else None))
                keep.append(i)
                rows_images.append(images[i])
            except EncodeError as e:
                failures[i] = (e.reason, e.detail)
        if failures:
            columns = [c for c in batch if c not in ("images", "has_image")]
            order = sorted(failures)
            write_quarantine(self.quarantine, self.epoch, [{c: batch[c][i] for c in columns} for i in order],
                             [failures[i] for i in order])
        positions = [self.rope(e.input_ids, p.grids if p is not None else []) for e, p in zip(encoded, rows_images)]
        has_image = np.array([e.has_image for e in encoded], dtype=bool)
        keys = [str(batch["key"][i]) for i in keep]
        return assemble(encoded, keys, rows_images, positions, self.sequences(encoded, has_image, keys),
                        self.model_cfg.max_len, pixel_shape(self.processor))

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
            for bin_ in best_fit_packs(lengths[idx], self.model_cfg.max_len):
                packs.append([int(idx[b]) for b in bin_])
                pack_len.append(int(lengths[packs[-1]].sum()))
                pack_image.append(bool(modality))
        order = modality_length_batches(np.array(pack_len), np.array(pack_image), cfg.micro_batch_size, rng)
        return [packs[i] for b in order for i in b]


def processed_images(processor, images: list) -> tuple[list[Pixels | None], dict[int, tuple[str, str]]]:
    """Each row's image through the family's preprocessing (one call for the block), and
    {row: (reason, detail)} for images the processor refuses (tried alone, so a bad image
    takes only its own row with it)."""
    out: list[Pixels | None] = [None] * len(images)
    rows = [i for i, im in enumerate(images) if im is not None]
    failures: dict[int, tuple[str, str]] = {}
    try:
        done = pixels(processor, [images[i] for i in rows])
        for k, i in enumerate(rows):
            out[i] = Pixels([done.values[k]], None if done.grids is None else [done.grids[k]], [done.tokens[k]])
    except Exception:  # noqa: BLE001 - found again below, image by image
        for i in rows:
            try:
                out[i] = pixels(processor, [images[i]])
            except Exception as e:  # noqa: BLE001 - the processor's refusal is the row's reason
                failures[i] = ("image_unprocessable", f"{type(e).__name__}: {e}")
    return out, failures
