"""Quality control of a generated dataset version (the VLIT review, section 4.2.3):
per-row metrics as Ray Data operators, per-task diversity, thresholds, balanced
resampling, and a new versioned dataset with its report.

    rows (release shape) ─► element counts            (map_batches: complexity)
                         ─► CLIP-style image-text score (an actor pool: the dual encoder
                                                        loads once per actor: correctness)
                         ─► judge verdicts, m samples  (Serve chat through map_requests;
                                                        majority vote: correctness)
                         ─► judge difficulty, 1-10     (Serve chat: complexity)
    per task: instruction diversity (communities), response diversity (log DBSCAN clusters)
    thresholds (quality/filters.py) ─► balanced resampling (`per_task`) ─► the version

The version (`versions.publish_rows`, kind "qc"): rows.parquet (the kept rows
with their metrics), annotation.json (the release format, images relative to the
recorded image root), quarantine.parquet (every row not kept, with the reason: an
unreadable image, a failed threshold, an unscored metric, resampled away for balance)
and quality/{report.json, tasks.png, scores.png}.
"""
from __future__ import annotations

import json
import math
import zlib
from collections import Counter

import pyarrow as pa

from vlit import storage
from vlit.config import QC_METRICS, QualityConfig
from vlit.corpus.formats import as_vision_flan, to_release
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.quality import judging
from vlit.quality.filters import apply_thresholds
from vlit.quality.metrics import (
    balance_variance,
    balanced_resample,
    element_counts,
    embedder,
    instruction_diversity,
    response_clusters,
)
from vlit.serve.client import chat_texts
from vlit.versions import DatasetVersion, publish_rows, quarantine_row

# The row operators are light (the model work runs in Serve replicas or the CLIP actor):
# fractions of a CPU leave room for both on a small cluster.
ROW_OP_CPUS = 0.25
CLIP_CPUS = 0.5
SERVE_COLUMNS = ("request", "result", "error", "status", "attempts")


def qc_rows(release_rows: list[dict]) -> list[dict]:
    """Release-shape rows -> the operators' input: the first instruction and answer,
    the conversation as JSON text (one Arrow type whatever its length)."""
    out = []
    for r in release_rows:
        conv = r["conversations"]
        out.append({"id": r["id"], "image": r.get("image"), "task_name": r["task_name"],
                    "instruction": conv[0]["value"].replace(IMAGE_TOKEN, "").strip(),
                    "response": conv[1]["value"] if len(conv) > 1 else "",
                    "conversations": json.dumps(conv)})
    return out


