"""Corpora, configs and the failure-injecting loop the training tests share."""
from __future__ import annotations

import json
import os
import signal

from vlit.config import Config, PrepareConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.world import synth_corpus
from vlit.versions import CorpusVersion
from vlit.train import loop


def corpus(out: str, instances: int = 160, tasks: int = 4, text_only_every: int = 0, too_long: int = 0) -> CorpusVersion:
    """A synthetic corpus version; with `text_only_every=k`, every k-th row loses its image
    (and its <image> token), so the stream mixes image and text-only rows; `too_long` rows
    get an instruction longer than any max_len the tests use."""
    synth = synth_corpus(f"{out}/src", instances=instances, tasks=tasks, image_pool=8, image_size=32)
    annotation = synth["annotation"]
    if text_only_every or too_long:
        rows = json.load(open(annotation))
        for row in rows[::text_only_every] if text_only_every else []:
            row["image"] = None
            row["conversations"][0]["value"] = row["conversations"][0]["value"].replace("<image>", "").strip()
        # First in the file, so even a short run's stream reaches them.
        rows[:0] = [{**row, "id": f"too-long-{i}", "conversations": [
            {**row["conversations"][0], "value": row["conversations"][0]["value"] + " Look closely." * 400},
            row["conversations"][1]]} for i, row in enumerate(rows[:too_long])]
        annotation = f"{out}/src/edited.json"
        json.dump(rows, open(annotation, "w"))
    summary = prepare_corpus(PrepareConfig(sources=[annotation]), f"{out}/versions")
    return CorpusVersion.open(summary["version"])


def config(tmp: str, version: CorpusVersion, name: str = "sft-test", **train) -> Config:
    """Tiny model, 2 workers, CPU; one decode actor so the stream keeps a CPU of Ray's 4
    for its reads while the two train workers hold theirs."""
    return Config.model_validate({
        "run": {"name": name, "workdir": f"{tmp}/work"},
        "corpus": {"out": version.uri, "stream": {"image_size": 32, "block_rows": 48, "decode_concurrency": 1}},
        "model": {"preset": "tiny", "max_len": 512},
        "train": {"output": f"{tmp}/{name}", "lr": 3e-3, "warmup_ratio": 0.0, "micro_batch_size": 2,
                  "num_workers": 2, "checkpoint_every": 100, **train},
    })


class _FailOnce(loop.DeepSpeedStrategy):
    """Rank 1 dies by SIGKILL after optimizer step `fail_at`, on the run's first attempt
    only: no exception, no cleanup, as when the OOM killer or a lost node takes it."""

    fail_at, marker = None, None

    def step(self) -> bool:
        took = super().step()
        if took and self.rank == 1 and self.engine.global_steps == self.fail_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return took


def failing_train_loop(config: dict, fail_at: int, marker: str) -> None:
    """`loop.worker` with a worker killed; bind fail_at and marker with partial. Each
    attempt appends the checkpoint Ray Train handed it (or "none") to MARKER.starts."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if ray.train.get_context().get_world_rank() == 0:
        with open(f"{marker}.starts", "a") as f:
            f.write(f"{os.path.basename(checkpoint.path) if checkpoint else 'none'}\n")
    _FailOnce.fail_at, _FailOnce.marker = fail_at, marker
    loop.DeepSpeedStrategy = _FailOnce  # this worker process only
    loop.worker(config)
