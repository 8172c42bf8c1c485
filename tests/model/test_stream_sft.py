"""Ray: the template-text aggregation (stored and reused) and SFTTransform in the real stream."""
from __future__ import annotations

import collections
import functools

import pytest
from ray import cloudpickle

import model_helpers
from model_helpers import synth_version
from vlit import storage
from vlit.config import CorpusConfig, LossConfig, ModelConfig, TrainConfig
from vlit.corpus.stream import build_stream, quarantine_uri
from vlit.corpus.template_text import sentences, template_text, template_uri
from vlit.model.collate import MODEL_INPUTS, collate
from vlit.model.packing import SFTTransform

cloudpickle.register_pickle_by_value(model_helpers)


@pytest.mark.timeout(120)
def test_template_text_aggregation_is_stored_and_reused(ray_local, tmp_path):
    version = synth_version(str(tmp_path), instances=80, tasks=4)
    cfg = LossConfig(target="l2t", template_min_fraction=0.5, template_min_rows=10)
    found = template_text(version, cfg)

    # Oracle: the same rule counted in plain Python.
    rows = version.read_table(columns=["task", "turns"]).to_pylist()
    counts = collections.Counter((r["task"], s) for r in rows for s in set(sentences(r["turns"][0]["content"])))
    n = version.task_counts
    expected = collections.defaultdict(set)
    for (task, sentence), c in counts.items():
        if n[task] >= 10 and c >= 0.5 * n[task]:
            expected[task].add(sentence)
    assert found == dict(expected) and found
    assert all(n[t] >= 10 for t in found)

    # Stored with the version, reused on the next call (even if Ray would find otherwise).
    uri = template_uri(version, cfg)
    assert uri.startswith(version.uri + "/template_text/")
    stored = storage.read_json(uri)
    stored["tasks"] = {"marker": ["reused"]}
    storage.write_json(uri, stored)
    assert template_text(version, cfg) == {"marker": {"reused"}}
    assert template_uri(version, LossConfig(template_min_rows=5)) != uri


@pytest.mark.timeout(120)
def test_sft_stream_packs_every_row_once(ray_local, tmp_path):
    version = synth_version(str(tmp_path), instances=60, tasks=4)
    corpus = CorpusConfig(out=version.uri, stream={"image_size": 32, "block_rows": 30, "decode_concurrency": 1})
    model_cfg, loss_cfg = ModelConfig(max_len=512), LossConfig(target="l2t")
    transform = functools.partial(
        SFTTransform, model_cfg, loss_cfg, TrainConfig(output=str(tmp_path / "out"), micro_batch_size=2),
        template_text=template_text(version, loss_cfg), quarantine=quarantine_uri(version, corpus),
    )
    keys, real = [], 0
    for batch in build_stream(version, corpus, transform=transform).iter_batches(batch_size=2, batch_format="numpy"):
        assert batch["input_ids"].shape[1] == 512 and batch["pixel_values"][0].shape[1:] == (3, 32, 32)
        keys += [k for seg in batch["segment_keys"] for k in seg]
        real += int((batch["segment_ids"] > 0).sum())
        inputs = collate(batch)
        assert set(MODEL_INPUTS) <= set(inputs) and inputs["pixel_values"].shape[0] == batch["num_images"].sum()
    assert sorted(keys) == sorted(version.read_table(columns=["key"])["key"].to_pylist())
    assert real / (512 * len(keys)) < 1  # sanity: rows are shorter than a sequence