def _rowwise(fn):
    """A batch function applying `fn(row) -> row` to each row of a pyarrow batch."""
    def batch_fn(batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([fn(r) for r in batch.to_pylist()])
    return batch_fn


def _complexity(row: dict) -> dict:
    counts = element_counts(row["instruction"])
    return {**row, **{f"instruction_{k}": v for k, v in counts.items()},
            "turns": len(json.loads(row["conversations"])) // 2, "response_words": len(row["response"].split())}


class ClipScores:
    """Ray Data callable class: `clip_score` per row with an image (null without one);
    an image that cannot be read or decoded sets `clip_error` instead."""

    def __init__(self, path: str | None):
        from vlit.quality.clip import DualEncoder

        self.encoder = DualEncoder.load(path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vlit.corpus.images import decode_image

        rows = batch.to_pylist()
        images, texts, at = [], [], []
        for i, r in enumerate(rows):
            r["clip_score"], r["clip_error"] = None, None
            if not r["image"]:
                continue
            try:
                images.append(decode_image(storage.read_bytes(r["image"])))
            except Exception as e:
                r["clip_error"] = f"image_unreadable: {type(e).__name__}: {e}"
                continue
            texts.append(f"{r['instruction']} {r['response']}")
            at.append(i)
        for i, score in zip(at, self.encoder.scores(images, texts)):
            rows[i]["clip_score"] = float(score)
        return pa.Table.from_pylist(rows)


def _seed(cfg: QualityConfig, row_id: str) -> int:
    return cfg.seed * 100003 + zlib.crc32(row_id.encode())


def _verdict_request(cfg: QualityConfig):
    def fn(row: dict) -> dict:
        req = judging.verdict_request(row, cfg.judge, cfg.votes, cfg.vote_temperature, _seed(cfg, row["id"]))
        return {**row, "request": json.dumps(req)}
    return fn


def _read_verdicts(row: dict) -> dict:
    result, error = (json.loads(row["result"]) if row["result"] else None), row["error"]
    row = {k: v for k, v in row.items() if k not in SERVE_COLUMNS}
    if result is None:
        return {**row, "judge_votes": 0, "judge_votes_valid": 0, "judge_votes_correct": 0, "judge_correct": None,
                "judge_error": f"judge call failed: {error}"}
    return {**row, **judging.majority([judging.parse_verdict(text) for text in chat_texts(result)])}


def _difficulty_request(cfg: QualityConfig):
    def fn(row: dict) -> dict:
        return {**row, "request": json.dumps(judging.difficulty_request(row, cfg.judge, _seed(cfg, row["id"])))}
    return fn


def _read_difficulty(row: dict) -> dict:
    result, error = (json.loads(row["result"]) if row["result"] else None), row["error"]
    row = {k: v for k, v in row.items() if k not in SERVE_COLUMNS}
    if result is None:
        return {**row, "difficulty": None, "difficulty_error": f"judge call failed: {error}"}
    text = chat_texts(result)[0]
    value = judging.parse_difficulty(text)
    return {**row, "difficulty": None if value is None else float(value),
            "difficulty_error": None if value is not None else f"unparseable difficulty reply: {text[:200]!r}"}


def score_rows(rows: list[dict], cfg: QualityConfig, app_name: str = "vlit") -> list[dict]:
    """The per-row metrics through Ray Data; rows in `qc_rows` shape, returned sorted by id."""
    import ray.data

    from vlit.serve.client import map_requests

    if not rows:
        return []
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(_rowwise(_complexity), batch_format="pyarrow", num_cpus=ROW_OP_CPUS)
    ds = ds.map_batches(ClipScores, fn_constructor_kwargs={"path": cfg.clip}, batch_size=cfg.clip_batch_size,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=CLIP_CPUS)
    if cfg.judge is not None:
        ds = ds.map_batches(_rowwise(_verdict_request(cfg)), batch_format="pyarrow", num_cpus=ROW_OP_CPUS)
        ds = map_requests(ds, method="chat", app_name=app_name, request_column="request")
        ds = ds.map_batches(_rowwise(_read_verdicts), batch_format="pyarrow", num_cpus=ROW_OP_CPUS)
        ds = ds.map_batches(_rowwise(_difficulty_request(cfg)), batch_format="pyarrow", num_cpus=ROW_OP_CPUS)
        ds = map_requests(ds, method="chat", app_name=app_name, request_column="request")
        ds = ds.map_batches(_rowwise(_read_difficulty), batch_format="pyarrow", num_cpus=ROW_OP_CPUS)
    return sorted(ds.take_all(), key=lambda r: r["id"])


def task_diversity(rows: list[dict], cfg: QualityConfig) -> dict[str, dict]:
    """Per task: instruction diversity (communities of the content-word co-occurrence
    graph) and response diversity (log of the number of DBSCAN clusters of response
    embeddings; 0 when there is at most one cluster)."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task_name"], []).append(r)
    embed = embedder(cfg.embedding)
    out = {}
    for task, group in sorted(by_task.items()):
        clusters = response_clusters(embed([r["response"] for r in group]), cfg.dbscan_eps, cfg.dbscan_min_samples)
        out[task] = {"rows": len(group), "instruction_diversity": instruction_diversity([r["instruction"] for r in group]),
                     "response_clusters": clusters, "response_diversity": math.log(clusters) if clusters else 0.0}
    return out


def run_qc(cfg: QualityConfig, source: str, out_root: str, app_name: str = "vlit") -> dict:
    """Quality control of the generated dataset version `source` into OUT_ROOT/<digest>/."""
    from vlit.quality.report import render_report

    version = DatasetVersion.open(source)
    scored = score_rows(qc_rows([as_vision_flan(r) for r in version.read_rows()]), cfg, app_name)
    quarantine, readable = [], []
    for r in scored:
        error = r["clip_error"] or ""
        if error.startswith("image_unreadable"):  # bad data whatever the thresholds
            quarantine.append(quarantine_row("image_unreadable", error, r["id"], json.dumps(r)))
        else:
            readable.append(r)
    kept, rejected = apply_thresholds(readable, cfg.thresholds)
    quarantine += [quarantine_row(reason, detail, r["id"], json.dumps(r)) for r, reason, detail in rejected]
    if cfg.per_task is not None:
        chosen = balanced_resample(kept, cfg.per_task, cfg.seed)
        ids = {r["id"] for r in chosen}
        quarantine += [quarantine_row("balance_resampled", f"task {r['task_name']} over per_task {cfg.per_task}",
                                      r["id"], json.dumps(r)) for r in kept if r["id"] not in ids]
        kept = sorted(chosen, key=lambda r: r["id"])
    release, root = to_release([{**r, "conversations": json.loads(r["conversations"])} for r in kept])
    metrics = {m: [r[m] for r in kept if r.get(m) is not None] for m in QC_METRICS}
    extra = {"source": version.uri, "source_rows": len(scored),
             "balance_variance_before": balance_variance(dict(Counter(r["task_name"] for r in readable))),
             "diversity": task_diversity(kept, cfg),
             "judge_votes_valid": sum(r.get("judge_votes_valid") or 0 for r in scored),
             "judge_votes": sum(r.get("judge_votes") or 0 for r in scored),
             "rejected": dict(sorted(Counter(q["reason"] for q in quarantine).items()))}
    report, files = render_report(release, {m: v for m, v in metrics.items() if v}, extra)
    summary = publish_rows(out_root, "qc", kept, quarantine,
                           {**cfg.model_dump(mode="json"), "source": version.uri, "image_root": root},
                           extra_files={"annotation.json": json.dumps(release, indent=1).encode(),
                                         **{f"quality/{name}": data for name, data in files.items()}})
    return {**summary, "source_rows": len(scored), "tasks": report["tasks"], "rejected": extra["rejected"],
            "report": storage.join(summary["version"], "quality", "report.json")}
