"""The two-stage job (Vision-Flan's recipe, with VLFeedback DPO as an option):

    corpus -> [base eval] -> sft1 -> align -> sft2 -> [dpo] -> comparison table

- corpus: synthesize (when configured) and prepare the corpus version.
- sft1: SFT on the corpus (stage 1), exported; registered as model <name>-sft1.
- align: Serve starts the configured generator pool and judge; k responses per corpus
  prompt are rated; each prompt's best response, task-balanced, makes the alignment set
  (a versioned dataset with its quality report), prepared as the stage-2 corpus.
- sft2: SFT from sft1's export on the alignment set (stage 2).
- dpo: DPO from the last export on preference pairs made by VLFeedback's rule from the
  align stage's judged responses (or, when the `dpo` section names them, its own pairs).
- evaluation (with an `eval` section): the base model once, and every trained stage's
  export, on the held-out sets; the stage's gates decide whether its model version gets
  the `eval.alias` alias, and a failing gate stops the job with the reason.

Every stage is keyed (`vlit.ledger`): a re-run skips what finished and says so; a run
killed mid-stage finds that stage's folder again and Ray Train resumes it from its last
checkpoint. MLflow gets a parent run per invocation and a nested run per stage run
(`vlit.lineage`). The job records its summary and writes its run report beside its
outputs (`vlit.run_report`); its output ends with its tables and where the report is.
"""
from __future__ import annotations

import json
import time

from vlit import lineage, storage
from vlit.config import Config, ConfigError, require, stage_config
from vlit.ledger import Ledger, stage_key
from vlit.lineage import tracking_uri
from vlit.pipeline import corpus_stage, pairs_stage, prepare_stage, say
from vlit.run_report import write_job_report
from vlit.versions import CorpusVersion, PairsVersion

# synthetic.tasks.accuracy is held-out accuracy on the synthetic corpus's own tasks,
# synthetic.tasks.chance that of guessing among each question's choices: the pair says
# whether stage 1 learned. The released benchmarks' headline metrics follow; a column
# shows when some stage measured it.
TABLE_METRICS = ("synthetic.tasks.accuracy", "synthetic.tasks.chance", "synthetic.mme.acc",
                 "synthetic.pope.adversarial.f1", "synthetic.circular.accuracy", "synthetic.forgetting.accuracy",
                 "mme.perception", "mme.cognition", "pope.adversarial.f1", "mmbench.accuracy",
                 "llava_bench.all.relative", "holdout.accuracy")
TASKS = "synthetic.tasks."


def _dump(section) -> dict | None:
    return None if section is None else section.model_dump(mode="json")


