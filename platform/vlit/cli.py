"""The `vlit` command.

    vlit corpus prepare SOURCE... --format vision-flan --out URI
    vlit corpus synth --instances N --tasks T --out DIR
    vlit corpus tasks VERSION
    vlit corpus sample VERSION [--cap N] [--temperature T] [--seed S] [--epoch E]
    vlit corpus render CONFIG VERSION [--rows N] [--json] [key=value ...]
    vlit feedback pairs INPUT... --out ROOT [--image-root R] [--judge ID]
    vlit loops feedback|vigc FILE --corpus VERSION [--attach] [key=value ...]
    vlit loops self-instruct FILE (--annotations JSONL | --synth-corpus DIR) [--attach] [key=value ...]
    vlit loops alignment FILE --source VERSION... [--attach] [key=value ...]
    vlit loops qc FILE --source VERSION [--attach] [key=value ...]
    vlit config check FILE [key=value ...]
    vlit config serve FILE [key=value ...]
    vlit cluster check [FILE ...] [--root DIR] [--crds DIR]
    vlit cluster sync [FILE ...] [--root DIR]
    vlit eval sets FILE [key=value ...]
    vlit eval run FILE [--model URI] [--stage S] [--run-id ID] [--baseline JSON] [--gate] [key=value ...]
    vlit eval score PREDICTIONS...
    vlit lineage MODEL[@ALIAS | /VERSION] [--tracking-uri URI] [--json]
    vlit report JOB_OUT
"""
from __future__ import annotations

import argparse
import json
import sys

from vlit.config import ConfigError, PrepareConfig, load_config


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


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
    from vlit.world import synth_corpus

    try:
        summary = synth_corpus(
            args.out,
            instances=args.instances,
            tasks=args.tasks,
            image_pool=args.image_pool,
            image_size=args.image_size,
            templates_per_task=args.templates_per_task,
            seed=args.seed,
            family_weights=_family_weights(args.family_weight),
        )
    except ValueError as e:
        print(f"vlit corpus synth: {e}", file=sys.stderr)
        return 2
    _print(summary)
    return 0


def _family_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise SystemExit(f"vlit corpus synth: --family-weight {item!r} is not FAMILY=NUMBER") from None
    return weights


def _tasks(args: argparse.Namespace) -> int:
    from vlit.corpus.tasks import TaskRegistry
    from vlit.versions import CorpusVersion

    registry = TaskRegistry.from_version(CorpusVersion.open(args.version))
    _print(registry.to_dict())
    return 0


def _render(args: argparse.Namespace) -> int:
    """What the model trains on, row by row (vlit/model/render.py)."""
    from vlit.model.render import encode_rows, report

    cfg = load_config(args.file, args.overrides)
    processor, rows = encode_rows(cfg, args.version, args.rows)
    print(json.dumps(rows) if args.json else report(rows, processor.tokenizer.decode), end="\n" if args.json else "")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from vlit.corpus.sampling import SamplingPlan
    from vlit.versions import CorpusVersion

    version = CorpusVersion.open(args.version)
    plan = SamplingPlan.build(version.task_counts, cap=args.cap, temperature=args.temperature)
    _print(plan.report(version, seed=args.seed, epoch=args.epoch))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)
    print(cfg.model_dump_json(indent=2))
    return 0


def _config_serve(args: argparse.Namespace) -> int:
    import yaml

    from vlit.serve.app import deploy_config

    print(yaml.safe_dump(deploy_config(load_config(args.file, args.overrides)), sort_keys=False), end="")
    return 0


def _feedback_pairs(args: argparse.Namespace) -> int:
    from vlit.loops.feedback import FeedbackError, build_pairs

    try:
        summary = build_pairs(args.inputs, args.out, image_root=args.image_root, judge=args.judge)
    except FeedbackError as e:
        print(f"vlit feedback pairs: {e}", file=sys.stderr)
        return 1
    _print(summary)
    return 0


def _loops(args: argparse.Namespace) -> int:
    from vlit.loops.run import run_loop

    cfg = load_config(args.file, args.overrides)
    sources = getattr(args, "source", None)
    sources = [sources] if isinstance(sources, str) else sources
    _print(run_loop(cfg, args.loop, corpus=getattr(args, "corpus", None), sources=sources,
                    annotations=getattr(args, "annotations", None), synth_corpus=getattr(args, "synth_corpus", None),
                    synth_seed=getattr(args, "synth_seed", 0), attach=args.attach))
    return 0


def _eval_sets(args: argparse.Namespace) -> int:
    from vlit.evaluate.harness import build_eval_sets

    sets = build_eval_sets(load_config(args.file, args.overrides))
    _print({suite: {"uri": es.uri, "digest": es.digest, "rows": es.manifest["rows"], "tasks": es.manifest["tasks"]}
            for suite, es in sets.items()})
    return 0


