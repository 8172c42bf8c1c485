"""The comparison table across stages: one row per metric, one column per stage."""
from __future__ import annotations

import json


def comparison_table(stages: dict[str, dict[str, float]], metrics: list[str] | None = None) -> str:
    """Plain text, stages in the dict's order (e.g. base, stage1, stage2), and the change
    from the first stage to the last; a metric a stage lacks shows as "-"."""
    if not stages:
        raise ValueError("comparison_table: no stages")
    names = list(stages)
    metrics = metrics or sorted({m for values in stages.values() for m in values})
    header = ["metric", *names] + (["change"] if len(names) > 1 else [])
    lines = []
    for metric in metrics:
        values = [stages[s].get(metric) for s in names]
        cells = [metric, *("-" if v is None else f"{v:.3f}" for v in values)]
        if len(names) > 1:
            first, last = values[0], values[-1]
            cells.append("-" if first is None or last is None else f"{last - first:+.3f}")
        lines.append(cells)
    return text_table(header, lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]) + "\n"


def log_comparison(tracking_uri: str, run_id: str, stages: dict[str, dict[str, float]]) -> str:
    """Log the table (eval/comparison.txt) and its numbers (eval/comparison.json) to a
    run, typically the job's last stage; returns the table."""
    from vlit import lineage

    table = comparison_table(stages)
    lineage.log_eval({"uri": tracking_uri, "run_id": run_id},
                      texts={"eval/comparison.txt": table, "eval/comparison.json": json.dumps(stages, indent=2)})
    return table
