"""The stage-2 alignment set (Vision-Flan's stage 2): `size` examples chosen from generated
data by judge score, balanced over tasks.

Candidates come from synthetic dataset versions (self-instruct rows, VIGC rows) in the
Vision-Flan release shape {id, image, task_name, conversations}. The judge rates each
first answer; the score is the mean of its rated aspects (a candidate with none rated is
quarantined). Selection takes tasks in turn, each giving its best remaining candidate,
until `size` (so small tasks are used up and large ones share the rest). The version
holds rows.parquet and annotation.json in the release format for `vlit corpus prepare`.
"""
from __future__ import annotations

import json
from collections import Counter

from vlit.config import AlignmentConfig
from vlit.corpus.formats import as_vision_flan, to_release
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.loops.feedback import parse_rating
from vlit.serve.client import serve_calls
from vlit.versions import DatasetVersion, publish_rows, quarantine_row


def select_balanced(scored: list[dict], size: int) -> list[dict]:
    """Round-robin over tasks (sorted names), best score first in each (ties by id)."""
    by_task: dict[str, list[dict]] = {}
    for r in scored:
        by_task.setdefault(r["task_name"], []).append(r)
    queues = [sorted(rows, key=lambda r: (-r["score"], r["id"])) for _, rows in sorted(by_task.items())]
    chosen, depth = [], 0
    while len(chosen) < size and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(chosen) < size:
                chosen.append(q[depth])
        depth += 1
    return chosen


def build_alignment_set(cfg: AlignmentConfig, sources: list[str], out_root: str, app_name: str = "vlit") -> dict:
    """Judge-score the rows of synthetic dataset versions `sources` and select the
    alignment set into OUT_ROOT/<digest>/ (rows.parquet + annotation.json)."""
    candidates = [as_vision_flan(r) for uri in sources for r in DatasetVersion.open(uri).read_rows()]
    reqs = []
    for c in candidates:
        req = {"instruction": c["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip(),
               "response": c["conversations"][1]["value"]}
        if c["image"]:
            req["image"] = c["image"]
        if cfg.judge:
            req["model"] = cfg.judge
        reqs.append(req)
    scored, quarantine = [], []
    for c, (result, error) in zip(candidates, serve_calls(reqs, method="judge", app_name=app_name)):
        ratings = [s["rating"] for s in (result or {}).get("scores", {}).values()
                   if s["status"] == "ok" and s.get("rating") is not None]
        if not ratings:
            quarantine.append(quarantine_row("unscored", error or "the judge rated no aspect", c["id"], json.dumps(c)))
            continue
        score = sum(ratings) / len(ratings)
        if cfg.min_score is not None and score < cfg.min_score:
            quarantine.append(quarantine_row("below_min_score", f"score {score:.3f} < {cfg.min_score}", c["id"],
                                             json.dumps(c)))
            continue
        scored.append({**c, "score": score})
    chosen = sorted(select_balanced(scored, cfg.size), key=lambda r: r["id"])
    release = [{k: r[k] for k in ("id", "image", "task_name", "conversations")} for r in chosen]
    summary = publish_rows(out_root, "alignment-set", chosen, quarantine,
                           {**cfg.model_dump(mode="json"), "sources": sources},
                           extra_files={"annotation.json": json.dumps(release, indent=1).encode()})
    tasks = Counter(r["task_name"] for r in chosen)
    return {**summary, "candidates": len(candidates), "tasks": dict(sorted(tasks.items()))}


def alignment_from_feedback(rows: list[dict], cfg: AlignmentConfig, out_root: str, settings: dict) -> dict:
    """The alignment set from judged responses (`feedback_loop.feedback_rows`: per prompt,
    responses from the generator pool with the judge's ratings): each prompt's best
    response by mean rating over the rated aspects (a response with any aspect not rated
    takes no part), `cfg.min_score` applied, then `select_balanced` over tasks. Writes
    OUT_ROOT/<digest>/ with rows.parquet, annotation.json (release format) and the
    rejected prompts in the quarantine, each with its reason."""
    scored, quarantine = [], []
    for r in rows:
        best, why = None, "no response"
        for c in r["completions"]:
            ratings = [parse_rating(a["Rating"]) for a in c["annotations"].values()]
            if not ratings or any(x is None for x in ratings):
                why = "no response rated on every aspect"
                continue
            score = float(sum(ratings) / len(ratings))
            if best is None or score > best[0]:
                best = (score, c)
        raw = json.dumps(r, sort_keys=True)
        if best is None:
            quarantine.append(quarantine_row("unscored", why, r["id"], raw))
            continue
        score, c = best
        if cfg.min_score is not None and score < cfg.min_score:
            quarantine.append(quarantine_row("below_min_score", f"best score {score:.3f} < {cfg.min_score}", r["id"], raw))
            continue
        prompt = f"{IMAGE_TOKEN}\n{r['prompt']}" if r["img_path"] else r["prompt"]
        scored.append({"id": r["id"], "image": r["img_path"], "task_name": r["task"], "score": score,
                       "model": c["model"],
                       "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": c["response"]}]})
    chosen = sorted(select_balanced(scored, cfg.size), key=lambda r: r["id"])
    release, root = to_release(chosen)  # the root is kept in the settings
    summary = publish_rows(out_root, "alignment-set", chosen, quarantine,
                           {**cfg.model_dump(mode="json"), **settings, "image_root": root},
                           extra_files={"annotation.json": json.dumps(release, indent=1).encode()})
    models = Counter(r["model"] for r in chosen)
    return {**summary, "candidates": len(rows), "tasks": len({r["task_name"] for r in chosen}),
            "models": dict(sorted(models.items())), "scores": [r["score"] for r in chosen], "release": release,
            "image_root": root}
