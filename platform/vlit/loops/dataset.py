"""What the synthetic loops share: prompts drawn from a corpus version.

Each loop writes its rows as a `vlit.versions.DatasetVersion` (`versions.publish_rows`:
rows.parquet, quarantine.parquet, summary.json, extra files, manifest last) and calls
models through the Serve app with `vlit.serve.client.serve_calls`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pyarrow as pa

from vlit.corpus.sampling import held_out
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.versions import CorpusVersion


@dataclass(frozen=True)
class Prompt:
    id: str
    task: str
    image: str | None
    instruction: str
    reference: str | None  # the corpus's answer


def corpus_prompts(corpus_version: str, n: int, seed: int = 0, images_only: bool = True,
                   holdout=None) -> list[Prompt]:
    """`n` rows of a corpus version (a seeded draw, the same for the same version) as prompts:
    the first user turn without the image placeholder, the first answer as the reference.
    `holdout` (eval.holdout): its rows are never drawn, so no generated set that a later
    stage trains on carries a held-out row's image or reference answer."""
    table = CorpusVersion.open(corpus_version).read_table(columns=["key", "task", "image", "turns"])
    if holdout is not None:
        table = table.filter(pa.array(~held_out(table["key"], holdout.fraction, holdout.seed)))
    rows = sorted(table.to_pylist(), key=lambda r: r["key"])
    if images_only:
        rows = [r for r in rows if r["image"]]
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows[:n]:
        user = next((t["content"] for t in r["turns"] if t["role"] == "user"), "")
        answer = next((t["content"] for t in r["turns"] if t["role"] == "assistant"), None)
        out.append(Prompt(r["key"], r["task"], r["image"], user.replace(IMAGE_TOKEN, "").strip(), answer))
    return out
