"""The engine's attention function: decode steps attend with grouped queries, without copying K/V.

transformers' ``sdpa`` path expands the keys and values of grouped-query models to one copy per query head whenever a
mask is passed (``repeat_kv``, and the engine always passes one): for a decode step that copy is most of the attention's
memory traffic. Here a decode step (one query token per sequence) folds the query heads of each KV head into the
query-length dimension, ``[b, Hq, 1, D] -> [b, Hkv, Hq/Hkv, D]``, and attends to the cache as it is; the mask
``[b, 1, 1, W]`` broadcasts over both. Prefill keeps the ``sdpa`` path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

NAME = "areal_kv"


def register() -> str:
    """Make ``attn_implementation=NAME`` known to transformers; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, kv_attention_forward)
    return NAME


def kv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                         scaling: Optional[float] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """``query [b, Hq, q, D]``, ``key/value [b, Hkv, W, D]`` -> ``([b, q, Hq, D], None)``."""
    b, n_heads, q_len, dim = query.shape
    n_kv = key.shape[1]
    if q_len != 1 or n_kv == n_heads or kwargs.get("sliding_window") or getattr(module, "sliding_window", None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # query heads kv*G .. kv*G+G-1 share KV head kv (the layout repeat_kv would produce)
    q = query.reshape(b, n_kv, n_heads // n_kv, dim)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, 1, n_heads, dim), None
