"""Config schema: every shipped YAML validates; errors name the dotted key path."""
from pathlib import Path

import pytest

from vlit.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
CONFIG_FILES = [p for p in CONFIGS if "templates" not in p.parts and "deepspeed" not in p.parts]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(str(path))


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIG_FILES)


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(None, ["corpus.out=/tmp/x", "corpus.tasks.cap=10000", "corpus.tasks.temperature=2",
                             "corpus.prepare.sources=[a.json, b.json]", "ray.num_cpus=null"])
    assert cfg.corpus.tasks.cap == 10000 and cfg.corpus.tasks.temperature == 2.0
    assert cfg.corpus.prepare.sources == ["a.json", "b.json"] and cfg.ray.num_cpus is None


@pytest.mark.parametrize(
    "overrides, path, what",
    [
        (["corpus.out=/x", "corpus.tasks.capp=3"], "corpus.tasks.capp", "Extra inputs are not permitted"),
        (["corpus.out=/x", "corpus.tasks.cap=lots"], "corpus.tasks.cap", "valid integer"),
        (["corpus.out=/x", "corpus.prepare.format=csv"], "corpus.prepare.format", "vision-flan"),
        (["corpus.tasks.cap=1"], "corpus.out", "Field required"),
        (["run.seed=1"], "corpus", "Field required"),
        (["corpus.out=/x", "corpus.tasks.temperature=0"], "corpus.tasks.temperature", "greater than 0"),
    ],
)
def test_errors_name_the_key(overrides, path, what):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"{path}:" in str(err.value) and what in str(err.value)


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["corpus.out"])
    with pytest.raises(ConfigError, match="corpus.out is a value, not a section"):
        load_config(None, ["corpus.out=/x", "corpus.out.deeper=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("corpus: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_dpo_without_pairs_of_its_own_takes_the_align_stage_responses(tmp_path):
    """The demo's dpo has no pairs source: the job builds them from align's judged
    responses. Without align in the stages that is an error at load; a DPO job on its own
    (jobs/dpo.py) stops before any work with the sources it could take."""
    from vlit.pipeline import pairs_stage

    assert load_config("configs/demo.yaml").pipeline.stages[-1] == "dpo"
    with pytest.raises(ConfigError, match="add align to pipeline.stages"):
        load_config("configs/demo.yaml", ["pipeline.stages=[sft1,dpo]"])
    with pytest.raises(ConfigError, match="at most one of dpo.pairs"):
        load_config("configs/demo.yaml", ["dpo.pairs=/x", "dpo.feedback=[/y]"])
    with pytest.raises(ConfigError, match="only the two-stage job"):
        pairs_stage(load_config("configs/demo.yaml", [f"dpo.pairs_out={tmp_path}"]))
