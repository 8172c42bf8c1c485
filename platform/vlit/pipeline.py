"""The stages as single jobs run them (jobs/sft.py, jobs/dpo.py) and the two-stage job
composes them (vlit/two_stage.py): each is a function of the config and says what it did.
"""
from __future__ import annotations

import json

from vlit import storage
from vlit.config import Config
from vlit.corpus.prepare import prepare_corpus
from vlit.corpus.synth import synth_corpus
from vlit.corpus.version import CorpusVersion
from vlit.ledger import stage_key


def say(stage: str, message: str) -> None:
    print(f"[vlit {stage}] {message}", flush=True)


def synth_stage(cfg: Config) -> list[str]:
    """A synthetic corpus in the Vision-Flan release format, made once per settings."""
    s = cfg.corpus.synth
    # Every setting is in the folder's name (the key covers those not spelled out), so
    # a changed setting never reuses another corpus.
    out = storage.join(cfg.corpus.out, "_sources", f"synth-{s.instances}x{s.tasks}-pool{s.image_pool}-seed{s.seed}-"
                                                   f"{stage_key('synth', {}, s.model_dump())[:8]}")
    annotation = storage.join(out, "annotation.json")
    if storage.exists(annotation):
        say("synth", f"reusing {out}")
    else:
        summary = synth_corpus(out, **s.model_dump())  # the config's fields are its arguments
        say("synth", f"{summary['instances']} instances over {summary['tasks']} tasks, {summary['images']} images -> {out}")
    return [annotation]


def prepare_stage(cfg: Config, sources: list[str]) -> CorpusVersion:
    prep = cfg.corpus.prepare.model_copy(update={"sources": sources})
    summary = prepare_corpus(prep, cfg.corpus.out)
    verb = "reused" if summary["reused"] else "prepared"
    say("prepare", f"{verb} corpus {summary['digest']}: {summary['rows']} rows, {summary['quarantined']} quarantined "
                    f"{summary['reasons']}, {summary['tasks']} tasks -> {summary['version']}")
    print(json.dumps(summary, indent=2, sort_keys=True))
    return CorpusVersion.open(summary["version"])


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
    say("sft", f"{result['steps']} steps, final loss {result['loss']:.4f}, {result['tokens_per_s']:.0f} tokens/s "
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
    say("pairs", f"{'reused' if summary['reused'] else 'built'} pairs {summary['digest']}: {summary['pairs']} pairs "
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
    say("dpo", f"{result['steps']} steps, final loss {result['loss']:.4f}, reward accuracy "
                f"{result['reward_accuracy']:.2f}{where} -> {result['export']}")
    return result
