"""VLFeedback through Serve: prompts -> k responses from the generator pool -> the judge's
three-aspect ratings -> preference pairs.

The responses and ratings are written as released-format VLFeedback JSONL, one row per
prompt, ratings as text: a responses version (`vlit.versions.ResponsesVersion`,
ROOT/<digest>/responses.jsonl, its image root and the generators and judge in its
manifest). The pairs version is built from it by `vlit.loops.feedback.build_pairs`: the
same pair rule, ties, exclusions, quarantine and digest as for the released data. An aspect the judge did not
rate (status `unparseable` or `unrated`, or a failed call) is written as "N/A" with the
reason as its rationale, so the pair rule excludes that response, visibly.
"""
from __future__ import annotations

import hashlib
import json

from vlit import storage, versions
from vlit.config import ASPECT_NAMES, FeedbackLoopConfig
from vlit.loops.dataset import Prompt, corpus_prompts
from vlit.loops.feedback import build_pairs
from vlit.serve.client import chat_texts, serve_calls, user_message
from vlit.versions import ResponsesVersion


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
            notes[ASPECT_NAMES[aspect]] = {"Rating": repr(float(score["rating"])), "Rationale": score.get("rationale")}
        else:
            why = error or (f"judge {score['status']}: {score.get('rationale') or score.get('raw')}" if score
                            else "aspect not rated")
            notes[ASPECT_NAMES[aspect]] = {"Rating": "N/A", "Rationale": why}
    return notes


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


def write_responses(rows: list[dict], root: str, cfg: FeedbackLoopConfig, corpus: str | None = None) -> ResponsesVersion:
    """The rows as released-format JSONL, image paths relative to their deepest common
    folder: the responses version ROOT/<digest>/ (digest: of the JSONL's bytes), whose
    manifest names that image root, the generators and judge that made it, and the corpus
    version the prompts came from (its `sources`, which lineage follows)."""
    image_root = storage.common_parent([r["img_path"] for r in rows if r["img_path"]])
    rows = [{**r, "img_path": r["img_path"][len(image_root) + 1:] if r["img_path"] else None} for r in rows]
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    digest = hashlib.sha256(data).hexdigest()[:20]
    with versions.staging(root) as stage:
        storage.write_bytes(stage.file(ResponsesVersion.TABLE), data)
        return stage.publish(digest, "feedback-responses", {
            "digest": digest, "rows": len(rows), "responses": sum(len(r["completions"]) for r in rows),
            "image_root": image_root, "generators": list(cfg.generators), "judge": cfg.judge or "default-judge",
            "aspects": list(cfg.aspects), "sources": [corpus] if corpus else []}, ResponsesVersion)


def pairs_from_responses(responses: ResponsesVersion, root: str) -> dict:
    """The pairs version (ROOT/<digest>/) of a responses version by the VLFeedback rule over
    the aspects its judge rated; the manifest names the responses version, its judge and
    generators. Returns build_pairs' summary."""
    m = responses.manifest
    return build_pairs([responses.file(ResponsesVersion.TABLE)], root, image_root=m["image_root"],
                       judge=m["judge"], aspects=tuple(ASPECT_NAMES[a] for a in m["aspects"]),
                       provenance={"responses": responses.uri, "generators": m["generators"]})


def feedback_pairs(cfg: FeedbackLoopConfig, corpus_version: str, out_root: str, app_name: str = "vlit",
                   holdout=None) -> dict:
    """The VLFeedback loop on `cfg.prompts` prompts of a corpus version (none of `holdout`'s
    rows, which evaluation scores): a responses version
    under OUT_ROOT/responses/ and its pairs version under OUT_ROOT/pairs/. Returns the pairs
    version's summary plus `responses` (their count), `responses_file` (the JSONL in the
    responses version `responses_version`) and `generation_errors`."""
    prompts = corpus_prompts(corpus_version, cfg.prompts, cfg.seed, holdout=holdout)
    rows, counts = feedback_rows(prompts, cfg, app_name)
    responses = write_responses(rows, storage.join(out_root, "responses"), cfg, corpus_version)
    summary = pairs_from_responses(responses, storage.join(out_root, "pairs"))
    return {**summary, "responses_file": responses.file(ResponsesVersion.TABLE), "responses_version": responses.uri,
            "generation_errors": counts["generation_errors"], "responses": counts["responses"]}
