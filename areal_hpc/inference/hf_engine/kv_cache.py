"""KV memory of the running batch: one row per sequence, its positions 0..n-1 in columns 0..n-1.

Passed to a transformers model as its cache: `update` writes where this step's mode says and returns what to attend to.
Prefill writes rows ``row0 .. row0+n`` at columns ``0 .. L`` and attends over the prompt itself (4-D causal+padding
mask); decode writes row ``i`` at column ``pos[i]`` and attends over columns ``0 .. width`` of rows ``0 .. n`` (masked
by ``col <= pos[i]``). Rows start at column 0, so sequences join and leave without re-padding anyone (`move_rows`). CPU
buffers grow by doubling; GPU ones are allocated once (CUDA graphs need fixed addresses).

`kv_attention_forward`: transformers' ``sdpa`` path copies a grouped-query model's keys and values once per query head
whenever a mask is passed (``repeat_kv``), most of a decode step's memory traffic; a decode step instead folds the query
heads of each KV head into the query-length dimension and attends to the cache as it is. Prefill keeps ``sdpa``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ATTENTION = "areal_kv"


def register_attention() -> str:
    """Make ``attn_implementation=ATTENTION`` known to transformers; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, kv_attention_forward)
    return ATTENTION


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


class KVCache:
    is_compileable = False  # transformers asks

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, rows: int, cols: int, max_rows: int, max_cols: int):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.max_rows, self.max_cols = max_rows, max_cols
        self.initial = (rows, cols)
        self.reset()
        # what the next `update` does: set by `begin_prefill` / `begin_decode` before every forward pass
        self._mode, self._row0, self._n, self._width = "", 0, 0, 0
        self._rows = self._pos = self._row_idx

    def _alloc(self, rows: int, cols: int) -> None:
        shape = (rows, self.n_kv_heads, cols, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        r, c = min(rows, self.rows), min(cols, self.cols)
        if r and c:
            for old, new in zip(self.k + self.v, new_k + new_v):
                new[:r, :, :c] = old[:r, :, :c]
        self.k, self.v = new_k, new_v
        self.rows, self.cols = rows, cols
        self._row_idx = torch.arange(rows, device=self.device)

    def ensure(self, rows: int, cols: int) -> None:
        """Make room for ``rows`` sequences of ``cols`` tokens (grows by doubling)."""
        if rows <= self.rows and cols <= self.cols:
            return
        if rows > self.max_rows or cols > self.max_cols:
            raise RuntimeError(f"KV cache request ({rows} rows x {cols} tokens) exceeds its capacity "
                               f"({self.max_rows} x {self.max_cols})")
        # sizes stay powers of two (or the capacity): the next one up, never below the current one
        self._alloc(max(self.rows, min(self.max_rows, 1 << (rows - 1).bit_length())),
                    max(self.cols, min(self.max_cols, max(16, 1 << (cols - 1).bit_length()))))

    def reset(self) -> None:
        """Drop everything and shrink back to the initial size (when idle)."""
        self.k: List[torch.Tensor] = []
        self.v: List[torch.Tensor] = []
        self.rows = self.cols = 0
        self._alloc(*self.initial)

    # ----------------------------------------------------------------- modes
    def begin_prefill(self, row0: int) -> None:
        self._mode, self._row0 = "prefill", row0

    def begin_decode(self, pos: torch.Tensor, width: int) -> None:
        """Rows ``0 .. len(pos)`` decode (on the fixed buffers of a CUDA graph, padding rows included)."""
        self._mode, self._n, self._width, self._pos = "decode", len(pos), width, pos
        self._rows = self._row_idx[:self._n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self._mode == "prefill":
            r0, n, length = self._row0, key_states.shape[0], key_states.shape[2]
            k[r0:r0 + n, :, :length] = key_states
            v[r0:r0 + n, :, :length] = value_states
            return key_states, value_states
        rows, pos = self._rows, self._pos
        k[rows, :, pos] = key_states[:, :, 0]
        v[rows, :, pos] = value_states[:, :, 0]
        return k[:self._n, :, :self._width], v[:self._n, :, :self._width]

    def move_rows(self, moves: Sequence[Tuple[int, int, int]]) -> None:
        """Copy row ``src`` (its first ``ncols`` columns) over row ``dst``."""
        for src, dst, ncols in moves:
            ncols = min(ncols, self.cols)
            for buf in self.k + self.v:
                buf[dst, :, :ncols] = buf[src, :, :ncols]

    def spread_rows(self, row0: int, idx: torch.Tensor, ncols: int) -> None:
        """Rows ``row0 + i`` become copies of rows ``row0 + idx[i]`` (their first ``ncols`` columns)."""
        for buf in self.k + self.v:
            buf[row0: row0 + len(idx), :, :ncols] = buf[row0 + idx, :, :ncols]

    # for transformers code that queries a cache; positions are always passed explicitly
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return self.n_layers
