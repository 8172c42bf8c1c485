"""One synthetic loop from a config, as `vlit loops LOOP CONFIG ...` runs it: Ray joined
or started (`ray` section), the `serve` section's application started for the loop and
shut down after it (or, with `attach`, an application already running on the cluster
under that name), the loop's dataset version written under `loops.out/<loop>/`.

    feedback      VLFeedback: k responses per corpus prompt, judged, paired
    vigc          VIG question + answer per corpus image, VIC correction
    self-instruct dialogues from image annotations (JSONL, or a synthetic corpus's ground truth)
    alignment     the stage-2 set: judge-scored, task-balanced, from generated versions
    qc            quality control of a generated version (Serve only with `quality.judge`)
"""
from __future__ import annotations

import json
from contextlib import contextmanager

from vlit import storage
from vlit.config import Config, ConfigError

LOOPS = ("feedback", "vigc", "self-instruct", "alignment", "qc")
ANNOTATION_KEYS = ("id", "image")


def read_annotations(uri: str, limit: int) -> tuple[list[dict], list[dict]]:
    """Image annotations, one JSON object per line: {id, image, captions, objects: [{name,
    count, attributes}], ocr: [{text, where}], qa: [{question, answer}]}; the first `limit`
    good ones, and quarantine rows (reason, detail, `uri:line`, raw line) for the lines
    before them that are not JSON objects with an id and an image."""
    from vlit.versions import quarantine_row

    good, bad = [], []
    for n, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ann = json.loads(line)
        except ValueError as e:
            bad.append(quarantine_row("not_json", str(e), f"{uri}:{n}", line))
            continue
        missing = [k for k in ANNOTATION_KEYS if not isinstance(ann, dict) or not ann.get(k)]
        if missing:
            bad.append(quarantine_row("not_annotation", f"an annotation needs {missing}", f"{uri}:{n}", line))
            continue
        good.append(ann)
        if len(good) == limit:
            break
    return good, bad


@contextmanager
def serving(cfg: Config, needed: bool, attach: bool):
    """The `serve` section's app for the duration of a loop."""
    from ray import serve

    from vlit.serve.app import start

    if not needed or attach:
        yield
        return
    start(cfg.serve)
    try:
        yield
    finally:
        serve.delete(cfg.serve.app_name)  # this app only: a shared cluster may serve others


def run_loop(cfg: Config, loop: str, *, corpus: str | None = None, sources: list[str] | None = None,
             annotations: str | None = None, synth_corpus: str | None = None, synth_seed: int = 0,
             attach: bool = False) -> dict:
    from vlit.runtime import init_ray

    loops, app = cfg.loops, cfg.serve.app_name
    holdout = cfg.eval.holdout if cfg.eval else None  # rows evaluation scores: never a prompt
    out = storage.join(loops.out, loop)

    def need(value, flag: str):
        if not value:
            raise ConfigError(f"vlit loops {loop}: {flag} is required")
        return value

    if loop not in LOOPS:
        raise ConfigError(f"vlit loops: unknown loop {loop!r}; one of {list(LOOPS)}")
    if loop in ("feedback", "vigc"):
        need(corpus, "--corpus")
    if loop in ("alignment", "qc"):
        need(sources, "--source")
        if loop == "qc" and len(sources) != 1:
            raise ConfigError("vlit loops qc: one --source version at a time")
    if loop == "self-instruct":
        if bool(annotations) == bool(synth_corpus):
            raise ConfigError("vlit loops self-instruct: give --annotations or --synth-corpus (one of them)")
    init_ray(cfg.ray, cfg.run.workdir)
    with serving(cfg, needed=loop != "qc" or loops.quality.judge is not None, attach=attach):
        if loop == "feedback":
            from vlit.loops.feedback_loop import feedback_pairs
            return feedback_pairs(loops.feedback, corpus, out, app_name=app, holdout=holdout)
        if loop == "vigc":
            from vlit.loops.vigc import vigc_dataset
            return vigc_dataset(loops.vigc, corpus, out, app_name=app, holdout=holdout)
        if loop == "self-instruct":
            from vlit.loops.self_instruct import self_instruct, synth_annotations
            n = loops.self_instruct.images
            anns, rejected = (read_annotations(annotations, n) if annotations
                              else (synth_annotations(storage.normalize(synth_corpus), synth_seed, n), []))
            return self_instruct(anns, loops.self_instruct, out, app_name=app, rejected=rejected)
        if loop == "alignment":
            from vlit.loops.alignment import build_alignment_set
            return build_alignment_set(loops.alignment, sources, out, app_name=app)
        from vlit.quality.qc import run_qc
        return run_qc(loops.quality, sources[0], out, app_name=app)
