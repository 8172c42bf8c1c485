"""A batch of packed sequences (numpy, from the stream) -> model inputs (torch).

Attention stays within each packed row through a 4D additive block-diagonal causal mask
([B, 1, L, L], 0 = attend, dtype-min = masked), which transformers passes through
unchanged to SDPA and eager attention. With `varlen` (`model.attn_implementation:
flash_attention_2`) the micro-batch is flattened instead: one row of its real tokens, no
mask, the position ids restarting at every segment, from which transformers finds the
segments (flash-attn's varlen kernel through cu_seqlens, at no O(L^2) mask cost; SDPA
builds the same block mask from them, which is how the CPU tests check this path). Qwen-VL
then takes four position rows: the text positions first, then its three mRoPE rows.
"""
from __future__ import annotations

import numpy as np
import torch

# What `model(**{k: batch[k] for k in MODEL_INPUTS})` takes; the rest is for the per-task
# loss and the supervision audit (`labels.token_losses`).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "labels")


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, L] segment ids (0 = padding) -> [B, 1, L, L] additive mask: each token sees the
    earlier tokens of its own segment. Padding sees itself only, so no softmax row is empty."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool).tril()
    allowed = (same & causal & (segment_ids[:, :, None] > 0)) | torch.eye(segment_ids.shape[1], dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _flatten(out: dict, segment_ids: torch.Tensor) -> dict:
    """The micro-batch as one row of its real tokens (see the module doc)."""
    real = segment_ids > 0
    # Segments of different rows must stay apart: number them across the batch.
    offset = torch.cumsum(segment_ids.max(dim=1).values, 0) - segment_ids.max(dim=1).values
    flat = {k: out[k][real][None] for k in ("input_ids", "labels", "token_task")}
    flat["segment_ids"] = (segment_ids + offset[:, None])[real][None]
    positions = out["position_ids"]
    if positions.ndim == 2:  # LLaVA: [B, L] -> [1, N]
        flat["position_ids"] = positions[real][None]
    else:  # Qwen-VL: [3, B, L] -> [4, 1, N], the text positions first
        starts = torch.cat([torch.ones(1, dtype=torch.bool), flat["segment_ids"][0, 1:] != flat["segment_ids"][0, :-1]])
        index = torch.arange(starts.numel())
        text = index - torch.cummax(torch.where(starts, index, 0), 0).values
        flat["position_ids"] = torch.cat([text[None, None], positions[:, real][:, None]])
    return {**out, **flat}


def collate(rows: dict, dtype: torch.dtype = torch.float32, varlen: bool = False) -> dict:
    """Sequences from `SFTTransform` -> input_ids, attention_mask, position_ids, labels,
    pixel_values (None when no sequence has an image), plus segment_ids, `tasks` (the
    batch's task names) and `token_task` (index into `tasks` per token, -1 on padding).
    Trims the shared padding to the longest sequence in the batch."""
    segment_ids = np.asarray(rows["segment_ids"])
    length = int((segment_ids > 0).sum(axis=1).max())
    take = {k: torch.tensor(np.asarray(rows[k])[:, :length]) for k in ("input_ids", "labels", "segment_ids")}
    positions = np.asarray(rows["position_ids"])
    # [B, L] for LLaVA; Qwen-VL's mRoPE rows [B, 3, L] as the model takes them, [3, B, L].
    take["position_ids"] = torch.tensor(positions[..., :length] if positions.ndim == 2 else
                                        positions[..., :length].transpose(1, 0, 2))

    tasks = sorted({t for seg in rows["segment_tasks"] for t in seg})
    index = {t: i for i, t in enumerate(tasks)}
    # Per sequence: segment number -> task index, with slot 0 (padding) -> -1.
    lookup = [np.array([-1] + [index[t] for t in seg], np.int64) for seg in rows["segment_tasks"]]
    token_task = np.stack([lk[s] for lk, s in zip(lookup, segment_ids[:, :length])])

    images = [np.asarray(p, dtype=np.float32) for p, n in zip(rows["pixel_values"], rows["num_images"]) if n > 0]
    out = {
        **take,
        "attention_mask": None if varlen else block_causal_mask(take["segment_ids"], dtype),
        "pixel_values": torch.as_tensor(np.concatenate(images)).to(dtype) if images else None,
        "token_task": torch.as_tensor(token_task),
        "tasks": tasks,
    }
    if "image_grid_thw" in rows:  # Qwen-VL: each image's patch grid, in the pixels' order
        grids = [np.asarray(g, np.int64).reshape(-1, 3) for g, n in zip(rows["image_grid_thw"], rows["num_images"]) if n]
        out["image_grid_thw"] = torch.as_tensor(np.concatenate(grids)) if grids else None
    return _flatten(out, take["segment_ids"]) if varlen else out
