"""The Ray Data stream: every row once, quarantine on bad images, S3, two Ray Train workers."""
from __future__ import annotations

import collections
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle  # Ray's vendored copy: the one that pickles tasks

import stream_helpers
from stream_helpers import Tokenize, synth_version
from vlit import storage
from vlit.config import CorpusConfig
from vlit.corpus.sampling import SamplingPlan
from vlit.corpus.stream import build_stream

# Ray workers do not share the driver's sys.path (tests/ is on it via conftest): ship the
# helper module by value, so train loops and transforms defined there unpickle anywhere.
cloudpickle.register_pickle_by_value(stream_helpers)
SIZE = 24


@pytest.fixture(scope="module")
def ray_s3(s3, ray_local):
    """S3 first: Ray workers take the AWS_* environment that exists when Ray starts."""
    return ray_local


def _config(version, **tasks) -> CorpusConfig:
    return CorpusConfig(out=version.uri, tasks=tasks, stream={"image_size": SIZE, "batch_size": 16})


def _stream(ds) -> tuple[list[str], list[np.ndarray]]:
    keys, batches = [], []
    for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
        keys.extend(batch["key"].tolist())
        batches.append(batch)
    return keys, batches


@pytest.mark.timeout(120)
def test_every_row_once_with_pixels_and_transform(ray_s3, tmp_path):
    version, _ = synth_version(str(tmp_path))
    assert len(version.shard_uris) == 3
    keys, batches = _stream(build_stream(version, _config(version)))
    assert sorted(keys) == sorted(version.read_table(columns=["key"])["key"].to_pylist())
    pixels = np.concatenate([b["pixels"] for b in batches])
    assert pixels.dtype == np.uint8 and pixels.shape == (120, SIZE, SIZE, 3)
    assert all(b["has_image"].all() for b in batches) and pixels.max() > 0

    keys, batches = _stream(build_stream(version, _config(version), transform=Tokenize))
    assert sorted(keys) == sorted(version.read_table(columns=["key"])["key"].to_pylist())
    assert {b["input_ids"].dtype.kind for b in batches} == {"i"}
    # One <image> token (id 4) per prompt: the transform saw the rendered turns.
    assert all((b["input_ids"] == 4).sum(axis=1).tolist() == [1] * len(b["key"]) for b in batches)


@pytest.mark.timeout(120)
def test_truncated_image_is_quarantined_and_sampling_matches_plan(ray_s3, tmp_path):
    version, synth = synth_version(str(tmp_path))
    table = version.read_table(columns=["key", "task", "image", "source", "position"])
    bad = table["image"][0].as_py()
    data = storage.read_bytes(bad)
    storage.write_bytes(bad, data[: len(data) // 2])  # a valid PNG header, a cut body

    cfg = _config(version, cap=15, temperature=2.0, seed=5)
    keys, _ = _stream(build_stream(version, cfg, epoch=1))

    plan = SamplingPlan.build(version.task_counts, cap=15, temperature=2.0)
    times = plan.multiplicity(table["task"], table["key"], seed=5, epoch=1)
    is_bad = np.array([uri == bad for uri in table["image"].to_pylist()])
    expected = {k: int(n) for k, n, b in zip(table["key"].to_pylist(), times, is_bad) if n and not b}
    assert collections.Counter(keys) == expected  # streamed sample == the plan's, bad rows out

    quarantine = pq.read_table(storage.join(version.uri, "stream_quarantine")).to_pylist()
    assert {q["reason"] for q in quarantine} == {"image_undecodable"}
    refs = {f"{s}#{p}" for s, p, b, n in zip(table["source"].to_pylist(), table["position"].to_pylist(), is_bad, times) if b and n}
    assert {q["source_ref"] for q in quarantine} == refs and len(quarantine) == int(times[is_bad].sum())
    assert all(json.loads(q["raw"])["image"] == bad and bad in q["detail"] for q in quarantine)


@pytest.mark.timeout(120)
def test_stream_from_s3(ray_s3):
    version, _ = synth_version("s3://vlit-test/stream", instances=60, tasks=4, image_pool=6, shard_rows=25)
    assert version.uri.startswith("s3://") and version.read_table(columns=["image"])["image"][0].as_py().startswith("s3://")
    missing = version.read_table(columns=["image"])["image"][0].as_py()
    fs, path = storage.filesystem(missing)
    fs.delete_file(path)  # an object gone after prepare: quarantined as missing, run goes on
    keys, batches = _stream(build_stream(version, _config(version)))
    images = version.read_table(columns=["key", "image"]).to_pylist()
    assert sorted(keys) == sorted(r["key"] for r in images if r["image"] != missing)
    assert batches[0]["pixels"].shape[1:] == (SIZE, SIZE, 3)
    quarantine = pq.read_table(
        storage.filesystem(version.uri)[1] + "/stream_quarantine", filesystem=storage.filesystem(version.uri)[0]
    )
    assert set(quarantine["reason"].to_pylist()) == {"image_missing"}


@pytest.mark.timeout(240)
def test_two_train_workers_see_every_row_once(ray_s3, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    version, _ = synth_version(str(tmp_path / "corpus"))  # 120 rows: an even split drops none
    out = tmp_path / "keys"
    out.mkdir()
    trainer = TorchTrainer(
        stream_helpers.record_keys_loop,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets={"train": build_stream(version, _config(version))},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="stream-keys"),
    )
    trainer.fit()
    seen = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(s["keys"] for s in seen), "a worker got no rows"
    keys = seen[0]["keys"] + seen[1]["keys"]
    assert sorted(keys) == sorted(version.read_table(columns=["key"])["key"].to_pylist())
    assert all(s["shapes"] == [[SIZE, SIZE, 3]] for s in seen)
