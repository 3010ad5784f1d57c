"""Document-aware attention for packed micro-batches (``attn_impl=varlen``; ``sdpa`` would get a dense ``[T, T]``
mask): torch's flash varlen kernel on CUDA (bf16/fp16), else causal SDPA over the documents."""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NAME = "areal_varlen"
ALIASES = ("varlen", NAME)
# Settled by `probe` outside compiled code, read inside it: whether the flash kernel runs here, and
# whether it takes grouped-query K/V as they are.
_state = {"flash": False, "gqa": False}


def resolve_impl(attn_impl: str) -> str:
    """The transformers ``attn_implementation`` for an engine's ``attn_impl`` (registers ours)."""
    if attn_impl in ALIASES:
        register()
        return NAME
    return attn_impl


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


def probe(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Try the flash varlen kernel on ``device`` (forward and backward), used from then on if it ran; grouped-query K/V
    go in as they are only if that matches repeating them. Call before the first forward (compiled code reads it)."""
    register()
    flash = gqa = False
    if device.type == "cuda":
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(40, h, 64, device=device, dtype=dtype, generator=g) for h in (4, 2, 2))
            cu = torch.tensor([0, 13, 40], device=device, dtype=torch.int32)

            def run(grouped: bool):
                qkv = [t.detach().requires_grad_() for t in (q, k, v)]
                out = _flash_varlen(*qkv, cu, 27, None, grouped)
                out.float().square().sum().backward()
                return [out.float()] + [t.grad.float() for t in qkv]

            want = run(False)
            flash = True
            gqa = all(torch.allclose(a, b, atol=2e-2, rtol=2e-2) for a, b in zip(run(True), want))
            if not gqa:
                log.info("flash attention with grouped-query K/V differs from repeated K/V here; repeating them")
        except (RuntimeError, TypeError, ValueError) as e:  # unsupported GPU or torch build
            log.warning("varlen flash attention unavailable (%s); using per-document SDPA", e)
    _state.update(flash=flash, gqa=gqa)
    return flash


def _repeat_kv(x: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    rep = n_heads // x.shape[dim]
    return x if rep == 1 else x.repeat_interleave(rep, dim=dim)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                  scale: Optional[float], grouped: bool) -> torch.Tensor:
    """q ``[T, Hq, D]``, k, v ``[T, Hkv, D]`` -> ``[T, Hq, D]``, causal within each document of ``cu``, by the aten op
    (less host time per call than the ``varlen_attn`` wrapper); without ``grouped``, K/V repeated to ``Hq`` heads."""
    if k.shape[1] != q.shape[1] and not grouped:
        k, v = _repeat_kv(k, q.shape[1], 1), _repeat_kv(v, q.shape[1], 1)
    kwargs = {} if scale is None else {"scale": scale}
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False, **kwargs)[0]


@torch.compiler.disable  # data-dependent shapes: compiled layers call it eagerly
def _per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                  scale: Optional[float]) -> torch.Tensor:
    """q ``[Hq, T, D]``, k, v ``[Hkv, T, D]`` -> ``[T, Hq, D]``: causal SDPA within each document of ``cu``, as one
    batch (right-padded: a causal query never sees the padding) when that at most doubles the positions, else one by
    one."""
    k, v = _repeat_kv(k, q.shape[0], 0), _repeat_kv(v, q.shape[0], 0)
    bounds = cu.tolist()
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    total, longest = bounds[-1], max(lens, default=0)
    if len(lens) > 1 and min(lens) == longest:  # all of one length: a reshape, nothing to gather
        n, (h, _, d) = len(lens), q.shape
        o = F.scaled_dot_product_attention(*(x.reshape(h, n, longest, d).transpose(0, 1) for x in (q, k, v)),
                                           is_causal=True, scale=scale)  # [n, H, L, D]
        return o.transpose(1, 2).reshape(total, h, d)
    if len(lens) > 1 and len(lens) * longest <= 2 * total:
        starts, pos = cu[:-1].to(torch.long), torch.arange(longest)
        idx = (starts[:, None] + pos[None, :]).clamp(max=max(total - 1, 0)).to(q.device)  # [n, L]
        o = F.scaled_dot_product_attention(q[:, idx].transpose(0, 1), k[:, idx].transpose(0, 1),
                                           v[:, idx].transpose(0, 1), is_causal=True, scale=scale)  # [n, H, L, D]
        valid = (pos[None, :] < torch.tensor(lens)[:, None]).to(q.device)
        return o.transpose(1, 2)[valid]
    outs = [F.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], is_causal=True,
                                           scale=scale)[0] for s, e in zip(bounds[:-1], bounds[1:])]
    # contiguous like the batched paths: compiled code after this is guarded on the strides
    return torch.cat(outs, dim=1).transpose(0, 1).contiguous()


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]`` -> ``([1, T, Hq, D],
    None)``; without ``cu_seq_lens_q`` the row is one document. The flash path is traceable (no graph break)."""
    if sliding_window is not None:
        raise ValueError("attn_impl=varlen does not implement sliding-window attention")
    if query.shape[0] != 1:
        raise ValueError("attn_impl=varlen expects one packed row (batch size 1)")
    total = query.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu = torch.tensor([0, total], dtype=torch.int32, device=query.device)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _state["flash"]:
        max_len = kwargs.get("max_length_q") or total
        out = _flash_varlen(query[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1).contiguous(),
                            value[0].transpose(0, 1).contiguous(), cu.to(torch.int32), max_len, scaling,
                            _state["gqa"])
        return out.unsqueeze(0), None
    return _per_document(query[0], key[0], value[0], cu.cpu(), scaling).unsqueeze(0), None
