"""One storage helper for local paths, file:// and s3:// (a real S3 endpoint on loopback)."""
import pytest

from vlit import storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3")
        return "s3://vlit-test/storage-test"
    return str(tmp_path) if request.param == "local" else f"file://{tmp_path}"


def test_roundtrip_list_move_delete(root):
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(root, "a", "b", "y.bin"), b"\x00\x01")
    assert storage.read_json(storage.join(root, "a/x.json")) == {"k": 1}
    files = storage.list_files(storage.join(root, "a"))
    assert [f.rsplit("/", 2)[-2:] for f in files] == [["b", "y.bin"], ["a", "x.json"]]
    assert storage.list_files(storage.join(root, "a"), (".json",)) == [storage.join(root, "a", "x.json")]
    storage.move_dir(storage.join(root, "a"), storage.join(root, "moved"))
    assert not storage.exists(storage.join(root, "a", "x.json"))
    assert storage.read_bytes(storage.join(root, "moved", "b", "y.bin")) == b"\x00\x01"
    storage.delete_dir(storage.join(root, "moved"))
    assert not storage.exists(storage.join(root, "moved", "x.json"))
    with pytest.raises(FileNotFoundError):
        storage.list_files(storage.join(root, "nothing-here"))


def test_uris():
    assert storage.normalize("s3://b/k/") == "s3://b/k"
    assert storage.join("s3://b/k", "x", "/y") == "s3://b/k/x/y"
    assert storage.parent("s3://b/k/x.json") == "s3://b/k"
    assert storage.normalize("file:///tmp/a") == "/tmp/a"


def test_local_s3_binds_loopback(s3):
    assert s3.endpoint.startswith("http://127.0.0.1:")
