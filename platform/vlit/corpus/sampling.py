"""Task-balanced sampling: cap each task, flatten the task mix with a temperature.

Instruction-tuning corpora are dominated by a few large tasks (Vision-Flan: 187 tasks,
some with 10k+ instances, some with a few hundred). A plan fixes, per task, the expected
number of rows in one epoch:

    capped_t = min(n_t, cap)
    p_t      ∝ capped_t ** (1 / T)          T = 1 keeps the capped proportions
    target_t = p_t * sum(capped)            the epoch keeps the capped size
    rate_t   = target_t / n_t               > 1 upsamples, < 1 downsamples

and applies it row by row while streaming: a row appears floor(rate) times, plus once more
with probability frac(rate). The coin is a hash of (seed, epoch, row key), so the sample
does not depend on how rows are split into blocks or workers and needs no global view of
the data: any shard can be sampled on its own.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlit import storage

# splitmix64's constants: a cheap, well-mixed 64-bit finalizer (Steele et al. 2014).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def row_hash(keys: pa.Array | pa.ChunkedArray, seed: int, epoch: int, purpose: str) -> np.ndarray:
    """A uint64 per row key, fixed by (seed, epoch, purpose) and nothing else.

    `purpose` separates independent draws (sampling coin, template choice) over the same
    keys, so the template a row gets is not correlated with whether it was sampled.
    """
    salt = np.frombuffer(
        hashlib.blake2b(f"{purpose}:{seed}:{epoch}".encode(), digest_size=8).digest(), dtype=np.uint64
    )[0]
    # pandas hashes an object array of strings in C (SipHash); no per-row Python.
    base = pd.util.hash_array(np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object), categorize=False)
    return _splitmix64(base ^ salt)


def row_uniform(keys, seed: int, epoch: int, purpose: str) -> np.ndarray:
    """Uniform [0, 1) floats from `row_hash` (the top 53 bits, a double's mantissa)."""
    return (row_hash(keys, seed, epoch, purpose) >> np.uint64(11)) * (1.0 / (1 << 53))


def held_out(keys, fraction: float, seed: int) -> np.ndarray:
    """True for the rows whose key hashes below `fraction` (eval.holdout): the same rows
    whatever the epoch, block or worker, so the stream drops exactly the rows that
    evaluation scores (vlit/evaluate/holdout.py)."""
    return row_uniform(keys, seed, 0, "holdout") < fraction


def _water_fill(target: np.ndarray, cap: float) -> np.ndarray:
    """Clip targets at `cap` and hand the excess to the unclipped tasks in proportion.

    Only a temperature below 1 (sharpening) can push a task above the cap; the total is
    kept, which is always possible because sum(min(n, cap)) <= cap * tasks.
    """
    target = target.astype(float).copy()
    while (over := target > cap * (1 + 1e-12)).any():
        excess = (target[over] - cap).sum()
        target[over] = cap
        free = target < cap
        target[free] += excess * target[free] / target[free].sum()
    return target


@dataclass(frozen=True)
class SamplingPlan:
    """Expected rows per task per epoch; `rate` is what streaming applies."""

    tasks: tuple[str, ...]
    source: np.ndarray  # n_t, rows in the corpus version
    capped: np.ndarray  # min(n_t, cap)
    target: np.ndarray  # expected rows in one epoch (float)
    cap: int | None
    temperature: float

    @classmethod
    def build(cls, task_counts: dict[str, int], cap: int | None = None, temperature: float = 1.0) -> "SamplingPlan":
        if cap is not None and cap < 1:
            raise ValueError(f"sampling cap must be >= 1, got {cap}")
        if temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        tasks = tuple(sorted(task_counts))
        source = np.array([task_counts[t] for t in tasks], dtype=np.int64)
        if (source < 0).any():
            bad = tasks[int(np.argmax(source < 0))]
            raise ValueError(f"task {bad!r} has a negative row count")
        capped = source if cap is None else np.minimum(source, cap)
        if temperature == 1.0:
            # Exact, so rates are exactly 1 (or cap/n) with no float residue in the coin.
            target = capped.astype(float)
        else:
            weights = capped.astype(float) ** (1.0 / temperature)
            target = capped.sum() * weights / weights.sum() if weights.sum() > 0 else weights
            if cap is not None:
                target = _water_fill(target, cap)
        return cls(tasks, source, capped, target, cap, float(temperature))

    @property
    def rate(self) -> np.ndarray:
        return np.divide(self.target, self.source, out=np.zeros(len(self.tasks)), where=self.source > 0)

    def multiplicity(self, tasks: pa.Array | pa.ChunkedArray, keys, seed: int, epoch: int) -> np.ndarray:
        """How many times each row appears this epoch: floor(rate) + Bernoulli(frac(rate))."""
        index = pc.index_in(tasks, value_set=pa.array(self.tasks, pa.string()))
        if index.null_count:
            unknown = pc.filter(tasks, pc.is_null(index))[0].as_py()
            raise KeyError(f"task {unknown!r} is not in the sampling plan (built from another corpus version?)")
        rate = self.rate[index.to_numpy(zero_copy_only=False)]
        whole = np.floor(rate)
        coin = row_uniform(keys, seed, epoch, "sample") < (rate - whole)
        return whole.astype(np.int64) + coin

    def apply(self, table: pa.Table, seed: int, epoch: int) -> pa.Table:
        """The sampled rows of `table`; a row drawn k times appears k times with
        `replica` = 0..k-1, so (key, replica) stays unique within an epoch."""
        counts = self.multiplicity(table["task"], table["key"], seed, epoch)
        rows = np.repeat(np.arange(len(table)), counts)
        # Position of each copy within its row's run of copies.
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        replica = np.arange(len(rows)) - starts
        return table.take(rows).append_column("replica", pa.array(replica, pa.int32()))

    def report(self, version, seed: int = 0, epoch: int = 0) -> dict:
        """Per-task source, expected and actual sampled counts, and the balance before/after.

        Reads only the `task` and `key` columns, one shard at a time.
        """
        sampled = dict.fromkeys(self.tasks, 0)
        for uri in version.shard_uris:
            fs, path = storage.filesystem(uri)
            table = pq.read_table(path, filesystem=fs, columns=["task", "key"])
            counts = self.multiplicity(table["task"], table["key"], seed, epoch)
            per_task = pd.Series(counts).groupby(table["task"].to_numpy()).sum()
            for task, n in per_task.items():
                sampled[task] += int(n)
        after = np.array([sampled[t] for t in self.tasks], dtype=float)
        return {
            "seed": seed,
            "epoch": epoch,
            "cap": self.cap,
            "temperature": self.temperature,
            "tasks": {
                t: {
                    "source": int(n),
                    "capped": int(c),
                    "expected": round(float(e), 3),
                    "rate": round(float(r), 6),
                    "sampled": sampled[t],
                }
                for t, n, c, e, r in zip(self.tasks, self.source, self.capped, self.target, self.rate)
            },
            "totals": {
                "source": int(self.source.sum()),
                "expected": round(float(self.target.sum()), 3),
                "sampled": int(after.sum()),
            },
            "balance": {
                "definition": "variance = population variance of per-task row counts (rows^2); "
                "cv = its square root over the mean (scale-free); lower is more balanced",
                "variance_before": float(np.var(self.source)),
                "variance_after": float(np.var(after)),
                "cv_before": _cv(self.source),
                "cv_after": _cv(after),
            },
        }


def _cv(counts: np.ndarray) -> float:
    mean = float(np.mean(counts)) if len(counts) else 0.0
    return float(np.std(counts)) / mean if mean > 0 else 0.0
