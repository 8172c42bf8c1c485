"""Corpus prepare on the real Vision-Flan sample and on a corpus of every kind of bad row,
on a local path and on s3:// (moto's server on 127.0.0.1)."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlit import storage
from vlit.config import PrepareConfig
from vlit.corpus.prepare import PrepareError, prepare_corpus
from vlit.versions import CorpusVersion

MISSING = "task_imgs/WIT+detailed_description_48_Emperor_Alexander_I.jpg"


def _upload(local: Path, bucket: str, prefix: str) -> str:
    client = boto3.client("s3")
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local)}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def sample_on_s3(s3, sample_dir) -> str:
    return _upload(sample_dir, "vlit-test", "vision-flan-sample")


def _prepare(source: str, out: str, **kw) -> dict:
    return prepare_corpus(PrepareConfig(sources=[source], **kw), out)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sample_release_format(where, sample_dir, tmp_path, request):
    if where == "s3":
        root = request.getfixturevalue("sample_on_s3")
        out = "s3://vlit-test/corpora/sample"
    else:
        root, out = str(sample_dir), str(tmp_path / "corpora")
    summary = _prepare(f"{root}/annotation.json", out, format="vision-flan")
    # All 205 rows but the one whose image is missing.
    assert (summary["rows"], summary["quarantined"]) == (204, 1)
    assert summary["reasons"] == {"image_missing": 1}
    version = CorpusVersion.open(summary["version"])
    assert version.rows == 204 and sum(version.task_counts.values()) == 204
    q = version.read_quarantine().to_pylist()
    assert q[0]["reason"] == "image_missing" and MISSING in q[0]["raw"]
    assert q[0]["source_ref"].endswith("annotation.json#6")
    table = version.read_table()
    assert table.column("image")[0].as_py().startswith(root)
    assert all(t[0]["role"] == "user" and "<image>" in t[0]["content"] for t in table.column("turns").to_pylist())
    assert storage.read_json(storage.join(summary["version"], "summary.json"))["rows"] == 204


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sample_raw_format(where, sample_dir, tmp_path, request):
    if where == "s3":
        root, out = request.getfixturevalue("sample_on_s3"), "s3://vlit-test/corpora/raw"
    else:
        root, out = str(sample_dir), str(tmp_path)
    summary = _prepare(f"{root}/metadata.json", out, format="vision-flan-raw")
    assert (summary["rows"], summary["quarantined"]) == (36, 0)
    rows = CorpusVersion.open(summary["version"]).read_table().to_pylist()
    geo = next(r for r in rows if r["id"] == "GEOMETRY3K+geometry_question_answer+386")
    assert geo["options"] == ["63", "7", "21\\sqrt{3}", "7\\sqrt{3}"]
    assert geo["turns"][0]["content"].startswith("<image>\nI will give you a figure")
    assert geo["turns"][1] == {"role": "assistant", "content": "(c) 21\\sqrt{3}"}


def _turns(q: str, a: str = "an answer") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_bad_corpus(root: Path) -> dict[str, int]:
    """A release-format corpus with every quarantine reason; returns the expected counts."""
    (root / "imgs").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(root / "imgs" / "good.png")
    Image.new("RGB", (32, 32), "blue").save(root / "imgs" / "other.png")
    (root / "imgs" / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    good = {"id": "g1", "image": "./imgs/good.png", "task_name": "ds+t1", "conversations": _turns("<image>\nWhat colour?", "red")}
    rows = [
        good,
        {"id": "g2", "image": "imgs/other.png", "task_name": "ds+t2", "conversations": _turns("What colour?\n<image>", "blue")},
        {"id": "txt", "task_name": "ds+text", "conversations": _turns("Say hi.", "hi")},  # text-only: fine
        "a JSON string, not an object",  # unparseable
        {"id": "m1", "image": "./imgs/good.png", "conversations": _turns("<image>\nQ")},  # no task_name
        {"id": "m2", "image": "./imgs/good.png", "task_name": "ds+t1", "conversations": "not a list"},
        {"id": "e1", "image": "./imgs/good.png", "task_name": "ds+t1", "conversations": []},
        {"id": "e2", "image": "./imgs/good.png", "task_name": "ds+t1", "conversations": _turns("<image>\nQ", "  ")},
        {"id": "tok", "task_name": "ds+t1", "conversations": _turns("<image>\nWhat is this?")},
        {"id": "notok", "image": "./imgs/good.png", "task_name": "ds+t1", "conversations": _turns("What is this?")},
        {"id": "miss", "image": "./imgs/absent.png", "task_name": "ds+t1", "conversations": _turns("<image>\nQ")},
        {"id": "undec", "image": "./imgs/not_an_image.png", "task_name": "ds+t1", "conversations": _turns("<image>\nQ")},
        {"id": "esc1", "image": "../outside.png", "task_name": "ds+t1", "conversations": _turns("<image>\nQ")},
        {"id": "esc2", "image": "/etc/passwd", "task_name": "ds+t1", "conversations": _turns("<image>\nQ")},
        {"id": "esc3", "image": "imgs/../../x.png", "task_name": "ds+t1", "conversations": _turns("<image>\nQ")},
        dict(good),  # duplicate key
    ]
    text = json.dumps(rows, indent=1)
    # One element that is not JSON at all: the scanner still delimits it.
    text = text[: text.rindex("]")].rstrip() + ',\n {"id": "broken", "image": }\n]'
    (root / "annotation.json").write_text(text)
    return {
        "unparseable": 2,
        "missing_fields": 2,
        "empty_conversation": 2,
        "image_token_without_image": 1,
        "image_without_token": 1,
        "image_missing": 1,
        "image_undecodable": 1,
        "image_path_escapes_root": 3,
        "duplicate_key": 1,
    }


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_quarantine_reason(where, tmp_path, request):
    expected = write_bad_corpus(tmp_path / "bad")
    root, out = str(tmp_path / "bad"), str(tmp_path / "out")
    if where == "s3":
        request.getfixturevalue("s3")
        root, out = _upload(tmp_path / "bad", "vlit-test", "bad"), "s3://vlit-test/bad-out"
    summary = _prepare(root, out, format="vision-flan", max_bad_fraction=1.0)
    assert summary["reasons"] == expected
    assert summary["rows"] == 3 and summary["quarantined"] == sum(expected.values())
    version = CorpusVersion.open(summary["version"])
    assert sorted(version.read_table().column("id").to_pylist()) == ["g1", "g2", "txt"]
    quarantine = version.read_quarantine().to_pylist()
    by_reason = {}
    for row in quarantine:
        by_reason.setdefault(row["reason"], []).append(row)
    assert by_reason["duplicate_key"][0]["source_ref"].endswith("annotation.json#15")
    assert '"id": "broken"' in by_reason["unparseable"][1]["raw"]  # nothing is lost
    assert "task_name" in by_reason["missing_fields"][0]["detail"]
    assert "conversations" in by_reason["missing_fields"][1]["detail"]


def test_decode_level_catches_truncated_image(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64), "green").save(tmp_path / "imgs" / "full.png")
    noisy = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))  # incompressible
    noisy.save(tmp_path / "imgs" / "big.png")
    (tmp_path / "imgs" / "cut.png").write_bytes((tmp_path / "imgs" / "big.png").read_bytes()[:200])
    rows = [
        {"id": "a", "image": "imgs/full.png", "task_name": "t", "conversations": _turns("<image>\nQ")},
        {"id": "b", "image": "imgs/cut.png", "task_name": "t", "conversations": _turns("<image>\nQ")},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    header = _prepare(str(tmp_path / "a.json"), str(tmp_path / "o1"), format="vision-flan")
    assert header["quarantined"] == 0  # the header alone is readable
    full = _prepare(str(tmp_path / "a.json"), str(tmp_path / "o2"), format="vision-flan", image_check="decode", max_bad_fraction=1.0)
    assert full["reasons"] == {"image_undecodable": 1}


def test_max_bad_fraction_fails_and_keeps_quarantine(tmp_path):
    write_bad_corpus(tmp_path / "bad")
    with pytest.raises(PrepareError) as err:
        _prepare(str(tmp_path / "bad"), str(tmp_path / "out"), format="vision-flan", max_bad_fraction=0.2)
    message = str(err.value)
    assert "14 of 17 rows" in message and "max_bad_fraction 20.0%" in message
    quarantine = message.rsplit(": ", 1)[1]
    assert pq.read_table(quarantine).num_rows == 14
    assert not list((tmp_path / "out").glob("*/manifest.json"))  # nothing published


def test_digest_is_content_addressed(sample_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_dir, src)
    rows = json.loads((src / "annotation.json").read_text())
    first = _prepare(str(src / "annotation.json"), str(tmp_path / "a"), format="vision-flan")
    again = _prepare(str(src / "annotation.json"), str(tmp_path / "b"), format="vision-flan")
    assert first["digest"] == again["digest"]
    # Layout of the JSON text is not content: compact vs indented gives the same digest.
    (src / "annotation.json").write_text(json.dumps(rows, indent=3))
    assert _prepare(str(src / "annotation.json"), str(tmp_path / "c"), format="vision-flan")["digest"] == first["digest"]
    rows[10]["conversations"][1]["value"] += "!"
    (src / "annotation.json").write_text(json.dumps(rows))
    changed_answer = _prepare(str(src / "annotation.json"), str(tmp_path / "d"), format="vision-flan")["digest"]
    rows[10]["conversations"][1]["value"] = rows[10]["conversations"][1]["value"][:-1]
    rows[11]["image"] = rows[12]["image"]
    (src / "annotation.json").write_text(json.dumps(rows))
    changed_image = _prepare(str(src / "annotation.json"), str(tmp_path / "e"), format="vision-flan")["digest"]
    assert len({first["digest"], changed_answer, changed_image}) == 3


def test_llava_multiturn_and_text_only(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "0001.jpg")
    rows = [
        {"id": "000000000001", "image": "0001.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A black square."},
            {"from": "human", "value": "Is it large?"}, {"from": "gpt", "value": "It fills the image."}]},
        {"id": 42, "conversations": _turns("Tell me a joke.", "No.")},  # numeric id, no image
    ]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    summary = _prepare(str(tmp_path / "llava.json"), str(tmp_path / "out"), format="llava")
    assert (summary["rows"], summary["quarantined"]) == (2, 0)
    table = CorpusVersion.open(summary["version"]).read_table().to_pylist()
    assert [len(r["turns"]) for r in table] == [4, 2]
    assert table[1]["image"] is None and table[1]["id"] == "42" and table[1]["task"] == "llava_instruct"


def test_truncated_json_names_file_and_nothing_published(tmp_path):
    (tmp_path / "a.json").write_text('[{"id": "1", "image": null, "task_name": "t", "conversations": []}, {"id": "2"')
    with pytest.raises(PrepareError, match=r"a\.json: ended inside the top-level array"):
        _prepare(str(tmp_path / "a.json"), str(tmp_path / "out"), format="vision-flan")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_cli_prepare(sample_dir, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "vlit.cli", "corpus", "prepare", str(sample_dir / "annotation.json"),
         "--format", "vision-flan", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rows"] == 204
    bad = subprocess.run(
        [sys.executable, "-m", "vlit.cli", "corpus", "prepare", str(tmp_path / "nope.json"),
         "--format", "vision-flan", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1 and "source not found" in bad.stderr


def test_many_sources_and_jsonl(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for name in ("a", "b"):
        lines = [json.dumps({"id": f"{name}{i}", "image": "x.png", "task_name": f"ds+{name}",
                             "conversations": _turns("<image>\nQ", "A")}) for i in range(3)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    summary = _prepare(str(tmp_path), str(tmp_path / "out"), format="vision-flan")
    assert summary["rows"] == 6 and summary["tasks"] == 2 and len(summary["sources"]) == 2
    assert summary["image_checks"]["distinct"] == 1  # one image, checked once for six rows
    table = CorpusVersion.open(summary["version"]).read_table()
    assert sorted(set(table.column("source").to_pylist())) == summary["sources"]
    assert table.column("position").to_pylist() == [0, 1, 2, 0, 1, 2]


def test_secrets_stay_out_of_outputs(s3, sample_on_s3):
    import os

    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    summary = _prepare(f"{sample_on_s3}/annotation.json", "s3://vlit-test/corpora/secrets", format="vision-flan")
    assert summary["image_checks"]["distinct"] == 205
    version = CorpusVersion.open(summary["version"])
    texts = [json.dumps(summary), storage.read_bytes(storage.join(version.uri, "manifest.json")).decode(),
             storage.read_bytes(storage.join(version.uri, "summary.json")).decode(),
             json.dumps(version.read_quarantine().to_pylist())]
    assert not any(secret in t or key_id in t for t in texts)


@pytest.mark.parametrize("level", ["header", "decode"])
def test_an_image_the_store_cannot_read_stops_prepare_unpublished(level, tmp_path):
    """A read that fails for a reason other than a missing file or a bad image (here a
    symlink loop; on S3, an error left after the retries) is the store's failure, not
    the row's: prepare stops, names the file and publishes nothing, where quarantining
    the row would lose a good one."""
    images = tmp_path / "src"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "ok.png")
    (images / "loop.png").symlink_to("loop.png")
    rows = [{"id": f"r{i}", "image": name, "task_name": "t",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
            for i, name in enumerate(["ok.png", "loop.png"])]
    (images / "annotation.json").write_text(json.dumps(rows))
    out = tmp_path / "corpora"
    with pytest.raises(PrepareError, match=r"reading .*loop\.png failed after the retries.*Nothing was published"):
        _prepare(str(images / "annotation.json"), str(out), format="vision-flan", image_check=level)
    assert not [p for p in out.rglob("*") if p.is_file()]  # no version, no staging left
