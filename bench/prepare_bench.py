"""Corpus prepare vs the LLaVA-style baseline, side by side in one run.

    python bench/prepare_bench.py --instances 100000 1664261

For each size: a synthetic Vision-Flan release file (made once, cached under --workdir),
then, each in its own process so peak RSS is its own:
  vlit      `prepare_corpus` (streaming parse, validation, image checks, digest, quarantine)
  baseline  `json.load` of the whole file, a Python loop doing the same checks, and the
            same Parquet output in the canonical schema
Prints wall time, rows/s and peak RSS of both and the ratios (goal: >= 2.5x faster,
<= 0.25x the memory), and the image-check rate. Linearity: seconds per 100k rows per size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _child(kind: str, source: str, out: str) -> None:
    start = time.perf_counter()
    if kind == "vlit":
        from vlit.config import PrepareConfig
        from vlit.corpus.prepare import prepare_corpus

        summary = prepare_corpus(PrepareConfig(sources=[source], format="vision-flan"), out)
        rows, extra = summary["rows"], {"image_checks": summary["image_checks"]}
    else:
        rows, extra = _baseline(source, out), {}
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start, **extra}))


def _baseline(source: str, out: str) -> int:
    """What LLaVA-style trainers do: load the whole array, loop in Python."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from vlit.corpus.schema import CORPUS_SCHEMA

    with open(source) as f:
        rows = json.load(f)
    root = os.path.dirname(source)
    images: dict[str, bool] = {}
    seen: set[int] = set()
    batch, shard, kept = [], 0, 0
    os.makedirs(out, exist_ok=True)

    def flush():
        nonlocal batch, shard
        if batch:
            pq.write_table(pa.Table.from_pylist(batch, CORPUS_SCHEMA), f"{out}/part-{shard:05d}.parquet", compression="zstd")
            batch, shard = [], shard + 1

    for i, r in enumerate(rows):
        conv, ref, task = r.get("conversations"), r.get("image"), r.get("task_name")
        if not conv or not task or r.get("id") is None:
            continue
        turns = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv]
        has_token = any("<image>" in t["content"] for t in turns if t["role"] == "user")
        if bool(ref) != has_token or (ref and (ref.startswith("/") or ".." in ref.split("/"))):
            continue
        image = None
        if ref:
            image = os.path.join(root, ref.removeprefix("./"))
            if image not in images:
                try:
                    with open(image, "rb") as f, Image.open(io.BytesIO(f.read(65536))) as img:
                        img.size  # noqa: B018
                    images[image] = True
                except Exception:
                    images[image] = False
            if not images[image]:
                continue
        key = hash((r["id"], ref, task))
        if key in seen:
            continue
        seen.add(key)
        batch.append({"key": f"{key & (2**64 - 1):016x}", "id": str(r["id"]), "task": task, "dataset": task.split("+")[0],
                      "image": image, "turns": turns, "input_text": None, "options": None, "source": source, "position": i})
        kept += 1
        if len(batch) == 200_000:
            flush()
    flush()
    return kept


def _measure(kind: str, source: str, out: str) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, source, out], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    result = json.loads(proc.stdout.read())
    if status != 0:
        raise SystemExit(f"{kind} failed with status {status}")
    result["peak_rss_gb"] = usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, nargs="+", default=[100_000])
    parser.add_argument("--workdir", default="/tmp/vlit-bench")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)

    from vlit.world import synth_corpus

    print("$ python bench/prepare_bench.py --instances " + " ".join(map(str, args.instances)))
    print(f"{'instances':>10} {'side':>8} {'seconds':>8} {'rows/s':>10} {'peak RSS GB':>12} {'s/100k':>7}")
    for n in args.instances:
        corpus = os.path.join(args.workdir, f"synth-{n}")
        if not os.path.exists(os.path.join(corpus, "annotation.json")):
            synth_corpus(corpus, instances=n, tasks=187, image_pool=1000, image_size=64, seed=0)
        size_gb = os.path.getsize(os.path.join(corpus, "annotation.json")) / 1e9
        results = {}
        for kind in ("baseline", "vlit"):
            out = os.path.join(args.workdir, f"out-{kind}-{n}-{os.getpid()}")
            results[kind] = r = _measure(kind, os.path.join(corpus, "annotation.json"), out)
            subprocess.run(["rm", "-rf", out], check=True)
            print(f"{n:>10} {kind:>8} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>10.0f} "
                  f"{r['peak_rss_gb']:>12.2f} {r['seconds'] / n * 1e5:>7.2f}")
        b, v = results["baseline"], results["vlit"]
        assert b["rows"] == v["rows"], (b["rows"], v["rows"])
        checks = v["image_checks"]
        print(f"{n:>10} file {size_gb:.2f} GB | speed-up {b['seconds'] / v['seconds']:.2f}x (goal >= 2.5) | "
              f"memory {v['peak_rss_gb'] / b['peak_rss_gb']:.3f}x of baseline (goal <= 0.25) | "
              f"image checks: {checks['distinct']} distinct at {checks['per_second']}/s ({checks['level']})")


if __name__ == "__main__":
    main()
