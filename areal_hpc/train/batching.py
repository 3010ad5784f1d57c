"""A rollout batch turned into what each rank trains on: its shard, then micro-batches by token budget.

A batch is a dict of tensors: per-token keys ``[B, L]`` (``attention_mask`` marks real tokens, ``loss_mask`` trained
ones), per-sample keys ``[B]``. A micro-batch is one packed row, ``position_ids`` restarting for each document. Every
rank runs as many micro-batches (FSDP's collectives): ranks with fewer add dummy ones whose loss weighs zero."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from areal_hpc.train import dist

log = logging.getLogger(__name__)

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
    idx_t = torch.as_tensor(idx if isinstance(idx, torch.Tensor) else list(idx), dtype=torch.long)
    return {k: v[idx_t] for k, v in batch.items()}


def chunk_ranges(n_items: int, n_chunks: int) -> List[range]:
    """Split ``range(n_items)`` into ``n_chunks`` contiguous, near-equal ranges (earlier ones larger)."""
    base, extra = divmod(n_items, n_chunks)
    bounds = [c * base + min(c, extra) for c in range(n_chunks + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def group_ranges(batch: Batch, group_size: int = 1) -> List[range]:
    """The rows of each group: runs of one ``group`` id where the batch has that key, else ``group_size`` rows each."""
    if "group" in batch:
        sizes = torch.unique_consecutive(batch["group"], return_counts=True)[1].tolist()
    else:
        bs = batch_size(batch)
        if bs % group_size:
            raise ValueError(f"batch size {bs} is not a multiple of group size {group_size}")
        sizes = [group_size] * (bs // group_size)
    bounds = list(itertools.accumulate(sizes, initial=0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _select_groups(batch: Batch, groups: Sequence[range]) -> Batch:
    return select(batch, [i for g in groups for i in g])


def split_batch(batch: Batch, n: int, group_size: int = 1) -> List[Batch]:
    """Split into ``n`` contiguous parts of whole groups (for PPO minibatches)."""
    groups = group_ranges(batch, group_size)
    parts = chunk_ranges(len(groups), max(1, min(n, len(groups))))
    return [_select_groups(batch, groups[r.start: r.stop]) for r in parts]


def shard_batch(batch: Batch, rank: int, world_size: int, group_size: int = 1) -> Batch:
    """This rank's share of a batch every rank holds: whole groups, counts differing by at most one, dealt longest
    first to the rank with the fewest tokens (so ranks do not wait for each other), kept in batch order."""
    groups = group_ranges(batch, group_size)
    cum = list(itertools.accumulate(batch["attention_mask"].long().sum(dim=1).tolist(), initial=0))
    tokens = [cum[g.stop] - cum[g.start] for g in groups]
    room = sorted((len(r) for r in chunk_ranges(len(groups), world_size)), reverse=True)  # groups each rank takes
    return _select_groups(batch, [groups[g] for g in sorted(deal_least_loaded(tokens, world_size, room)[rank])])


def deal_least_loaded(weights: Sequence[int], k: int, room: Sequence[int] | None = None) -> List[List[int]]:
    """Item indices, heaviest first (the lower index of equals), each to the least-loaded of ``k`` bins (the first of
    equals) with room left (``room[b]`` items, unbounded without it). Each bin's indices in the order dealt."""
    left = list(room) if room is not None else [len(weights)] * k  # (no bin can fill)
    bins: List[List[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        b = min((b for b in range(k) if left[b] > 0), key=lambda b: (loads[b], b))
        bins[b].append(i)
        loads[b] += weights[i]
        left[b] -= 1
    return bins


def async_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` through pinned memory: a pageable copy would wait for all queued GPU work."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class Stems:
    """Each distinct stem (a document but its last token) once, packed, and ``src [T]``: the stem position standing
    for each position of the micro-batch."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    src: torch.Tensor

    def to(self, device: torch.device) -> "Stems":
        return Stems(async_to_device(self.input_ids, device), async_to_device(self.position_ids, device),
                     self.cu_seqlens, async_to_device(self.src, device))


@dataclass
class MicroBatch:
    """Per-token keys ``[T]`` and per-sample keys ``[n]``; ``cu_seqlens [n+1]``: document boundaries; ``sample_idx``:
    the documents' rows in the batch; ``stems``: see `share_stems`."""

    data: Dict[str, torch.Tensor]
    cu_seqlens: torch.Tensor
    sample_idx: List[int] = field(default_factory=list)
    is_dummy: bool = False
    stems: Optional[Stems] = None

    @property
    def n_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def doc_starts(self, device: torch.device | None = None) -> torch.Tensor:
        """Bool ``[T]``: True at the first token of each document."""
        starts = torch.zeros(self.n_tokens, dtype=torch.bool)
        starts[self.cu_seqlens[:-1]] = True
        return async_to_device(starts, device) if device is not None else starts

    def to(self, device: torch.device) -> "MicroBatch":
        """Move ``data`` to ``device``; ``cu_seqlens`` stays on the CPU (it is used for slicing)."""
        stems = self.stems.to(device) if self.stems is not None else None
        data = {k: async_to_device(v, device) for k, v in self.data.items()}
        return MicroBatch(data, self.cu_seqlens, self.sample_idx, self.is_dummy, stems)


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, min_mbs: int = 1) -> List[List[int]]:
    """Sample indices grouped into micro-batches of at most ``max_tokens`` (a longer sample alone).

    First-fit-decreasing; when that leaves a short remainder, the samples are dealt to the fewest micro-batches that
    could hold them, if `_fit` can repair that. Then the heaviest is halved until there are ``min_mbs``.
    Deterministic: indices sorted within a micro-batch, micro-batches by their first index."""
    def load(b: List[int]) -> int:
        return sum(lengths[i] for i in b)

    over = [n for n in lengths if n > max_tokens]
    if over:  # one line a batch, not one a sample: a long-context run has many
        log.warning("%d sample(s) over max_tokens_per_mb=%d (the longest: %d tokens) get a micro-batch each",
                    len(over), max_tokens, max(over))
    bins = _first_fit(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)), lengths, max_tokens)
    fewest = -(-sum(lengths) // max_tokens) if max_tokens > 0 else len(bins)
    if len(bins) > max(fewest, min_mbs, 1) and not over:
        for k in range(max(fewest, 1), len(bins)):
            spread = deal_least_loaded(lengths, k)
            if _fit(spread, [load(b) for b in spread], lengths, max_tokens):
                bins = spread
                break
    while len(bins) < min_mbs:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            break
        b = max(splittable, key=lambda j: (load(bins[j]), -j))
        items = sorted(bins[b])
        bins[b], right = ([items[j] for j in half] for half in deal_least_loaded([lengths[i] for i in items], 2))
        bins.append(right)
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def _first_fit(order: Sequence[int], lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    bins: List[List[int]] = []
    loads: List[int] = []
    for i in order:
        b = next((b for b, load in enumerate(loads) if load + lengths[i] <= max_tokens), len(bins))
        if b == len(bins):
            bins.append([])
            loads.append(0)
        bins[b].append(i)
        loads[b] += lengths[i]
    return bins


def _fit(bins: List[List[int]], loads: List[int], lengths: Sequence[int], max_tokens: int) -> bool:
    """Bring every bin within ``max_tokens`` (in place) by the smallest move or swap of one sample per overfull bin
    that fits both bins; False when some bin cannot be fixed so."""
    for o in range(len(bins)):
        excess = loads[o] - max_tokens
        if excess <= 0:
            continue
        best = None  # (tokens moved out of bin o, sample out, other bin, sample in or None)
        for q in range(len(bins)):
            room = max_tokens - loads[q]
            if q == o or room < 0:
                continue
            for a in bins[o]:
                for b in [None, *bins[q]]:
                    moved = lengths[a] - (lengths[b] if b is not None else 0)
                    if excess <= moved <= room and (best is None or moved < best[0]):
                        best = (moved, a, q, b)
        if best is None:
            return False
        moved, a, q, b = best
        bins[o].remove(a)
        bins[q].append(a)
        if b is not None:
            bins[q].remove(b)
            bins[o].append(b)
        loads[o] -= moved
        loads[q] += moved
    return True


def pack_rows(batch: Batch, mask: torch.Tensor, sample_idx: Sequence[int], pad_to: int = 0,
              pad_token_id: int = 0, share: bool = False) -> MicroBatch:
    """Rows ``sample_idx`` of a padded batch (``mask``: its ``attention_mask``, bool) as one packed micro-batch, filled
    up to ``pad_to`` tokens by a padding document (other per-token keys zero: no loss sees it); ``share``: `share_stems`
    (unpadded only)."""
    idx = torch.as_tensor(list(sample_idx), dtype=torch.long)
    m = mask[idx]
    lens = m.sum(dim=1)
    n_real = int(lens.sum())
    pad = max(0, pad_to - n_real)
    docs = torch.cat([lens, torch.tensor([pad])]) if pad else lens
    data: Dict[str, torch.Tensor] = {}
    for k, v in batch.items():
        if k == "attention_mask" or not isinstance(v, torch.Tensor):
            continue
        token_key = is_token_key(batch, k)
        data[k] = v[idx][m] if token_key else v[idx]
        if pad and token_key:
            fill = pad_token_id if k == "input_ids" else 0
            data[k] = torch.cat([data[k], torch.full((pad, *v.shape[2:]), fill, dtype=v.dtype)])
    cu, data["position_ids"] = _layout(docs)
    stems = share_stems(data["input_ids"], cu) if share and not pad_to else None
    return MicroBatch(data, cu, list(sample_idx), stems=stems)


def _layout(lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cu_seqlens`` and ``position_ids`` (restarting at 0) of documents of these lengths, packed."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lengths, 0)
    total = int(cu[-1])
    return cu, torch.arange(total, dtype=torch.long) - torch.repeat_interleave(cu[:-1], lengths, output_size=total)


def share_stems(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> Optional[Stems]:
    """Documents equal but for their last token have equal logits wherever a logit predicts something, so the model
    runs on each stem once (the samples of a one-token answer); None when all differ. Exact: backward sums the
    gradients of the documents sharing a stem."""
    ids, bounds = input_ids.numpy(), cu_seqlens.tolist()
    first: Dict[bytes, int] = {}  # stem -> its index among the distinct stems
    which, pieces = [], []  # each document's stem; each distinct stem, from its first document
    for s, e in zip(bounds[:-1], bounds[1:]):
        key = ids[s: max(e - 1, s + 1)].tobytes()
        if key not in first:
            first[key] = len(pieces)
            pieces.append(input_ids[s: max(e - 1, s + 1)])
        which.append(first[key])
    if len(pieces) == len(which):
        return None
    stem_lens, which_t = torch.tensor([len(p) for p in pieces]), torch.tensor(which)
    stem_cu, stem_pos = _layout(stem_lens)
    doc_lens, n = cu_seqlens[1:] - cu_seqlens[:-1], int(bounds[-1])

    def spread(per_doc: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(per_doc, doc_lens, output_size=n)
    # position j of a document reads its stem's position j; its last token (no prediction) the stem's last
    src = spread(stem_cu[:-1][which_t]) + torch.minimum(torch.arange(n) - spread(cu_seqlens[:-1]),
                                                        spread(stem_lens[which_t] - 1))
    return Stems(torch.cat(pieces), stem_pos, stem_cu, src)


def dummy_micro_batch(template: Batch, pad_token_id: int = 0, n_tokens: int = 2) -> MicroBatch:
    """A micro-batch of the template's keys, all masks zero; two tokens at least: compiled code specialises 0 and 1."""
    data: Dict[str, torch.Tensor] = {}
    for k, v in template.items():
        if k == "attention_mask":
            continue
        shape = (n_tokens, *v.shape[2:]) if is_token_key(template, k) else (1, *v.shape[1:])
        data[k] = torch.zeros(shape, dtype=v.dtype)
    data["input_ids"] = torch.full((n_tokens,), pad_token_id, dtype=template["input_ids"].dtype)
    data["position_ids"] = torch.arange(n_tokens, dtype=torch.long)
    return MicroBatch(data, torch.tensor([0, n_tokens], dtype=torch.long), [], is_dummy=True)


def make_micro_batches(batch: Batch, max_tokens: int, min_mbs: int = 1, pad_token_id: int = 0,
                       pad: bool = False, share: bool = False) -> List[MicroBatch]:
    """Pack a padded batch into micro-batches, as many on every rank (collective); ``pad``: each filled up to
    ``max_tokens`` (one shape for compiled layers); ``share``: `share_stems`."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    plan = plan_micro_batches(lengths, max_tokens, min_mbs) if lengths else []
    pad_to = max_tokens if pad else 0
    mbs = [pack_rows(batch, mask, idx, pad_to, pad_token_id, share) for idx in plan]
    n = max(int(dist.all_reduce_scalar(len(mbs), "max")), 1)
    while len(mbs) < n:
        mbs.append(dummy_micro_batch(batch, pad_token_id, max(2, pad_to)))
    return mbs


def unpack_to_padded(values: Sequence[torch.Tensor], mbs: Sequence[MicroBatch], batch: Batch,
                     fill: float = 0.0) -> torch.Tensor:
    """Scatter per-token results of packed micro-batches back into the batch's ``[B, L]`` layout."""
    mask = batch["attention_mask"].bool()
    out = torch.full(mask.shape, fill, dtype=values[0].dtype if values else torch.float32)
    for v, mb in zip(values, mbs):
        if not mb.sample_idx:  # a dummy micro-batch
            continue
        v = v.detach().to("cpu")
        idx = torch.as_tensor(mb.sample_idx, dtype=torch.long)
        m = mask[idx]
        rows = out[idx]
        rows[m] = v[: int(m.sum())]  # documents in sample_idx order, then any padding document
        out[idx] = rows
    return out

