"""Stage 1 on paper: GPUs and hours for the full Vision-Flan corpus (1,664,261 instances)
with a 7B and a 13B LLaVA-1.5, from tokens per instance measured on the real sample.

    python bench/sizing.py [--tokenizer ../shared/tokenizers/llama2] [--sample ../shared/vision-flan-sample] [--mfu 0.4]

--tokenizer is LLaMA-2's tokenizer folder (Vicuna v1.5's vocabulary, as in LLaVA-1.5) or
a llava-1.5 checkpoint folder. Measured with vlit's own path: `vlit corpus prepare` on
the sample, then `model.labels.encode_row` with the vicuna_v1 template and a LLaVA
processor at 336 px / patch 14, so `<image>` is the 576 tokens LLaVA-1.5 feeds the LLM
(CLIP ViT-L/14-336: 24 x 24 patches).

Compute: 6 FLOPs per trained parameter per token (forward + backward) for the LLM and the
projector (the projector on image tokens only), 2 per parameter per patch for the frozen
vision tower (forward only). Gradient checkpointing recomputes the forward (8N really
executed); by the usual convention that overhead lives in the MFU. Attention's own FLOPs
(~5% at 2k tokens for 13B) are left out. Wall hours assume linear scaling over GPUs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

CORPUS_INSTANCES = 1_664_261
H100_BF16_PEAK = 989e12  # dense FLOP/s, SXM
IMAGE_SIZE, PATCH = 336, 14
VISION_PARAMS = 303.5e6  # CLIP ViT-L/14-336 tower
# (LLM parameters, hidden size) of Vicuna v1.5 (LLaMA-2 shapes); projector: 1024 -> h -> h.
MODELS = {"7B": (6.74e9, 4096), "13B": (13.02e9, 5120)}
GPU_COUNTS = (8, 16, 32)


def projector_params(hidden: int, vision_hidden: int = 1024) -> float:
    return vision_hidden * hidden + hidden + hidden * hidden + hidden


def training_flops(instances: int, tokens_per_instance: float, image_fraction: float, llm_params: float,
                   hidden: int, epochs: int = 1) -> float:
    """FLOPs of `epochs` passes over `instances` rows (see the module doc for the rule)."""
    image_tokens = (IMAGE_SIZE // PATCH) ** 2
    per_instance = (6 * llm_params * tokens_per_instance
                    + image_fraction * 6 * projector_params(hidden) * image_tokens
                    + image_fraction * 2 * VISION_PARAMS * (image_tokens + 1))
    return epochs * instances * per_instance


def gpu_hours(flops: float, mfu: float, peak: float = H100_BF16_PEAK) -> float:
    return flops / (peak * mfu) / 3600


def processor_for(tokenizer_path: str):
    """LLaVA-1.5's processor: a llava-1.5 checkpoint folder's own, or LLaMA-2's tokenizer
    folder with `<image>` (id 32000) and a pad token added, CLIP at 336 px / patch 14."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    from vlit.model.build import load_processor

    if os.path.exists(os.path.join(tokenizer_path, "config.json")):
        return load_processor(tokenizer_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def measure(sample: Path, tokenizer_path: str) -> dict:
    """Tokens per instance of the sample through vlit's prepare, template and encode path:
    each row's `encode_row` input ids (vicuna_v1, LLaVA-1.5's preprocessing token for
    token: BOS, the image first and expanded), and the rows it quarantines, and why."""
    from vlit.config import LossConfig, ModelConfig, PrepareConfig
    from vlit.corpus.prepare import prepare_corpus
    from vlit.versions import CorpusVersion
    from vlit.model.families import num_image_tokens
    from vlit.model.labels import IGNORE, encode_row
    from vlit.model.templates import EncodeError

    processor = processor_for(tokenizer_path)
    tokenizer, per_image = processor.tokenizer, num_image_tokens(processor)
    model_cfg = ModelConfig(preset="tiny", template="vicuna_v1", max_len=4096)  # only template and max_len matter
    with tempfile.TemporaryDirectory() as out:
        summary = prepare_corpus(PrepareConfig(sources=[str(sample / "annotation.json")], format="vision-flan"), out)
        rows = CorpusVersion.open(summary["version"]).read_table().to_pylist()
    lengths, supervised, images, quarantined = [], [], 0, {}
    for row in rows:
        try:
            enc = encode_row(row, processor, model_cfg, LossConfig(target="response"), None)
        except EncodeError as e:
            quarantined[e.reason] = quarantined.get(e.reason, 0) + 1
            continue
        lengths.append(len(enc.input_ids))
        images += row["image"] is not None
        supervised.append(int((enc.labels != IGNORE).sum()))
    lengths.sort()
    return {"rows": len(rows), "tasks": len({r["task"] for r in rows}), "quarantined": quarantined,
            "image_tokens": per_image, "image_fraction": images / len(lengths),
            "mean": statistics.fmean(lengths), "median": statistics.median(lengths),
            "p90": lengths[int(0.9 * (len(lengths) - 1))], "max": lengths[-1],
            "supervised_mean": statistics.fmean(supervised), "vocab": len(tokenizer)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "llama2"),
                        help="LLaMA-2's tokenizer folder, or a llava-1.5 checkpoint folder")
    parser.add_argument("--sample", default=str(REPO.parent / "shared" / "vision-flan-sample"))
    parser.add_argument("--instances", type=int, default=CORPUS_INSTANCES)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--mfu", type=float, default=0.40)
    args = parser.parse_args()

    m = measure(Path(args.sample), args.tokenizer)
    print(f"sample: {m['rows']} rows over {m['tasks']} tasks; tokenizer vocab {m['vocab']}; "
          f"<image> = {m['image_tokens']} tokens; {m['image_fraction']:.0%} rows with an image")
    print(f"tokens per instance (vicuna_v1 as LLaVA-1.5 preprocesses it, image expanded): mean {m['mean']:.1f}, "
          f"median {m['median']:.0f}, p90 {m['p90']}, max {m['max']}")
    print(f"encode_row with this tokenizer: {m['rows'] - sum(m['quarantined'].values())} rows accepted "
          f"(supervised response tokens: mean {m['supervised_mean']:.1f}), quarantined {m['quarantined'] or 'none'}")
    tokens = args.instances * m["mean"] * args.epochs
    print(f"stage 1: {args.instances:,} instances x {args.epochs} epoch(s) = {tokens / 1e9:.2f} B tokens; "
          f"H100 bf16 peak {H100_BF16_PEAK / 1e12:.0f} TFLOP/s at {args.mfu:.0%} MFU")
    header = f"{'model':>5} {'PFLOP':>9} {'GPU-hours':>9}" + "".join(f" {f'wall h @{n}':>10}" for n in GPU_COUNTS)
    print(header)
    for name, (params, hidden) in MODELS.items():
        flops = training_flops(args.instances, m["mean"], m["image_fraction"], params, hidden, args.epochs)
        hours = gpu_hours(flops, args.mfu)
        print(f"{name:>5} {flops / 1e15:>9,.0f} {hours:>9.1f}" + "".join(f" {hours / n:>10.2f}" for n in GPU_COUNTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