class TwoStageJob:
    def __init__(self, cfg: Config):
        require(cfg, "pipeline", "the two-stage job", "at least pipeline.out")
        require(cfg, "train", "the two-stage job", "the SFT stages' settings")
        self.cfg = cfg
        self.ledger = Ledger(cfg.pipeline.out)
        self.model_name = cfg.pipeline.model_name or cfg.run.name
        self.parent: dict | None = None
        self.done: dict[str, dict] = {}  # stage -> its outputs, in the job's order
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.eval_sets = None

    # ---- the ledger around every stage

    def nth(self, stage: str) -> str:
        """'stage N/M, ' of the job's keyed steps (corpus, evaluations, training stages)."""
        evals = self.cfg.eval is not None
        plan = ["corpus", *(["eval_base"] if evals else [])]
        for s in self.cfg.pipeline.stages:
            plan += [s, *([f"eval_{s}"] if evals and s != "align" else [])]
        return f"stage {plan.index(stage) + 1}/{len(plan)}, " if stage in plan else ""

    def keyed(self, stage: str, inputs: dict[str, str], settings: dict, body) -> dict:
        key = stage_key(stage, inputs, settings)
        record = self.ledger.get(stage, key)
        if record is not None:
            say(stage, f"skipped: finished {record['finished_at']} ({self.nth(stage)}key {key}); outputs reused")
            self.skipped.append(stage)
            lineage.set_tags(self.parent, {f"vlit.skipped.{stage}": key})
            return {**record["outputs"], "key": key, "skipped": True}
        say(stage, f"running ({self.nth(stage)}key {key}) -> {self.ledger.stage_dir(stage, key)}")
        started = time.monotonic()
        outputs = body(key, self.ledger.stage_dir(stage, key))
        outputs["seconds"] = round(time.monotonic() - started, 1)
        self.ledger.put(stage, key, inputs, outputs)
        self.ran.append(stage)
        lineage.set_tags(self.parent, {f"vlit.ran.{stage}": key})
        return {**outputs, "key": key, "skipped": False}

    # ---- stages

    def corpus(self) -> dict:
        cfg = self.cfg
        settings = {"synth": _dump(cfg.corpus.synth), "prepare": _dump(cfg.corpus.prepare), "out": cfg.corpus.out}

        def body(key, _):
            version = corpus_stage(cfg)
            run = lineage.start_stage(cfg, self.parent, "corpus", key, [])
            lineage.set_tags(run, {"vlit.out.corpus.digest": version.digest, "vlit.out.corpus.version": version.uri,
                                   "vlit.out.corpus.rows": version.rows})
            lineage.finish(run)
            return {"version": version.uri, "digest": version.digest, "rows": version.rows,
                    "tasks": len(version.task_counts), "mlflow_run_id": run["run_id"]}

        return self.keyed("corpus", {}, settings, body)

    def evaluate(self, stage: str, model: dict | None) -> dict | None:
        """Held-out metrics of `model` (a training stage's outputs; None: the base model),
        logged on that stage's run (the base gets its own)."""
        from vlit.evaluate.harness import build_eval_sets, run_eval

        cfg = self.cfg if model is None else model["cfg"]
        if cfg.eval is None:
            return None
        if self.eval_sets is None:
            self.eval_sets = build_eval_sets(self.cfg, self.done.get("corpus", {}).get("version"))
        sets = self.eval_sets
        inputs = {f"eval.{s}": es.digest for s, es in sets.items()}
        inputs["model"] = model["key"] if model else stage_key("base", {}, {"model": _dump(cfg.model)})
        settings = {"engine": cfg.eval.engine, "batch_size": cfg.eval.batch_size,
                    **({"llava_bench": _dump(cfg.eval.llava_bench)} if cfg.eval.llava_bench else {})}
        baseline = self.done.get("base", {}).get("metrics")

        def body(key, _):
            if model is None:
                run = lineage.start_stage(cfg, self.parent, "eval-base", key, [], context="eval")
                run_id = run["run_id"]
            else:
                run_id = model["mlflow_run_id"]
            metrics = run_eval(cfg, model["export"] if model else None, sets, stage=stage, run_id=run_id,
                               baseline=baseline)
            if model is None:
                lineage.finish(run)
            return {"metrics": metrics, "mlflow_run_id": run_id}

        return self.keyed(f"eval_{stage}", inputs, settings, body)

    def gate(self, stage: str, model: dict, evaluation: dict | None) -> None:
        """Promote the stage's model version when its metrics pass its gates; a failing
        gate raises `GateFailed` with the reasons (recorded on the stage's run)."""
        from vlit.evaluate.gates import gate_and_promote

        ev = model["cfg"].eval
        if ev is None or evaluation is None:
            return
        results = gate_and_promote(tracking_uri(self.cfg), evaluation["metrics"], ev.gates,
                                   stage=stage, model_name=model["model_name"], version=model["model_version"],
                                   alias=ev.alias, run_id=model["mlflow_run_id"])
        verdict = f"{len(results)} gates passed" if results else "no gates"
        say(stage, f"{verdict}: {model['model_name']} version {model['model_version']} is @{ev.alias}")

    def train(self, stage: str, data: dict, init: dict | None) -> dict:
        """A training stage (sft1, sft2, dpo) on `data` (a corpus or pairs version's
        outputs), starting from `init`'s export (None: the config's model)."""
        base = stage_config(self.cfg, stage, {"train.init_from": init["export"]} if init else None)
        train = base.train.model_dump(mode="json", exclude={"output"})
        settings = {"model": _dump(base.model), "loss": _dump(base.loss), "train": train, "dpo": None,
                    "tasks": _dump(base.corpus.tasks), "stream": _dump(base.corpus.stream)}
        if stage == "dpo":
            settings["dpo"] = base.dpo.model_dump(mode="json", exclude={"pairs", "cache", "pairs_out"})
        inputs = {"data": data["digest"], "init": init["key"] if init else "config"}
        name = f"{self.model_name}-{stage}"

        def at(out: str) -> Config:  # the stage's config with its outputs in `out`
            return stage_config(base, stage, {"train.output": out})

        def body(key, out):
            from vlit.train.dpo import run_dpo
            from vlit.train.sft import run_sft

            cfg = at(out)
            if stage == "dpo":
                result = run_dpo(cfg, PairsVersion.open(data["version"]), parent_run_id=self.parent["run_id"])
            else:
                result = run_sft(cfg, CorpusVersion.open(data["version"]), parent_run_id=self.parent["run_id"])
            tags = {"vlit.run_id": result["mlflow_run_id"], "vlit.stage": stage, "vlit.stage.key": key,
                    "vlit.checkpoint": result["checkpoint"], "vlit.input.digest": data["digest"],
                    "vlit.input.version": data["version"], "vlit.init": init["export"] if init else "config"}
            version = lineage.register_model(tracking_uri(cfg), name, result["export"],
                                             result["mlflow_run_id"], tags)
            rewards = "".join(f", {k.replace('_', ' ')} {result[k]:.3f}" for k in ("reward_accuracy", "reward_margin")
                              if result.get(k) is not None)
            say(stage, f"{result['steps']} steps, loss {result['loss']:.4f}{rewards}; registered {name} version {version}")
            return {"export": result["export"], "checkpoint": result["checkpoint"], "steps": result["steps"],
                    **{k: result[k] for k in ("reward_accuracy", "reward_margin") if k in result},
                    "loss": result["loss"], "mlflow_run_id": result["mlflow_run_id"], "model_name": name,
                    "model_version": version, "data": data["version"], "data_digest": data["digest"],
                    "rows": data.get("rows")}

        outputs = self.keyed(stage, inputs, settings, body)
        outputs["cfg"] = at(self.ledger.stage_dir(stage, outputs["key"]))
        return outputs

    def align(self, corpus: dict) -> dict:
        cfg = stage_config(self.cfg, "align")
        loops = require(cfg, "loops", "the align stage", "loops.feedback, loops.alignment")
        require(cfg, "serve", "the align stage", "the generator pool and judge it calls")
        settings = {"feedback": _dump(loops.feedback), "alignment": _dump(loops.alignment),
                    "quality": _dump(loops.quality),
                    "serve": {"generators": {k: v.backend.model_dump(mode="json") for k, v in cfg.serve.generators.items()},
                              "judges": {k: v.model_dump(mode="json", include={"backend", "mode"})
                                         for k, v in cfg.serve.judges.items()}},
                    "prepare": _dump(cfg.corpus.prepare.model_copy(update={"sources": []}))}

        def body(key, out):
            run = lineage.start_stage(cfg, self.parent, "align", key,
                                      [("corpus", corpus["digest"], corpus["version"])])
            made = build_alignment(cfg, corpus, out)
            stage2 = stage_config(cfg, "align", {"corpus.prepare.format": "vision-flan",
                                                 "corpus.prepare.image_root": made["image_root"]})
            version2 = prepare_stage(stage2, [storage.join(made["version"], "annotation.json")])
            lineage.set_tags(run, {"vlit.out.alignment.digest": made["digest"], "vlit.out.alignment.version": made["version"],
                                   "vlit.out.corpus.digest": version2.digest, "vlit.out.corpus.version": version2.uri,
                                   "vlit.out.responses": made["responses"]})
            lineage.log_files(run, storage.join(made["version"], "quality"), "quality")
            lineage.log_text(run, json.dumps({k: made[k] for k in ("rows", "candidates", "tasks", "models",
                                                                   "quarantined", "quarantine_reasons")}, indent=2),
                             "alignment.json")
            lineage.finish(run)
            return {"alignment": made["version"], "alignment_digest": made["digest"], "rows": version2.rows,
                    "responses": made["responses"],
                    "version": version2.uri, "digest": version2.digest, "models": made["models"],
                    "quality": made["quality"], "mlflow_run_id": run["run_id"]}

        return self.keyed("align", {"corpus": corpus["digest"]}, settings, body)

    def pairs(self) -> dict:
        cfg, align = stage_config(self.cfg, "dpo"), self.done.get("align")
        responses = align.get("responses") if align else None
        if align and not responses and cfg.dpo.from_responses:
            raise ConfigError(f"the align stage's record {self.ledger.stage_dir('align', align['key'])} predates "
                              "kept responses versions: remove its ledger entry to run align again for DPO's pairs")
        pairs = pairs_stage(cfg, responses)
        return {"version": pairs.uri, "digest": pairs.digest, "rows": pairs.rows}

    # ---- the job

    def run(self) -> dict:
        cfg, stages = self.cfg, self.cfg.pipeline.stages
        job_key = stage_key("pipeline", {}, cfg.model_dump(mode="json", exclude={"ray", "storage"}))
        preflight(cfg)
        self.parent = lineage.start_pipeline(cfg, job_key)
        started = time.monotonic()
        status = "FAILED"
        try:
            corpus = self.done["corpus"] = self.corpus()
            if cfg.eval is not None:
                self.done["base"] = self.evaluate("base", None)
            last = None
            for stage in stages:
                if stage == "align":
                    self.done["align"] = self.align(corpus)
                    continue
                data = {"sft1": corpus, "sft2": self.done.get("align"), "dpo": None}[stage]
                if stage == "dpo":
                    data = self.pairs()
                model = self.train(stage, data, last)
                evaluation = self.evaluate(stage, model)
                model["metrics"] = evaluation["metrics"] if evaluation else {}
                self.done[stage] = model
                self.gate(stage, model, evaluation)
                last = model
            status = "FINISHED"
        finally:
            lineage.set_tags(self.parent, {"vlit.stages.ran": ",".join(self.ran) or "-",
                                           "vlit.stages.skipped": ",".join(self.skipped) or "-"})
            lineage.finish(self.parent, status)
        table = self.table()
        lineage.log_text(self.parent, table, "summary.txt")
        summary = {"pipeline_run_id": self.parent["run_id"], "ran": self.ran, "skipped": self.skipped,
                   "stages": {s: {k: v for k, v in o.items() if k != "cfg"} for s, o in self.done.items()},
                   "seconds": round(time.monotonic() - started), "table": table, "job_key": job_key,
                   "tracking_uri": tracking_uri(cfg), "mlflow_ui": mlflow_ui_command(cfg)}
        summary["report"] = write_job_report(cfg.pipeline.out, summary)
        return summary

    def table(self) -> str:
        """stage -> data version, rows, loss, key accuracies; then, when the tasks suite
        ran, held-out accuracy per question family across the evaluated stages."""
        from vlit.evaluate.report import text_table

        measured = [m for m in TABLE_METRICS if any(m in (o.get("metrics") or {}) for o in self.done.values())]
        dpo = "reward_accuracy" in self.done.get("dpo", {})
        header = ["stage", "data", "rows", "loss", *(["reward acc"] if dpo else []), *measured]
        rows = []
        for stage, out in self.done.items():
            metrics = out.get("metrics") or {}
            digest = out.get("data_digest") or out.get("digest") or ""
            loss = out.get("loss")
            rows.append([stage, digest[:12] or "-", str(out.get("rows") or "-"),
                         "-" if loss is None else f"{loss:.4f}",
                         *(["-" if out.get("reward_accuracy") is None else f"{out['reward_accuracy']:.3f}"] if dpo else []),
                         *("-" if metrics.get(m) is None else f"{metrics[m]:.3f}" for m in measured)])
        table = text_table(header, rows)
        evaluated = {stage: out["metrics"] for stage, out in self.done.items() if out.get("metrics")}
        families = sorted({m.split(".")[2] for ms in evaluated.values() for m in ms
                           if m.startswith(TASKS) and m.endswith(".chance") and m.count(".") == 3})
        if not families:
            return table
        family_rows = [[family, f"{max(ms.get(f'{TASKS}{family}.chance', 0.0) for ms in evaluated.values()):.3f}",
                        *("-" if ms.get(f"{TASKS}{family}.accuracy") is None else f"{ms[f'{TASKS}{family}.accuracy']:.3f}"
                          for ms in evaluated.values())] for family in families]
        return table + "\n" + text_table(["held-out task", "guessing", *evaluated], family_rows)


