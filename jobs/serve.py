"""Entry point of the serving job (generator pool + judges on Ray Serve), for
`python jobs/serve.py` and `ray job submit`. Serves until SIGINT or SIGTERM.

    python jobs/serve.py --config configs/serve/tiny.yaml [key.path=value ...]

On Kubernetes a RayService runs the same application from `vlit config serve FILE`.
"""
import sys

from vlit.entrypoint import job_main
from vlit.serve.app import run_serve

if __name__ == "__main__":
    sys.exit(job_main("serve", __doc__.split("\n")[0], run_serve))
