"""Object-store faults lose nothing: prepare, the Ray Data stream and checkpoint-style
writes, run against a real S3 endpoint (moto's server) behind a proxy that answers
503 SlowDown, resets connections (before and halfway through replies) and delays.

What must hold is what holds without faults: the same digest and counts, the same rows,
the same bytes. The proxy's counts show the faults really happened.
"""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from vlit import storage
from vlit.config import PrepareConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.world import synth_corpus
from vlit.versions import CorpusVersion
from support.faults import KINDS, FaultProxy

RATE = 0.15  # of requests: high enough that each kind shows up, SDK retries still win
SEED = int(os.environ.get("VLIT_FAULT_SEED", "7"))  # another seed, other faults: for exploring
ROOT = "s3://vlit-test/faults"


def _assert_every_kind(faults: dict) -> None:
    assert all(faults[kind] > 0 for kind in KINDS), f"not every fault kind was injected: {faults}"


@pytest.fixture(scope="module")
def clean(s3):
    """A synthetic release on S3 and its fault-free prepare: the reference."""
    synth = synth_corpus(f"{ROOT}/src", instances=300, tasks=8, image_pool=120, image_size=32)
    cfg = PrepareConfig(sources=[synth["annotation"]], shard_rows=100)
    return cfg, prepare_corpus(cfg, f"{ROOT}/clean")


@pytest.fixture
def proxy(s3):
    with FaultProxy(s3.endpoint, rate=RATE, seed=SEED) as p, p.routing():
        yield p


@pytest.mark.timeout(600)
def test_prepare_to_s3_under_faults(clean, proxy):
    cfg, expected = clean
    started = time.monotonic()
    got = prepare_corpus(cfg, f"{ROOT}/faulty")
    print(f"prepare under faults: {time.monotonic() - started:.1f}s, {proxy.stats()}")
    keys = ("digest", "rows", "quarantined", "tasks", "reasons")
    assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}
    assert got["reused"] is False  # a fresh version, written through the faults
    faulty, reference = CorpusVersion.open(got["version"]), CorpusVersion.open(expected["version"])
    assert faulty.manifest["shards"] == reference.manifest["shards"]
    assert faulty.manifest["tasks"] == reference.manifest["tasks"]
    assert faulty.read_table().equals(reference.read_table())
    assert faulty.read_quarantine().equals(reference.read_quarantine())
    # Only the version: no staging left behind, nothing written twice under another name.
    assert storage.list_files(f"{ROOT}/faulty") == sorted(
        storage.join(got["version"], p) for p in
        ["manifest.json", "summary.json", "quarantine.parquet", *(f"data/{s}" for s in faulty.manifest["shards"])])
    _assert_every_kind(proxy.stats())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stream_from_s3_under_faults(clean, s3, tmp_path):
    _, summary = clean
    out = tmp_path / "stream.json"
    started = time.monotonic()
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("stream_through_faults.py")), summary["version"],
         f"{ROOT}/stream-quarantine", str(RATE), str(SEED), str(out)],
        check=True, timeout=540,
    )
    result = json.loads(out.read_text())
    print(f"stream under faults: {time.monotonic() - started:.1f}s (two passes and Ray start), "
          f"faults {result['faulty']['faults']}")
    every_key = sorted(CorpusVersion.open(summary["version"]).read_table(columns=["key"])["key"].to_pylist())
    assert sorted(result["clean"]["keys"]) == every_key  # each row once, without faults
    assert sorted(result["faulty"]["keys"]) == every_key  # and with them: no row lost or repeated
    assert result["clean"]["quarantine"] == result["faulty"]["quarantine"] == {}
    # The workers' image reads went through the proxy too (a HEAD and a GET per row).
    assert result["clean"]["faults"]["requests"] >= 2 * len(every_key)
    assert sum(result["clean"]["faults"][k] for k in KINDS) == 0
    _assert_every_kind(result["faulty"]["faults"])


@pytest.mark.timeout(300)
def test_small_reads_survive_slowdown(s3):
    """A 503 SlowDown answering a ranged GET smaller than its XML body: the SDK gives up at
    once with INTERNAL_FAILURE (see storage.retrying); our reads must retry it themselves."""
    from vlit.corpus.images import ImageChecker

    small = {f"{ROOT}/small/{i}.json": b'{"i": %d}\n' % i for i in range(8)}
    images = {f"{ROOT}/small/{i}.png": _tiny_png(i) for i in range(8)}
    for uri, data in {**small, **images}.items():
        storage.write_bytes(uri, data)
    with FaultProxy(s3.endpoint, seed=SEED) as proxy, proxy.routing():
        # The premise: opened fault-free, then one SlowDown on the read, which is not retried.
        fs, path = storage.filesystem(f"{ROOT}/small/0.json")
        with fs.open_input_file(path) as f:
            proxy.rate, proxy.kinds = 1.0, ("slowdown",)
            with pytest.raises(OSError, match="Failed to flush response stream"):
                f.read()
        proxy.rate = 0.2
        for uri, data in small.items():
            assert storage.read_bytes(uri) == data
            with storage.open_input(uri) as f:  # one-byte peeks and lines, as the JSON readers do
                assert f.read(1) == data[:1] and f.read(1) == data[1:2] and f.read() == data[2:]
            with storage.open_input(uri) as f:
                assert list(io.TextIOWrapper(f, encoding="utf-8")) == [data.decode()]
        assert ImageChecker("header", 4).check(list(images)) == dict.fromkeys(images)  # all pass
        print(f"small reads under SlowDown: {proxy.stats()}")
        assert proxy.stats()["slowdown"] > 5, proxy.stats()


def _tiny_png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, "PNG")
    return buf.getvalue()  # ~70 bytes: far smaller than the error body


def _checkpoint_files(step: int) -> dict[str, bytes]:
    rng = random.Random(step)
    files = {f"model/shard-{i:02d}.bin": rng.randbytes(rng.randrange(1, 300_000)) for i in range(12)}
    files["model/empty.bin"] = b""
    # Above pyarrow's 10 MB part size: written as a multipart upload.
    files["optimizer/state.bin"] = rng.randbytes(12 * 1024 * 1024)
    return files


@pytest.mark.timeout(600)
def test_checkpoint_writes_under_faults(proxy):
    """Write a checkpoint folder to staging, move it into place, then its manifest (last,
    as every versioned output here does); read it all back byte for byte."""
    started = time.monotonic()
    for step in (100, 200):
        files = _checkpoint_files(step)
        staging, final = f"{ROOT}/ckpt/_staging/step-{step}", f"{ROOT}/ckpt/step-{step}"
        for name, data in files.items():
            storage.write_bytes(storage.join(staging, name), data)
        storage.write_json(storage.join(staging, "trainer_state.json"), {"step": step, "files": sorted(files)})
        storage.move_dir(staging, final)
        storage.write_json(storage.join(final, "manifest.json"), {"step": step})

        assert not storage.exists(staging)
        listed = storage.list_files(final)
        assert listed == sorted(storage.join(final, n) for n in [*files, "trainer_state.json", "manifest.json"])
        for name, data in files.items():
            assert storage.read_bytes(storage.join(final, name)) == data, name
        assert storage.read_json(storage.join(final, "trainer_state.json")) == {"step": step, "files": sorted(files)}
        assert storage.read_json(storage.join(final, "manifest.json")) == {"step": step}
    print(f"checkpoints under faults: {time.monotonic() - started:.1f}s, {proxy.stats()}")
    _assert_every_kind(proxy.stats())
