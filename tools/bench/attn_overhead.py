#!/usr/bin/env python
"""Host cost of the packed (varlen) attention call, eager and inside ``torch.compile``.

For each way of calling the flash varlen kernel, ``--calls`` forward + backward calls are queued
back to back: ``launch_ms`` is the host time per call before the final synchronise (what the call
costs the host, which in a training step must stay below the GPU's time), ``total_ms`` the time
per call including it (the GPU's time, when the host keeps ahead).

    python tools/bench/attn_overhead.py            # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from areal_hpc.train import attention  # noqa: E402


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


def transformers_call(q, k, v, cu, max_len):
    """What a decoder layer does: our attention function on ``[1, H, T, D]`` tensors."""
    out, _ = attention.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                max_length_q=max_len, max_length_k=max_len)
    return out


def wrapper_call(q, k, v, cu, max_len):
    """torch's public ``varlen_attn`` (a custom op around the same kernel), K/V repeated to Q's heads."""
    from torch.nn.attention.varlen import varlen_attn

    k, v = attention._repeat_kv(k, q.shape[1], 1), attention._repeat_kv(v, q.shape[1], 1)
    out = varlen_attn(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(),
                      v[0].transpose(0, 1).contiguous(), cu, cu, max_len, max_len, window_size=(-1, 0))
    return out.unsqueeze(0)


def measure(fn, inputs, calls: int) -> dict:
    q, k, v, cu, max_len = inputs
    for _ in range(3):
        fn(q, k, v, cu, max_len).sum().backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(q, k, v, cu, max_len).sum().backward()
    t_launch = time.perf_counter() - t0
    torch.cuda.synchronize()
    t_total = time.perf_counter() - t0
    return {"launch_ms": round(1e3 * t_launch / calls, 3), "total_ms": round(1e3 * t_total / calls, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--calls", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda")
    attention.probe(dev)
    inputs = make_inputs(a.tokens, a.heads, a.kv_heads, a.head_dim, 4096, dev)
    print(json.dumps({"torch": torch.__version__, **attention._state}), flush=True)
    grouped = attention._state["gqa"]
    runs = [("ours", g, c) for g in ([True, False] if grouped else [False]) for c in (False, True)]
    runs += [("torch_varlen_attn", False, c) for c in (False, True)]
    for name, gqa, compiled in runs:
        attention._state["gqa"] = gqa
        fn = transformers_call if name == "ours" else wrapper_call
        f = torch.compile(fn, dynamic=True) if compiled else fn
        try:
            r = measure(f, inputs, a.calls)
        except Exception as e:  # noqa: BLE001 - report and go on
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps({"bench": "attn_overhead", "call": name, "gqa_native": gqa, "compiled": compiled,
                          **r}), flush=True)
    attention._state["gqa"] = grouped


if __name__ == "__main__":
    main()
