#!/usr/bin/env python
"""Inference throughput; one JSON line per measurement.

    python tools/bench/infer.py --gpu           # hf engine decode tok/s, Qwen2.5-0.5B shape, batch 64 and 256,
                                                # CUDA graphs and eager, vs model.generate
    python tools/bench/infer.py                 # CPU: pool, engine, 1 and 2 hf servers
    python tools/bench/infer.py --mode pool     # requests/s through the pool, trivial server
    python tools/bench/infer.py --mode servers  # client+server req/s and tok/s (toy model)
    python tools/bench/infer.py --mode engine   # in-process engine vs model.generate (toy, CPU)
    python tools/bench/infer.py --smoke         # the --gpu code on CPU with a tiny model, and the pool (CI)

Servers run as subprocesses (``areal-hpc serve``) in a temporary run dir;
the client is `ServerPool` in this process. Every subprocess is killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import QWEN25_SHAPES, QWEN25_VOCAB, REPO as ROOT, TINY_SHAPE, emit

# decoder shape of the GPU decode benchmark (random init): the Qwen2.5-0.5B architecture
QWEN25_05B_SHAPE = dict(QWEN25_SHAPES["qwen2.5-0.5b"], vocab_size=QWEN25_VOCAB)


# ---------------------------------------------------------------------- a server that returns at once

def trivial_server() -> None:
    from aiohttp import web

    body = json.dumps({"output_ids": [5], "meta_info": {
        "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 4, "completion_tokens": 1,
        "weight_version": "0", "output_token_logprobs": [[-0.5, 5, None]]}}).encode()

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/generate", generate)
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None)


async def _drive(pool, n: int, concurrency: int, make_req) -> tuple[float, int]:
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with sem:
            res = await pool.generate(*make_req(i))
            tokens += len(res.output_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0, tokens


def bench_pool(n: int, concurrency: int) -> None:
    from areal_hpc.inference.client import ServerPool

    proc = subprocess.Popen([sys.executable, __file__, "--trivial-server"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())

        async def run():
            async with ServerPool(None, api_key="k") as pool:
                pool.add_server("trivial", f"127.0.0.1:{port}")
                await _drive(pool, 200, concurrency, lambda i: ([1, 2, 3, 4], {"max_new_tokens": 1}))
                return await _drive(pool, n, concurrency, lambda i: ([1, 2, 3, 4], {"max_new_tokens": 1}))

        dt, _ = asyncio.run(run())
        emit(bench="pool_trivial_server", requests=n, concurrency=concurrency, seconds=round(dt, 3),
             requests_per_s=round(n / dt, 1), cpu_count=os.cpu_count())
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- real hf servers

def start_servers(run_dir: Path, k: int, model: str, threads: int) -> list:
    from areal_hpc.config import dump_yaml, load_config

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), AREAL_HPC_LOG_LEVEL="WARNING")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(None, [
        f"server.model_path={model}", "launcher.heartbeat_s=0.5", "launcher.ttl_s=5"])))
    return [subprocess.Popen([sys.executable, "-m", "areal_hpc", "serve", "--run-dir", str(run_dir), "--server-id",
                              f"bench{i}", "--backend", "hf"],
                             cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, start_new_session=True)
            for i in range(k)]


def stop_servers(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def bench_servers(counts, n: int, concurrency: int, prompt_len: int, new_tokens: int, model: str) -> None:
    from areal_hpc.inference.client import ServerPool
    from areal_hpc.registry import Registry
    from areal_hpc.toy import resolve_model

    model = resolve_model(model)
    cores = os.cpu_count() or 1
    for k in counts:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp)
            procs = start_servers(run_dir, k, model, threads=max(1, cores // k))
            try:
                reg = Registry(run_dir / "registry", ttl_s=5)
                reg.wait_for("servers", k, timeout_s=120, predicate=lambda r: r.get("state") == "ready")
                rng = random.Random(0)
                vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
                prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(n)]
                params = {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}

                async def run():
                    async with ServerPool(reg, refresh_s=0.5) as pool:
                        await pool.wait_for_servers(k, 30)
                        await _drive(pool, 2 * concurrency, concurrency, lambda i: (prompts[i % n], params))
                        return await _drive(pool, n, concurrency, lambda i: (prompts[i], params))

                dt, tokens = asyncio.run(run())
                emit(bench="hf_servers", servers=k, requests=n, concurrency=concurrency, prompt_len=prompt_len,
                     new_tokens=new_tokens, seconds=round(dt, 3), requests_per_s=round(n / dt, 1),
                     tokens_per_s=round(tokens / dt, 1), torch_threads_per_server=max(1, cores // k),
                     cpu_count=cores)
            finally:
                stop_servers(procs)


# ---------------------------------------------------------------------- GPU: engine vs generate

def bench_engine(batches, prompt_len: int, new_tokens: int, device: str = "cuda", tiny: bool = False,
                 model_dir: str = "") -> None:
    """hf engine (in-process, no HTTP) vs ``model.generate`` in the same run, same model.

    Default: a Qwen2.5-0.5B-shaped model (random init, bf16 on GPU). ``model_dir``: an existing
    model instead (the CPU mode uses the toy model); ``tiny``: a small qwen2 (smoke test)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from areal_hpc.inference.hf_engine import LLMEngine, ModelRunner, SamplingParams, Sequence

    if device == "cuda":
        assert torch.cuda.is_available(), "--gpu needs CUDA"
    dims = TINY_SHAPE if tiny else QWEN25_05B_SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = AutoConfig.for_model("qwen2", max_position_embeddings=32768, tie_word_embeddings=True, **dims)
    vocab = dims["vocab_size"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir:
            tmp = model_dir
            vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        else:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            model.save_pretrained(tmp)
            del model
        ctx = 1024 if prompt_len + new_tokens <= 1024 else 4096
        for graphs in ((True, False) if device == "cuda" else (False,)):
            runner = ModelRunner(tmp, dtype=str(dtype).replace("torch.", ""), device=device,
                                 max_running=max(batches), context_length=ctx, cuda_graph=graphs)
            engine = LLMEngine(runner).start()
            for b in batches:
                rng = random.Random(b)
                prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(b)]
                for _ in range(2):  # the first round captures the graphs; the second is timed
                    # the waiting thread sleeps on an event: a polling loop here would take the GIL
                    # from the engine thread every few hundred microseconds and slow it down
                    all_done = threading.Semaphore(0)
                    seqs = [Sequence(p, SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True),
                                     on_finish=lambda _s: all_done.release()) for p in prompts]
                    sync()
                    t0 = time.perf_counter()
                    for s in seqs:
                        engine.submit(s)
                    for _ in seqs:
                        all_done.acquire()
                    dt = time.perf_counter() - t0
                assert all(len(s.output_ids) == new_tokens for s in seqs)
                emit(bench="hf_engine", device=dev_name, model=Path(tmp).name if model_dir else "qwen2-0.5b-shape",
                     cuda_graph=runner.cuda_graphs,
                     decode_mode=runner.decode_mode, batch=b, prompt_len=prompt_len, new_tokens=new_tokens,
                     seconds=round(dt, 3), tokens_per_s=round(b * new_tokens / dt, 1), torch=torch.__version__)
            engine.stop()
            del engine, runner
            if device == "cuda":
                torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device)
        for b in batches:
            x = torch.randint(10, vocab, (b, prompt_len), device=device)
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=True, pad_token_id=0)
                sync()
                dt = time.perf_counter() - t0
            emit(bench="model_generate", device=dev_name, batch=b, prompt_len=prompt_len, new_tokens=new_tokens,
                 seconds=round(dt, 3), tokens_per_s=round(b * new_tokens / dt, 1), torch=torch.__version__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("all", "pool", "servers", "engine"), default="all")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the --gpu code on CPU with a tiny model, and the pool")
    ap.add_argument("--trivial-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=5000, help="pool benchmark requests")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--server-requests", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model", default="toy:qwen3-h128-l2")
    a = ap.parse_args()
    if a.trivial_server:
        return trivial_server()
    if a.gpu:
        return bench_engine([64, 256], prompt_len=128, new_tokens=256)
    if a.smoke:
        bench_engine([4, 8], prompt_len=8, new_tokens=8, device="cpu", tiny=True)
        return bench_pool(300, 32)
    if a.mode in ("all", "pool"):
        bench_pool(a.requests, a.concurrency)
    if a.mode in ("all", "engine"):
        from areal_hpc.toy import resolve_model

        bench_engine([64], prompt_len=8, new_tokens=32, device="cpu", model_dir=resolve_model(a.model))
    if a.mode in ("all", "servers"):
        bench_servers([1, 2], a.server_requests, a.concurrency, a.prompt_len, a.new_tokens, a.model)


if __name__ == "__main__":
    main()
