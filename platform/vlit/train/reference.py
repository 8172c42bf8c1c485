"""The reference policy of DPO, three ways (`dpo.reference`).

- `cached`: the reference scores every pair once, in a Ray Data pass before training
  (`cache_reference_logps`), and the workers look the log-probs up by pair id. The cache
  is a version (`vlit.versions.ReferenceCache`) CACHE/<pairs digest>-<reference digest>/:
  a pass that died half way published nothing, and the next run computes it again; a
  finished one is reused by every later run with the same pairs and reference. Training
  then runs no reference forward at all, and holds no second model.
- `copy`: a frozen copy of the initial model in each worker, run before the policy's
  forward. It is not sharded: fine on CPU and for models that fit one device twice; a
  ZeRO-3 reference would need its own `deepspeed.initialize` with a stage-3 config and no
  optimizer, so its parameters are gathered per layer like the policy's.
- `lora_disabled`: the policy itself with its LoRA adapters switched off (peft's
  `disable_adapter`): the base weights are the initial model's, so this is the reference
  at no memory cost. It goes through the DeepSpeed engine, so it is ZeRO-3 safe.

All three score the same sequences the same way (`EveryRankVision`, eval mode, one image
encoding per pair), so they give the same log-probs; the tests hold the cached and a live
reference to the same first-step loss.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import time

import numpy as np
import torch

from vlit import storage, versions
from vlit.config import Config
from vlit.digest import DIGEST_CHARS
from vlit.model.build import initial_model, resolved
from vlit.model.pairs import PairTransform, collate_pairs, pairs_quarantine, pairs_stream
from vlit.model.parts import EveryRankVision
from vlit.train.preference import sequence_logps
from vlit.versions import ReferenceCache

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values")


def _forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) of response log-probs of a collated pair batch, without gradients."""
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in MODEL_INPUTS}, image_grid_thw=batch.get("image_grid_thw"),
                       repeat_images=2)
    return sequence_logps(logits, batch["labels"])


def _bf16(cfg: Config) -> bool:
    # As `deepspeed_config` decides: bf16 on GPUs only.
    return cfg.train.use_gpu and cfg.model.dtype == "bfloat16"


# ---------------------------------------------------------------- live references
class FrozenCopy:
    """A frozen copy of the initial model. Build it before `DeepSpeedStrategy.prepare`
    (which adds LoRA and trains the original in place)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model = EveryRankVision(copy.deepcopy(model).to(dtype)).eval().requires_grad_(False)

    def logps(self, engine, batch: dict):
        self.model.to(engine.device)
        return _forward(self.model, batch)


class AdaptersDisabled:
    """The policy with its LoRA adapters disabled, through the engine, in eval mode."""

    def logps(self, engine, batch: dict):
        engine.eval()
        try:
            with engine.module.model.disable_adapter():
                return _forward(engine, batch)
        finally:
            engine.train()


class CachedReference:
    """Log-probs of a finished cache, looked up by pair id."""

    def __init__(self, uri: str):
        self.uri = uri
        table = ReferenceCache.open(uri).read_table()
        self.index = {p: i for i, p in enumerate(table["pair_id"].to_pylist())}
        self.values = torch.tensor(np.stack([table[c].to_numpy() for c in (
            "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")], axis=1), dtype=torch.float32)

    def logps(self, engine, batch: dict):
        missing = [p for p in batch["pair_id"] if p not in self.index]
        if missing:
            raise KeyError(f"pair {missing[0]!r} (and {len(missing) - 1} more in this batch) has no reference "
                           f"log-probs in {self.uri}: the cache was built from other pairs or another encoding")
        rows = self.values[[self.index[p] for p in batch["pair_id"]]].to(engine.device)
        return torch.cat([rows[:, 0], rows[:, 1]]), torch.cat([rows[:, 2], rows[:, 3]]).long()


def build_reference(cfg: Config, model: torch.nn.Module, cache: str | None):
    """The worker's reference for `dpo.reference`; call before `prepare(model)`."""
    kind = cfg.dpo.reference
    if kind == "cached":
        return CachedReference(cache)
    if kind == "copy":
        return FrozenCopy(model, torch.bfloat16 if _bf16(cfg) else torch.float32)
    return AdaptersDisabled()


# ---------------------------------------------------------------- the cache
def _hash_file(h, uri: str) -> None:
    with storage.open_input(uri) as f:
        while chunk := f.read(16 * 1024 * 1024):
            h.update(chunk)