def _eval_run(args: argparse.Namespace) -> int:
    """Metrics as JSON on stdout; with --gate, exit 3 and the reasons on stderr when a
    configured gate fails."""
    from vlit.evaluate.gates import GateFailed, enforce_gates
    from vlit.evaluate.harness import run_eval

    cfg = load_config(args.file, args.overrides)
    baseline = json.loads(open(args.baseline).read()) if args.baseline else None
    metrics = run_eval(cfg, args.model, stage=args.stage, run_id=args.run_id, baseline=baseline)
    _print(metrics)
    if args.gate:
        try:
            enforce_gates(metrics, cfg.eval.gates, args.stage)
        except GateFailed as e:
            print(f"vlit eval run: {e}", file=sys.stderr)
            return 3
    return 0


def _eval_score(args: argparse.Namespace) -> int:
    """A run's published prediction tables scored again by today's scorers, without the model."""
    from vlit.evaluate.harness import score_predictions

    try:
        _print({k: v for uri in args.predictions for k, v in score_predictions(uri).items()})
    except FileNotFoundError as e:
        print(f"vlit eval score: {e}", file=sys.stderr)
        return 2
    return 0


def _cluster_files(args: argparse.Namespace) -> list[str]:
    import glob
    import os

    return args.files or [os.path.normpath(f) for f in sorted(glob.glob(os.path.join(args.root, "cluster", "*.yaml")))]


def _kubecheck(root: str):
    """The manifest checker: repository tooling beside the manifests (cluster/kubecheck),
    not part of this package; found through --root."""
    import importlib
    import os

    tooling = os.path.join(os.path.abspath(root), "cluster")
    if not os.path.isdir(os.path.join(tooling, "kubecheck")):
        raise SystemExit(f"vlit cluster: no manifest checker at {tooling}/kubecheck: run from the repository "
                         "or pass --root")
    if tooling not in sys.path:
        sys.path.insert(0, tooling)
    return importlib.import_module("kubecheck")


def _cluster_check(args: argparse.Namespace) -> int:
    """Problems one a line (FILE: KIND NAME: field.path: message); exit 1 when there are any."""
    check_files = _kubecheck(args.root).check_files
    files = _cluster_files(args)
    if not files:
        print(f"vlit cluster check: no manifests given and none in {args.root}/cluster", file=sys.stderr)
        return 2
    report = check_files(files, root=args.root, crd_dir=args.crds)
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"vlit cluster check: {len(report.problems)} problem(s) in {len(report.objects)} manifests", file=sys.stderr)
        return 1
    print(f"{len(report.objects)} manifests in {len(files)} files: ok")
    for name, keys in sorted(report.secrets.items()):
        listed = [k if required else f"{k} (optional)" for k, required in sorted(keys.items())]
        print(f"  needs Secret {name}: {', '.join(listed) or '(all keys)'}")
    return 0


def _cluster_sync(args: argparse.Namespace) -> int:
    sync_serve_config = _kubecheck(args.root).sync_serve_config
    for file in _cluster_files(args):
        names = sync_serve_config(file, args.root)
        print(f"{file}: {'serveConfigV2 rewritten for ' + ', '.join(names) if names else 'up to date'}")
    return 0


