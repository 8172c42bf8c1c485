"""The run report of a two-stage job: one self-contained HTML file a person opens in a
browser, written beside the job's outputs (<pipeline.out>/report.html) and logged to the
job's MLflow run (report.html).

    stage table         the job's closing tables, as it printed them
    training            loss and learning rate per step of each training stage (MLflow)
    held-out accuracy   per question family across the evaluated stages, beside guessing
    alignment set       its quality pictures (vlit.quality.report)
    DPO                 reward accuracy and margin per step, when a dpo stage ran
    lineage             each registered model version back to its data, with digests

It reads only what the job recorded: <pipeline.out>/job.json (the job's summary, whose
stages are the ledger's records) and the runs it names. `vlit report JOB_OUT` rebuilds it.
Charts are matplotlib PNGs inlined as base64, so the file needs nothing beside it.
"""
from __future__ import annotations

import base64
import datetime as dt
import html

from vlit import lineage, storage

JOB_RECORD = "job.json"
REPORT = "report.html"
TRAINING = ("loss", "lr")
DPO = ("rewards/accuracies", "rewards/margins")


def _figure(panels: list[tuple[str, dict[str, list[tuple[int, float]]]]], xlabel: str = "step") -> bytes:
    """One row of line charts: (title, {series: [(x, y)]}) each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlit.quality.report import _png

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for name, points in series.items():
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _families_figure(evaluated: dict[str, dict], families: list[str], prefix: str) -> bytes:
    """Grouped bars: held-out accuracy per family, a bar per evaluated stage (the base
    model first), guessing as a black tick on each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlit.quality.report import _png

    width = 0.8 / max(len(evaluated), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(families)), 3.6))
    for i, (stage, metrics) in enumerate(evaluated.items()):
        xs = [f + (i - (len(evaluated) - 1) / 2) * width for f in range(len(families))]
        ax.bar(xs, [metrics.get(f"{prefix}{f}.accuracy", 0.0) for f in families], width, label=stage)
    chance = [max(m.get(f"{prefix}{f}.chance", 0.0) for m in evaluated.values()) for f in families]
    ax.hlines(chance, [f - 0.45 for f in range(len(families))], [f + 0.45 for f in range(len(families))],
              colors="black", linestyles="dashed", label="guessing")
    ax.set_xticks(range(len(families)), [f.replace("_", "\n") for f in families], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8, ncols=min(len(evaluated) + 1, 5))
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _img(png: bytes, alt: str) -> str:
    return f'<img class="chart" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pre(text: str, cls: str = "") -> str:
    return f'<pre class="{cls}">{html.escape(text)}</pre>'


def _sections(record: dict) -> list[tuple[str, str]]:
    """(title, HTML body) of each section the job's record has data for."""
    from vlit.two_stage import TASKS

    uri = record["tracking_uri"]
    stages = {s: record["stages"][s] for s in record["order"]}  # job.json's keys are sorted
    trained = {s: o for s, o in stages.items() if o.get("model_name")}
    out = [("Stages", _pre(record["table"], "table"))]
    if trained:
        history = {s: lineage.metric_history({"uri": uri, "run_id": o["mlflow_run_id"]}, TRAINING)
                   for s, o in trained.items()}
        panels = [(k, {s: h[k] for s, h in history.items()}) for k in TRAINING]
        steps = ", ".join(f"{s}: {o['steps']} steps, final loss {o['loss']:.4f}" for s, o in trained.items())
        out.append(("Training", _img(_figure(panels), "loss and learning rate per step") + f"<p>{steps}</p>"))
    evaluated = {s: o["metrics"] for s, o in stages.items() if o.get("metrics")}
    families = sorted({m[len(TASKS):-len(".chance")] for ms in evaluated.values() for m in ms
                       if m.startswith(TASKS) and m.endswith(".chance") and m.count(".") == 3})
    if families:
        out.append(("Held-out accuracy per family",
                    _img(_families_figure(evaluated, families, TASKS), "held-out accuracy per family") +
                    "<p>Bars: each evaluated stage, the base model first; dashed: guessing among each "
                    "question's choices.</p>"))
    align = stages.get("align")
    if align:
        pictures = [_img(storage.read_bytes(uri_), name) for name in ("tasks.png", "scores.png")
                    if storage.exists(uri_ := storage.join(align["alignment"], "quality", name))]
        out.append(("Alignment set", f"<p>{align['rows']} rows, digest <code>{align['alignment_digest']}</code>, "
                                     f"chosen from {html.escape(', '.join(align.get('models') or []))}</p>"
                    + "".join(pictures)))
    dpo = stages.get("dpo")
    if dpo and dpo.get("mlflow_run_id"):
        history = lineage.metric_history({"uri": uri, "run_id": dpo["mlflow_run_id"]}, DPO)
        final = ", ".join(f"{k.replace('_', ' ')} {dpo[k]:.3f}" for k in ("reward_accuracy", "reward_margin")
                          if dpo.get(k) is not None)
        out.append(("DPO", _img(_figure([(k, {"dpo": v}) for k, v in history.items()]),
                                "DPO reward accuracy and margin per step") + f"<p>{final}</p>"))
    chains = [lineage.format_chain(lineage.chain(uri, f"{o['model_name']}/{o['model_version']}"))
              for o in trained.values()]
    if chains:
        out.append(("Lineage", _pre("\n".join(chains), "lineage")))
    return out


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}img.chart{max-width:100%;display:block;margin:.5em 0}
.meta{color:#555;font-size:.9em}"""

# Counts the charts the browser decoded into `data-charts-rendered` on <body>, so a
# headless browser's DOM says whether they render.
SCRIPT = """addEventListener("load", () => { const imgs = [...document.images];
document.body.dataset.chartsRendered = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
document.body.dataset.charts = imgs.length; });"""


def render(record: dict) -> str:
    """The report of a job's record (see the module doc) as one HTML document."""
    sections = _sections(record)
    meta = (f"job {record['job_key'][:12]}, MLflow run {record['pipeline_run_id']} "
            f"({html.escape(record['tracking_uri'])}); ran: {', '.join(record['ran']) or '-'}; "
            f"skipped: {', '.join(record['skipped']) or '-'}; {record['seconds']} s")
    body = "".join(f"<h2>{html.escape(t)}</h2>{b}" for t, b in sections)
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vlit run report {record['job_key'][:8]}"
            f"</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body><h1>vlit run report</h1>"
            f"<p class='meta'>{meta}<br>generated {generated}</p>{body}</body></html>")


def write_report(out: str) -> str:
    """Render <out>/job.json into <out>/report.html and log it to the job's MLflow run;
    returns the report's URI."""
    if not storage.exists(storage.join(out, JOB_RECORD)):
        raise FileNotFoundError(f"no {JOB_RECORD} in {out}: not the pipeline.out of a two-stage job that finished")
    record = storage.read_json(storage.join(out, JOB_RECORD))
    uri = storage.join(out, REPORT)
    page = render(record)
    storage.write_bytes(uri, page.encode())
    lineage.log_text({"uri": record["tracking_uri"], "run_id": record["pipeline_run_id"]}, page, REPORT)
    return uri


def write_job_report(out: str, summary: dict) -> str:
    """Record the job's summary as <out>/job.json, then its report (`write_report`)."""
    storage.write_json(storage.join(out, JOB_RECORD), {**{k: v for k, v in summary.items() if k != "report"},
                                                      "order": list(summary["stages"])})
    return write_report(out)
