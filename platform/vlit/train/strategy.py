"""The DeepSpeed strategy: one object owns distributed setup, the engine, checkpoints.

Train loops (SFT now, DPO later) stay about their algorithm: they get a model from
`load_initial_model`, hand it to `DeepSpeedStrategy.prepare`, and call `backward`,
`step`, `save_checkpoint` and `load_checkpoint`. The stage's consolidated Hugging Face
export is built on the driver from the last Ray checkpoint (`export_checkpoint`), where
every rank's shard has been merged into one folder.

configs/deepspeed/zero{0,1,2,3}.json hold what does not change between runs; every
"auto" value in them is filled here from the config (micro batch, accumulation, bf16)
or the model (ZeRO-3 bucket sizes, as Hugging Face's integration derives them).
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlit.config import Config, ModelConfig, TrainConfig

# Repo checkout: platform/vlit/train/strategy.py -> configs/deepspeed. A job whose working
# dir is not a checkout points VLIT_DEEPSPEED_CONFIGS at its copy.
DEEPSPEED_CONFIGS = Path(os.environ.get("VLIT_DEEPSPEED_CONFIGS", Path(__file__).resolve().parents[3] / "configs" / "deepspeed"))
# One fixed DeepSpeed tag: a Ray checkpoint folder holds exactly one DeepSpeed checkpoint.
CHECKPOINT_TAG = "zero"

# `train.trainable` parts as parameter-name prefixes of LlavaForConditionalGeneration.
PARTS = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}
PEFT_PREFIX = "base_model.model."


def deepspeed_config(train: TrainConfig, model: ModelConfig) -> dict:
    """configs/deepspeed/zero{N}.json with the run's values in place of "auto"."""
    path = DEEPSPEED_CONFIGS / f"zero{train.zero_stage}.json"
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"train.zero_stage={train.zero_stage}: DeepSpeed config {path} not found "
                                "(set VLIT_DEEPSPEED_CONFIGS to the folder holding zero*.json)") from None
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum
    # bf16 on GPUs; CPUs train in fp32 (DeepSpeed's CPU path is tested with fp32 only).
    ds["bf16"] = {"enabled": train.use_gpu and model.dtype == "bfloat16"}
    return ds


def _fill_model_autos(ds: dict, hidden: int, path: str) -> dict:
    zero = ds.get("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = [k for k, v in {**ds, **{f"zero_optimization.{k}": v for k, v in zero.items()}}.items() if v == "auto"]
    if left:
        raise ValueError(f"{path}: no value for \"auto\" keys {left}")
    return ds


def load_initial_model(cfg: Config):
    """(model, processor) a stage starts from: `train.init_from` (an earlier stage's
    export) when set, else `model.*`."""
    from vlit.model.build import build_model_and_processor

    model_cfg = cfg.model
    if cfg.train.init_from:
        model_cfg = model_cfg.model_copy(update={"preset": None, "path": cfg.train.init_from})
    return build_model_and_processor(model_cfg)


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
        config = model.config
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


class DeepSpeedStrategy:
    """Distributed setup, the DeepSpeed engine and its checkpoints for one train worker."""

    def __init__(self, train: TrainConfig, ds_config: dict):
        self.train, self.ds_config = train, ds_config
        self.engine = None

    def setup_distributed(self) -> None:
        """Set up this worker's process (the allocator and Ray Train's logging, see
        vlit.runtime) and join the process group Ray Train already formed (gloo on CPU,
        NCCL on GPU)."""
        import deepspeed

        from vlit.runtime import keep_freed_memory, quiet_train_reports

        keep_freed_memory()
        quiet_train_reports()
        random.seed(self.train.seed)
        np.random.seed(self.train.seed)
        torch.manual_seed(self.train.seed)
        deepspeed.init_distributed(dist_backend="nccl" if self.train.use_gpu else "gloo", verbose=False)

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def prepare(self, model: nn.Module, total_steps: int) -> nn.Module:
        """Trainable parts, LoRA, gradient checkpointing, AdamW + warmup/cosine, DeepSpeed.
        Returns the engine: call it like the model (an `EveryRankVision` around it)."""
        import deepspeed
        from transformers import get_cosine_schedule_with_warmup

        if not self.ds_config["bf16"]["enabled"]:
            model = model.float()
        if self.train.gradient_checkpointing:
            # Non-reentrant: works with frozen inputs (a frozen vision tower or embeddings)
            # without forcing requires_grad onto them.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = EveryRankVision(select_trainable(model, self.train))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if p.ndim >= 2], "weight_decay": self.train.weight_decay},
            # Biases and norm scales are not decayed.
            {"params": [p for n, p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.train.lr)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, num_warmup_steps=int(self.train.warmup_ratio * total_steps), num_training_steps=total_steps)
        hidden = model.model.config.text_config.hidden_size
        config = _fill_model_autos(json.loads(json.dumps(self.ds_config)), hidden, f"zero{self.train.zero_stage}.json")
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """Optimizer step at gradient-accumulation boundaries; True when one was taken."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        """This rank's part of a DeepSpeed checkpoint (model states, ZeRO shards) in `path`."""
        self.engine.save_checkpoint(path, tag=CHECKPOINT_TAG, client_state=client_state)

    def load_checkpoint(self, path: str) -> dict:
        """Model, optimizer and scheduler states from a merged checkpoint; the client state."""
        load_path, client_state = self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{CHECKPOINT_TAG}' under {path}")
        return client_state


def consolidated_state_dict(checkpoint_dir: str, zero_stage: int) -> dict:
    """The full fp32 state dict of a merged DeepSpeed checkpoint (all ranks' shards)."""
    if zero_stage == 0:  # no ZeRO partitions: rank 0's model states hold everything
        path = os.path.join(checkpoint_dir, CHECKPOINT_TAG, "mp_rank_00_model_states.pt")
        return torch.load(path, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)


def export_checkpoint(cfg: Config, checkpoint_dir: str, uri: str) -> None:
    """The stage's Hugging Face export: the model the stage started from, with the
    checkpoint's weights, LoRA merged in, saved with its processor to `uri`."""
    from vlit.model.build import export_model

    model, processor = load_initial_model(cfg)
    wrapped = EveryRankVision(select_trainable(model.float(), cfg.train))
    wrapped.load_state_dict(consolidated_state_dict(checkpoint_dir, cfg.train.zero_stage))
    model = wrapped.model.merge_and_unload() if cfg.train.lora.enabled else wrapped.model
    export_model(model.to(getattr(torch, cfg.model.dtype)), processor, uri)
