"""Samples/s of the Ray Data training stream against a torch DataLoader doing the same work.

Both paths read the same corpus version (synthetic, prepared in a temp dir), fetch each
row's image, decode it with the same function, resize it to --resize, tokenize the first
user turn with the same tiny BPE tokenizer (fixed length), and hand torch tensors to a
consumer loop that only counts rows. Both use --workers processes for that work: Ray with
`stream.decode_concurrency` actors, the DataLoader with `num_workers`. The first
--warmup rows of each are not timed (worker start-up, first reads).

    python bench/stream_bench.py [--instances 20000 --image-pool 256 --image-size 128 --resize 224]
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

import pyarrow.parquet as pq
import torch

from vlit import storage
from vlit.config import CorpusConfig, PrepareConfig, RayConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.corpus.stream import build_stream, load_pixels
from vlit.world import synth_corpus
from vlit.versions import CorpusVersion
from vlit.model.tokenizer import build_tiny_tokenizer
from vlit.runtime import init_ray

MAX_TOKENS = 64


class Tokenize:
    """The stream's transform: one tokenizer per actor, a whole batch per call."""

    def __init__(self):
        self.tokenizer = build_tiny_tokenizer()

    def __call__(self, batch: dict) -> dict:
        prompts = [turns[0]["content"] for turns in batch["turns"]]
        enc = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="np")
        return {"pixels": batch["pixels"], "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class ParquetRows(torch.utils.data.Dataset):
    """The DataLoader baseline: map-style over the same Parquet rows, one row per item."""

    def __init__(self, version: CorpusVersion, size: int):
        tables = []
        for uri in version.shard_uris:
            fs, path = storage.filesystem(uri)
            tables.append(pq.read_table(path, filesystem=fs, columns=["image", "turns"]))
        self.images = [u for t in tables for u in t["image"].to_pylist()]
        self.prompts = [turns[0]["content"] for t in tables for turns in t["turns"].to_pylist()]
        self.size = size
        self.tokenizer = None  # built in each worker process

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if self.tokenizer is None:
            self.tokenizer = build_tiny_tokenizer()
        pixels = load_pixels(storage.read_bytes(self.images[i]), self.size)
        enc = self.tokenizer(self.prompts[i], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="np")
        return {"pixels": pixels, "input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0]}


def consume(batches, warmup: int) -> tuple[float, int]:
    """Rows/s after the first `warmup` rows, and the total rows seen."""
    rows, start, timed_from = 0, None, 0
    for batch in batches:
        rows += len(batch["input_ids"])
        if start is None and rows >= warmup:
            start, timed_from = time.perf_counter(), rows
    elapsed = time.perf_counter() - start
    return (rows - timed_from) / elapsed, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=20_000)
    p.add_argument("--tasks", type=int, default=187)
    p.add_argument("--image-pool", type=int, default=256)
    p.add_argument("--image-size", type=int, default=128, help="stored image side (px)")
    p.add_argument("--resize", type=int, default=224, help="stream image side (px)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block-rows", type=int, default=256, help="rows per Ray decode block")
    p.add_argument("--workers", type=int, default=2, help="decode_concurrency = DataLoader num_workers")
    p.add_argument("--warmup", type=int, default=2000, help="rows excluded from timing")
    p.add_argument("--prefetch", type=int, default=4, help="batches the Ray consumer prefetches")
    args = p.parse_args()
    print("$ " + " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]), flush=True)

    work = tempfile.mkdtemp(prefix="vlit-bench-", dir="/tmp")
    synth = synth_corpus(f"{work}/src", instances=args.instances, tasks=args.tasks,
                         image_pool=args.image_pool, image_size=args.image_size)
    version = CorpusVersion.open(prepare_corpus(PrepareConfig(sources=[synth["annotation"]]), f"{work}/versions")["version"])
    print(f"corpus: {version.rows} rows, {len(version.task_counts)} tasks, {args.image_pool} PNGs of "
          f"{args.image_size}px -> {args.resize}px, batch {args.batch_size}, {args.workers} workers, "
          f"{os.cpu_count()} cores", flush=True)

    init_ray(RayConfig(), workdir=work)
    cfg = CorpusConfig(out=version.uri, stream={"image_size": args.resize, "batch_size": args.batch_size,
                                                "block_rows": args.block_rows, "decode_concurrency": args.workers})
    ds = build_stream(version, cfg, transform=Tokenize)
    batches = ds.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=args.prefetch)
    ray_rate, ray_rows = consume(batches, args.warmup)
    print(f"ray data stream : {ray_rate:8.1f} samples/s ({ray_rows} rows)", flush=True)

    loader = torch.utils.data.DataLoader(ParquetRows(version, args.resize), batch_size=args.batch_size,
                                         num_workers=args.workers, shuffle=False)
    torch_rate, torch_rows = consume(loader, args.warmup)
    print(f"torch DataLoader: {torch_rate:8.1f} samples/s ({torch_rows} rows)", flush=True)
    print(f"ratio ray/torch : {ray_rate / torch_rate:.2f}x")


if __name__ == "__main__":
    main()
