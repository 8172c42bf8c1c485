"""Stage keys, the ledger, and per-stage config overrides of the two-stage job."""
import pytest

from vlit.config import ConfigError, load_config, stage_config
from vlit.ledger import Ledger, stage_key


def test_stage_key_covers_inputs_and_settings():
    key = stage_key("sft1", {"data": "abc"}, {"train": {"lr": 1e-3}})
    assert key == stage_key("sft1", {"data": "abc"}, {"train": {"lr": 1e-3}})
    assert key != stage_key("sft1", {"data": "abd"}, {"train": {"lr": 1e-3}})  # another corpus version
    assert key != stage_key("sft1", {"data": "abc"}, {"train": {"lr": 2e-3}})  # another setting
    assert key != stage_key("sft2", {"data": "abc"}, {"train": {"lr": 1e-3}})  # another stage


def test_ledger_records_a_finished_stage_only(tmp_path):
    ledger = Ledger(str(tmp_path / "jobs"))
    assert ledger.get("sft1", "k1") is None
    assert ledger.stage_dir("sft1", "k1") == f"{tmp_path}/jobs/sft1-k1"
    ledger.put("sft1", "k1", {"data": "abc"}, {"export": "x"})
    record = ledger.get("sft1", "k1")
    assert record["outputs"] == {"export": "x"} and record["inputs"] == {"data": "abc"} and record["finished_at"]
    assert ledger.get("sft1", "k2") is None


def test_stage_overrides_apply_to_their_stage_and_are_checked_at_load():
    cfg = load_config("configs/demo.yaml", ["pipeline.overrides.sft2={train.lr: 0.5, corpus.tasks.cap: 7}"])
    assert cfg.train.lr == 3.0e-4
    sft2 = stage_config(cfg, "sft2", {"train.output": "/somewhere"})
    assert sft2.train.lr == 0.5 and sft2.corpus.tasks.cap == 7 and sft2.train.output == "/somewhere"
    assert sft2.pipeline.overrides == {}  # applied once
    assert stage_config(cfg, "sft1").train.lr == 3.0e-4
    with pytest.raises(ConfigError, match=r"pipeline.overrides.sft2: invalid config:\n  train.lrr: Extra inputs"):
        load_config("configs/demo.yaml", ["pipeline.overrides.sft2={train.lrr: 1}"])
    with pytest.raises(ConfigError, match="pipeline.stages must keep the job's order"):
        load_config("configs/demo.yaml", ["pipeline.stages=[sft2,sft1,align]"])
    with pytest.raises(ConfigError, match="sft2 trains on the align stage's set"):
        load_config("configs/demo.yaml", ["pipeline.stages=[sft1,sft2]"])
