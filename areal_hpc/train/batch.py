"""Padded batches (the AReaL convention): a dict of tensors, per-token keys ``[B, L]`` padded on either side
(``attention_mask`` marks real tokens, ``loss_mask`` trained ones), per-sample keys ``[B]``. A *sample* is one
sequence without padding: per-token ``[n]``, per-sample 0-dim."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

Batch = Dict[str, torch.Tensor]
Sample = Dict[str, torch.Tensor]


def batch_size(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def is_token_key(batch: Batch, key: str) -> bool:
    """A key is per-token when its first two dimensions are those of ``input_ids``."""
    v, ids = batch[key], batch["input_ids"]
    return v.dim() >= 2 and tuple(v.shape[:2]) == tuple(ids.shape[:2])


def collate(samples: Sequence[Sample], pad_values: Dict[str, float] | None = None) -> Batch:
    """Right-pad samples back into a batch. 0-dim values are stacked as per-sample keys."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    pad_values = pad_values or {}
    lens = [int(s["input_ids"].shape[0]) for s in samples]
    max_len = max(lens)
    out: Batch = {}
    for k, v0 in samples[0].items():
        if v0.dim() == 0:
            out[k] = torch.stack([s[k] for s in samples])
            continue
        t = torch.full((len(samples), max_len, *v0.shape[1:]), pad_values.get(k, 0), dtype=v0.dtype)
        for i, s in enumerate(samples):
            t[i, : lens[i]] = s[k]
        out[k] = t
    out["attention_mask"] = (torch.arange(max_len)[None, :] < torch.tensor(lens)[:, None]).long()
    return out


def select(batch: Batch, idx: Sequence[int] | torch.Tensor) -> Batch:
    idx_t = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long)
    return {k: v[idx_t] for k, v in batch.items()}


def chunk_ranges(n_items: int, n_chunks: int) -> List[range]:
    """Split ``range(n_items)`` into ``n_chunks`` contiguous, near-equal ranges (earlier ones larger)."""
    base, extra = divmod(n_items, n_chunks)
    bounds = [c * base + min(c, extra) for c in range(n_chunks + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _whole_groups(batch: Batch, group_size: int) -> int:
    bs = batch_size(batch)
    if bs % group_size:
        raise ValueError(f"batch size {bs} is not a multiple of group size {group_size}")
    return bs // group_size


def _select_groups(batch: Batch, groups: Sequence[int], group_size: int) -> Batch:
    return select(batch, [g * group_size + j for g in groups for j in range(group_size)])


def split_batch(batch: Batch, n: int, group_size: int = 1) -> List[Batch]:
    """Split into ``n`` contiguous parts of whole groups (for PPO minibatches)."""
    n_groups = _whole_groups(batch, group_size)
    return [_select_groups(batch, r, group_size) for r in chunk_ranges(n_groups, max(1, min(n, n_groups)))]


def shard_batch(batch: Batch, rank: int, world_size: int, group_size: int = 1, balance: bool = True) -> Batch:
    """This rank's share of a batch every rank holds: whole groups, counts differing by at most one.
    ``balance``: groups dealt longest first to the rank with the fewest tokens (so ranks do not
    wait for each other), kept in batch order; else contiguous ranges."""
    ranges = chunk_ranges(_whole_groups(batch, group_size), world_size)
    if not balance:
        return _select_groups(batch, ranges[rank], group_size)
    tokens = batch["attention_mask"].long().sum(dim=1).view(-1, group_size).sum(dim=1).tolist()
    room = sorted((len(r) for r in ranges), reverse=True)  # how many groups each rank takes
    return _select_groups(batch, sorted(deal_least_loaded(tokens, world_size, room)[rank]), group_size)


def deal_least_loaded(weights: Sequence[int], k: int, room: Sequence[int] | None = None) -> List[List[int]]:
    """Item indices, heaviest first (the lower index of equals), each to the least-loaded of ``k``
    bins (the first of equals) that still takes items: ``room[b]`` items at most, unbounded
    without ``room``. Each bin's indices in the order they were dealt."""
    left = list(room) if room is not None else None
    bins: List[List[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        b = min((b for b in range(k) if left is None or left[b] > 0), key=lambda b: (loads[b], b))
        bins[b].append(i)
        loads[b] += weights[i]
        if left is not None:
            left[b] -= 1
    return bins


def async_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without waiting for the GPU (through pinned memory: a pageable
    copy would wait for all queued GPU work)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device`` (`async_to_device`)."""
    return {k: async_to_device(v, device) for k, v in batch.items()}
