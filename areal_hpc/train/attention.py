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
# Filled once, outside compiled code (`register`, `probe`), read inside it: which keyword
# arguments this torch's ``varlen_attn`` takes, and whether its kernel ran on this GPU.
_state = {"varlen_params": frozenset(), "varlen_ok": False}


def resolve_impl(attn_impl: str) -> str:
    """The transformers ``attn_implementation`` for an engine's ``attn_impl`` (registers ours)."""
    if attn_impl in ALIASES:
        register()
        return NAME
    return attn_impl


def register() -> None:
    from transformers import AttentionInterface

    try:
        from torch.nn.attention.varlen import varlen_attn

        _state["varlen_params"] = frozenset(inspect.signature(varlen_attn).parameters)
    except ImportError:  # torch < 2.10
        _state["varlen_params"] = frozenset()
    AttentionInterface.register(NAME, varlen_attention_forward)


def probe(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Run the flash varlen kernel once (forward and backward, grouped-query heads) on ``device``;
    from then on `varlen_attention_forward` uses it if that worked, per-document SDPA if not.

    Called by the engine before the first forward, so compiled layers see a settled choice.
    """
    register()
    ok = False
    if device.type == "cuda" and _state["varlen_params"]:
        try:
            q = torch.randn(8, 4, 64, device=device, dtype=dtype, requires_grad=True)
            kv = torch.randn(8, 2, 64, device=device, dtype=dtype, requires_grad=True)
            cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
            _flash_varlen(q, kv, kv, cu, 5, None).sum().backward()
            ok = True
        except (RuntimeError, TypeError, ValueError) as e:  # unsupported GPU or torch build
            log.warning("varlen flash attention unavailable (%s); using per-document SDPA", e)
    _state["varlen_ok"] = ok
    return ok


def _repeat_kv(x: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    rep = n_heads // x.shape[dim]
    return x if rep == 1 else x.repeat_interleave(rep, dim=dim)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                  scale: Optional[float]) -> torch.Tensor:
    """q ``[T, Hq, D]``, k, v ``[T, Hkv, D]`` -> ``[T, Hq, D]`` with torch's varlen flash kernel.

    Grouped-query heads go to the kernel as they are where this torch can (``enable_gqa``);
    otherwise K and V are repeated to ``Hq`` heads. The keyword arguments differ by version.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = _state["varlen_params"]
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if "scale" in params and scale is not None:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise RuntimeError("this torch's varlen_attn has no scale argument")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, q.shape[1], 1), _repeat_kv(v, q.shape[1], 1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


@torch.compiler.disable  # python loop over documents: compiled layers call it eagerly
def _per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                  scale: Optional[float]) -> torch.Tensor:
    """q ``[Hq, T, D]``, k, v ``[Hkv, T, D]`` -> ``[T, Hq, D]``: causal SDPA for each document separately."""
    k, v = _repeat_kv(k, q.shape[0], 0), _repeat_kv(v, q.shape[0], 0)
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        o = F.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], is_causal=True,
                                           scale=scale)
        outs.append(o[0])
    return torch.cat(outs, dim=1).transpose(0, 1)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]`` ->
    ``([1, T, Hq, D], None)``. Without ``cu_seq_lens_q`` the whole row is one causal document.

    The flash path (CUDA, bf16/fp16, after a successful `probe`) is traceable: in compiled
    decoder layers the transposes around it fuse with the rotary embedding, no graph break.
    """
    if sliding_window is not None:
        raise ValueError("attn_impl=varlen does not implement sliding-window attention")
    if query.shape[0] != 1:
        raise ValueError("attn_impl=varlen expects one packed row (batch size 1)")
    total = query.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu = torch.tensor([0, total], dtype=torch.int32, device=query.device)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _state["varlen_ok"]:
        max_len = kwargs.get("max_length_q") or total
        out = _flash_varlen(query[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1).contiguous(),
                            value[0].transpose(0, 1).contiguous(), cu.to(torch.int32), max_len, scaling)
        return out.unsqueeze(0), None
    return _per_document(query[0], key[0], value[0], cu.cpu(), scaling).unsqueeze(0), None
