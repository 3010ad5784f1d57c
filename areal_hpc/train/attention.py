"""Document-aware attention for packed micro-batches (``EngineConfig.attn_impl = "varlen"``).

With ``sdpa``, transformers turns packed ``position_ids`` into a dense ``[T, T]`` block-diagonal
mask: correct, but attention then costs O(T^2) over the whole packed row (and the flash kernel
cannot take a mask). ``varlen`` registers an attention function with transformers that gets
the document boundaries (``cu_seq_lens_q``, passed by the engine) and attends within each
document only: torch's flash-attention varlen kernel on CUDA (bf16/fp16), otherwise causal
``scaled_dot_product_attention`` per document. No mask is built for it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NAME = "areal_varlen"
ALIASES = ("varlen", NAME)
_state = {"varlen_ok": True}


def resolve_impl(attn_impl: str) -> str:
    """The transformers ``attn_implementation`` for an engine's ``attn_impl`` (registers ours)."""
    if attn_impl in ALIASES:
        register()
        return NAME
    return attn_impl


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    rep = n_heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                  scale: Optional[float]) -> torch.Tensor:
    """q, k, v ``[T, H, D]`` -> ``[T, H, D]`` with torch's varlen flash kernel (API differs by version)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if "scale" in params and scale is not None:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise RuntimeError("this torch's varlen_attn has no scale argument")
    cu = cu.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                  scale: Optional[float]) -> torch.Tensor:
    """q, k, v ``[H, T, D]`` -> ``[T, H, D]``: causal SDPA for each document separately."""
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        o = F.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], is_causal=True,
                                           scale=scale)
        outs.append(o[0])
    return torch.cat(outs, dim=1).transpose(0, 1)


@torch.compiler.disable  # compiled decoder layers call it eagerly (version checks, kernel fallback)
def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]`` ->
    ``([1, T, Hq, D], None)``. Without ``cu_seq_lens_q`` the whole row is one causal document."""
    if sliding_window is not None:
        raise ValueError("attn_impl=varlen does not implement sliding-window attention")
    if query.shape[0] != 1:
        raise ValueError("attn_impl=varlen expects one packed row (batch size 1)")
    n_heads, total = query.shape[1], query.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu = torch.tensor([0, total], dtype=torch.int32)
    max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
    k, v = _repeat_kv(key, n_heads), _repeat_kv(value, n_heads)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _state["varlen_ok"]:
        try:
            out = _flash_varlen(query[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(),
                                v[0].transpose(0, 1).contiguous(), cu, int(max_len), scaling)
            return out.unsqueeze(0), None
        except (ImportError, RuntimeError, TypeError) as e:  # older torch / unsupported GPU
            _state["varlen_ok"] = False
            log.warning("varlen flash attention unavailable (%s); using per-document SDPA", e)
    cu_cpu = cu.to("cpu") if cu.is_cuda else cu
    return _per_document(query[0], k[0], v[0], cu_cpu, scaling).unsqueeze(0), None
