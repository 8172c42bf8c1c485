"""The strategy's pieces that need no cluster: the DeepSpeed config, and a checkpoint's
consolidated weights exported (LoRA merged) as a model that reloads with Auto classes."""
from __future__ import annotations

import os

import pytest
import torch

from vlit.config import Config
from vlit.model.build import build_model_and_processor, load_exported
from vlit.model.parts import EveryRankVision, export_trained, select_trainable
from vlit.train import strategy
from vlit.train.strategy import consolidated_state_dict, deepspeed_config


def _cfg(tmp_path, **train) -> Config:
    return Config.model_validate({"corpus": {"out": str(tmp_path)}, "model": {"preset": "tiny", "max_len": 128},
                                  "train": {"output": str(tmp_path / "out"), **train}})


def test_deepspeed_config_fills_the_run_values(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, zero_stage=3, micro_batch_size=3, grad_accum=4)
    ds = deepspeed_config(cfg.train, cfg.model)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"] == {"enabled": False} and ds["zero_allow_untested_optimizer"] is True
    gpu = cfg.model_copy(update={"train": cfg.train.model_copy(update={"use_gpu": True}),
                                 "model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    assert deepspeed_config(gpu.train, gpu.model)["bf16"] == {"enabled": True}
    filled = strategy._fill_model_autos(ds, 64, "zero3.json")["zero_optimization"]
    assert filled["stage3_param_persistence_threshold"] == 640 and filled["reduce_bucket_size"] == 64 * 64
    monkeypatch.setattr(strategy, "DEEPSPEED_CONFIGS", tmp_path)
    with pytest.raises(FileNotFoundError, match="train.zero_stage=3"):
        deepspeed_config(cfg.train, cfg.model)


@pytest.mark.timeout(120)
def test_export_merges_lora_and_reloads_with_auto_classes(tmp_path):
    cfg = _cfg(tmp_path, zero_stage=0, lora={"enabled": True, "r": 4})
    model, _ = build_model_and_processor(cfg.model)
    trained = EveryRankVision(select_trainable(model, cfg.train))
    with torch.no_grad():  # a "trained" adapter: non-zero B, so the merge changes weights
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    # A ZeRO-0 checkpoint as DeepSpeed writes it: rank 0's model states hold the module.
    os.makedirs(tmp_path / "ckpt" / strategy.CHECKPOINT_TAG)
    torch.save({"module": trained.state_dict()}, tmp_path / "ckpt" / strategy.CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    export_trained(cfg, consolidated_state_dict(str(tmp_path / "ckpt"), 0), str(tmp_path / "export"))

    exported, _ = load_exported(str(tmp_path / "export"))
    assert not any("lora" in n for n in exported.state_dict())
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids)
        got = EveryRankVision(exported).eval()(input_ids=ids)
    assert torch.allclose(expected, got, atol=1e-4)
