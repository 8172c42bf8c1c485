"""What a GPU machine can do with vlit, measured in one short run (bench/gpu_check.sh).

    python bench/gpu_check.py [--out DIR] [--seconds 420]

Each check prints one line, `check <name>: ok|failed|skipped ...` with what it measured,
and the whole report goes to DIR/gpu_check.json:

- env       the GPU, torch, CUDA, and which of ray, deepspeed, vllm, flash_attn import
- bf16      one training step of each tiny family (LLaVA; Qwen2.5-VL and Qwen3-VL when
            --qwen-tokenizer names the Qwen3 tokenizer) in bf16, through the platform's
            own trainable model (`model.parts`) and collate (packed rows, block mask)
- attention per family, the packed batch's logits under sdpa with the block mask against
            flash_attention_2 on the flattened varlen layout (`collate(varlen=True)`)
            when flash-attn is installed: the largest relative difference
- mfu       a ~1.3B LLaVA built from config (random weights), bf16, packed 4096-token
            sequences: tokens/s of forward + backward + AdamW, and model FLOPs
            utilization against the GPU's dense bf16 peak (6 x params x tokens/s)
- sft       `jobs/sft.py` on the tiny config for 4 steps, 1 GPU worker, bf16 (needs ray
            and deepspeed)
- vllm      the tiny model exported with its chat template and served through Ray Serve
            LLM (`backend.kind: vllm`, vlit/serve/llm.py): one chat completion and one
            judge rating through the pool's ingress, with their latency (needs ray[llm])

A check whose packages are missing says so and is skipped; one that fails prints why and
the rest still run. The whole run stays under --seconds (each check gets what is left).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "platform"))
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device name.
PEAK_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def have(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def check_env() -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None,
           "missing": have("ray", "deepspeed", "vllm", "flash_attn", "mlflow")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return out


def _tiny_batch(model_cfg, rows: int = 8, varlen: bool = False):
    """Two packed sequences of the tiny model from rows with images of two sizes and
    text-only rows, as the stream makes them; `varlen`: flattened for flash-attn."""
    import numpy as np
    from PIL import Image

    from vlit.config import LossConfig, TrainConfig
    from vlit.model.collate import collate
    from vlit.model.packing import SFTTransform

    train = TrainConfig(output="/tmp/x", micro_batch_size=2)
    transform = SFTTransform(model_cfg, LossConfig(), train, template_text=None, quarantine="/tmp/vlit-gpu-quarantine")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32 + 16 * (i % 2), 48, 3), dtype=np.uint8)) if i % 3 else None
              for i in range(rows)]
    batch = {"key": np.array([f"r{i}" for i in range(rows)], dtype=object),
             "task": np.array(["t"] * rows, dtype=object), "has_image": np.array([im is not None for im in images]),
             "images": images,
             "turns": [[{"role": "user", "content": ("<image>\n" if images[i] else "") + "How many shapes are there?"
                         + " Look." * (i % 5)},
                        {"role": "assistant", "content": f"There are {i % 4 + 1} shapes."}] for i in range(rows)],
             "source": np.array(["gpu-check"] * rows, dtype=object), "position": np.arange(rows)}
    sequences = transform(batch)
    return collate({k: v[:2] for k, v in sequences.items()}, dtype=__import__("torch").bfloat16, varlen=varlen)


def _families(qwen_tokenizer: str | None) -> dict:
    """The tiny model of each family this machine can build: Qwen-VL needs the Qwen3 tokenizer."""
    from vlit.config import ModelConfig

    out = {"llava": ModelConfig(preset="tiny", dtype="bfloat16")}
    if qwen_tokenizer and os.path.isdir(qwen_tokenizer):
        for preset in ("tiny-qwen2.5-vl", "tiny-qwen3-vl"):
            out[preset.removeprefix("tiny-")] = ModelConfig(preset=preset, tokenizer=qwen_tokenizer, dtype="bfloat16",
                                                             max_len=1024)
    return out


def _on(batch: dict, device: str) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward(model, batch: dict):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                 image_grid_thw=batch.get("image_grid_thw"))


def check_bf16(device: str, qwen_tokenizer: str | None) -> dict:
    """One training step per family through the platform's trainable model and collate."""
    import torch

    from vlit.config import TrainConfig
    from vlit.model.build import build_model_and_processor
    from vlit.model.labels import IGNORE
    from vlit.model.parts import trainable_model

    out = {}
    for family, cfg in _families(qwen_tokenizer).items():
        model, _ = build_model_and_processor(cfg)
        model = trainable_model(model, TrainConfig(output="/tmp/x", trainable=["projector", "llm"])).to(device)
        batch = _on(_tiny_batch(cfg), device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        start = time.perf_counter()
        logits = _forward(model, batch)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:],
                                                 ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        assert torch.isfinite(loss), f"{family}: loss {loss}"
        out[family] = {"loss": round(float(loss.detach()), 4), "step_ms": round(1000 * (time.perf_counter() - start), 1),
                       "logits_dtype": str(logits.dtype)}
    return out


