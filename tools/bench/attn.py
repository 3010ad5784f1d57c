#!/usr/bin/env python
"""Packed (varlen) causal attention: GPU time and accuracy of torch's kernels, and the host cost
of the call as a decoder layer makes it. One JSON line per measurement.

``kernels``: for the attention shapes of the benchmarked models (16k tokens of documents 256-4096
long), each kernel runs forward + backward through its aten op: flash (FA2, what
``attn_impl=varlen`` uses), flash told that the longest document is the whole micro-batch
(``flash_max_total``: more thread blocks, most of which exit at once), cuDNN
(``_cudnn_attention_forward`` with cumulative sequence lengths), memory-efficient
(``_efficient_attention_forward``), and ``packed`` (our `varlen_attention_forward`, any device);
grouped-query K/V as they are and repeated to the query's heads. ``gpu_ms`` is the CUDA-event
time per forward + backward, ``tflops`` the causal FLOPs (forward 2 matmuls, backward 5, each over
the causal half of every document) per second, ``max_err`` the largest difference of output and
gradients to an fp32 per-document reference, relative to the reference's largest value.

``overhead``: for each way of calling the flash varlen kernel, ``--calls`` forward + backward
calls are queued back to back: ``launch_ms`` is the host time per call before the final
synchronise (what the call costs the host, which in a training step must stay below the GPU's
time), ``total_ms`` the time per call including it (the GPU's time, when the host keeps ahead).

    python tools/bench/attn.py kernels      # GPU
    python tools/bench/attn.py overhead     # GPU
    python tools/bench/attn.py --smoke      # both on CPU, small shapes, the kernels that run there (CI)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from common import sync
from areal_hpc.train import packed_attention

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-1.5b": (12, 2, 128)}


def make_inputs(total: int, hq: int, hkv: int, dim: int, max_doc: int, device):
    lens, used, g = [], 0, torch.Generator().manual_seed(0)
    while used < total:
        n = min(int(torch.randint(256, max_doc + 1, (1,), generator=g)), total - used)
        lens.append(n)
        used += n
    cu = torch.tensor([0] + lens).cumsum(0).to(device, torch.int32)
    q = torch.randn(1, hq, total, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, total, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, total, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    return q, k, v, cu, max(lens)


# ---------------------------------------------------------------------------- kernels ([T, H, D])

def flash(q, k, v, cu, max_len):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False)[0]


def cudnn(q, k, v, cu, max_len):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True,
                                                   False)[0]


def efficient(q, k, v, cu, max_len):
    out = torch.ops.aten._efficient_attention_forward(q[None], k[None], v[None], None, cu, cu, max_len, max_len,
                                                      0.0, 1, True)[0]
    return out[0]


def flash_max_total(q, k, v, cu, max_len):
    """flash with the micro-batch's length as the longest document (a constant under padding)."""
    return flash(q, k, v, cu, q.shape[0])


def packed(q, k, v, cu, max_len):
    """Our attention function, as a decoder layer calls it (``[1, H, T, D]`` in, ``[1, T, H, D]`` out)."""
    out, _ = packed_attention.varlen_attention_forward(
        None, *(t.transpose(0, 1)[None] for t in (q, k, v)), None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=max_len, max_length_k=max_len)
    return out[0]


KERNELS = {"flash": flash, "flash_max_total": flash_max_total, "cudnn": cudnn, "efficient": efficient,
           "packed": packed}


def reference(q, k, v, cu):
    """fp32 causal SDPA per document; ``[T, H, D]`` in, out."""
    k, v = packed_attention._repeat_kv(k, q.shape[1], 1), packed_attention._repeat_kv(v, q.shape[1], 1)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], is_causal=True)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1).transpose(0, 1)


def run_grads(fn, q, k, v, cu, max_len, grad, grouped: bool):
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    kk, vv = qkv[1], qkv[2]
    if not grouped:
        kk, vv = (packed_attention._repeat_kv(t, q.shape[1], 1) for t in (kk, vv))
    out = fn(qkv[0], kk, vv, cu, max_len)
    out.backward(grad)
    return [out] + [t.grad for t in qkv]


