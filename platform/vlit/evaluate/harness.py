"""The evaluation a job runs after each stage: build (or reuse) the held-out sets, answer
them with the stage's model, score each suite, and log it all to the stage's MLflow run.

    sets = build_eval_sets(cfg)                                  # once per job
    base = run_eval(cfg, None, sets, stage="base")               # the model before stage 1
    m1 = run_eval(cfg, export_1, sets, stage="stage1", run_id=run_1, baseline=base)
    gate_and_promote(tracking_uri(cfg), m1, cfg.eval.gates, stage="stage1", ...)

Metric names are `<set>.<metric>`, the names gates use. Released benchmarks
(`eval.benchmarks`, released.py): `mme.perception`, `mme.OCR.score`,
`pope.adversarial.f1`, `mmbench.accuracy`. Held-out corpus rows (`eval.holdout`,
holdout.py): `holdout.<task>.accuracy`, `holdout.accuracy`. Synthetic suites (`eval.suites`, sets.py),
named as such: `synthetic.mme.acc`, `synthetic.circular.accuracy`,
`synthetic.forgetting.color.accuracy`, `synthetic.tasks.accuracy` beside
`synthetic.tasks.chance`, and with a baseline `synthetic.forgetting.min_delta`.

Each set's predictions are published as a versioned table (OUT/predictions/<digest>/,
`versions.publish_rows`), so `score_predictions` re-scores a run after a scorer change
without running the model again.
"""
from __future__ import annotations

import json
import sys
import time

import pyarrow as pa

from vlit import storage, versions
from vlit.config import Config, require
from vlit.evaluate import llava_bench, reference, scorers
from vlit.evaluate.holdout import build_holdout_set, holdout_scores
from vlit.evaluate.released import build_benchmark_set
from vlit.evaluate.sets import EvalSet, EvalSpec, build_eval_set

