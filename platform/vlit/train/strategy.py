"""The DeepSpeed strategy: one object owns distributed setup, the engine, checkpoints.

Train loops stay about their algorithm (`vlit.train.loop`): they hand the stage's
trainable model (`vlit.model.parts.trainable_model`) to `DeepSpeedStrategy.prepare`, and
call `backward`, `step`, `save_checkpoint` and `load_checkpoint`. The driver builds the
stage's Hugging Face export from the last Ray checkpoint, where every rank's shard has
been merged into one folder (`consolidated_state_dict`).

configs/deepspeed/zero{0,1,2,3}.json hold what does not change between runs; every
"auto" value in them is filled here from the config (micro batch, accumulation, bf16)
or the model (ZeRO-3 bucket sizes, as Hugging Face's integration derives them).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlit.config import ModelConfig, TrainConfig

# Repo checkout: platform/vlit/train/strategy.py -> configs/deepspeed. A job whose working
# dir is not a checkout points VLIT_DEEPSPEED_CONFIGS at its copy.
DEEPSPEED_CONFIGS = Path(os.environ.get("VLIT_DEEPSPEED_CONFIGS", Path(__file__).resolve().parents[3] / "configs" / "deepspeed"))
# One fixed DeepSpeed tag: a Ray checkpoint folder holds exactly one DeepSpeed checkpoint.
CHECKPOINT_TAG = "zero"


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


class DeepSpeedStrategy:
    """Distributed setup, the DeepSpeed engine and its checkpoints for one train worker."""

    def __init__(self, train: TrainConfig, ds_config: dict):
        self.train, self.ds_config = train, ds_config
        self.engine = None

    @property
    def bf16(self) -> bool:
        return self.ds_config["bf16"]["enabled"]

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
        """AdamW + warmup/cosine over the model's trainable parameters, and the DeepSpeed
        engine. Returns the engine: call it like the model."""
        import deepspeed
        from transformers import get_cosine_schedule_with_warmup

        if not self.bf16:
            model = model.float()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if p.ndim >= 2], "weight_decay": self.train.weight_decay},
            # Biases and norm scales are not decayed.
            {"params": [p for n, p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.train.lr, betas=self.train.adam_betas)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, num_warmup_steps=int(self.train.warmup_ratio * total_steps), num_training_steps=total_steps)
        text = getattr(model.config, "text_config", model.config)
        config = _fill_model_autos(json.loads(json.dumps(self.ds_config)), text.hidden_size,
                                   f"zero{self.train.zero_stage}.json")
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

    from vlit.runtime import quiet_prints

    with quiet_prints():  # four lines per export on what it parsed and rebuilt
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
