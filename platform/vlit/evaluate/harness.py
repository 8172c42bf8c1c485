"""The evaluation a job runs after each stage: build (or reuse) the held-out sets, answer
them with the stage's model, score each suite, and log it all to the stage's MLflow run.

    sets = build_eval_sets(cfg)                                  # once per job
    base = run_eval(cfg, None, sets, stage="base")               # the model before stage 1
    m1 = run_eval(cfg, export_1, sets, stage="stage1", run_id=run_1, baseline=base)
    gate_and_promote(tracking_uri(cfg), m1, cfg.eval.gates, stage="stage1", ...)

Metric names are `<suite>.<metric>` (`mme.acc`, `pope.adversarial.f1`,
`circular.accuracy`, `forgetting.color.accuracy`, `tasks.accuracy` beside `tasks.chance`,
and with a baseline
`forgetting.min_delta`), the names gates use.
"""
from __future__ import annotations

import json
import sys
import time

from vlit.config import Config, require
from vlit.evaluate import scorers
from vlit.evaluate.sets import EvalSet, EvalSpec, build_eval_set

SCORERS = {
    "mme": scorers.mme_scores,
    "pope": scorers.pope_scores,
    "circular": scorers.circular_scores,
    "forgetting": scorers.accuracy_by_task,
    "tasks": scorers.accuracy_and_chance,
}


def eval_spec(cfg: Config) -> EvalSpec:
    """The held-out sets' recipe: the corpus's synthetic world (seed, image size) unless
    the eval section sets its own."""
    ev, synth = require(cfg, "eval", "evaluation", "at least eval.out"), cfg.corpus.synth if cfg.corpus else None
    seed = ev.seed if ev.seed is not None else (synth.seed if synth else 0)
    size = ev.image_size or (synth.image_size if synth else 64)
    return EvalSpec(seed=seed, first_image=ev.first_image, images=ev.images, image_size=size,
                    pope_objects=ev.pope_objects, intro=ev.intro, synth=synth.model_dump() if synth else None)


def build_eval_sets(cfg: Config) -> dict[str, EvalSet]:
    """One versioned set per configured suite under eval.out, reused when unchanged."""
    spec = eval_spec(cfg)
    return {suite: build_eval_set(suite, spec, cfg.eval.out) for suite in cfg.eval.suites}


def score_suite(suite: str, rows: list[dict]) -> dict[str, float]:
    return {f"{suite}.{k}": v for k, v in SCORERS[suite](rows).items()}


def forgetting_deltas(baseline: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """`forgetting.<task>.delta` and `forgetting.min_delta` from two runs' metrics."""
    def accuracies(m: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix("forgetting."): v for k, v in m.items()
                if k.startswith("forgetting.") and k.endswith("accuracy")}

    return {f"forgetting.{k}": v for k, v in scorers.forgetting(accuracies(baseline), accuracies(metrics)).items()}


def _predict(cfg: Config, model_uri: str | None, sets: dict[str, EvalSet]) -> dict[str, list[dict]]:
    from vlit.evaluate import predict

    ev = cfg.eval
    if ev.engine == "ray":
        from vlit.runtime import init_ray

        init_ray(cfg.ray, cfg.run.workdir)
        return {suite: predict.predict_ray(model_uri, cfg.model, es.read_table(), es.uri, ev.batch_size, ev.num_gpus)
                for suite, es in sets.items()}
    scorer = predict.ChoiceScorer.load(model_uri, cfg.model, ev.batch_size)
    return {suite: predict.predict_local(scorer, es.read_table(), es.uri) for suite, es in sets.items()}


def run_eval(cfg: Config, model_uri: str | None, eval_sets: dict[str, EvalSet] | None = None, *,
             stage: str = "eval", run_id: str | None = None, baseline: dict[str, float] | None = None,
             prefix: str = "") -> dict[str, float]:
    """Metrics of the model at `model_uri` (an HF export; None: the config's own model,
    e.g. the untrained base) on the held-out sets. With `baseline` (an earlier
    `run_eval` result), the forgetting suite's deltas too. With `run_id`, everything is
    logged to that MLflow run: metrics (names prefixed by `prefix`, for a second
    evaluation on one run), per-suite predictions and the metrics as artifacts under
    eval/<stage>/, and each set as a dataset input named by its digest."""
    started = time.monotonic()
    sets = eval_sets if eval_sets is not None else build_eval_sets(cfg)
    predictions = _predict(cfg, model_uri, sets)
    metrics: dict[str, float] = {}
    for suite, rows in predictions.items():
        metrics.update(score_suite(suite, rows))
    if baseline is not None and "forgetting" in sets:
        metrics.update(forgetting_deltas(baseline, metrics))
    seconds = time.monotonic() - started
    print(f"[vlit eval] {stage}: {sum(map(len, predictions.values()))} questions over {len(sets)} suites "
          f"in {seconds:.1f} s: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.count(".") == 1),
          file=sys.stderr, flush=True)  # stdout stays for results (`vlit eval run` prints JSON)
    if run_id:
        from vlit import lineage

        texts = {f"eval/{stage}/metrics.json": json.dumps(metrics, indent=2, sort_keys=True)}
        for suite, rows in predictions.items():
            texts[f"eval/{stage}/predictions-{suite}.jsonl"] = "".join(
                json.dumps({k: r[k] for k in ("key", "task", "answer", "prediction")}) + "\n" for r in rows)
        tags = {f"vlit.eval.{suite}.digest": es.digest for suite, es in sets.items()}
        tags[f"vlit.eval.{stage}.model"] = model_uri or "config:model"
        lineage.log_eval({"uri": lineage.tracking_uri(cfg), "run_id": run_id},
                          {f"{prefix}{k}": v for k, v in metrics.items()}, texts=texts, tags=tags,
                          datasets=[{"name": f"vlit-eval-{suite}", "digest": es.digest, "source": es.uri}
                                    for suite, es in sets.items()])
    return metrics
