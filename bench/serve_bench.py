"""Serve throughput: dynamic batching (`@serve.batch`) against one request at a time.

Judge: the same N requests (VLFeedback rubric, three aspects, logprob mode, the tiny LLaVA,
images on half of them) through the ingress's DeploymentHandle, to two judge deployments
of the same model: `batched` (max_batch_size 32: up to 96 aspect prompts per forward
pass) gets all requests at once; `single` (max_batch_size 1) gets them one after another,
each awaited before the next is sent. The same requests to a reference judge (no model)
measure what Serve, the ingress and image decoding cost. Generator: the same M chat
requests (sampling, max_tokens 16) the same two ways. Each side is warmed up first; Serve, the ingress and
image decoding are on both sides.

    python bench/serve_bench.py [--requests 256 --gen-requests 64 --max-batch 32]
    python bench/serve_bench.py --generator-backend vllm   # GPU serving image, with vllm
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import tempfile
import time

from PIL import Image

from vlit.config import RayConfig, ServeConfig
from vlit.runtime import init_ray


def png_url(i: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def judge_requests(n: int) -> list[dict]:
    return [{"model": None, "instruction": f"Describe the objects in image {i} and their colors." + " Be precise." * (i % 3),
             "response": f"The image shows shape number {i % 17} in a plain color." + " It is centered." * (i % 4),
             **({"image": png_url(i)} if i % 2 else {})} for i in range(n)]


def chat_requests(n: int) -> list[dict]:
    return [{"model": None, "max_tokens": 16, "temperature": 0.8,
             "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(i)}},
                                                       {"type": "text", "text": f"What is shown in image {i}?"}]}]}
            for i in range(n)]


def config(args, port: int) -> ServeConfig:
    tiny = {"kind": "hf", "model": {"preset": "tiny", "max_len": 2048}, "threads": args.threads}
    gen_backend = tiny if args.generator_backend == "hf" else {"kind": "vllm", "model": {"preset": "tiny", "max_len": 2048}}

    def deployment(batch: int, gpu: bool = False) -> dict:
        return {"num_cpus": 0.5, "num_gpus": 1.0 if gpu else 0.0, "max_ongoing_requests": max(64, batch),
                "max_queued_requests": -1, "batch": {"max_batch_size": batch, "wait_timeout_s": 0.01}}

    gpu = args.generator_backend == "vllm"
    return ServeConfig.model_validate({
        "http": {"host": "127.0.0.1", "port": port},
        "request_timeout_s": 600,
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 1024, "max_queued_requests": -1},
        "judges": {"batched": {"backend": tiny, "deployment": deployment(args.max_batch)},
                   "single": {"backend": tiny, "deployment": deployment(1)},
                   # No model: what Serve, the ingress and image decoding cost per request.
                   "ref-batched": {"backend": {"kind": "reference"}, "deployment": deployment(args.max_batch)},
                   "ref-single": {"backend": {"kind": "reference"}, "deployment": deployment(1)}},
        "generators": {"batched": {"backend": gen_backend, "max_new_tokens": 16, "deployment": deployment(16, gpu)},
                       "single": {"backend": gen_backend, "max_new_tokens": 16, "deployment": deployment(1, gpu)}},
    })


async def all_at_once(handle, bodies: list[dict]) -> list[dict]:
    return await asyncio.gather(*[handle.remote(b) for b in bodies])


async def one_at_a_time(handle, bodies: list[dict]) -> list[dict]:
    return [await handle.remote(b) for b in bodies]


def timed(fn, handle, bodies):
    t0 = time.perf_counter()
    out = asyncio.run(fn(handle, bodies))
    return out, time.perf_counter() - t0


def side(name: str, bodies: list[dict]) -> list[dict]:
    return [{**b, "model": name} for b in bodies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--gen-requests", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--generator-backend", choices=["hf", "vllm"], default="hf")
    # torch threads per replica; None: one per core. On 2 cores a replica with 2 threads
    # competes with the ingress and the proxy for both.
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from ray import serve

    from vlit.serve.app import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tempfile.mkdtemp(prefix="vlit-bench-", dir="/tmp")
    init_ray(RayConfig(num_cpus=4, object_store_mb=512), workdir=work)
    cfg = config(args, port)
    ingress = start(cfg)
    judge = ingress.options(method_name="judge")
    chat = ingress.options(method_name="chat")
    cores = os.cpu_count()
    print(f"tiny LLaVA (hf, torch threads {args.threads or cores}), {args.requests} judge requests x 3 aspects (logprob), "
          f"{args.gen_requests} chat requests (16 new tokens), {cores} cores, Serve on 127.0.0.1")

    bodies = judge_requests(args.requests)
    for name in ("batched", "single"):  # warm-up: first batches pay for lazy initialisation
        timed(all_at_once if name == "batched" else one_at_a_time, judge, side(name, bodies[:8]))
    before = {s["name"]: s for s in asyncio.run(_stats(ingress))}
    batched, t_batched = timed(all_at_once, judge, side("batched", bodies))
    single, t_single = timed(one_at_a_time, judge, side("single", bodies))
    diff = max(abs(a - b) for x, y in zip(batched, single) for k in x["scores"]
               for a, b in zip(x["scores"][k]["distribution"], y["scores"][k]["distribution"]))
    stats = {s["name"]: s for s in asyncio.run(_stats(ingress))}
    busy = {n: stats[n]["busy_s"] - before[n]["busy_s"] for n in ("judge-batched", "judge-single")}
    print(f"judge batched      : {args.requests / t_batched:8.1f} requests/s  ({t_batched:6.1f} s, "
          f"{busy['judge-batched']:5.1f} s in the model; largest batch {stats['judge-batched']['largest_batch']} requests)")
    print(f"judge one at a time: {args.requests / t_single:8.1f} requests/s  ({t_single:6.1f} s, "
          f"{busy['judge-single']:5.1f} s in the model)")
    print(f"judge ratio batched/one-at-a-time: {t_single / t_batched:.2f}x (goal >= 5); "
          f"largest score difference {diff:.1e}")

    refs = [{**b, "reference": "a plain color"} for b in bodies]
    timed(all_at_once, judge, side("ref-batched", refs[:8]))
    _, r_batched = timed(all_at_once, judge, side("ref-batched", refs))
    _, r_single = timed(one_at_a_time, judge, side("ref-single", refs))
    print(f"no model (reference judge): batched {args.requests / r_batched:6.1f} requests/s, one at a time "
          f"{args.requests / r_single:6.1f} requests/s ({r_single / args.requests * 1000:.1f} ms a request)")

    chats = chat_requests(args.gen_requests)
    for name in ("batched", "single"):
        timed(all_at_once if name == "batched" else one_at_a_time, chat, side(name, chats[:4]))
    gb, tgb = timed(all_at_once, chat, side("batched", chats))
    gs, tgs = timed(one_at_a_time, chat, side("single", chats))
    tok_b = sum(r["usage"]["completion_tokens"] for r in gb)
    tok_s = sum(r["usage"]["completion_tokens"] for r in gs)
    print(f"generator batched      : {tok_b / tgb:8.1f} tokens/s  {len(gb) / tgb:6.1f} requests/s ({tgb:5.1f} s)")
    print(f"generator one at a time: {tok_s / tgs:8.1f} tokens/s  {len(gs) / tgs:6.1f} requests/s ({tgs:5.1f} s)")
    print(f"generator ratio batched/one-at-a-time: {(tok_b / tgb) / (tok_s / tgs):.2f}x tokens/s "
          f"({args.generator_backend} backend)")
    serve.shutdown()


async def _stats(ingress) -> list[dict]:
    health = await ingress.options(method_name="health").remote()
    return list(health["deployments"].values())


if __name__ == "__main__":
    main()
