"""Model families: what differs between LLaVA and the Qwen-VL line (Qwen2.5-VL, Qwen3-VL),
in one place, so training, DPO, evaluation and serving treat a family the same way.

- processor: a checkpoint's own; Qwen-VL's without its video processor, which needs
  torchvision (an image corpus needs the image processor and the tokenizer only);
- images: `prepare` is the family's reference preprocessing before its image processor.
  LLaVA-1.5 trains with `image_aspect_ratio: pad` (each image padded to a square of the
  image mean, then CLIP's resize and centre crop); Qwen-VL resizes to its dynamic
  resolution (between min and max pixels) itself. Every path calls `pixels`, so the
  tensors a model trains on are the ones it is evaluated and served with;
- image tokens: LLaVA a fixed count per image, Qwen-VL (grid t*h*w / merge^2) per image;
- rope positions of a packed segment: LLaVA 0..n-1; Qwen-VL the 3-D mRoPE positions of
  the segment alone, as the model's own `get_rope_index` computes them;
- vision features and the LLM run on the embeddings (`EveryRankVision`, model/parts.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

LLAVA, QWEN2_5_VL, QWEN3_VL = "llava", "qwen2_5_vl", "qwen3_vl"


@dataclass
class Pixels:
    """The processed images of some rows: per image its model input (LLaVA [3, H, W];
    Qwen-VL [patches, C*T*P*P]), its grid (Qwen-VL (t, h, w)) and its token count."""

    values: list[np.ndarray]
    grids: list[tuple[int, int, int]] | None
    tokens: list[int]


def family_of(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    kind = getattr(config, "model_type", None)
    if kind not in (LLAVA, QWEN2_5_VL, QWEN3_VL):
        raise ValueError(f"model type {kind!r} is not a family vlit trains (llava, qwen2_5_vl, qwen3_vl)")
    return kind


def processor_family(processor) -> str:
    return LLAVA if type(processor).__name__ == "LlavaProcessor" else getattr(processor, "family", QWEN2_5_VL)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `expand2square`: the image centred on a square of `background`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - width) // 2, (side - height) // 2))
    return out


def prepare(processor, images: list[Image.Image]) -> list[Image.Image]:
    """The family's preprocessing before its image processor (module doc)."""
    if processor_family(processor) != LLAVA:
        return images
    mean = processor.image_processor.image_mean
    background = tuple(int(round(255 * m)) for m in mean)
    return [expand_to_square(im, background) for im in images]


def pixels(processor, images: list[Image.Image]) -> Pixels:
    """Images (decoded RGB) -> the model's pixel inputs and each image's token count."""
    if not images:
        return Pixels([], None if processor_family(processor) == LLAVA else [], [])
    out = processor.image_processor(images=prepare(processor, images), return_tensors="np")
    if processor_family(processor) == LLAVA:
        values = [v.astype(np.float32) for v in out["pixel_values"]]
        n = num_image_tokens(processor)
        return Pixels(values, None, [n] * len(values))
    grids = [tuple(int(x) for x in g) for g in out["image_grid_thw"]]
    merge = processor.image_processor.merge_size ** 2
    sizes = [t * h * w for t, h, w in grids]
    values = np.split(out["pixel_values"].astype(np.float32), np.cumsum(sizes)[:-1])
    return Pixels(list(values), grids, [s // merge for s in sizes])


def pixel_shape(processor) -> tuple[int, ...]:
    """The shape of one image's pixel input less its leading dimension: LLaVA (3, H, W)
    per image, Qwen-VL (C*T*P*P,) per patch."""
    ip = processor.image_processor
    if processor_family(processor) == LLAVA:
        return (3, ip.crop_size["height"], ip.crop_size["width"])
    return (3 * ip.temporal_patch_size * ip.patch_size ** 2,)


def num_image_tokens(processor) -> int:
    """Tokens one image takes in a LLaVA sequence (LLaVA-1.5 at 336 px: 576)."""
    crop = processor.image_processor.crop_size
    return processor._get_num_multimodal_tokens(image_sizes=[(crop["height"], crop["width"])]).num_image_tokens[0]


def image_token(processor) -> str:
    """The text that stands for one image token in the model's sequence."""
    return processor.image_token


class RopeIndex:
    """Rope positions of one packed segment: [rows, n] (1 row for LLaVA, 3 for Qwen-VL).
    Qwen-VL's come from the model's own `get_rope_index`, on a copy of its text-free
    skeleton built on the meta device (the method reads only the config)."""

    def __init__(self, config):
        self.family = family_of(config)
        self.model = None
        if self.family != LLAVA:
            from transformers import AutoModel

            with torch.device("meta"):
                self.model = AutoModel.from_config(config)
            self.image_id = config.image_token_id

    @property
    def rows(self) -> int:
        return 1 if self.model is None else 3

    def __call__(self, ids: np.ndarray, grids: list[tuple[int, int, int]]) -> np.ndarray:
        n = len(ids)
        if self.model is None or not grids:
            return np.broadcast_to(np.arange(n, dtype=np.int64), (self.rows, n)).copy()
        t = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
        mm = (t == self.image_id).int()
        positions, _ = self.model.get_rope_index(t, mm, image_grid_thw=torch.as_tensor(grids, dtype=torch.long))
        return positions[:, 0].numpy().astype(np.int64)
