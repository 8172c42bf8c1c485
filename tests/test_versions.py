"""The one versions protocol (vlit/versions.py): staging, publish, reuse, and a process
SIGKILLed between staging and publish, locally and on S3."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from vlit import storage, versions
from vlit.versions import Version

# A child process that stages one version and is SIGKILLed at `where`: after the files
# are staged (before the move), or after the move (before the manifest).
CHILD = textwrap.dedent("""
    import os, signal, sys
    import pyarrow as pa
    from vlit import storage, versions

    root, where = sys.argv[1], sys.argv[2]
    real_move, real_write = storage.move_dir, storage.write_json

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def move_dir(src, dst):
        if where == "before_move":
            die()
        real_move(src, dst)

    def write_json(uri, obj):
        if where == "before_manifest" and uri.endswith("manifest.json"):
            die()
        real_write(uri, obj)

    storage.move_dir, storage.write_json = move_dir, write_json
    with versions.staging(root) as stage:
        versions.write_parquet(stage.file("rows.parquet"), pa.table({"x": [1, 2, 3]}))
        stage.publish("v1", "test", {"digest": "v1", "rows": 3})
""")


def _stage(root: str, rows: list[int], name: str = "v1") -> Version:
    with versions.staging(root) as stage:
        versions.write_parquet(stage.file("rows.parquet"), pa.table({"x": rows}))
        return stage.publish(name, "test", {"digest": name, "rows": len(rows)})


def _staged(root: str) -> list[str]:
    staging = storage.join(root, versions.STAGING)
    return storage.list_files(staging) if storage.exists(staging) else []


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "versions")
    request.getfixturevalue("s3")
    return f"s3://vlit-test/versions-{os.urandom(4).hex()}"


def test_publish_writes_the_manifest_and_reuses_a_finished_version(root):
    first = _stage(root, [1, 2, 3])
    assert not first.reused and first.manifest["kind"] == "test" and first.rows == 3
    assert first.read_table().column("x").to_pylist() == [1, 2, 3]
    again = _stage(root, [1, 2, 3])
    assert again.reused and again.uri == first.uri == storage.join(root, "v1")
    assert _staged(root) == []  # the second copy was dropped
    assert Version.find(root, "v1") == first and Version.find(root, "v2") is None


def test_a_failed_block_leaves_nothing_and_keep_leaves_its_files(root):
    with pytest.raises(RuntimeError, match="boom"):
        with versions.staging(root) as stage:
            versions.write_parquet(stage.file("rows.parquet"), pa.table({"x": [1]}))
            raise RuntimeError("boom")
    assert _staged(root) == []
    with pytest.raises(RuntimeError):
        with versions.staging(root) as stage:
            versions.write_parquet(stage.file("rows.parquet"), pa.table({"x": [1]}))
            stage.keep()
            raise RuntimeError("for a person to look at")
    assert [u.rsplit("/", 1)[1] for u in _staged(root)] == ["rows.parquet"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["before_move", "before_manifest"])
def test_a_kill_between_staging_and_publish_publishes_nothing_and_the_rerun_publishes(root, where):
    run = subprocess.run([sys.executable, "-c", CHILD, root, where], env=os.environ.copy(), timeout=100)
    assert run.returncode == -9
    # Nothing reads as a version: the folder has no manifest (or does not exist).
    assert Version.find(root, "v1") is None
    with pytest.raises(FileNotFoundError, match="not a finished vlit version: manifest.json is missing"):
        Version.open(storage.join(root, "v1"))
    moved = storage.exists(storage.join(root, "v1", "rows.parquet"))
    assert moved == (where == "before_manifest")
    # The next run publishes the version whole, replacing what the killed run moved.
    version = _stage(root, [1, 2, 3])
    assert not version.reused and version.read_table().column("x").to_pylist() == [1, 2, 3]
    assert Version.open(version.uri).manifest["rows"] == 3
