"""Per-token log-probabilities and entropies with bounded memory (a micro-batch's full logits are GBs).

`gather_logprobs` works on the model's logits chunk by chunk, each recomputed in backward. `linear_logprobs` starts
from the last hidden states and never holds more than one chunk of logits ("fused linear cross-entropy"); on CUDA the
per-chunk reductions are compiled. `install_logprob_forward` makes it the model's output (``engine.fused_lm_head``)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 4096


def _head_stats(logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: ``(logsumexp, logprob of label, entropy)`` of ``logits / temperature``; the entropy reuses the
    logsumexp (``H = lse - sum(exp(x - lse) * x)``)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(1, labels[:, None])[:, 0] - lse
    ent = lse - (torch.exp(x - lse[:, None]) * x).sum(-1) if with_entropy else torch.zeros_like(lse)
    return lse, logp, ent


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                    chunk: int = DEFAULT_CHUNK) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log softmax(logits / temperature)[labels]`` (and the entropy) for ``logits [T, V]``."""
    if logits.shape[0] == 0:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    n, grad = logits.shape[0], torch.is_grad_enabled() and logits.requires_grad
    stats = functools.partial(checkpoint, _head_stats, use_reentrant=False) if grad and n > chunk else _head_stats
    _, logps, ents = zip(*(stats(logits[s: s + chunk], labels[s: s + chunk], temperature, with_entropy)
                           for s in range(0, n, chunk)))
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def _head_grad(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
               g_logp: torch.Tensor, g_ent: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk: d(sum g_logp * logp + g_ent * H) / d logits, in the logits' dtype.

    With ``x = logits / T``: d logp_label / dx = onehot - p and dH / dx = -p (log p + H)."""
    logp_all = logits.to(lse.dtype) / temperature - lse[:, None]
    p = torch.exp(logp_all)
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == labels[:, None]
    grad = g_logp[:, None] * (onehot.to(p.dtype) - p) - g_ent[:, None] * p * (logp_all + ent[:, None])
    return (grad / temperature).to(logits.dtype)


_compiled: dict = {}


def _call(fn, device: torch.device, *args):
    """``fn(*args)``, compiled (`compiled_call`) on CUDA; ``AREAL_HPC_NO_COMPILE=1`` keeps it eager."""
    if device.type != "cuda" or os.environ.get("AREAL_HPC_NO_COMPILE") == "1":
        return fn(*args)
    return compiled_call(fn, *args)


def compiled_call(fn, *args):
    """``fn(*args)`` through ``torch.compile``, only dim 0 dynamic; after a compile failure ``fn`` runs eagerly."""
    import torch._dynamo as dynamo

    compiled = _compiled.get(fn)
    if compiled is None:
        compiled = _compiled[fn] = torch.compile(fn)
    if compiled is fn:
        return fn(*args)
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            dynamo.maybe_mark_dynamic(a, 0)
    try:
        return compiled(*args)
    except torch.OutOfMemoryError:  # not the compiler's fault: eager code would need the memory too
        raise
    except Exception as e:  # noqa: BLE001 - an optimisation: say why, go on eagerly
        log.warning("compiled %s failed (%s: %s); running it eagerly", fn.__name__, type(e).__name__, e)
        _compiled[fn] = fn
        return fn(*args)


class _LinearLogprobs(torch.autograd.Function):
    """``x = hidden @ weight.T / temperature`` -> ``x[label] - logsumexp(x)`` and the entropy per token; with
    ``keep_logits`` each chunk's logits are saved for backward instead of recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature: float, chunk: int, with_entropy: bool,
                keep_logits: bool = False):
        n, dev = hidden.shape[0], hidden.device
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 inputs stay fp64)
        lse, logp, ent = (torch.empty(n, dtype=acc, device=dev) for _ in range(3))
        kept = []
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = hidden[s:e] @ weight.t()
            out = _call(_head_stats, dev, logits, labels[s:e], temperature, with_entropy)
            for buf, val in zip((lse, logp, ent), out):
                buf[s:e] = val
            if keep_logits:
                kept.append(logits)
        ctx.save_for_backward(hidden, weight, labels, lse, ent, *kept)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, labels, lse, ent, *kept = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(lse.dtype)
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.to(lse.dtype)
        n, dev = hidden.shape[0], hidden.device
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for i, s in enumerate(range(0, n, ctx.chunk)):
            e = min(n, s + ctx.chunk)
            logits = kept[i] if kept else hidden[s:e] @ weight.t()
            grad = _call(_head_grad, dev, logits, labels[s:e], lse[s:e], ent[s:e],
                         g_logp[s:e], g_ent[s:e], ctx.temperature)
            del logits
            if need_h:
                grad_h[s:e] = grad @ weight
            if need_w:
                grad_w += grad.t() @ hidden[s:e]
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False, chunk: int = DEFAULT_CHUNK, keep_logits: bool = False
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`gather_logprobs` of ``hidden @ weight.T`` (``[T, H]``, ``[V, H]``), one chunk of logits at a time; fp32
    results (fp64 for fp64 inputs). ``keep_logits``: keep the logits for backward (memory for a matmul)."""
    keep = keep_logits and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logp, ent = _LinearLogprobs.apply(hidden, weight, labels, float(temperature), int(chunk), bool(with_entropy), keep)
    return logp, (ent if with_entropy else None)


def shift_to_tokens(lp_next: torch.Tensor, ent_next: Optional[torch.Tensor], doc_starts: torch.Tensor
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Values computed at position t for token t+1, moved to t+1; 0 at document starts."""
    zero = torch.zeros((), dtype=lp_next.dtype, device=lp_next.device)
    logp = torch.where(doc_starts, zero, torch.roll(lp_next, shifts=1))
    ent = torch.where(doc_starts, zero, torch.roll(ent_next, shifts=1)) if ent_next is not None else None
    return logp, ent


def packed_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, doc_starts: torch.Tensor,
                          temperature: float = 1.0, with_entropy: bool = False,
                          chunk: int = DEFAULT_CHUNK) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logprob (and entropy) of each token of a packed row under the previous position's logits; 0 at each
    document's first token (``doc_starts``), which has no prediction."""
    labels = torch.roll(input_ids, shifts=-1)
    return shift_to_tokens(*gather_logprobs(logits, labels, temperature, with_entropy, chunk), doc_starts)


def install_logprob_forward(model: torch.nn.Module, keep_logits: bool = False) -> str:
    """Let ``model(**inputs, logprobs_of=(ids, doc_starts, src, temperature, with_entropy))`` return per-token
    ``(logprobs, entropy)`` of the packed row ``ids`` by `linear_logprobs`, through the root's ``__call__`` (FSDP2's
    hooks gather the root's parameters). ``src``: see `batching.share_stems`. Returns why `linear_logprobs` cannot
    stand in for this model's logits, installing nothing ('' when it can)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"the output layer is a {type(head).__name__}, not a Linear"
    if head.bias is not None:
        return "the output layer has a bias"
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            return f"the model config sets {key}"
    hf_forward = model.forward
    base = getattr(model, model.base_model_prefix)

    def forward(*args, logprobs_of=None, **kwargs):
        if logprobs_of is None:
            return hf_forward(*args, **kwargs)
        ids, starts, src, temperature, with_entropy = logprobs_of
        hidden = base(*args, **kwargs).last_hidden_state[0]
        if src is not None:
            hidden = hidden[src]
        labels = torch.roll(ids, shifts=-1)
        return shift_to_tokens(*linear_logprobs(hidden, head.weight, labels, temperature, with_entropy,
                                                keep_logits=keep_logits), starts)

    model.forward = forward
    return ""
