"""Packing against padded batching, for both model families: the real-token fraction of
the sequences at real size, and the step time on the tiny models, on the same rows.

Fraction (real size). Every row of the corpus is rendered and tokenized by `encode_row`
with the family's real tokenizer (../shared/tokenizers), each image expanded to the
tokens it takes at real size: LLaVA-1.5 576 (CLIP 336 px, patch 14); Qwen2.5-VL its
dynamic resolution (patch 14, merge 2, 3,136 to 12,845,056 pixels) at the image's own
size. Packed: `SFTTransform`'s grouping and `best_fit_packs`, per stream block of
--block-rows rows, into sequences of --max-len, beside first-fit-decreasing (the
packer before it); padded: micro-batches of --batch rows in stream order, each padded
to its longest row. Fraction = real tokens / tokens computed (each micro-batch trimmed
to its longest sequence).

Step time (tiny models, CPU). The same rows, with their real images, through the tiny
preset of the family: packed sequences against padded micro-batches, forward and
backward of every sequence; tokens per second of real tokens, and the ratio.

    python bench/packing_bench.py --corpus ../shared/vision-flan-sample/annotation.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlit.config import LossConfig, ModelConfig, TrainConfig
from vlit.model.build import build_model_and_processor
from vlit.model.collate import collate
from vlit.model.labels import IGNORE, encode_row
from vlit.model.packing import SFTTransform, best_fit_packs
from vlit.model.parts import EveryRankVision
from vlit.model.templates import EncodeError

SHARED = Path(__file__).resolve().parents[2] / "shared"


def real_processor(family: str):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    if family == "llava-1.5":
        tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "llama2")
        tok.add_tokens(["<image>"], special_tokens=True)
        tok.add_special_tokens({"pad_token": "<pad>"})
        image = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        return LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    from vlit.model import qwen

    return qwen.PROCESSORS["qwen2_5_vl"](image_processor=qwen.image_processor(14, 3136, 12845056),
                                         tokenizer=AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen3"),
                                         chat_template=qwen.CHAT_TEMPLATE)


def rows_of(annotation: str) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    root = Path(annotation).parent
    out = []
    for r in json.load(open(annotation)):
        image = root / r["image"] if r.get("image") else None
        out.append({"turns": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]],
                    "task": r["task_name"], "has_image": image is not None,
                    "image": image if image is not None and image.exists() else None, "key": r["id"]})
    return [r for r in out if r["image"] is not None or not r["has_image"]]


def image_tokens(processor, row) -> list[int] | None:
    if row["image"] is None:
        return None
    with Image.open(row["image"]) as im:
        width, height = im.size
    if type(processor).__name__ == "LlavaProcessor":
        return None  # the fixed count
    return [processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]]


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """The packer best_fit_packs replaced, as the baseline."""
    bins, room = [], []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        slot = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if slot is None:
            bins.append([int(i)])
            room.append(capacity - int(lengths[i]))
        else:
            bins[slot].append(int(i))
            room[slot] -= int(lengths[i])
    return bins


def computed(lengths: np.ndarray, batch: int) -> int:
    """Token positions the model computes: each micro-batch trimmed to its longest."""
    return int(sum(len(b) * b.max() for b in np.split(lengths, range(batch, len(lengths), batch))))


def fractions(family: str, rows: list[dict], args) -> None:
    processor = real_processor(family)
    cfg = ModelConfig(max_len=args.max_len)
    encoded, too_long = [], 0
    for r in rows:
        try:
            encoded.append(encode_row(r, processor, cfg, LossConfig(), None, image_tokens(processor, r)))
        except EncodeError as e:
            assert e.reason == "too_long", e
            too_long += 1
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(encoded)) for _ in range(args.repeat)])
    lengths = np.array([len(encoded[i].input_ids) for i in order])
    real = int(lengths.sum())
    print(f"{family}: rows {len(lengths)} ({too_long} too long for {args.max_len}, quarantined)  "
          f"mean {lengths.mean():.0f} tokens  median {np.median(lengths):.0f}  max {lengths.max()}")
    padded = real / computed(lengths, args.batch)
    print(f"  padded batching (batch {args.batch}): real-token fraction {padded:.2%}")
    for name, packer in (("first-fit decreasing", first_fit_decreasing), ("best_fit_packs", best_fit_packs)):
        sequences = []
        for start in range(0, len(order), args.block_rows):
            block = lengths[start:start + args.block_rows]
            sequences += [int(block[b].sum()) for b in packer(block, args.max_len)]
        frac = real / computed(np.array(sequences), args.batch)
        print(f"  packing, {name} (max_len {args.max_len}, block {args.block_rows}): real-token fraction "
              f"{frac:.2%} in {len(sequences)} sequences; {frac / padded:.2f}x padded")


def step_time(preset: str, rows: list[dict], args) -> None:
    tokenizer = str(SHARED / "tokenizers" / "qwen3") if "qwen" in preset else None
    cfg = ModelConfig(preset=preset, tokenizer=tokenizer, max_len=1024)
    model, processor = build_model_and_processor(cfg)
    wrapped = EveryRankVision(model.float()).train()
    rows = rows[:args.step_rows]
    n = len(rows)
    batch = {"key": np.array([r["key"] for r in rows]), "task": np.array([r["task"] for r in rows]),
             "turns": np.array([r["turns"] for r in rows] + [None], dtype=object)[:n],
             "has_image": np.array([r["image"] is not None for r in rows]),
             "images": [Image.open(r["image"]).convert("RGB") if r["image"] else None for r in rows],
             "source": np.array(["bench"] * n), "position": np.arange(n)}
    results = {}
    for packing in (True, False):
        transform = SFTTransform(cfg, LossConfig(), TrainConfig(output="-", micro_batch_size=args.step_batch,
                                                                packing=packing), template_text=None,
                                 quarantine="/tmp/vlit-bench-quarantine")
        out = transform(batch)
        seqs = len(out["input_ids"])
        real = int((out["segment_ids"] > 0).sum())
        elapsed = []
        for _ in range(args.step_rounds):
            start = time.perf_counter()
            for lo in range(0, seqs, args.step_batch):
                inputs = collate({k: v[lo:lo + args.step_batch] for k, v in out.items()})
                logits = wrapped(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 position_ids=inputs["position_ids"], pixel_values=inputs["pixel_values"],
                                 image_grid_thw=inputs.get("image_grid_thw"))
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:],
                                                         ignore_index=IGNORE)
                loss.backward()
            elapsed.append(time.perf_counter() - start)
        results[packing] = (real / min(elapsed), seqs)
    (packed, ps), (padded, qs) = results[True], results[False]
    print(f"{preset}: {n} rows, step time of the tiny model: packed {ps} sequences {packed:.0f} real tokens/s, "
          f"padded {qs} micro-batch rows {padded:.0f} real tokens/s; ratio packed/padded {packed / padded:.2f}x "
          f"(best of {args.step_rounds} rounds)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default=str(SHARED / "vision-flan-sample" / "annotation.json"))
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-rows", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=8, help="epochs of a small corpus (row order reshuffled)")
    parser.add_argument("--step-rows", type=int, default=96)
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument("--step-rounds", type=int, default=2)
    args = parser.parse_args()
    print("$ python " + shlex.join(sys.argv))
    rows = rows_of(args.corpus)
    for family in ("llava-1.5", "qwen2.5-vl"):
        fractions(family, rows, args)
    torch.manual_seed(0)
    for preset in ("tiny", "tiny-qwen2.5-vl"):
        step_time(preset, rows, args)


if __name__ == "__main__":
    main()
