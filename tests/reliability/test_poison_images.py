"""Poison images: files whose header is fine but whose pixels are not. The default
`header` check at prepare lets them in (that is its contract); the stream must then
quarantine exactly their rows, name the image, and deliver every other row."""
from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlit import storage
from vlit.config import CorpusConfig, PrepareConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.corpus.stream import build_stream, quarantine_reasons, quarantine_uri
from vlit.versions import CorpusVersion


def _noise(fmt: str, size: int, seed: int) -> bytes:
    # Noise: incompressible, so the pixel data is most of the file and a cut lands in it.
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3)).save(buf, fmt)
    return buf.getvalue()


def _corrupt_idat(png: bytes) -> bytes:
    """The PNG with bytes inside its first IDAT's deflate stream flipped, and the chunk's CRC
    recomputed: every chunk is well formed, the file is whole, only decoding fails."""
    out, pos = bytearray(png), 8
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        if kind == b"IDAT":
            start = pos + 8
            for i in range(start + length // 3, start + length // 3 + 16):  # past the zlib header
                out[i] ^= 0xFF
            out[start + length:start + length + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4:start + length])))
            return bytes(out)
        pos += 12 + length
    raise ValueError("no IDAT chunk")


def _turns(image: bool) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + "What is shown?"},
            {"from": "gpt", "value": "Noise."}]


def _write_corpus(root: Path) -> dict[str, str]:
    """Six good images, three poison ones; two rows per image plus a text-only row.
    Returns {image name: 'good' or 'bad'}."""
    (root / "imgs").mkdir(parents=True)
    kinds = {}
    for i in range(6):
        (root / "imgs" / f"good{i}.png").write_bytes(_noise("PNG", 24, i))
        kinds[f"good{i}.png"] = "good"
    png, jpeg = _noise("PNG", 48, 10), _noise("JPEG", 64, 11)
    poison = {
        "corrupt_idat.png": _corrupt_idat(png),
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) * 4 // 5],
    }
    for name, data in poison.items():
        (root / "imgs" / name).write_bytes(data)
        kinds[name] = "bad"
    rows = [{"id": f"{name}-{n}", "image": f"imgs/{name}", "task_name": f"ds+t{n}", "conversations": _turns(True)}
            for name in kinds for n in range(2)]
    rows.append({"id": "text", "task_name": "ds+t0", "conversations": _turns(False)})
    (root / "annotation.json").write_text(json.dumps(rows))
    return kinds


@pytest.mark.timeout(300)
def test_poison_images_pass_header_check_and_are_quarantined_by_the_stream(ray_local, tmp_path):
    kinds = _write_corpus(tmp_path / "src")
    summary = prepare_corpus(PrepareConfig(sources=[str(tmp_path / "src" / "annotation.json")], image_check="header"),
                             str(tmp_path / "versions"))
    assert (summary["rows"], summary["quarantined"]) == (19, 0)  # the header check passes all three
    version = CorpusVersion.open(summary["version"])
    rows = version.read_table(columns=["key", "image"]).to_pylist()
    bad_images = {str(tmp_path / "src" / "imgs" / name) for name, kind in kinds.items() if kind == "bad"}

    cfg = CorpusConfig(out=version.uri, stream={"image_size": 16, "block_rows": 8})
    keys = []
    for batch in build_stream(version, cfg).iter_batches(batch_size=16, batch_format="numpy"):
        keys.extend(batch["key"].tolist())
    assert sorted(keys) == sorted(r["key"] for r in rows if r["image"] not in bad_images)  # every good row, once

    quarantine = quarantine_uri(version, cfg)
    assert quarantine_reasons(quarantine) == {"image_undecodable": 6}
    fs, path = storage.filesystem(quarantine)
    quarantined = pq.read_table(path, filesystem=fs).to_pylist()
    by_image = {json.loads(q["raw"])["image"]: q for q in quarantined}
    assert set(by_image) == bad_images and len(quarantined) == 6
    for image, q in by_image.items():
        assert q["detail"].startswith(image + ": "), q["detail"]  # the reason names the image
    assert "truncated" in by_image[str(tmp_path / "src" / "imgs" / "truncated.png")]["detail"]