def reference_digest(cfg: Config) -> str:
    """Names what the cached log-probs depend on: the reference's weights and tokenizer
    (every file of its export, or the tiny preset's tensors and vocabulary), and how pairs
    become its inputs (template, max_len, image size, compute dtype)."""
    h = hashlib.sha256()
    encoding = {"template": cfg.model.template, "max_len": resolved(cfg.model).max_len, "image_size": cfg.dpo.stream.image_size,
                "vision_feature_layer": cfg.model.vision_feature_layer, "bf16": _bf16(cfg)}
    h.update(json.dumps(encoding, sort_keys=True).encode())
    source = cfg.train.init_from or cfg.model.path
    if source:
        root = storage.normalize(source)
        for uri in storage.list_files(root):
            h.update(uri[len(root):].encode())
            _hash_file(h, uri)
    else:
        model, processor = initial_model(cfg)
        h.update(processor.tokenizer.backend_tokenizer.to_str().encode())
        for name, tensor in model.state_dict().items():
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


class _Scorer:
    """The caching pass's transform: encodes a block of pairs (`PairTransform`) and scores
    them with the reference, built once per actor. Encoding and scoring share one actor,
    so the pass starts one process with torch and the model, not two."""

    def __init__(self, config: dict, quarantine: str):
        cfg = Config.model_validate(config)
        self.encode = PairTransform(cfg.model, quarantine=quarantine)
        self.batch_size = cfg.dpo.reference_batch_size
        model, _ = initial_model(cfg)
        self.device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
        self.model = EveryRankVision(model.to(torch.bfloat16 if _bf16(cfg) else torch.float32)).to(self.device).eval()

    def __call__(self, block: dict) -> dict:
        rows = self.encode(block)
        n = len(rows["pair_id"])
        sums, counts = [np.zeros((0, 2), np.float32)], [np.zeros((0, 2), np.int64)]
        for lo in range(0, n, self.batch_size):
            batch = collate_pairs({k: v[lo:lo + self.batch_size] for k, v in rows.items()})
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            s, c = _forward(self.model, batch)
            sums.append(s.float().cpu().numpy().reshape(2, -1).T)  # [chosen, rejected] per pair
            counts.append(c.cpu().numpy().reshape(2, -1).T)
        sums, counts = np.concatenate(sums), np.concatenate(counts)
        return {"pair_id": rows["pair_id"], "chosen_logps": sums[:, 0], "rejected_logps": sums[:, 1],
                "chosen_tokens": counts[:, 0], "rejected_tokens": counts[:, 1]}


def cache_root(cfg: Config, pairs) -> str:
    return cfg.dpo.cache or storage.join(storage.parent(pairs.uri), "_reference_cache")


def cache_reference_logps(cfg: Config, pairs) -> dict:
    """The reference log-probs of every pair of `pairs`, computed once (Ray must be up):
    the cache's manifest, with `uri` and `reused`."""
    digest = reference_digest(cfg)
    root, name = cache_root(cfg, pairs), f"{pairs.digest}-{digest}"
    found = ReferenceCache.find(root, name)
    if found is not None:
        return {**found.manifest, "uri": found.uri, "reused": True}
    start = time.perf_counter()
    # One scoring actor (the reference model is loaded once); on GPU it takes one GPU.
    stream = cfg.dpo.stream.model_copy(update={"decode_concurrency": 1})
    scorer = functools.partial(_Scorer, cfg.model_dump(mode="json"), pairs_quarantine(pairs))
    gpu = {"num_gpus": 1} if cfg.train.use_gpu else {}
    with versions.staging(root) as stage:
        fs, path = storage.filesystem(stage.file(ReferenceCache.TABLE))
        pairs_stream(pairs, stream, scorer, **gpu).write_parquet(path, filesystem=fs)
        rows = versions.read_parquet(stage.file(ReferenceCache.TABLE), columns=["pair_id"]).num_rows
        cache = stage.publish(name, "reference-logps", {
            "digest": name, "pairs_digest": pairs.digest, "reference_digest": digest, "pairs": pairs.uri,
            "rows": rows, "pairs_not_scored": pairs.rows - rows,  # quarantined by the stream (see its quarantine)
            "reference": cfg.train.init_from or cfg.model.path or f"preset:{cfg.model.preset}",
            "seconds": round(time.perf_counter() - start, 2)}, ReferenceCache)
    return {**cache.manifest, "uri": cache.uri, "reused": cache.reused}