def check_attention(device: str, qwen_tokenizer: str | None) -> dict:
    """Per family, the packed batch's logits under sdpa with the block mask against
    flash_attention_2 on the flattened (varlen) layout the trainer feeds it
    (`model.attn_implementation: flash_attention_2`): the largest difference at real
    tokens, relative to the largest logit (bf16 noise is ~1e-2)."""
    import torch

    from vlit.model.build import build_model_and_processor
    from vlit.model.parts import EveryRankVision

    flash = not have("flash_attn") and device == "cuda"
    out = {} if flash else {"flash_attention_2": "skipped: " + ("no GPU" if device != "cuda" else "flash-attn is not installed")}
    for family, cfg in _families(qwen_tokenizer).items():
        masked_batch, flat_batch = _on(_tiny_batch(cfg), device), _on(_tiny_batch(cfg, varlen=True), device)
        model, _ = build_model_and_processor(cfg)
        model = EveryRankVision(model.to(device).eval())
        with torch.no_grad():
            masked = _forward(model, masked_batch)[masked_batch["segment_ids"] > 0].float()
            sdpa_varlen = _forward(model, flat_batch)[0].float()
            row = {"sdpa_varlen_rel_diff": round(float((masked - sdpa_varlen).abs().max() / masked.abs().max()), 5)}
            if flash:
                model.model.set_attn_implementation("flash_attention_2")
                varlen = _forward(model, flat_batch)[0].float()
                row["flash_varlen_rel_diff"] = round(float((masked - varlen).abs().max() / masked.abs().max()), 5)
        out[family] = row
    return out


def check_mfu(seconds: float) -> dict:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llm_params = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    seq, batch = 4096, 2
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    # Four packed rows per sequence: positions restart, as packing makes them.
    positions = torch.arange(seq, device="cuda").remainder(seq // 4).expand(batch, seq)
    steps, tokens, elapsed = 0, 0, 0.0
    budget = time.monotonic() + seconds
    while time.monotonic() < budget and steps < 12:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=ids, position_ids=positions, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        steps += 1
        if steps > 2:  # warm-up steps are not measured
            elapsed += time.perf_counter() - start
            tokens += batch * seq
    if not tokens:
        raise RuntimeError(f"only {steps} steps in {seconds:.0f} s: nothing measured after the warm-up")
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    rate = tokens / elapsed
    # Text tokens only (no images here): the LLM's 6 x N FLOPs per token; gradient
    # checkpointing's recompute is not counted (model FLOPs, not hardware FLOPs).
    flops = 6 * llm_params * rate
    return {"llm_params_b": round(llm_params / 1e9, 2), "tokens_per_s": round(rate), "steps_measured": steps - 2,
            "tflops": round(flops / 1e12, 1), "peak_tflops": peak,
            "mfu": round(flops / (peak * 1e12), 3) if peak else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.path.join(REPO, "platform"), **(env or {})})


def check_sft(seconds: float, work: str) -> dict:
    missing = have("ray", "deepspeed", "mlflow")
    if missing:
        return {"skipped": f"needs {missing}"}
    start = time.monotonic()
    run = _run([sys.executable, "jobs/sft.py", "--config", "configs/sft_tiny.yaml", f"run.workdir={work}/sft",
                f"corpus.out={work}/sft/corpora", f"train.output={work}/sft/run", "train.use_gpu=true",
                "train.num_workers=1", "train.max_steps=4", "model.dtype=bfloat16", "ray.num_cpus=8"], seconds)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    # The job's closing summary starts a line; Ray's worker logs may follow it.
    summary = json.JSONDecoder().raw_decode(run.stdout, run.stdout.rindex('{\n  "export"'))[0]
    return {"steps": summary["steps"], "loss": summary["loss"], "tokens_per_s": summary["tokens_per_s"],
            "seconds": round(time.monotonic() - start, 1)}


