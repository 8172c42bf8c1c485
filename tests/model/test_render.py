"""`vlit corpus render`: what the model trains on, for both families, on the real sample."""
from __future__ import annotations

import json

import pytest
from model_helpers import sample_version

from vlit.cli import main
from vlit.model.build import build_processor
from vlit.config import load_config


@pytest.fixture(scope="module")
def version(sample_dir, tmp_path_factory):
    return sample_version(sample_dir, tmp_path_factory.mktemp("sample")).uri


@pytest.mark.parametrize("family", ["tiny", "tiny-qwen2.5-vl"])
def test_render_shows_text_ids_supervision_and_image_tokens(family, version, tokenizers_dir, tmp_path, capsys):
    overrides = [f"run.workdir={tmp_path}", "model.max_len=4096", "corpus.stream.image_size=64"]
    if family != "tiny":
        overrides += [f"model.preset={family}", f"model.tokenizer={tokenizers_dir / 'qwen3'}"]
    args = ["corpus", "render", "configs/sft_tiny.yaml", version, "--rows", "3", *overrides]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    processor = build_processor(load_config("configs/sft_tiny.yaml", overrides).model)
    for r in rows:
        assert set(r) == {"id", "key", "task", "template", "text", "input_ids", "labels", "image_tokens"}
        assert len(r["input_ids"]) == len(r["labels"])
        assert r["input_ids"].count(processor.image_token_id) == r["image_tokens"] > 0
        supervised = [t for t, label in zip(r["input_ids"], r["labels"]) if label != -100]
        assert supervised == [label for label in r["labels"] if label != -100]  # labels are the ids they supervise
        assert r["template"] == ("vicuna_v1" if family == "tiny" else "chat_template")
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("== row ") == 3 and "supervised:  " in text
    assert ("ASSISTANT:" in text) if family == "tiny" else ("<|im_start|>assistant" in text)
