#!/usr/bin/env python
"""GPU time and accuracy of the packed (varlen) causal attention kernels torch ships.

For the attention shapes of the benchmarked models (16k tokens of documents 256-4096 long), each
kernel runs forward + backward through its aten op: flash (FA2, what ``attn_impl=varlen`` uses),
flash told that the longest document is the whole micro-batch (``flash_max_total``: more
thread blocks, most of which exit at once), cuDNN (``_cudnn_attention_forward`` with cumulative
sequence lengths) and memory-efficient (``_efficient_attention_forward``), grouped-query K/V as
they are and repeated to the query's heads.
``gpu_ms`` is the CUDA-event time per forward + backward, ``tflops`` the causal FLOPs
(forward 2 matmuls, backward 5, each over the causal half of every document) per second, and
``max_err`` the largest difference of output and gradients to an fp32 per-document reference,
relative to the reference's largest value.

    python tools/bench/attn_kernels.py            # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attn_overhead import make_inputs  # noqa: E402

from areal_hpc.train import attention  # noqa: E402

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-1.5b": (12, 2, 128)}


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


KERNELS = {"flash": flash, "flash_max_total": flash_max_total, "cudnn": cudnn, "efficient": efficient}


def reference(q, k, v, cu):
    """fp32 causal SDPA per document; ``[T, H, D]`` in, out."""
    k, v = attention._repeat_kv(k, q.shape[1], 1), attention._repeat_kv(v, q.shape[1], 1)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], is_causal=True)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1).transpose(0, 1)


def run_grads(fn, q, k, v, cu, max_len, grad, grouped: bool):
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    kk, vv = qkv[1], qkv[2]
    if not grouped:
        kk, vv = (attention._repeat_kv(t, q.shape[1], 1) for t in (kk, vv))
    out = fn(qkv[0], kk, vv, cu, max_len)
    out.backward(grad)
    return [out] + [t.grad for t in qkv]


def time_ms(fn, q, k, v, cu, max_len, grad, grouped: bool, iters: int) -> float:
    for _ in range(3):
        run_grads(fn, q, k, v, cu, max_len, grad, grouped)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run_grads(fn, q, k, v, cu, max_len, grad, grouped)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--max-doc", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda")
    print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                      "gpu": torch.cuda.get_device_name()}), flush=True)
    for model, (hq, hkv, dim) in SHAPES.items():
        q4, k4, v4, cu, max_len = make_inputs(a.tokens, hq, hkv, dim, a.max_doc, dev)
        q, k, v = (t.detach()[0].transpose(0, 1).contiguous() for t in (q4, k4, v4))  # [T, H, D]
        grad = torch.randn_like(q)
        lens = (cu[1:] - cu[:-1]).double()
        flops = 3.5 * 2 * float((lens * lens).sum()) * hq * dim  # fwd 2 causal matmuls (L^2 D each), bwd 2.5x
        qkv = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref_out = reference(*qkv, cu)
        ref_out.backward(grad.float())
        want = [ref_out.detach()] + [t.grad for t in qkv]
        for name, fn in KERNELS.items():
            for grouped in (True, False):
                row = {"bench": "attn_kernels", "model": model, "kernel": name, "gqa_native": grouped}
                try:
                    got = run_grads(fn, q, k, v, cu, max_len, grad, grouped)
                    row["max_err"] = round(max(float((g.float() - w).abs().max() / w.abs().max())
                                               for g, w in zip(got, want)), 5)
                    ms = time_ms(fn, q, k, v, cu, max_len, grad, grouped, a.iters)
                    row.update(gpu_ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
                except Exception as e:  # noqa: BLE001 - report and go on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