def time_ms(fn, q, k, v, cu, max_len, grad, grouped: bool, iters: int) -> float:
    for _ in range(3):
        run_grads(fn, q, k, v, cu, max_len, grad, grouped)
    if q.device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            run_grads(fn, q, k, v, cu, max_len, grad, grouped)
        return 1e3 * (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run_grads(fn, q, k, v, cu, max_len, grad, grouped)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def cmd_kernels(a, dev: torch.device, shapes: dict) -> None:
    print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                      "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}), flush=True)
    packed_attention.probe(dev)
    kernels = KERNELS if dev.type == "cuda" else {"packed": packed}  # the aten kernels are CUDA-only
    ms_key = "gpu_ms" if dev.type == "cuda" else "cpu_ms"
    for model, (hq, hkv, dim) in shapes.items():
        q4, k4, v4, cu, max_len = make_inputs(a.tokens, hq, hkv, dim, a.max_doc, dev)
        q, k, v = (t.detach()[0].transpose(0, 1).contiguous() for t in (q4, k4, v4))  # [T, H, D]
        grad = torch.randn_like(q)
        lens = (cu[1:] - cu[:-1]).double()
        flops = 3.5 * 2 * float((lens * lens).sum()) * hq * dim  # fwd 2 causal matmuls (L^2 D each), bwd 2.5x
        qkv = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref_out = reference(*qkv, cu)
        ref_out.backward(grad.float())
        want = [ref_out.detach()] + [t.grad for t in qkv]
        for name, fn in kernels.items():
            for grouped in (True, False):
                row = {"bench": "attn_kernels", "model": model, "kernel": name, "gqa_native": grouped}
                try:
                    got = run_grads(fn, q, k, v, cu, max_len, grad, grouped)
                    row["max_err"] = round(max(float((g.float() - w).abs().max() / w.abs().max())
                                               for g, w in zip(got, want)), 5)
                    ms = time_ms(fn, q, k, v, cu, max_len, grad, grouped, a.iters)
                    row.update({ms_key: round(ms, 3), "tflops": round(flops / ms / 1e9, 1)})
                except Exception as e:  # noqa: BLE001 - report and go on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------------- host overhead ([1, H, T, D])

def transformers_call(q, k, v, cu, max_len):
    """What a decoder layer does: our attention function on ``[1, H, T, D]`` tensors."""
    out, _ = packed_attention.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                       max_length_q=max_len, max_length_k=max_len)
    return out


def wrapper_call(q, k, v, cu, max_len):
    """torch's public ``varlen_attn`` (a custom op around the same kernel), K/V repeated to Q's heads."""
    from torch.nn.attention.varlen import varlen_attn

    k, v = packed_attention._repeat_kv(k, q.shape[1], 1), packed_attention._repeat_kv(v, q.shape[1], 1)
    out = varlen_attn(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(),
                      v[0].transpose(0, 1).contiguous(), cu, cu, max_len, max_len, window_size=(-1, 0))
    return out.unsqueeze(0)


def measure(fn, inputs, calls: int) -> dict:
    q, k, v, cu, max_len = inputs
    for _ in range(3):
        fn(q, k, v, cu, max_len).sum().backward()
    sync(q.device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(q, k, v, cu, max_len).sum().backward()
    t_launch = time.perf_counter() - t0
    sync(q.device)
    t_total = time.perf_counter() - t0
    return {"launch_ms": round(1e3 * t_launch / calls, 3), "total_ms": round(1e3 * t_total / calls, 3)}


def cmd_overhead(a, dev: torch.device, shape: tuple, compiled_too: bool) -> None:
    hq, hkv, dim = shape
    packed_attention.probe(dev)
    inputs = make_inputs(a.tokens, hq, hkv, dim, a.max_doc, dev)
    print(json.dumps({"torch": torch.__version__, **packed_attention._state}), flush=True)
    grouped = packed_attention._state["gqa"]
    modes = (False, True) if compiled_too else (False,)
    runs = [("ours", g, c) for g in ([True, False] if grouped else [False]) for c in modes]
    if dev.type == "cuda":
        runs += [("torch_varlen_attn", False, c) for c in modes]
    for name, gqa, compiled in runs:
        packed_attention._state["gqa"] = gqa
        fn = transformers_call if name == "ours" else wrapper_call
        f = torch.compile(fn, dynamic=True) if compiled else fn
        try:
            r = measure(f, inputs, a.calls)
        except Exception as e:  # noqa: BLE001 - report and go on
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps({"bench": "attn_overhead", "call": name, "gqa_native": gqa, "compiled": compiled,
                          **r}), flush=True)
    packed_attention._state["gqa"] = grouped


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["kernels", "overhead"], help="(all with --smoke)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--max-doc", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20, help="kernels: timed forward + backward per kernel")
    p.add_argument("--calls", type=int, default=20, help="overhead: calls queued per measurement")
    p.add_argument("--shape", default="14,2,64", help="overhead: query heads, KV heads, head dim")
    p.add_argument("--smoke", action="store_true", help="CPU, 512 tokens, 2 iterations, no torch.compile (CI)")
    a = p.parse_args(argv)
    if a.smoke:
        a.tokens, a.max_doc, a.iters, a.calls = 512, 300, 2, 2
        dev, shapes = torch.device("cpu"), {"tiny": (4, 2, 16)}
        cmd_kernels(a, dev, shapes)
        cmd_overhead(a, dev, shapes["tiny"], compiled_too=False)
        return
    if a.what is None:
        p.error("say kernels or overhead (or --smoke)")
    dev = torch.device("cuda")
    if a.what == "kernels":
        cmd_kernels(a, dev, SHAPES)
    else:
        cmd_overhead(a, dev, tuple(int(x) for x in a.shape.split(",")), compiled_too=True)


if __name__ == "__main__":
    main()
