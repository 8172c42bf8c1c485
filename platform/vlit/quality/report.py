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


def quality_report(rows: list[dict], out: str, scores: dict[str, list[float]] | None = None) -> dict:
    """Rows in the release shape {task_name, conversations}; `scores`: metric -> values.
    Writes OUT/report.json, OUT/tasks.png, OUT/scores.png; returns the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: dict[str, list[str]] = {}
    for r in rows:
        tasks.setdefault(r["task_name"], []).append(r["conversations"][0]["value"])
    counts = {t: len(v) for t, v in sorted(tasks.items())}
    words = [element_counts(i)["words"] for v in tasks.values() for i in v]
    report = {"rows": len(rows), "tasks": counts, "balance_variance": balance_variance(counts),
              "instruction_diversity": {t: instruction_diversity(v) for t, v in sorted(tasks.items())},
              "instruction_words_mean": sum(words) / len(words) if words else 0.0,
              "scores": {k: {"n": len(v), "mean": sum(v) / len(v) if v else None} for k, v in (scores or {}).items()}}
    fig, ax = plt.subplots(figsize=(6, 0.4 * max(len(counts), 3)))
    ax.barh(list(counts), list(counts.values()))
    ax.set_xlabel("examples")
    ax.set_title("examples per task")
    storage.write_bytes(storage.join(out, "tasks.png"), _png(fig))
    plt.close(fig)
    fig, axes = plt.subplots(1, max(len(scores or {}), 1), figsize=(4 * max(len(scores or {}), 1), 3), squeeze=False)
    for ax, (name, values) in zip(axes[0], sorted((scores or {}).items())):
        ax.hist(values, bins=10)
        ax.set_title(name)
    storage.write_bytes(storage.join(out, "scores.png"), _png(fig))
    plt.close(fig)
    storage.write_bytes(storage.join(out, "report.json"), json.dumps(report, indent=2, sort_keys=True).encode())
    return report
