"""Turns a batch of next-token logits into tokens and their log-probabilities.

SGLang semantics: a token's logprob is ``log_softmax(logits / temperature)`` of the raw model logits
(``log_softmax(logits)`` for a greedy temperature), before any top-k / top-p filtering. Sampling uses the filtered
distribution; greedy rows take the argmax.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from areal_hpc.inference.hf_engine.sequence import GREEDY_BELOW, SamplingParams


def sample(logits: torch.Tensor, params: Sequence[SamplingParams]) -> Tuple[List[int], List[float]]:
    """``logits``: [n, vocab] float32. Returns python lists (one device sync)."""
    dev = logits.device
    greedy = [p.greedy for p in params]
    temps = [1.0 if p.temperature < GREEDY_BELOW else p.temperature for p in params]
    if all(t == temps[0] for t in temps):
        scaled = logits if temps[0] == 1.0 else logits / temps[0]
    else:
        scaled = logits / torch.tensor(temps, device=dev, dtype=logits.dtype)[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    if all(greedy):
        tok = logits.argmax(dim=-1)
    else:
        probs = logp.exp()
        if any(p.top_k > 0 or p.top_p < 1.0 for p, g in zip(params, greedy) if not g):
            probs = _filter_top_k_top_p(probs, params)
        # exponential race: argmax(p / E), E ~ Exp(1), is a draw from p without a device sync
        tok = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)
        if any(greedy):
            g = torch.tensor(greedy, device=dev)
            tok = torch.where(g, logits.argmax(dim=-1), tok)
    lp = logp.gather(1, tok[:, None])[:, 0]
    both = torch.stack([tok.to(torch.float64), lp.to(torch.float64)]).cpu()
    return both[0].long().tolist(), both[1].tolist()


def _filter_top_k_top_p(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    vocab = probs.shape[-1]
    dev = probs.device
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_p, dtype=torch.bool)
    # clamped: a top_k past int64 (a request may send 1e30) would fail the tensor, the whole step, and with it
    # every other request in the batch
    ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    if any(k < vocab for k in ks):
        k = torch.tensor(ks, device=dev)
        remove |= torch.arange(vocab, device=dev)[None, :] >= k[:, None]
    tps = [p.top_p for p in params]
    if any(tp < 1.0 for tp in tps):
        tp = torch.tensor(tps, device=dev, dtype=probs.dtype)
        cum = sorted_p.cumsum(dim=-1)
        remove |= (cum - sorted_p) > tp[:, None]  # keep tokens until the mass before them reaches top_p
    sorted_p = sorted_p.masked_fill(remove, 0.0)
    return torch.zeros_like(probs).scatter_(1, idx, sorted_p)
