"""A quality report per dataset version: report.json plus pictures a person reads at a
glance (per-task counts, score distributions), written next to the version."""
from __future__ import annotations

import io
import json

from vlit import storage
from vlit.quality.metrics import balance_variance, element_counts, instruction_diversity


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def render_report(rows: list[dict], scores: dict[str, list[float]] | None = None,
                  extra: dict | None = None) -> tuple[dict, dict[str, bytes]]:
    """Rows in the release shape {task_name, conversations}; `scores`: metric -> values;
    `extra`: more fields for report.json. Returns the report and its files
    (report.json, tasks.png, scores.png) as bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: dict[str, list[str]] = {}
    for r in rows:
        tasks.setdefault(r["task_name"], []).append(r["conversations"][0]["value"])
    counts = {t: len(v) for t, v in sorted(tasks.items())}
    words = [element_counts(i)["words"] for v in tasks.values() for i in v]
    scores = dict(scores or {})
    report = {"rows": len(rows), "tasks": counts, "balance_variance": balance_variance(counts),
              "instruction_diversity": {t: instruction_diversity(v) for t, v in sorted(tasks.items())},
              "instruction_words_mean": sum(words) / len(words) if words else 0.0,
              "scores": {k: {"n": len(v), "mean": sum(v) / len(v) if v else None,
                             "min": min(v) if v else None, "max": max(v) if v else None}
                         for k, v in scores.items()},
              **(extra or {})}
    files = {}
    fig, ax = plt.subplots(figsize=(6, 0.4 * max(len(counts), 3)))
    ax.barh(list(counts), list(counts.values()))
    ax.set_xlabel("examples")
    ax.set_title("examples per task")
    files["tasks.png"] = _png(fig)
    plt.close(fig)
    cols = min(max(len(scores), 1), 3)
    grid = -(-max(len(scores), 1) // cols)
    fig, axes = plt.subplots(grid, cols, figsize=(4 * cols, 3 * grid), squeeze=False)
    for ax in axes.flat[len(scores):]:
        ax.set_axis_off()
    for ax, (name, values) in zip(axes.flat, sorted(scores.items())):
        ax.hist(values, bins=10)
        ax.set_title(name)
        ax.set_ylabel("rows")
    fig.tight_layout()
    files["scores.png"] = _png(fig)
    plt.close(fig)
    files["report.json"] = json.dumps(report, indent=2, sort_keys=True).encode()
    return report, files


def quality_report(rows: list[dict], out: str, scores: dict[str, list[float]] | None = None,
                   extra: dict | None = None) -> dict:
    """`render_report`, written to OUT/report.json, OUT/tasks.png, OUT/scores.png."""
    report, files = render_report(rows, scores, extra)
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
    return report
