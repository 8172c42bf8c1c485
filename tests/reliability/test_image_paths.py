"""Image paths never leave their root, URIs included: `..` (which the S3 client resolves
itself before sending, so `s3://b/../other/k` reads bucket `other`), `file://` with `..`,
and percent-encoded dots (literal names to our clients, refused anyway)."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vlit import storage
from vlit.config import ImageLimitsConfig, PrepareConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.serve.protocol import RequestError, load_image


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def test_storage_names_what_the_s3_client_fetches(s3):
    storage.write_bytes("s3://vlit-test/paths/secret/x.png", b"secret")
    storage.write_bytes("s3://vlit-test/paths/images/a.png", b"image")
    assert storage.normalize("s3://bucket/../other/k") == "s3://other/k"
    assert storage.normalize("s3://bucket/a/../../other/k") == "s3://other/k"
    assert storage.normalize("s3://bucket/a/./b//c/") == "s3://bucket/a/b//c"  # `//` is a different key
    assert storage.normalize("file:///root/../etc/passwd") == "/etc/passwd"
    # The client resolves `..` itself: this reads the secret, and normalize says so.
    sneaky = "s3://vlit-test/paths/images/../secret/x.png"
    assert storage.read_bytes(sneaky) == b"secret"
    assert storage.normalize(sneaky) == "s3://vlit-test/paths/secret/x.png"
    # Percent-encoded dots are sent encoded (as %252e): a literal key, not a way out.
    assert storage.normalize("s3://vlit-test/paths/images/%2e%2e/secret/x.png").endswith("/%2e%2e/secret/x.png")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://vlit-test/paths/images/%2e%2e/secret/x.png")


def test_served_image_uris_stay_under_their_roots(s3, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(_png("red"))
    (tmp_path / "outside.png").write_bytes(_png("blue"))
    storage.write_bytes("s3://vlit-test/serve-roots/images/a.png", _png("green"))
    storage.write_bytes("s3://vlit-test/serve-roots/secret/x.png", _png("black"))
    limits = ImageLimitsConfig(uri_roots=["s3://vlit-test/serve-roots/images", str(root), "/root"])

    assert load_image("s3://vlit-test/serve-roots/images/a.png", limits).size == (8, 8)
    assert load_image(f"file://{root}/a.png", limits).size == (8, 8)
    escapes = [
        "s3://vlit-test/serve-roots/images/../secret/x.png",  # exists, and was served before the fix
        "s3://vlit-test/serve-roots/images/a/../../secret/x.png",
        "s3://vlit-test/serve-roots/images/../../../other-bucket/x.png",
        "s3://vlit-test/serve-roots/images/%2e%2e/secret/x.png",
        "s3://vlit-test/serve-roots/images/%2E%2E/secret/x.png",
        "s3://vlit-test/serve-roots/images/%252e%252e/secret/x.png",
        "s3://vlit-test/serve-roots/images/..%2fsecret/x.png",
        f"file://{root}/../outside.png",
        f"{root}/../outside.png",
        f"file://{root}/%2e%2e/outside.png",
        "file:///root/../etc/passwd",
    ]
    for uri in escapes:
        with pytest.raises(RequestError) as err:
            load_image(uri, limits)
        assert err.value.status == 400 and "outside the allowed roots" in err.value.message, uri


def test_prepare_quarantines_refs_that_leave_the_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "good.png").write_bytes(_png("red"))
    (tmp_path / "outside.png").write_bytes(_png("blue"))
    escaping = [
        "../outside.png", "imgs/../../outside.png", "imgs\\..\\..\\outside.png",
        "%2e%2e/outside.png", "imgs/%2E%2e/%2e%2e/outside.png", "imgs/..%2f..%2Foutside.png",
        "%252e%252e/outside.png", "s3://vlit-test/other/x.png", "s3://bucket/../other/x.png",
        "file:///root/../etc/passwd", "/etc/passwd",
    ]
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    rows = [{"id": str(i), "image": ref, "task_name": "ds+t", "conversations": turns}
            for i, ref in enumerate(["imgs/good.png", "./imgs/./good.png", *escaping])]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    summary = prepare_corpus(PrepareConfig(sources=[str(tmp_path / "a.json")], max_bad_fraction=1.0),
                             str(tmp_path / "out"))
    assert summary["reasons"] == {"image_path_escapes_root": len(escaping)}
    assert summary["rows"] == 2
