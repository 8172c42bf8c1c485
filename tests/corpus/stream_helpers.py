"""Helpers the corpus tests share, and the train loop Ray Train workers run."""
from __future__ import annotations

import json
import os

import numpy as np

from vlit.config import PrepareConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.world import synth_corpus
from vlit.versions import CorpusVersion
from vlit.model.tokenizer import build_tiny_tokenizer


def synth_version(out: str, instances: int = 120, tasks: int = 6, image_pool: int = 12,
                  image_size: int = 32, shard_rows: int = 50) -> tuple[CorpusVersion, dict]:
    """A synthetic corpus prepared into a version (several shards); returns (version, synth summary)."""
    synth = synth_corpus(f"{out}/src", instances=instances, tasks=tasks, image_pool=image_pool,
                         image_size=image_size)
    summary = prepare_corpus(PrepareConfig(sources=[synth["annotation"]], shard_rows=shard_rows), f"{out}/versions")
    return CorpusVersion.open(summary["version"]), synth


def record_keys_loop(config: dict) -> None:
    """Ray Train loop: read this worker's shard of the stream, write the keys it saw."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    keys, shapes = [], set()
    for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=16, batch_format="numpy"):
        keys.extend(batch["key"].tolist())
        shapes.add(tuple(batch["pixels"].shape[1:]))
    with open(os.path.join(config["out"], f"rank-{rank}.json"), "w") as f:
        json.dump({"keys": keys, "shapes": sorted(shapes)}, f)
    ray.train.report({"rows": len(keys)})


class Tokenize:
    """A stateful transform (one tokenizer per actor), as the model's processor will be."""

    def __init__(self):
        self.tokenizer = build_tiny_tokenizer()

    def __call__(self, batch: dict) -> dict:
        prompts = [turns[0]["content"] for turns in batch["turns"]]
        # A fixed length, so batches re-cut by the consumer still stack into one array.
        ids = self.tokenizer(prompts, padding="max_length", max_length=384, truncation=True, return_tensors="np")["input_ids"]
        # A transform gets the decoded images as they are (here all of one size).
        pixels = np.stack([np.asarray(im) for im in batch["images"]])
        return {"key": batch["key"], "input_ids": ids, "pixels": pixels}
