"""What a training stage trains, as model code: the trainable parts (vision tower,
projector, LLM; LoRA on them), the wrapper that runs the vision tower on every rank, and
the export of trained weights as a Hugging Face model.

DeepSpeed is not here (train/strategy.py); a train loop builds the stage's model with
`model.build.initial_model`, makes it trainable with `trainable_model`, and hands that to
the strategy.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from vlit.config import Config, TrainConfig
from vlit.model.families import LLAVA, QWEN2_5_VL, QWEN3_VL, family_of

# `train.trainable` parts as parameter-name prefixes, per family. Qwen-VL's projector (the
# patch merger, and Qwen3-VL's deepstack mergers) sits inside its vision module: a name
# takes the first part whose prefix it has, projector first.
PARTS = {
    LLAVA: {"projector": ("model.multi_modal_projector.",), "vision": ("model.vision_tower.",),
            "llm": ("model.language_model.", "lm_head.")},
    QWEN2_5_VL: {"projector": ("model.visual.merger.",), "vision": ("model.visual.",),
                 "llm": ("model.language_model.", "lm_head.")},
    QWEN3_VL: {"projector": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
               "vision": ("model.visual.",), "llm": ("model.language_model.", "lm_head.")},
}
PEFT_PREFIX = "base_model.model."


def part_of(name: str, family: str) -> str | None:
    name = name.removeprefix(PEFT_PREFIX)
    return next((part for part, prefixes in PARTS[family].items() if name.startswith(prefixes)), None)


def select_trainable(model: nn.Module, train: TrainConfig) -> nn.Module:
    """Freeze everything outside `train.trainable`; with `train.lora.enabled`, the vision
    tower and LLM get LoRA adapters instead of full updates (the projector, being small,
    stays fully trainable, as in LLaVA's LoRA recipe)."""
    family = family_of(model)
    parts = set(train.trainable)
    full = parts
    if train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        adapted = sorted(parts - {"projector"})
        if not adapted:
            raise ValueError("train.lora.enabled needs 'llm' or 'vision' in train.trainable (LoRA adapts those)")
        prefixes = "|".join(re.escape(p[:-1]) for part in adapted for p in PARTS[family][part])
        targets = "|".join(re.escape(m) for m in train.lora.target_modules)
        lora = train.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=rf"(?:{prefixes})\..*\.(?:{targets})",
        ))
        full = parts & {"projector"}
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue  # peft marked its adapters trainable
        param.requires_grad = part_of(name, family) in full
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train.trainable={train.trainable}: no parameter of {type(model).__name__} "
                         f"matches {sorted(parts)} (expected parameter names {PARTS[family]})")
    return model


