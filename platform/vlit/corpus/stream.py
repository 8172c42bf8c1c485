"""The training stream: a corpus version as a Ray Dataset, fed to Ray Train workers.

    read_parquet(shards)                      streaming, one read task per file fragment
      -> sample + render templates            cheap Arrow work, fused into the read tasks
      -> repartition(block_rows rows/block)   streaming: gives the decode stage parallelism
      -> fetch + decode + resize (+ transform) `decode_concurrency` workers
      -> TorchTrainer(datasets={"train": ds}) / ray.train.get_dataset_shard("train")

Nothing is materialized: Ray Data's streaming executor pulls blocks as consumers ask for
them, under its object-store budget. A row whose image cannot be fetched or decoded never
stops the run: it leaves the stream and lands in a quarantine part file.
"""
from __future__ import annotations

import collections
import functools
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.data.block import BlockAccessor
from ray.data.extensions import ArrowTensorArray

from vlit import storage
from vlit.config import CorpusConfig
from vlit.corpus.images import decode_image, read_image_bytes
from vlit.corpus.sampling import SamplingPlan, held_out
from vlit.corpus.tasks import TemplateSet, load_templates
from vlit.versions import QUARANTINE_SCHEMA

STREAM_QUARANTINE = "stream_quarantine"


def resized(rgb: Image.Image, size: int) -> np.ndarray:
    """A decoded RGB image as a uint8 array (size, size, 3)."""
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def load_pixels(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB array (size, size, 3). Raises on bad data.

    Decoding is `images.decode_image`, the same code that ingest's `decode` check runs.
    """
    return resized(decode_image(data), size)


class _SampleAndRender:
    """Per block: held-out rows out, task-balanced sampling, then instruction templates."""

    def __init__(self, plan: SamplingPlan, templates: TemplateSet | None, seed: int, epoch: int, holdout=None):
        self.plan, self.templates, self.seed, self.epoch = plan, templates, seed, epoch
        self.holdout = holdout

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.holdout is not None:
            table = table.filter(pa.array(~held_out(table["key"], self.holdout.fraction, self.holdout.seed)))
        table = self.plan.apply(table, self.seed, self.epoch)
        if self.templates is not None:
            table = self.templates.render(table, self.seed, self.epoch)
        return table


class _DecodeImages:
    """Fetch and decode each row's image; quarantine the rows that fail; run `transform`.

    One stage for decode and transform, so pixels go from the decoder to the tokenizer/
    processor without another trip through the object store, and one pool of
    `decode_concurrency` workers holds the CPUs (a second pool could starve the reads).
    A transform gets each row's decoded image as it is (`images`: RGB or None), for the
    model family's own preprocessing (vlit/model/families.py); without one, rows carry
    `pixels` resized to `stream.image_size` square.
    """

    def __init__(self, image_size: int, quarantine: str, epoch: int, transform=None):
        self.size, self.quarantine, self.epoch = image_size, quarantine, epoch
        # A class is instantiated once per actor (e.g. to load a processor once).
        self.transform = transform() if _is_stateful(transform) else transform

    def __call__(self, table: pa.Table):
        images: list = [None] * len(table)
        failures = []  # (row, reason, detail)
        for row, uri in enumerate(table["image"].to_pylist()):
            if uri is None:
                continue
            try:
                data = read_image_bytes(uri)
            except OSError as e:  # FileNotFoundError, or a store that refuses the object
                failures.append((row, "image_missing", f"{uri}: {type(e).__name__}: {e}"))
                continue
            try:
                images[row] = decode_image(data)
            except Exception as e:  # noqa: BLE001 - any decoder error means undecodable bytes
                failures.append((row, "image_undecodable", f"{uri}: {type(e).__name__}: {e}"))
        if failures:
            self._quarantine(table, failures)
            keep = np.ones(len(table), dtype=bool)
            keep[[row for row, _, _ in failures]] = False
            table, images = table.filter(pa.array(keep)), [im for im, k in zip(images, keep) if k]
        has_image = np.array([im is not None for im in images], dtype=bool)
        if self.transform is None:
            pixels = np.zeros((len(images), self.size, self.size, 3), dtype=np.uint8)
            for row, im in enumerate(images):
                if im is not None:
                    pixels[row] = resized(im, self.size)
            table = table.append_column("pixels", ArrowTensorArray.from_numpy(pixels))
            return table.append_column("has_image", pa.array(has_image))
        batch = BlockAccessor.for_block(table).to_batch_format("numpy")
        batch["images"], batch["has_image"] = images, has_image
        return self.transform(batch)

    def _quarantine(self, table: pa.Table, failures) -> None:
        rows = table.take([row for row, _, _ in failures]).to_pylist()
        write_quarantine(self.quarantine, self.epoch, rows, [(reason, detail) for _, reason, detail in failures])


def write_quarantine(uri: str, epoch: int, rows: list[dict], failures: list[tuple[str, str]]) -> None:
    """Write rejected canonical rows (with their (reason, detail)) as one quarantine part
    file under `uri`: the one format for every stage of the stream that drops rows."""
    out = pa.Table.from_pylist(
        [
            {
                "reason": reason,
                "detail": detail,
                "source_ref": f"{r['source']}#{r['position']}",
                "raw": json.dumps(r, sort_keys=True, default=_jsonable),
            }
            for r, (reason, detail) in zip(rows, failures)
        ],
        schema=QUARANTINE_SCHEMA,
    )
    # One small file per failing batch; a unique name, since workers write in parallel.
    name = f"epoch-{epoch:04d}-{uuid.uuid4().hex}.parquet"
    with storage.open_output(storage.join(uri, name)) as f:
        pq.write_table(out, f)


def quarantine_reasons(uri: str) -> dict[str, int]:
    """Rows quarantined under `uri` per reason, each row once: a resumed or repeated run
    replays the stream and quarantines the same rows again."""
    seen = set()
    for part in storage.list_files(uri, (".parquet",)) if storage.exists(uri) else []:
        fs, path = storage.filesystem(part)
        table = pq.read_table(path, filesystem=fs, columns=["reason", "source_ref"])
        seen.update(zip(table["reason"].to_pylist(), table["source_ref"].to_pylist()))
    return dict(collections.Counter(reason for reason, _ in seen))


def _jsonable(value):
    # Rows from a numpy batch hold numpy arrays and scalars where Arrow rows hold lists.
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def quarantine_uri(version, cfg: CorpusConfig) -> str:
    """Where the stream of `version` quarantines rows (images that fail, rows a transform rejects)."""
    return cfg.stream.quarantine or storage.join(version.uri, STREAM_QUARANTINE)


def _is_stateful(transform) -> bool:
    """A class, or a `functools.partial` of one: built once per actor, with its arguments."""
    return isinstance(transform, type) or (
        isinstance(transform, functools.partial) and isinstance(transform.func, type)
    )


def build_stream(version, cfg: CorpusConfig, epoch: int = 0, transform=None, holdout=None) -> ray.data.Dataset:
    """The lazily executed training stream of one epoch of `version`.

    Rows carry the canonical columns plus `replica` (copy number of an upsampled row),
    `pixels` (uint8, image_size x image_size x 3; zeros for text-only rows) and
    `has_image`. `transform`, a callable or a callable class (or a `functools.partial`
    of one, to pass constructor arguments) taking and returning a dict of numpy arrays,
    runs on each batch after decoding. `holdout` (eval.holdout) leaves out the rows that
    evaluation scores. Ray must be initialized.
    """
    tasks, stream = cfg.tasks, cfg.stream
    plan = SamplingPlan.build(version.task_counts, cap=tasks.cap, temperature=tasks.temperature)
    templates = TemplateSet(load_templates(tasks.templates)) if tasks.templates else None
    quarantine = quarantine_uri(version, cfg)

    fs, _ = storage.filesystem(version.uri)
    paths = [storage.filesystem(uri)[1] for uri in version.shard_uris]
    decode_args = (stream.image_size, quarantine, epoch, transform)
    if _is_stateful(transform):
        # A stateful transform: a fixed actor pool builds it once per worker.
        decode_fn, kwargs = _DecodeImages, {
            "fn_constructor_args": decode_args,
            "compute": ray.data.ActorPoolStrategy(size=stream.decode_concurrency),
        }
    else:
        decode_fn = _DecodeImages(*decode_args)
        kwargs = {"compute": ray.data.TaskPoolStrategy(size=stream.decode_concurrency)}
    return (
        ray.data.read_parquet(paths, filesystem=fs)
        .map_batches(_SampleAndRender(plan, templates, tasks.seed, epoch, holdout), batch_format="pyarrow",
                     batch_size=None)
        # A shard is one file of up to 200k rows: without this, one decode task would
        # get the whole file and the other workers nothing.
        .repartition(target_num_rows_per_block=stream.block_rows)
        .map_batches(decode_fn, batch_format="pyarrow", batch_size=stream.block_rows, **kwargs)
    )
