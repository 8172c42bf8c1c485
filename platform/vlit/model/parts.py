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

# `train.trainable` parts as parameter-name prefixes of LlavaForConditionalGeneration.
PARTS = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}
PEFT_PREFIX = "base_model.model."


def select_trainable(model: nn.Module, train: TrainConfig) -> nn.Module:
    """Freeze everything outside `train.trainable`; with `train.lora.enabled`, the vision
    tower and LLM get LoRA adapters instead of full updates (the projector, being small,
    stays fully trainable, as in LLaVA's LoRA recipe)."""
    parts = set(train.trainable)
    full = parts
    if train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        adapted = sorted(parts - {"projector"})
        if not adapted:
            raise ValueError("train.lora.enabled needs 'llm' or 'vision' in train.trainable (LoRA adapts those)")
        prefixes = "|".join(re.escape(p[:-1]) for part in adapted for p in PARTS[part])
        targets = "|".join(re.escape(m) for m in train.lora.target_modules)
        lora = train.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=rf"(?:{prefixes})\..*\.(?:{targets})",
        ))
        full = parts & {"projector"}
    prefixes = tuple(p for part in full for p in PARTS[part])
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue  # peft marked its adapters trainable
        param.requires_grad = name.removeprefix(PEFT_PREFIX).startswith(prefixes)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train.trainable={train.trainable}: no parameter of {type(model).__name__} "
                         f"matches {sorted(parts)} (expected LLaVA parameter names {PARTS})")
    return model


class EveryRankVision(nn.Module):
    """Runs the vision tower on every rank, every step, and returns the logits.

    ZeRO-3 gathers each module's parameters with a collective when the module runs, and
    checks that all ranks run their modules in the same order. A rank whose batch has no
    image would skip the vision tower while the others gather it, and every rank would
    wait forever. So both kinds of batch take one path: embed the tokens, run the vision
    tower and projector (on one black image when the batch has none), put the image
    features at the image tokens (or add 0 x them: no change to the loss, and zero
    gradients, so gradient reduction also sees the same parameters on every rank), then
    run the LLM on the embeddings.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = config = model.config
        self.image_token_id = config.image_token_id
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        size = config.vision_config.image_size
        self.register_buffer("blank_image", torch.zeros(1, 3, size, size), persistent=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, pixel_values=None, repeat_images: int = 1):
        """`repeat_images=k`: the batch is k groups of sequences that hold the same images in
        the same order (DPO: the chosen responses, then the rejected ones); each image is
        encoded once and its features fill its place in all k groups."""
        has_images = pixel_values is not None and len(pixel_values) > 0
        embeds = self.model.get_input_embeddings()(input_ids)
        features = torch.cat(self.model.get_image_features(
            pixel_values=pixel_values.to(self.blank_image.dtype) if has_images else self.blank_image,
            vision_feature_layer=self.feature_layer, vision_feature_select_strategy=self.select_strategy,
        ).pooler_output)
        if has_images and repeat_images > 1:
            features = features.repeat(repeat_images, 1)
        if has_images:
            at_images = input_ids == self.image_token_id
            if int(at_images.sum()) != features.shape[0]:
                raise ValueError(f"{int(at_images.sum())} image tokens in the batch but {features.shape[0]} "
                                 f"image feature vectors ({len(pixel_values)} images)")
            embeds = embeds.masked_scatter(at_images.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype))
        else:
            embeds = embeds + 0.0 * features.sum()
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).logits


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

    model, processor = initial_model(cfg)
    wrapped = EveryRankVision(select_trainable(model.float(), cfg.train))
    wrapped.load_state_dict(state_dict)
    model = wrapped.model.merge_and_unload() if cfg.train.lora.enabled else wrapped.model
    export_model(model.to(getattr(torch, cfg.model.dtype)), processor, uri, cfg.model.template)