SYNTHETIC = "synthetic."
FORGETTING = SYNTHETIC + "forgetting."
SCORERS = {
    SYNTHETIC + "mme": scorers.mme_scores,
    SYNTHETIC + "pope": scorers.pope_scores,
    SYNTHETIC + "circular": scorers.circular_scores,
    SYNTHETIC + "forgetting": scorers.accuracy_by_task,
    SYNTHETIC + "tasks": scorers.accuracy_and_chance,
    "mme": reference.mme_release_scores,
    "pope": reference.pope_release_scores,
    "mmbench": reference.mmbench_scores,
    "holdout": holdout_scores,
    "llava_bench": llava_bench.llava_bench_scores,
}
# A prediction table's row: what every scorer reads, and which set and model it came from.
PREDICTION_SCHEMA = pa.schema([
    pa.field("set", pa.string(), nullable=False),  # synthetic.mme, mmbench, ...
    pa.field("set_digest", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("group", pa.string(), nullable=False),
    pa.field("labels", pa.list_(pa.string()), nullable=False),
    pa.field("options", pa.list_(pa.string())),  # released multiple choice: each label's text
    pa.field("answer", pa.string(), nullable=False),
    pa.field("prediction", pa.string(), nullable=False),
])


def eval_spec(cfg: Config) -> EvalSpec:
    """The held-out sets' recipe: the corpus's synthetic world (seed, image size) unless
    the eval section sets its own."""
    ev, synth = require(cfg, "eval", "evaluation", "at least eval.out"), cfg.corpus.synth if cfg.corpus else None
    seed = ev.seed if ev.seed is not None else (synth.seed if synth else 0)
    size = ev.image_size or (synth.image_size if synth else 64)
    return EvalSpec(seed=seed, first_image=ev.first_image, images=ev.images, image_size=size,
                    pope_objects=ev.pope_objects, intro=ev.intro, synth=synth.model_dump() if synth else None)


def build_eval_sets(cfg: Config, corpus: str | None = None) -> dict[str, EvalSet]:
    """One versioned set per synthetic suite, released benchmark and the corpus's held-out
    rows (of `corpus`, a prepared version's URI; default corpus.version) under eval.out,
    by its metrics' prefix (synthetic.mme, mme, holdout); each reused when unchanged."""
    ev = require(cfg, "eval", "evaluation", "at least eval.out")
    sets = {SYNTHETIC + suite: build_eval_set(suite, eval_spec(cfg), ev.out) for suite in ev.suites}
    sets.update({name: build_benchmark_set(name, bench, ev.out) for name, bench in ev.benchmarks.items()})
    if ev.holdout is not None:
        sets["holdout"] = build_holdout_set(corpus or (cfg.corpus.version if cfg.corpus else None), ev.holdout, ev.out)
    return sets


def score_suite(name: str, rows: list[dict]) -> dict[str, float]:
    return {f"{name}.{k}": v for k, v in SCORERS[name](rows).items()}


def publish_predictions(out: str, name: str, eval_set: EvalSet, model: str, rows: list[dict]) -> str:
    """The set's predictions as a versioned table under OUT/predictions/; its URI."""
    table = [{"set": name, "set_digest": eval_set.digest, "model": model, "options": r.get("options"),
              **{k: r[k] for k in ("key", "task", "group", "labels", "answer", "prediction")}} for r in rows]
    return versions.publish_rows(storage.join(out, "predictions"), "eval-predictions", table, [],
                                 {"set": name, "set_digest": eval_set.digest, "model": model},
                                 PREDICTION_SCHEMA)["version"]


# LLaVA-Bench's rows: the generated answer and the reviewer's reply, which its scorer parses.
LLAVA_BENCH_SCHEMA = pa.schema([
    *(pa.field(name, pa.string(), nullable=False) for name in ("set", "set_digest", "model", "key", "category",
                                                               "question", "answer")),
    pa.field("review", pa.string()),  # null: the reviewer's call failed
])


def publish_llava_bench(out: str, digest: str, model: str, rows: list[dict]) -> str:
    table = [{"set": "llava_bench", "set_digest": digest, "model": model, **r} for r in rows]
    return versions.publish_rows(storage.join(out, "predictions"), "eval-predictions", table, [],
                                 {"set": "llava_bench", "set_digest": digest, "model": model},
                                 LLAVA_BENCH_SCHEMA)["version"]


def score_predictions(uri: str) -> dict[str, float]:
    """The metrics of a published prediction table, scored again by today's scorers."""
    rows = versions.DatasetVersion.open(uri).read_rows()
    names = sorted({r["set"] for r in rows})
    return {k: v for name in names for k, v in score_suite(name, [r for r in rows if r["set"] == name]).items()}


def forgetting_deltas(baseline: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """`synthetic.forgetting.<task>.delta` and `.min_delta` from two runs' metrics."""
    def accuracies(m: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix(FORGETTING): v for k, v in m.items()
                if k.startswith(FORGETTING) and k.endswith("accuracy")}

    return {f"{FORGETTING}{k}": v for k, v in scorers.forgetting(accuracies(baseline), accuracies(metrics)).items()}


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
    published = {}
    for name, rows in predictions.items():
        published[name] = publish_predictions(cfg.eval.out, name, sets[name], model_uri or "config:model", rows)
        metrics.update(score_suite(name, rows))
    bench_digest = None
    if cfg.eval.llava_bench is not None:
        rows, bench_digest = llava_bench.run_llava_bench(cfg, model_uri)
        predictions["llava_bench"] = rows
        published["llava_bench"] = publish_llava_bench(cfg.eval.out, bench_digest, model_uri or "config:model", rows)
        metrics.update(score_suite("llava_bench", rows))
    if baseline is not None and FORGETTING.rstrip(".") in sets:
        metrics.update(forgetting_deltas(baseline, metrics))
    seconds = time.monotonic() - started
    headline = (f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.removeprefix(SYNTHETIC).count(".") == 1)
    # stdout stays for results (`vlit eval run` prints JSON)
    print(f"[vlit eval] {stage}: {sum(map(len, predictions.values()))} questions over {len(sets)} suites "
          f"in {seconds:.1f} s: " + ", ".join(headline), file=sys.stderr, flush=True)
    if run_id:
        from vlit import lineage

        texts = {f"eval/{stage}/metrics.json": json.dumps(metrics, indent=2, sort_keys=True)}
        for suite, rows in predictions.items():
            fields = ("key", "category", "answer", "review") if suite == "llava_bench" else \
                ("key", "task", "answer", "prediction")
            texts[f"eval/{stage}/predictions-{suite}.jsonl"] = "".join(
                json.dumps({k: r[k] for k in fields}) + "\n" for r in rows)
        tags = {f"vlit.eval.{suite}.digest": es.digest for suite, es in sets.items()}
        if bench_digest:
            tags["vlit.eval.llava_bench.digest"] = bench_digest
        tags.update({f"vlit.eval.{stage}.{name}.predictions": uri for name, uri in published.items()})
        tags[f"vlit.eval.{stage}.model"] = model_uri or "config:model"
        lineage.log_eval({"uri": lineage.tracking_uri(cfg), "run_id": run_id},
                          {f"{prefix}{k}": v for k, v in metrics.items()}, texts=texts, tags=tags,
                          datasets=[{"name": f"vlit-eval-{suite}", "digest": es.digest, "source": es.uri}
                                    for suite, es in sets.items()])
    return metrics
