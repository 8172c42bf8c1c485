"""Entry point of one SFT stage, for `python jobs/sft.py` and `ray job submit`.

    python jobs/sft.py --config configs/sft_tiny.yaml [key.path=value ...]

Stage 2 is the same job with `train.init_from=<stage 1 export>` (see configs/two_stage.yaml).
"""
import sys

from vlit.entrypoint import job_main
from vlit.pipeline import sft_stage

if __name__ == "__main__":
    sys.exit(job_main("sft", __doc__.split("\n")[0], sft_stage))