def preflight(cfg: Config) -> None:
    """The tracking server and every s3:// store in the config answer, or the job stops
    here naming the one that does not (`storage.Unreachable`): a stage that trained for
    an hour and then cannot register, or a half-written ledger, helps no one."""
    def s3_uris(value) -> list[str]:
        if isinstance(value, dict):
            return [u for v in value.values() for u in s3_uris(v)]
        if isinstance(value, list):
            return [u for v in value for u in s3_uris(v)]
        return [value] if isinstance(value, str) and storage.is_s3(value) else []

    lineage.check_reachable(tracking_uri(cfg))
    storage.check_reachable(s3_uris(cfg.model_dump(mode="json")))


def build_alignment(cfg: Config, corpus: dict, out: str) -> dict:
    """Serve up, judged responses for corpus prompts, the alignment set and its quality
    report, Serve down (its replicas' CPUs go back to training)."""
    from ray import serve

    from vlit.loops.alignment import alignment_from_feedback
    from vlit.loops.dataset import corpus_prompts
    from vlit.loops.feedback_loop import feedback_rows, write_responses
    from vlit.quality.report import quality_report
    from vlit.runtime import init_ray
    from vlit.serve.app import start

    loops = cfg.loops
    init_ray(cfg.ray, cfg.run.workdir)
    start(cfg.serve)
    try:
        prompts = corpus_prompts(corpus["version"], loops.feedback.prompts, loops.feedback.seed,
                                 holdout=cfg.eval.holdout if cfg.eval else None)
        rows, counts = feedback_rows(prompts, loops.feedback, cfg.serve.app_name)
    finally:
        serve.shutdown()
    responses = write_responses(rows, storage.join(out, "feedback"), loops.feedback, corpus["version"])
    made = alignment_from_feedback(rows, loops.alignment, storage.join(out, "alignment"),
                                   {"corpus": corpus["version"], "responses": responses.uri})
    quality = quality_report(made["release"], storage.join(made["version"], "quality"), {"judge score": made["scores"]})
    say("align", f"{counts['responses']} responses to {len(prompts)} prompts "
                  f"({len(counts['generation_errors'])} generation errors); alignment set {made['digest']}: "
                  f"{made['rows']} rows over {made['tasks']} tasks, chosen from {made['models']}; "
                  f"{made['quarantined']} prompts quarantined {made['quarantine_reasons']}")
    return {**made, "responses": responses.uri, "quality": {k: quality[k] for k in ("rows", "balance_variance")}}


def closing(summary: dict) -> str:
    """The job's last lines (after its JSON summary): the tables, the report, the runs."""
    return (f"\n{summary['table']}\n[vlit report] {summary['report']}\n"
            f"[vlit done] {len(summary['ran'])} stage steps ran, {len(summary['skipped'])} skipped, in "
            f"{summary['seconds']} s. See the runs: {summary['mlflow_ui']}")


def mlflow_ui_command(cfg: Config) -> str:
    import os
    import sys

    # The mlflow beside this interpreter (the venv's), which a plain `mlflow` may not be.
    beside = os.path.join(os.path.dirname(sys.executable), "mlflow")
    mlflow = os.path.relpath(beside) if os.path.exists(beside) else "mlflow"
    uri, experiment = lineage.experiment_id(cfg)
    return (f"{mlflow} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
            f"http://127.0.0.1:5000{lineage.ui_path(experiment)}")


def run(cfg: Config) -> dict:
    return TwoStageJob(cfg).run()
