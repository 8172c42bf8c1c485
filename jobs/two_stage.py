"""Entry point of the two-stage job, for `python jobs/two_stage.py` and `ray job submit`.

    python jobs/two_stage.py --config configs/demo.yaml [key.path=value ...]
"""
import argparse
import sys

from vlit.config import ConfigError, load_config
from vlit.pipeline import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"two_stage: {e}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
