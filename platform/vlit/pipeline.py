"""The stages as single jobs run them (jobs/sft.py, jobs/dpo.py) and the two-stage job
composes them (vlit/two_stage.py): each is a function of the config and says what it did.
"""
from __future__ import annotations

from vlit import storage, versions
from vlit.config import Config, ConfigError, require
from vlit.corpus.prepare import prepare_corpus
from vlit.ledger import stage_key
from vlit.versions import CorpusVersion, PairsVersion, ResponsesVersion
from vlit.world import synth_corpus


def say(stage: str, message: str) -> None:
    print(f"[vlit {stage}] {message}", flush=True)


def synth_stage(cfg: Config) -> list[str]:
    """A synthetic corpus in the Vision-Flan release format, made once per settings: a
    version under <corpus.out>/_sources/ whose name carries every setting (the key covers
    those not spelled out), so a changed setting never reuses another corpus."""
    s = cfg.corpus.synth
    root = storage.join(cfg.corpus.out, "_sources")
    key = stage_key("synth", {}, s.model_dump())
    name = f"synth-{s.instances}x{s.tasks}-pool{s.image_pool}-seed{s.seed}-{key[:8]}"
    found = versions.Version.find(root, name)
    if found is not None:
        say("synth", f"reusing {found.uri}")
        return [found.file("annotation.json")]
    with versions.staging(root) as stage:
        try:
            summary = synth_corpus(stage.uri, **s.model_dump())  # the config's fields are its arguments
        except ValueError as e:
            raise ConfigError(f"corpus.synth: {e}") from None
        version = stage.publish(name, "synthetic-source", {"digest": key, "rows": summary["instances"],
                                                           "settings": s.model_dump(mode="json")})
    say("synth", f"{summary['instances']} instances over {summary['tasks']} tasks, {summary['images']} images "
                 f"-> {version.uri}")
    return [version.file("annotation.json")]


def prepare_stage(cfg: Config, sources: list[str]) -> CorpusVersion:
    prep = cfg.corpus.prepare.model_copy(update={"sources": sources})
    summary = prepare_corpus(prep, cfg.corpus.out)
    verb = "reused" if summary["reused"] else "prepared"
    say("prepare", f"{verb} corpus {summary['digest']}: {summary['rows']} rows, {summary['quarantined']} quarantined "
                    f"{summary['reasons']}, {summary['tasks']} tasks -> {summary['version']}")
    return CorpusVersion.open(summary["version"])


def corpus_stage(cfg: Config) -> CorpusVersion:
    """The config's corpus version: synthesized (when asked) and prepared, or reused."""
    corpus = require(cfg, "corpus", "this job", "corpus.out and its sources or corpus.synth")
    if corpus.version:
        version = CorpusVersion.open(corpus.version)
        say("prepare", f"corpus.version {version.digest}: {version.rows} rows, {len(version.task_counts)} tasks "
                       f"-> {version.uri} (prepared before; used as it is)")
        return version
    sources = synth_stage(cfg) if corpus.synth else list(corpus.prepare.sources)
    if not sources:
        raise ConfigError("corpus.prepare.sources is empty and corpus.synth is not set: the job has no corpus")
    return prepare_stage(cfg, sources)


def sft_stage(cfg: Config) -> dict:
    """One SFT stage (`train.*`) on the config's corpus, exported to <train.output>/export."""
    from vlit.train.sft import run_sft

    require(cfg, "train", "an SFT stage", "workers, ZeRO stage, lr, output")
    result = run_sft(cfg, corpus_stage(cfg))
    say("sft", f"{result['steps']} steps, final loss {result['loss']:.4f}, {result['tokens_per_s']:.0f} tokens/s "
                f"-> {result['export']}")
    return result


def pairs_stage(cfg: Config, responses: str | None = None) -> PairsVersion:
    """The DPO stage's pairs version: `dpo.pairs`, or built (content-addressed, reused when
    unchanged) from `dpo.feedback`, from feedback made from the synthetic corpus, or, with
    none of these, from `responses` (the two-stage job's align stage: the pool's judged
    responses). A version with no pair at all stops here (NoTrainingData), with why."""
    from vlit.loops.feedback import EXCLUDED, build_pairs
    from vlit.train.loop import NoTrainingData

    dpo = require(cfg, "dpo", "a DPO stage", "its pairs, loss and beta")
    if dpo.pairs:
        return PairsVersion.open(dpo.pairs)
    if dpo.feedback or dpo.synth:
        sources, judge = dpo.feedback, dpo.judge
        if dpo.synth:
            from vlit.loops.feedback_synth import JUDGE, synth_feedback

            s = dpo.synth
            made = synth_feedback(synth_stage(cfg)[0], prompts=s.prompts, completions=s.completions, seed=s.seed)
            sources, judge = [made["feedback"]], JUDGE
        summary = build_pairs(sources, dpo.pairs_out, dpo.image_root, judge)
    elif responses:
        from vlit.loops.feedback_loop import pairs_from_responses

        summary = pairs_from_responses(ResponsesVersion.open(responses), dpo.pairs_out)
    else:
        raise ConfigError("dpo: set one of dpo.pairs, dpo.feedback and dpo.synth (only the two-stage job, with an "
                          "align stage, builds pairs from its judged responses)")
    say("pairs", f"{'reused' if summary['reused'] else 'built'} pairs {summary['digest']}: {summary['pairs']} pairs "
                  f"of {summary['prompts']} prompts; {summary['ties']} ties, {summary['unparseable']} responses with a "
                  f"non-numeric rating, {summary['quarantined']} rows quarantined -> {summary['version']}")
    if not summary["pairs"]:
        raise NoTrainingData(f"pairs version {summary['version']} has no pair: {summary['prompts']} prompts, "
                             f"{summary['ties']} ties, {summary['unparseable']} responses with a non-numeric rating, "
                             f"{summary['quarantined']} rows quarantined; why each response made no pair: "
                             f"{storage.join(summary['version'], EXCLUDED)}")
    return PairsVersion.open(summary["version"])


def dpo_stage(cfg: Config) -> dict:
    """One DPO stage (`dpo.*`, `train.*`) on the config's pairs, exported to <train.output>/export."""
    from vlit.train.dpo import run_dpo

    require(cfg, "dpo", "a DPO stage", "its pairs, loss and beta")
    result = run_dpo(cfg, pairs_stage(cfg))
    cache = result["reference_cache"]
    where = f", reference log-probs {'reused from' if cache['reused'] else 'cached in'} {cache['uri']}" if cache else ""
    say("dpo", f"{result['steps']} steps, final loss {result['loss']:.4f}, reward accuracy "
                f"{result['reward_accuracy']:.2f}{where} -> {result['export']}")
    return result
