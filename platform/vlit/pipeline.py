"""The two-stage job, stage by stage. Each stage is a function of the config and the
outputs of the stages before it, and says what it did.

Built so far (the corpus data plane): synthesize a corpus when the config asks for one,
prepare it into a versioned corpus, and stream one epoch of it through Ray Data
(sampling, templates, image decode). Training, the alignment set, DPO and evaluation
stages come with the issues that build them.
"""
from __future__ import annotations

import collections
import json
import time

from vlit import storage
from vlit.config import Config
from vlit.corpus.prepare import prepare_corpus
from vlit.corpus.synth import synth_corpus
from vlit.corpus.version import CorpusVersion


def _say(stage: str, message: str) -> None:
    print(f"[vlit {stage}] {message}", flush=True)


def synth_stage(cfg: Config) -> list[str]:
    """A synthetic corpus in the Vision-Flan release format, made once per settings."""
    s = cfg.corpus.synth
    out = storage.join(cfg.corpus.out, "_sources", f"synth-{s.instances}x{s.tasks}-pool{s.image_pool}-seed{s.seed}")
    annotation = storage.join(out, "annotation.json")
    if storage.exists(annotation):
        _say("synth", f"reusing {out}")
    else:
        summary = synth_corpus(out, instances=s.instances, tasks=s.tasks, image_pool=s.image_pool,
                               image_size=s.image_size, templates_per_task=s.templates_per_task, seed=s.seed)
        _say("synth", f"{summary['instances']} instances over {summary['tasks']} tasks, {summary['images']} images -> {out}")
    return [annotation]


def prepare_stage(cfg: Config, sources: list[str]) -> CorpusVersion:
    prep = cfg.corpus.prepare.model_copy(update={"sources": sources})
    summary = prepare_corpus(prep, cfg.corpus.out)
    verb = "reused" if summary["reused"] else "prepared"
    _say("prepare", f"{verb} corpus {summary['digest']}: {summary['rows']} rows, {summary['quarantined']} quarantined "
                    f"{summary['reasons']}, {summary['tasks']} tasks -> {summary['version']}")
    print(json.dumps(summary, indent=2, sort_keys=True))
    return CorpusVersion.open(summary["version"])


def stream_stage(cfg: Config, version: CorpusVersion, epoch: int = 0) -> dict:
    """One epoch through the Ray Data stream: what training workers would see."""
    from vlit.corpus.sampling import SamplingPlan
    from vlit.corpus.stream import build_stream
    from vlit.runtime import init_ray

    init_ray(cfg.ray, cfg.run.workdir)
    start = time.perf_counter()
    ds = build_stream(version, cfg.corpus, epoch=epoch)
    tasks: collections.Counter = collections.Counter()
    shape = None
    for batch in ds.iter_batches(batch_size=cfg.corpus.stream.batch_size, batch_format="numpy"):
        tasks.update(batch["task"].tolist())
        shape = tuple(batch["pixels"].shape[1:])
    seconds = time.perf_counter() - start
    plan = SamplingPlan.build(version.task_counts, cap=cfg.corpus.tasks.cap, temperature=cfg.corpus.tasks.temperature)
    report = plan.report(version, seed=cfg.corpus.tasks.seed, epoch=epoch)
    rows = sum(tasks.values())
    result = {"rows": rows, "tasks": len(tasks), "pixels": shape, "seconds": round(seconds, 1),
              "sampled_per_plan": report["totals"], "balance": report["balance"]}
    _say("stream", f"epoch {epoch}: {rows} rows of {len(tasks)} tasks streamed in {seconds:.1f} s "
                   f"(images {shape}); sampling cap={cfg.corpus.tasks.cap} T={cfg.corpus.tasks.temperature}: "
                   f"balance cv {report['balance']['cv_before']:.2f} -> {report['balance']['cv_after']:.2f}")
    return result


def corpus_stage(cfg: Config) -> CorpusVersion:
    """The config's corpus version: synthesized (when asked) and prepared, or reused."""
    sources = synth_stage(cfg) if cfg.corpus.synth else list(cfg.corpus.prepare.sources)
    if not sources:
        raise SystemExit("config error: corpus.prepare.sources is empty and corpus.synth is not set")
    return prepare_stage(cfg, sources)


def sft_stage(cfg: Config) -> dict:
    """One SFT stage (`train.*`) on the config's corpus, exported to <train.output>/export."""
    from vlit.train.sft import run_sft

    if cfg.train is None:
        raise SystemExit("config error: train is not set (an SFT stage needs a train section)")
    result = run_sft(cfg, corpus_stage(cfg))
    _say("sft", f"{result['steps']} steps, final loss {result['loss']:.4f}, {result['tokens_per_s']:.0f} tokens/s "
                f"-> {result['export']}")
    return result


def pairs_stage(cfg: Config):
    """The DPO stage's pairs version: `dpo.pairs`, or built (content-addressed, reused when
    unchanged) from `dpo.feedback` or from feedback made from the synthetic corpus."""
    from vlit.synth.feedback import PairsVersion, pairs_version

    dpo = cfg.dpo
    if dpo.pairs:
        return PairsVersion.open(dpo.pairs)
    sources, judge = dpo.feedback, dpo.judge
    if dpo.synth:
        from vlit.synth.feedback_synth import JUDGE, synth_feedback

        s = dpo.synth
        made = synth_feedback(synth_stage(cfg)[0], prompts=s.prompts, completions=s.completions, seed=s.seed)
        sources, judge = [made["feedback"]], JUDGE
    summary = pairs_version(sources, dpo.pairs_out, dpo.image_root, judge)
    _say("pairs", f"{'reused' if summary['reused'] else 'built'} pairs {summary['digest']}: {summary['pairs']} pairs "
                  f"of {summary['prompts']} prompts; {summary['ties']} ties, {summary['unparseable']} responses with a "
                  f"non-numeric rating, {summary['quarantined']} rows quarantined -> {summary['version']}")
    return PairsVersion.open(summary["version"])


def dpo_stage(cfg: Config) -> dict:
    """One DPO stage (`dpo.*`, `train.*`) on the config's pairs, exported to <train.output>/export."""
    from vlit.train.dpo import run_dpo

    if cfg.dpo is None:
        raise SystemExit("config error: dpo is not set (a DPO stage needs a dpo section)")
    result = run_dpo(cfg, pairs_stage(cfg))
    cache = result["reference_cache"]
    where = f", reference log-probs {'reused from' if cache['reused'] else 'cached in'} {cache['uri']}" if cache else ""
    _say("dpo", f"{result['steps']} steps, final loss {result['loss']:.4f}, reward accuracy "
                f"{result['reward_accuracy']:.2f}{where} -> {result['export']}")
    return result


def run(cfg: Config) -> dict:
    version = corpus_stage(cfg)
    stream = stream_stage(cfg, version)
    _say("done", "stages built so far: synth, prepare, stream. Training stages are not part of this job yet.")
    return {"corpus": version.uri, "digest": version.digest, "stream": stream}
