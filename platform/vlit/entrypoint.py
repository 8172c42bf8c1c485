"""The body of every jobs/*.py entry point (`python jobs/sft.py --config FILE [key=value ...]`,
the same under `ray job submit`): load the config, run the stage, exit with a code that
says what went wrong."""
from __future__ import annotations

import argparse
import json
import sys

from vlit.config import ConfigError, load_config


def job_main(name: str, description: str, stage, closing=None) -> int:
    """The body of every jobs/*.py entry point: `--config FILE [key.path=value ...] [--verbose]`,
    a config error exits 2 naming the key, the stage's summary is printed as JSON, then
    `closing(summary)` (what a person reads last: the two-stage job's tables, its report)."""
    from vlit.runtime import quiet_logs

    parser = argparse.ArgumentParser(prog=name, description=description)
    parser.add_argument("--config", required=True)
    parser.add_argument("--verbose", action="store_true", help="every log line (as VLIT_LOG_LEVEL=DEBUG)")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args()
    quiet_logs(verbose=args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    from vlit.corpus.prepare import PrepareError
    from vlit.evaluate.gates import GateFailed
    from vlit.storage import Unreachable
    from vlit.train.loop import NoTrainingData

    try:
        summary = stage(cfg)
    except ConfigError as e:  # a stage that finds its section missing or inconsistent
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    # Data a stage cannot use (the message names the rows), or a store or the tracking
    # server that does not answer at start (the message names its URI).
    except (PrepareError, NoTrainingData, Unreachable) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except GateFailed as e:  # the job stops; the reasons are on the stage's MLflow run too
        print(f"{name}: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2, default=str))
    if closing:
        print(closing(summary), flush=True)
    return 0
