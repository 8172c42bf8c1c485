"""Small corpus versions for the corpus tests, written in the canonical layout."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlit import storage
from vlit.corpus.schema import CORPUS_SCHEMA
from vlit.corpus.version import CorpusVersion


def write_version(out: str, rows: list[dict], shard_rows: int = 50, digest: str = "v0") -> CorpusVersion:
    """Write `rows` (canonical-schema dicts) as a version at OUT/<digest>/."""
    uri = storage.join(out, digest)
    shards = []
    for i in range(0, len(rows), shard_rows):
        name = f"part-{i // shard_rows:05d}.parquet"
        table = pa.Table.from_pylist(rows[i : i + shard_rows], schema=CORPUS_SCHEMA)
        with storage.open_output(storage.join(uri, "data", name)) as f:
            pq.write_table(table, f)
        shards.append(name)
    tasks: dict[str, int] = {}
    for r in rows:
        tasks[r["task"]] = tasks.get(r["task"], 0) + 1
    storage.write_json(
        storage.join(uri, "manifest.json"),
        {"digest": digest, "rows": len(rows), "tasks": tasks, "shards": shards},
    )
    return CorpusVersion.open(uri)


def png_bytes(size: int = 24, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size + 8), color).save(buf, format="PNG")
    return buf.getvalue()


def make_rows(task_sizes: dict[str, int], image_dir: str | None = None, raw: bool = False) -> list[dict]:
    """Rows per task; with `image_dir`, every row gets its own PNG there (local or s3://)."""
    rows = []
    for task, n in task_sizes.items():
        for i in range(n):
            position = len(rows)
            image = None
            if image_dir is not None:
                image = storage.join(image_dir, f"{task}-{i}.png")
                storage.write_bytes(image, png_bytes(color=(position % 256, 40, 90)))
            prompt = ("<image>\n" if image else "") + f"question {i} of {task}"
            rows.append(
                {
                    "key": f"{task}-{i:06d}",
                    "id": str(i),
                    "task": task,
                    "dataset": task.split("+")[0],
                    "image": image,
                    "turns": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"answer {i}"}],
                    "input_text": f"input {i}" if raw else None,
                    "options": ["yes", "no"] if raw else None,
                    "source": f"/src/{task}.json",
                    "position": position,
                }
            )
    return rows