VLLM_CLIENT = """
import json, sys, time
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="none")
image = {"type": "image_url", "image_url": {"url": sys.argv[2]}}
start = time.perf_counter()
chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0.0,
    messages=[{"role": "user", "content": [image, {"type": "text", "text": "How many shapes are there?"}]}])
chat_s = time.perf_counter() - start
import urllib.request
req = urllib.request.Request(sys.argv[1] + "/judge", method="POST", headers={"Content-Type": "application/json"},
    data=json.dumps({"instruction": "How many shapes?", "response": "Two.", "image": sys.argv[2]}).encode())
start = time.perf_counter()
judged = json.loads(urllib.request.urlopen(req, timeout=120).read())
print(json.dumps({"chat_s": chat_s, "reply": chat.choices[0].message.content, "judge_s": time.perf_counter() - start,
                  "ratings": {k: v.get("rating") for k, v in judged["scores"].items()}}))
"""


def check_vllm(seconds: float, work: str) -> dict:
    missing = have("ray", "vllm")
    if missing:
        return {"skipped": f"needs {missing} (the serving image: ray[llm]==2.60.0, vllm==0.29.0)"}
    import base64
    import io

    from PIL import Image

    from vlit.config import ModelConfig
    from vlit.model.build import build_model_and_processor, export_model

    export = f"{work}/tiny-export"
    model, processor = build_model_and_processor(ModelConfig(preset="tiny"))
    export_model(model, processor, export, template="vicuna_v1")
    backend = {"kind": "vllm", "model": {"preset": None, "path": export, "max_len": 512}, "gpu_memory_utilization": 0.3}
    config = {"run": {"workdir": f"{work}/serve"}, "ray": {"num_cpus": 8},
              "serve": {"http": {"host": "127.0.0.1", "port": 8123},
                        "generators": {"tiny": {"backend": backend, "deployment": {"num_gpus": 1}}},
                        "judges": {"rater": {"backend": backend, "mode": "generate", "deployment": {"num_gpus": 1}}}}}
    path = f"{work}/serve.json"
    json.dump(config, open(path, "w"))
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    server = subprocess.Popen([sys.executable, "jobs/serve.py", "--config", path], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": os.path.join(REPO, "platform")})
    deadline = time.monotonic() + seconds
    try:
        lines = []
        for line in server.stdout:  # "serving vlit at URL/v1" once the deployments are up
            lines.append(line)
            if "serving vlit at" in line or time.monotonic() > deadline:
                break
        if not any("serving vlit at" in line for line in lines):
            raise RuntimeError("the serve job did not come up:\n" + "".join(lines[-40:]))
        run = _run([sys.executable, "-c", VLLM_CLIENT, "http://127.0.0.1:8123/v1", image],
                   max(30.0, deadline - time.monotonic()))
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-2000:])
        return json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="where gpu_check.json goes (default: a temp folder)")
    parser.add_argument("--seconds", type=float, default=420.0, help="the whole run's budget")
    parser.add_argument("--qwen-tokenizer", default=os.path.join(REPO, "..", "shared", "tokenizers", "qwen3"),
                        help="the Qwen3 tokenizer folder the tiny Qwen-VL models use (absent: LLaVA only)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: run the bf16 and attention checks on CPU (a dry run of the script)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="vlit-gpu-check-")
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vlit-gpu-work-")
    deadline = time.monotonic() + args.seconds
    report: dict = {}

    def left(share: float) -> float:
        return max(10.0, (deadline - time.monotonic()) * share)

    env = report["env"] = check_env()
    print(f"check env: {json.dumps(env)}", flush=True)
    checks = [("bf16", lambda: check_bf16(args.device, args.qwen_tokenizer)),
              ("attention", lambda: check_attention(args.device, args.qwen_tokenizer)),
              ("mfu", lambda: check_mfu(min(90.0, left(0.3)))),
              ("sft", lambda: check_sft(left(0.5), work)), ("vllm", lambda: check_vllm(left(0.95), work))]
    for name, check in checks:
        if env["gpu"] is None and not (args.device == "cpu" and name in ("bf16", "attention")):
            report[name] = {"skipped": "no GPU"}
        elif time.monotonic() > deadline:
            report[name] = {"skipped": "out of time"}
        else:
            started = time.monotonic()
            try:
                report[name] = {"status": "ok", **check()}
            except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
                report[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-3000:],
                                "where": traceback.format_exc(limit=3)[-1500:]}
            report[name]["check_seconds"] = round(time.monotonic() - started, 1)
        status = report[name].get("status") or "skipped"
        print(f"check {name}: {status} {json.dumps({k: v for k, v in report[name].items() if k != 'status'})}",
              flush=True)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"report: {os.path.join(out, 'gpu_check.json')}")
    return 1 if any(r.get("status") == "failed" for r in report.values() if isinstance(r, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
