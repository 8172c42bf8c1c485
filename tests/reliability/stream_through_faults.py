"""Stream a prepared s3:// corpus through Ray Data twice, fault-free and then behind a
FaultProxy, and write the keys each pass delivered (plus the proxy's counts) as JSON.

A process of its own because Ray workers take the S3 endpoint from the environment of
the moment Ray starts: here the proxy is in place before Ray is, so the workers' image
reads and quarantine writes go through it as well as the driver's Parquet reads.

    python stream_through_faults.py VERSION_URI QUARANTINE_ROOT RATE SEED OUT.json
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile


def _keys(ds) -> list[str]:
    keys = []
    for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
        assert batch["has_image"].all() and batch["pixels"].max() > 0
        keys.extend(batch["key"].tolist())
    return keys


def main(version_uri: str, quarantine_root: str, rate: float, seed: int, out: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: support/
    from support.faults import FaultProxy
    from vlit import storage

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], rate=0.0, seed=seed) as proxy, proxy.routing():
        import ray

        from vlit.config import CorpusConfig, RayConfig
        from vlit.corpus.stream import build_stream, quarantine_reasons
        from vlit.versions import CorpusVersion
        from vlit.runtime import init_ray

        workdir = tempfile.mkdtemp(prefix="vlit-", dir="/tmp")  # short: Ray's socket paths
        init_ray(RayConfig(num_cpus=4, object_store_mb=512), workdir=workdir)
        try:
            version = CorpusVersion.open(version_uri)
            result = {}
            for name, pass_rate in (("clean", 0.0), ("faulty", rate)):
                quarantine = storage.join(quarantine_root, name)
                cfg = CorpusConfig(out=version.uri, stream={"image_size": 16, "block_rows": 32,
                                                            "quarantine": quarantine})
                proxy.rate, before = pass_rate, proxy.stats()
                keys = _keys(build_stream(version, cfg))
                after = proxy.stats()
                proxy.rate = 0.0
                result[name] = {"keys": keys, "quarantine": quarantine_reasons(quarantine),
                                "faults": {k: after[k] - before[k] for k in after}}
        finally:
            ray.shutdown()
            shutil.rmtree(workdir, ignore_errors=True)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
