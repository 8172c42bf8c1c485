"""Entry point of one DPO stage, for `python jobs/dpo.py` and `ray job submit`.

    python jobs/dpo.py --config configs/dpo_tiny.yaml [key.path=value ...]   # CPU, synthetic pairs
    python jobs/dpo.py --config configs/dpo.yaml                             # Silkie's recipe, GPUs
"""
import sys

from vlit.entrypoint import job_main
from vlit.pipeline import dpo_stage

if __name__ == "__main__":
    sys.exit(job_main("dpo", __doc__.split("\n")[0], dpo_stage))
