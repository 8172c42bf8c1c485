"""Thresholds per metric: each row inside every [low, high] is kept; every other row is
rejected with the first failed metric as its reason, so the quarantine says why.

A row has no value for a metric in two cases, told apart by the `<metric>_error` column
(`clip_error`, `judge_error`, `difficulty_error`): the metric does not apply (a text-only
row has no image to match), and the row is kept; or measuring it failed (an unparseable
judge, an unreadable image), and the row is rejected as `unscored_<metric>`: a threshold
that cannot be checked is not passed.
"""
from __future__ import annotations

# Where each metric's failure is recorded.
ERROR_COLUMN = {"clip_score": "clip_error", "judge_correct": "judge_error", "difficulty": "difficulty_error"}


def check(row: dict, thresholds: dict[str, tuple[float | None, float | None]]) -> tuple[str, str] | None:
    """(reason, detail) of the first threshold the row fails, or None."""
    for metric, (low, high) in sorted(thresholds.items()):
        value = row.get(metric)
        if value is None:
            error = row.get(ERROR_COLUMN.get(metric, ""))
            if error:
                return f"unscored_{metric}", error
            continue
        if low is not None and value < low:
            return f"below_{metric}", f"{metric} {value:.4g} < {low:g}"
        if high is not None and value > high:
            return f"above_{metric}", f"{metric} {value:.4g} > {high:g}"
    return None


def apply_thresholds(rows: list[dict], thresholds: dict) -> tuple[list[dict], list[tuple[dict, str, str]]]:
    """(kept rows, [(row, reason, detail)] rejected)."""
    kept, rejected = [], []
    for row in rows:
        failed = check(row, thresholds)
        if failed is None:
            kept.append(row)
        else:
            rejected.append((row, *failed))
    return kept, rejected