def _lineage(args: argparse.Namespace) -> int:
    import os

    from vlit import lineage

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///.vlit/mlflow.db"
    try:
        chain = lineage.chain(uri, args.model)
    except LookupError as e:
        print(f"vlit lineage: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the registry's own errors: unknown alias or version
        if type(e).__name__ != "MlflowException":
            raise
        print(f"vlit lineage: {args.model}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(chain, indent=2) if args.json else lineage.format_chain(chain), end="" if not args.json else "\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    from vlit.run_report import write_report

    print(write_report(args.job_out))
    return 0


def _config_command(group, name: str, help_: str, func) -> argparse.ArgumentParser:
    """A subcommand that takes a config FILE and `key.path=value` overrides."""
    p = group.add_parser(name, help=help_)
    p.add_argument("file")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.set_defaults(func=func)
    return p


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
    s.add_argument("--family-weight", action="append", default=[], metavar="FAMILY=W",
                   help="scale a question family's task sizes (repeatable)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synth)

    t = corpus.add_parser("tasks", help="the task registry of a corpus version")
    t.add_argument("version", help="a corpus version URI (OUT/<digest>)")
    t.set_defaults(func=_tasks)

    r = corpus.add_parser("render", help="what the model trains on: each row's text, token ids, supervised tokens "
                                         "and image tokens")
    r.add_argument("file", help="the config (its model and loss sections)")
    r.add_argument("version", help="a corpus version URI (OUT/<digest>)")
    r.add_argument("overrides", nargs="*", help="key.path=value")
    r.set_defaults(func=_render)
    r.add_argument("--rows", type=int, default=5, help="how many rows (the version's first)")
    r.add_argument("--json", action="store_true", help="[{id, text, input_ids, labels, image_tokens}, ...]")

    m = corpus.add_parser("sample", help="task-balanced sampling report for a corpus version")
    m.add_argument("version")
    m.add_argument("--cap", type=int, default=None)
    m.add_argument("--temperature", type=float, default=1.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--epoch", type=int, default=0)
    m.set_defaults(func=_sample)

    feedback = top.add_parser("feedback", help="preference data").add_subparsers(dest="cmd", required=True)
    f = feedback.add_parser("pairs", help="VLFeedback-format JSONL -> a pairs version OUT/<digest>/ (pairs.parquet, summary.json)")
    f.add_argument("inputs", nargs="+", help="JSONL files or folders, local or s3://")
    f.add_argument("--out", required=True, help="where pairs versions live: OUT/<digest>/")
    f.add_argument("--image-root", default=None, help="resolve relative img_path here (default: each file's folder)")
    f.add_argument("--judge", default="vlfeedback-release", help="the judge id recorded with each pair")
    f.set_defaults(func=_feedback_pairs)

    lp = top.add_parser("loops", help="synthetic data loops through Serve; each writes a dataset version "
                                      "under loops.out/<loop>/").add_subparsers(dest="loop", required=True)
    for name, help_ in (("feedback", "VLFeedback: k responses per corpus prompt, judged on the aspects, paired"),
                        ("vigc", "VIGC: question + answer per corpus image, corrected sentence by sentence"),
                        ("self-instruct", "dialogues from image annotations (the VLIT review)"),
                        ("alignment", "the stage-2 alignment set: judge-scored, task-balanced"),
                        ("qc", "quality control of a generated version: metrics, filters, report")):
        lo = _config_command(lp, name, help_, _loops)
        lo.add_argument("--attach", action="store_true",
                        help="use the serve section's app already running on the cluster instead of starting it")
        if name in ("feedback", "vigc"):
            lo.add_argument("--corpus", required=True, help="a corpus version (prompts and images)")
        elif name == "self-instruct":
            lo.add_argument("--annotations", default=None, help="JSONL of image annotations, local or s3://")
            lo.add_argument("--synth-corpus", default=None,
                            help="a `vlit corpus synth` folder: its scenes' ground truth as the annotations")
            lo.add_argument("--synth-seed", type=int, default=0, help="the seed that folder was made with")
        else:
            lo.add_argument("--source", required=True, nargs="+" if name == "alignment" else None,
                            action="store", help="generated dataset version(s)")

    ev = top.add_parser("eval", help="held-out evaluation and gates").add_subparsers(dest="cmd", required=True)
    _config_command(ev, "sets", "build (or reuse) the config's evaluation sets and print their versions", _eval_sets)
    e = _config_command(ev, "run", "evaluate a model on the config's held-out sets; print the metrics as JSON",
                        _eval_run)
    e.add_argument("--model", default=None, help="an exported model (folder or s3://); default: the config's model")
    e.add_argument("--stage", default="eval", help="the stage's name in logs and artifacts")
    e.add_argument("--run-id", default=None, help="an MLflow run to log metrics, predictions and set digests to")
    e.add_argument("--baseline", default=None, help="metrics JSON of the model before the stage (forgetting deltas)")
    e.add_argument("--gate", action="store_true", help="exit 3 when a gate in eval.gates fails")
    e = ev.add_parser("score", help="score published prediction tables again (eval.out/predictions/<digest>)")
    e.add_argument("predictions", nargs="+", help="prediction table versions, as `vlit eval run` tags them")
    e.set_defaults(func=_eval_score)

    g = top.add_parser("lineage", help="a registered model version's chain: run, checkpoint, input datasets, sources")
    g.add_argument("model", help="NAME (latest version), NAME@ALIAS or NAME/VERSION")
    g.add_argument("--tracking-uri", default=None,
                   help="default: MLFLOW_TRACKING_URI, else the demo's sqlite:///.vlit/mlflow.db")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_lineage)
    g = top.add_parser("report", help="rebuild a two-stage job's run report (JOB_OUT/report.html) from its record")
    g.add_argument("job_out", metavar="JOB_OUT", help="the job's pipeline.out")
    g.set_defaults(func=_report)

    c = top.add_parser("config", help="configs").add_subparsers(dest="cmd", required=True)
    _config_command(c, "check", "validate a config file with overrides and print it resolved", _config_check)
    _config_command(c, "serve", "Ray Serve's config file (a RayService's serveConfigV2) for a config's serve section",
                    _config_serve)
    cl = top.add_parser("cluster", help="KubeRay manifests (cluster/)").add_subparsers(dest="cmd", required=True)
    k = cl.add_parser("check", help="validate manifests offline: KubeRay CRDs (strict), controller rules, "
                                    "Secret references only, non-root; and against the configs they run")
    k.add_argument("files", nargs="*", help="manifests (default: ROOT/cluster/*.yaml)")
    k.add_argument("--root", default=".", help="the repository: manifests' paths (configs/, jobs/) resolve here")
    k.add_argument("--crds", default=None, help="folder of the KubeRay v1.7.0 CRDs (default: ../shared/kuberay-crds)")
    k.set_defaults(func=_cluster_check)
    k = cl.add_parser("sync", help="rewrite each RayService's serveConfigV2 from the config its vlit/serve-config names")
    k.add_argument("files", nargs="*", help="manifests (default: ROOT/cluster/*.yaml)")
    k.add_argument("--root", default=".", help="the repository")
    k.set_defaults(func=_cluster_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting `key=value` overrides at the first option; take the ones
    # that come after options too (`vlit loops qc FILE --source V key=value`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
