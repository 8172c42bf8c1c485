"""The `vlit` command.

    vlit corpus prepare SOURCE... --format vision-flan --out URI
    vlit corpus synth --instances N --tasks T --out DIR
    vlit corpus tasks VERSION
    vlit corpus sample VERSION [--cap N] [--temperature T] [--seed S] [--epoch E]
    vlit config check FILE [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys

from vlit.config import ConfigError, PrepareConfig, load_config


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def job_main(name: str, description: str, stage) -> int:
    """The body of every jobs/*.py entry point: `--config FILE [key.path=value ...]`, a config
    error exits 2 naming the key, and the stage's summary is printed as JSON."""
    parser = argparse.ArgumentParser(prog=name, description=description)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stage(cfg), indent=2, default=str))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from vlit.corpus.prepare import PrepareError, prepare_corpus

    cfg = PrepareConfig(
        sources=args.sources,
        format=args.format,
        image_root=args.image_root,
        image_check=args.image_check,
        max_bad_fraction=args.max_bad_fraction,
        shard_rows=args.shard_rows,
        default_task=args.default_task,
    )
    try:
        summary = prepare_corpus(cfg, args.out)
    except PrepareError as e:
        print(f"vlit corpus prepare: {e}", file=sys.stderr)
        return 1
    _print(summary)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from vlit.corpus.synth import synth_corpus

    _print(
        synth_corpus(
            args.out,
            instances=args.instances,
            tasks=args.tasks,
            image_pool=args.image_pool,
            image_size=args.image_size,
            templates_per_task=args.templates_per_task,
            seed=args.seed,
        )
    )
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from vlit.corpus.tasks import TaskRegistry
    from vlit.corpus.version import CorpusVersion

    registry = TaskRegistry.from_version(CorpusVersion.open(args.version))
    _print(registry.to_dict())
    return 0


def _sample(args: argparse.Namespace) -> int:
    from vlit.corpus.sampling import SamplingPlan
    from vlit.corpus.version import CorpusVersion

    version = CorpusVersion.open(args.version)
    plan = SamplingPlan.build(version.task_counts, cap=args.cap, temperature=args.temperature)
    _print(plan.report(version, seed=args.seed, epoch=args.epoch))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)
    print(cfg.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlit", description=__doc__.split("\n")[0])
    top = parser.add_subparsers(dest="group", required=True)

    corpus = top.add_parser("corpus", help="corpus data plane").add_subparsers(dest="cmd", required=True)

    defaults = PrepareConfig()
    p = corpus.add_parser("prepare", help="ingest sources into a versioned corpus")
    p.add_argument("sources", nargs="+", help="files or folders, local or s3://")
    p.add_argument("--format", required=True, choices=["vision-flan", "vision-flan-raw", "llava"])
    p.add_argument("--out", required=True, help="where versions live: OUT/<digest>/")
    p.add_argument("--image-root", default=None, help="resolve relative image paths here")
    p.add_argument("--image-check", default=defaults.image_check, choices=["exists", "header", "decode"])
    p.add_argument("--max-bad-fraction", type=float, default=defaults.max_bad_fraction)
    p.add_argument("--shard-rows", type=int, default=defaults.shard_rows)
    p.add_argument("--default-task", default=defaults.default_task)
    p.set_defaults(func=_prepare)

    s = corpus.add_parser("synth", help="write a synthetic corpus in the Vision-Flan release format")
    s.add_argument("--instances", type=int, required=True)
    s.add_argument("--tasks", type=int, default=187)
    s.add_argument("--out", required=True)
    s.add_argument("--image-pool", type=int, default=256)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--templates-per-task", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synth)

    t = corpus.add_parser("tasks", help="the task registry of a corpus version")
    t.add_argument("version", help="a corpus version URI (OUT/<digest>)")
    t.set_defaults(func=_tasks)

    m = corpus.add_parser("sample", help="task-balanced sampling report for a corpus version")
    m.add_argument("version")
    m.add_argument("--cap", type=int, default=None)
    m.add_argument("--temperature", type=float, default=1.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--epoch", type=int, default=0)
    m.set_defaults(func=_sample)

    c = top.add_parser("config", help="configs").add_subparsers(dest="cmd", required=True)
    k = c.add_parser("check", help="validate a config file with overrides and print it resolved")
    k.add_argument("file")
    k.add_argument("overrides", nargs="*", help="key.path=value")
    k.set_defaults(func=_config_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vlit: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"vlit: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
