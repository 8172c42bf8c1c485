"""VLFeedback through Serve: prompts -> k responses from the generator pool -> the judge's
three-aspect ratings -> preference pairs.

The responses and ratings are written as released-format VLFeedback JSONL
(ROOT/responses/<sha>.jsonl, one row per prompt, ratings as text), and the pairs version
is built from it by `vlit.synth.feedback.pairs_version`: the same pair rule, ties,
exclusions, quarantine and digest as for the released data. An aspect the judge did not
rate (status `unparseable` or `unrated`, or a failed call) is written as "N/A" with the
reason as its rationale, so the pair rule excludes that response, visibly.
"""
from __future__ import annotations

import hashlib
import json

from vlit import storage
from vlit.config import FeedbackLoopConfig
from vlit.serve.protocol import ASPECTS as JUDGE_ASPECTS
from vlit.synth.dataset import Prompt, chat_texts, corpus_prompts, serve_calls, user_message
from vlit.synth.feedback import ASPECTS, pairs_version

# The judge endpoint's aspect names -> the released format's.
RELEASE_ASPECT = dict(zip(JUDGE_ASPECTS, ASPECTS))


def spread(k: int, generators: list[str]) -> dict[str, int]:
    """k responses over the pool, round-robin: response j comes from generator j mod len."""
    out = {g: 0 for g in generators}
    for j in range(k):
        out[generators[j % len(generators)]] += 1
    return {g: n for g, n in out.items() if n}


def _annotations(result: dict | None, error: str | None, aspects: list[str]) -> dict:
    notes = {}
    for aspect in aspects:
        score = (result or {}).get("scores", {}).get(aspect)
        if score and score["status"] == "ok" and score.get("rating") is not None:
            notes[RELEASE_ASPECT[aspect]] = {"Rating": repr(float(score["rating"])), "Rationale": score.get("rationale")}
        else:
            why = error or (f"judge {score['status']}: {score.get('rationale') or score.get('raw')}" if score
                            else "aspect not rated")
            notes[RELEASE_ASPECT[aspect]] = {"Rating": "N/A", "Rationale": why}
    return notes


def common_image_root(images: list[str]) -> str | None:
    """The deepest folder holding every image (VLFeedback rows name images relative to it)."""
    if not images:
        return None
    parts = [storage.parent(i).split("/") for i in images]
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return "/".join(common)


def feedback_rows(prompts: list[Prompt], cfg: FeedbackLoopConfig, app_name: str = "vlit") -> tuple[list[dict], dict]:
    """Released-format VLFeedback rows (image paths still absolute) and counts."""
    pool = spread(cfg.responses, cfg.generators)
    chat_reqs, owners = [], []
    for i, p in enumerate(prompts):
        for g, n in pool.items():
            req = {"model": g, "messages": [user_message(p.instruction, p.image)], "n": n,
                   "temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "seed": cfg.seed * 100003 + i}
            if cfg.send_reference and p.reference is not None:
                req["reference"] = p.reference
            chat_reqs.append(req)
            owners.append((i, g))
    responses: list[list[tuple[str, str]]] = [[] for _ in prompts]
    errors = []
    for (i, g), (result, error) in zip(owners, serve_calls(chat_reqs, method="chat", app_name=app_name)):
        if error:
            errors.append({"prompt_id": prompts[i].id, "generator": g, "error": error})
        responses[i] += [(g, t) for t in chat_texts(result)]
    judge_reqs, where = [], []
    for i, p in enumerate(prompts):
        for j, (_, text) in enumerate(responses[i]):
            req = {"instruction": p.instruction, "response": text, "aspects": list(cfg.aspects)}
            if cfg.judge:
                req["model"] = cfg.judge
            if p.image:
                req["image"] = p.image
            if cfg.send_reference and p.reference is not None:
                req["reference"] = p.reference
            judge_reqs.append(req)
            where.append((i, j))
    ratings = {w: r for w, r in zip(where, serve_calls(judge_reqs, method="judge", app_name=app_name))}
    rows = []
    for i, p in enumerate(prompts):
        completions = [{"model": g, "response": text, "annotations": _annotations(*ratings[(i, j)], cfg.aspects)}
                       for j, (g, text) in enumerate(responses[i])]
        rows.append({"id": p.id, "prompt": p.instruction, "img_path": p.image, "task": p.task,
                     "models": [c["model"] for c in completions], "completions": completions})
    return rows, {"generation_errors": errors, "responses": sum(len(r) for r in responses)}


def write_responses(rows: list[dict], out_root: str) -> tuple[str, str | None]:
    """The rows as released-format JSONL, image paths relative to their deepest common
    folder, at OUT_ROOT/responses/<sha>.jsonl; (that file, the image root)."""
    root = common_image_root([r["img_path"] for r in rows if r["img_path"]])
    rows = [{**r, "img_path": r["img_path"][len(root) + 1:] if r["img_path"] else None} for r in rows]
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    responses = storage.join(out_root, "responses", hashlib.sha256(data).hexdigest()[:20] + ".jsonl")
    storage.write_bytes(responses, data)
    return responses, root


def feedback_pairs(cfg: FeedbackLoopConfig, corpus_version: str, out_root: str, app_name: str = "vlit") -> dict:
    """The VLFeedback loop on `cfg.prompts` prompts of a corpus version; writes the
    responses JSONL under OUT_ROOT/responses/ and a pairs version under OUT_ROOT/pairs/.
    Returns the pairs version's summary plus `responses_file` and `generation_errors`."""
    prompts = corpus_prompts(corpus_version, cfg.prompts, cfg.seed)
    rows, counts = feedback_rows(prompts, cfg, app_name)
    responses, root = write_responses(rows, out_root)
    judge = cfg.judge or "default-judge"
    summary = pairs_version([responses], storage.join(out_root, "pairs"), image_root=root, judge=judge)
    return {**summary, "responses_file": responses, "generation_errors": counts["generation_errors"],
            "responses": counts["responses"]}
