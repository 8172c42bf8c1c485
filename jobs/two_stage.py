"""Entry point of the two-stage job, for `python jobs/two_stage.py` and `ray job submit`.

    python jobs/two_stage.py --config configs/demo.yaml [key.path=value ...]
"""
import sys

from vlit.entrypoint import job_main
from vlit.two_stage import closing, run

if __name__ == "__main__":
    sys.exit(job_main("two_stage", __doc__.split("\n")[0], run, closing))