class EveryRankVision(nn.Module):
    """Runs the vision tower on every rank, every step, and returns the logits.

    ZeRO-3 gathers each module's parameters with a collective when the module runs, and
    checks that all ranks run their modules in the same order. A rank whose batch has no
    image would skip the vision tower while the others gather it, and every rank would
    wait forever. So both kinds of batch take one path: run the vision tower and projector
    (on one blank image when the batch has none), put the image features at the image
    tokens (or add 0 x them: no change to the loss, and zero gradients, so gradient
    reduction also sees the same parameters on every rank), then run the LLM.

    LLaVA: the features are scattered into the token embeddings here. Qwen-VL: the model's
    own forward takes them as `mm_encoder_outputs` (Qwen3-VL's deepstack features too),
    with the 3-D rope positions the batch carries.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = config = model.config
        self.family = family_of(config)
        self.image_token_id = config.image_token_id
        if self.family == LLAVA:
            self.feature_layer = config.vision_feature_layer
            self.select_strategy = config.vision_feature_select_strategy
            size = config.vision_config.image_size
            blank, self.blank_grid = torch.zeros(1, 3, size, size), None
        else:  # one image of 2 x 2 patches: the smallest grid the merger takes
            vision = config.vision_config
            merge = vision.spatial_merge_size
            blank = torch.zeros(merge * merge, vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2)
            self.blank_grid = torch.tensor([[1, merge, merge]])
        self.register_buffer("blank_image", blank, persistent=False)

    def _features(self, pixel_values, image_grid_thw):
        pixel_values = pixel_values.to(self.blank_image.dtype)
        if self.family == LLAVA:
            return self.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=self.feature_layer,
                                                 vision_feature_select_strategy=self.select_strategy)
        return self.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw.to(
            self.blank_image.device), return_dict=True)

    def forward(self, input_ids, attention_mask=None, position_ids=None, pixel_values=None, image_grid_thw=None,
                repeat_images: int = 1):
        """`repeat_images=k`: the batch is k groups of sequences that hold the same images in
        the same order (DPO: the chosen responses, then the rejected ones); each image is
        encoded once and its features fill its place in all k groups. No KV cache: training
        never reads one, and transformers finds packed segments from the positions only
        without one (the varlen layout, model/collate.py)."""
        has_images = pixel_values is not None and len(pixel_values) > 0
        if has_images:
            out = self._features(pixel_values, image_grid_thw)
        else:
            out = self._features(self.blank_image, self.blank_grid)
        features = list(out.pooler_output) * (repeat_images if has_images else 1)
        # Every rank must call the same modules in the same order whatever its batch holds:
        # ZeRO-3 records the first step's order and prefetches (all-gathers) by it, so a
        # text-only batch calls them as its family's image batch does, below (LLaVA: the
        # embedding table, then the model on embeddings; Qwen-VL: the model on ids), and
        # the blank image's features enter the graph times 0.
        embed = self.model.get_input_embeddings()
        if not has_images:
            zero = 0.0 * sum(f.sum() for f in features)
            for layer in getattr(out, "deepstack_features", None) or []:
                zero = zero + 0.0 * sum(f.sum() for f in layer)
            if self.family == LLAVA:
                return self.model(inputs_embeds=embed(input_ids) + zero, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False).logits
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits + zero
        at_images = input_ids == self.image_token_id
        count = sum(int(f.shape[0]) for f in features)
        if int(at_images.sum()) != count:
            raise ValueError(f"{int(at_images.sum())} image tokens in the batch but {count} image feature vectors "
                             f"({len(out.pooler_output)} images)")
        if self.family == LLAVA:
            embeds = embed(input_ids)
            embeds = embeds.masked_scatter(at_images.unsqueeze(-1).expand_as(embeds), torch.cat(features).to(embeds.dtype))
            return self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits
        out.pooler_output = features
        if getattr(out, "deepstack_features", None):
            out.deepstack_features = [list(layer) * repeat_images for layer in out.deepstack_features]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          mm_encoder_outputs={"image": out}, use_cache=False).logits


def trainable_model(model: nn.Module, train: TrainConfig) -> EveryRankVision:
    """The stage's model as it trains: gradient checkpointing (when asked), the parts of
    `train.trainable` (LoRA on them when enabled), run through `EveryRankVision`."""
    if train.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (a frozen vision tower or embeddings)
        # without forcing requires_grad onto them.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return EveryRankVision(select_trainable(model, train))


def export_trained(cfg: Config, state_dict: dict, uri: str) -> None:
    """The stage's Hugging Face export: the model the stage started from with `state_dict`
    (of its `trainable_model`, as a checkpoint holds it) loaded, LoRA merged in, saved with
    its processor to `uri`."""
    from vlit.model.build import export_model, initial_model
    from vlit.model.templates import resolve

    model, processor = initial_model(cfg)
    wrapped = EveryRankVision(select_trainable(model.float(), cfg.train))
    wrapped.load_state_dict(state_dict)
    model = wrapped.model.merge_and_unload() if cfg.train.lora.enabled else wrapped.model
    export_model(model.to(getattr(torch, cfg.model.dtype)), processor, uri, resolve(cfg.model.template, processor))
