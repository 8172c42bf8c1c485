"""Task-balanced sampling: determinism, caps, temperature, the report."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stream_helpers import synth_version
from vlit.corpus.sampling import SamplingPlan

COUNTS = {"big+a": 6000, "mid+b": 900, "small+c": 60, "tiny+d": 7}


def _table(counts=COUNTS) -> pa.Table:
    tasks = [t for t, n in counts.items() for _ in range(n)]
    keys = [f"{t}-{i:06x}" for t, n in counts.items() for i in range(n)]
    order = np.random.default_rng(0).permutation(len(keys))  # tasks interleaved, as in a real shard
    return pa.table({"key": pa.array(keys).take(order), "task": pa.array(tasks).take(order)})


def _per_task(table: pa.Table) -> dict[str, int]:
    return {r["task"]: r["count_all"] for r in table.group_by("task").aggregate([([], "count_all")]).to_pylist()}


def test_deterministic_and_independent_of_batch_partitioning():
    plan = SamplingPlan.build(COUNTS, cap=1000, temperature=2.0)
    table = _table()
    whole = plan.apply(table, seed=7, epoch=3)
    cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, table.num_rows), 37, replace=False))
    pieces = [plan.apply(table.slice(a, b - a), seed=7, epoch=3) for a, b in zip([0, *cuts], [*cuts, table.num_rows])]
    assert pa.concat_tables(pieces).equals(whole)
    assert plan.apply(table, seed=7, epoch=3).equals(whole)
    assert not plan.apply(table, seed=7, epoch=4).equals(whole)  # a new epoch draws anew
    assert not plan.apply(table, seed=8, epoch=3).equals(whole)
    # Copies of an upsampled row are numbered, so (key, replica) is unique.
    pairs = set(zip(whole["key"].to_pylist(), whole["replica"].to_pylist()))
    assert len(pairs) == whole.num_rows


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_cap_respected_in_expectation_and_actually(temperature):
    cap = 1000
    plan = SamplingPlan.build(COUNTS, cap=cap, temperature=temperature)
    assert plan.target.max() <= cap + 1e-6
    assert plan.target.sum() == pytest.approx(1000 + 900 + 60 + 7)  # epoch size = sum of capped counts
    actual = _per_task(plan.apply(_table(), seed=0, epoch=0))
    for task, target, rate in zip(plan.tasks, plan.target, plan.rate):
        # Multiplicity is floor(r) + Bernoulli(frac r): variance n * f * (1 - f) <= n / 4.
        f = rate - np.floor(rate)
        bound = 5 * np.sqrt(COUNTS[task] * f * (1 - f)) + 1e-9
        assert abs(actual.get(task, 0) - target) <= bound, (task, actual.get(task), target)
    assert actual["big+a"] <= cap + 5 * np.sqrt(cap)


def test_temperature_one_keeps_proportions_exactly():
    plan = SamplingPlan.build(COUNTS)
    assert np.array_equal(plan.rate, np.ones(4))
    assert plan.apply(_table(), seed=0, epoch=0)["key"].equals(_table()["key"])


def test_temperature_flattens_and_report(tmp_path):
    version, _ = synth_version(str(tmp_path), instances=3000, tasks=12, image_pool=8, shard_rows=1000)
    counts = version.task_counts
    plain = SamplingPlan.build(counts).report(version, seed=0, epoch=0)
    assert {t: v["sampled"] for t, v in plain["tasks"].items()} == counts
    assert plain["balance"]["variance_after"] == plain["balance"]["variance_before"]

    previous = plain["balance"]
    for temperature in (2.0, 5.0):
        report = SamplingPlan.build(counts, temperature=temperature).report(version, seed=0, epoch=0)
        assert report["totals"]["expected"] == pytest.approx(version.rows)
        assert abs(report["totals"]["sampled"] - version.rows) < 5 * np.sqrt(version.rows)
        assert report["balance"]["variance_after"] < previous["variance_after"]
        assert report["balance"]["cv_after"] < previous["cv_after"]
        previous = report["balance"]
        small = min(counts, key=counts.get)
        assert report["tasks"][small]["rate"] > 1  # the tail is upsampled


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="cap"):
        SamplingPlan.build(COUNTS, cap=0)
    with pytest.raises(KeyError, match="'other'"):
        SamplingPlan.build(COUNTS).multiplicity(pa.array(["other"]), pa.array(["k"]), 0, 0)
