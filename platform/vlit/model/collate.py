"""A batch of packed sequences (numpy, from the stream) -> model inputs (torch).

Attention stays within each packed row through a 4D additive block-diagonal causal mask
([B, 1, L, L], 0 = attend, dtype-min = masked), which transformers passes through
unchanged to SDPA and eager attention. With flash-attn installed (GPU), the varlen
kernel does the same from position_ids alone (transformers detects the restarts), at no
O(L^2) mask cost; that path is not exercised here (CPU).
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


def collate(rows: dict, dtype: torch.dtype = torch.float32) -> dict:
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
        "attention_mask": block_causal_mask(take["segment_ids"], dtype),
        "pixel_values": torch.as_tensor(np.concatenate(images)).to(dtype) if images else None,
        "token_task": torch.as_tensor(token_task),
        "tasks": tasks,
    }
    if "image_grid_thw" in rows:  # Qwen-VL: each image's patch grid, in the pixels' order
        grids = [np.asarray(g, np.int64).reshape(-1, 3) for g, n in zip(rows["image_grid_thw"], rows["num_images"]) if n]
        out["image_grid_thw"] = torch.as_tensor(np.concatenate(grids)) if grids else None
    return out
