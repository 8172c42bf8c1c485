"""Real-token fraction of training sequences: packing vs padded batching.

Row lengths are real: every row of a corpus is rendered (vicuna_v1) and tokenized by
`encode_row` with the offline tokenizer, the image placeholder expanded to the processor's
image-token count (LLaVA-1.5 at 336 px, patch 14: 576 tokens). Packed: `SFTTransform`'s
grouping (image / text-only apart) and first-fit-decreasing packing, per stream block of
--block-rows rows, into sequences of --max-len; fraction = real tokens / (sequences *
max_len). Padded baseline: micro-batches of --batch rows in stream order, each padded to
its longest row; fraction = real tokens / (sum of batch * longest).

    python bench/packing_bench.py [--corpus ../shared/vision-flan-sample/annotation.json | --synth 4000]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile

import numpy as np

from vlit.config import LossConfig, ModelConfig, TrainConfig
from vlit.world import synth_corpus
from vlit.model.build import tiny_processor
from vlit.model.labels import encode_row
from vlit.model.packing import SFTTransform
from vlit.model.templates import EncodeError


def rows_of(annotation: str) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    return [
        {"turns": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]],
         "task": r["task_name"], "image": r.get("image")}
        for r in json.load(open(annotation))
    ]


def computed(lengths: np.ndarray, batch: int) -> int:
    """Token positions the model computes: each micro-batch trimmed to its longest."""
    return int(sum(len(b) * b.max() for b in np.split(lengths, range(batch, len(lengths), batch))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", help="a Vision-Flan annotation.json (default: a synthetic corpus)")
    parser.add_argument("--synth", type=int, default=4000, help="rows of the synthetic corpus")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-rows", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=8, help="epochs of a small corpus (row order reshuffled)")
    args = parser.parse_args()
    print("$ python " + shlex.join(sys.argv))

    if args.corpus:
        rows = rows_of(args.corpus)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = rows_of(synth_corpus(tmp, instances=args.synth, tasks=187, image_pool=16)["annotation"])
    processor = tiny_processor(args.image_size, args.patch_size)
    model_cfg = ModelConfig(max_len=args.max_len)
    encoded, too_long = [], 0
    for r in rows:
        try:
            encoded.append(encode_row(r, processor, model_cfg, LossConfig(), None))
        except EncodeError as e:
            assert e.reason == "too_long", e
            too_long += 1
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(encoded)) for _ in range(args.repeat)])
    lengths = np.array([len(encoded[i].input_ids) for i in order])

    padded = computed(lengths, args.batch)
    transform = SFTTransform.__new__(SFTTransform)  # the grouping and packing only, no processor
    transform.model_cfg, transform.epoch = model_cfg, 0
    transform.train_cfg = TrainConfig(output="-", micro_batch_size=args.batch)
    sequences = []  # real tokens per packed sequence, in stream order
    for start in range(0, len(order), args.block_rows):
        block = [encoded[i] for i in order[start:start + args.block_rows]]
        has_image = np.array([e.has_image for e in block])
        sequences += [sum(len(block[i].input_ids) for i in seq) for seq in transform.sequences(block, has_image, [str(start)])]
    real = int(lengths.sum())
    packed_frac, padded_frac = real / computed(np.array(sequences), args.batch), real / padded
    print(f"rows {len(lengths)} ({too_long} too long, quarantined)  mean length {lengths.mean():.0f} tokens  max {lengths.max()}  "
          f"(image tokens {int(processor._get_num_multimodal_tokens(image_sizes=[(args.image_size,) * 2]).num_image_tokens[0])})")
    print(f"padded batching (batch {args.batch}): real-token fraction {padded_frac:.2%}")
    print(f"packing (max_len {args.max_len}, block {args.block_rows}): real-token fraction {packed_frac:.2%} "
          f"in {len(sequences)} sequences ({real / (len(sequences) * args.max_len):.2%} of max_len)")
    print(f"ratio packed / padded: {packed_frac / padded_frac:.2f}x")


if __name__ == "__main__":
    main()
