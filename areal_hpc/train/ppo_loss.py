"""GRPO advantages, AReaL's decoupled PPO loss, and `PPOActor` tying them to an `FSDPEngine`.

Entry t of a per-token tensor belongs to token t: ``logprobs`` are the behaviour policy's (the servers'), ``prox_logp``
the proximal policy's (recomputed before the update). Decoupled loss:

    ratio   = exp(logp - prox_logp)                      clipped to [1 - eps, 1 + eps]
    pg      = max(-A * ratio, -A * clip(ratio))          PPO clip
    pg      = min(pg, c_clip * |A|)                      dual clip (binds only where A < 0)
    w_behav = exp(prox_logp - behav_logp)                importance weight of the stale behaviour
    pg      = pg * w_behav, tokens with w_behav > cap are dropped (weight 0)
    loss    = sum(pg * mask) / sum(mask)
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

from areal_hpc.config.schema import PPOConfig
from areal_hpc.train import dist
from areal_hpc.train.batching import Batch, split_batch
from areal_hpc.train.engine import FSDPEngine, loss_token_count, masked_mean
from areal_hpc.train.phases import PhaseTimer


def _centre_and_scale(r: torch.Tensor, s: torch.Tensor, sq: torch.Tensor, n: torch.Tensor, std_norm: bool,
                      leave_one_out: bool, eps: float) -> torch.Tensor:
    """Normalise ``r`` by the sum ``s`` and the sum of squares ``sq`` of the ``n`` rewards of its set."""
    adv = r - (torch.where(n > 1, (s - r) / (n - 1).clamp(min=1), s / n) if leave_one_out else s / n)
    if std_norm:
        var = ((sq - s * s / n) / (n - 1).clamp(min=1)).clamp(min=0.0)  # unbiased
        adv = adv / (var.sqrt() + eps)
    return adv


def compute_advantages(rewards: torch.Tensor, group_size: int, norm: str = "group", std_norm: bool = True,
                       leave_one_out: bool = False, eps: float = 1e-6, global_batch: bool = False,
                       groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample advantages from rewards ``[B]``. ``norm``: subtract the "group"'s mean (GRPO; a group is a run of one
    id in ``groups``, else ``group_size`` samples), the "batch"'s (over all ranks with ``global_batch``), or "none";
    ``leave_one_out``: the other members' mean (RLOO); ``std_norm``: divide by the unbiased std. A set of equal rewards
    gets exactly zero."""
    r = rewards.double()
    if norm == "none":
        return r.float()
    if norm == "group":
        if groups is None:
            if r.numel() % group_size:
                raise ValueError(f"{r.numel()} rewards are not whole groups of {group_size}")
            groups = torch.arange(r.numel(), device=r.device) // group_size
        if r.numel() == 0:
            return r.float()
        ids = torch.unique_consecutive(groups, return_inverse=True)[1]

        def over_group(x: torch.Tensor, how: str) -> torch.Tensor:
            """``x`` reduced over each sample's group, per sample."""
            return r.new_zeros(int(ids.max()) + 1).scatter_reduce(0, ids, x, how, include_self=False)[ids]

        n = over_group(torch.ones_like(r), "sum")
        adv = _centre_and_scale(r, over_group(r, "sum"), over_group(r * r, "sum"), n, std_norm, leave_one_out, eps)
        flat = over_group(r, "amax") == over_group(r, "amin")
        return torch.where(flat, torch.zeros_like(adv), adv).float()
    sums = torch.stack([r.sum(), (r * r).sum(), torch.tensor(float(r.numel()), dtype=torch.float64)])
    floor = r.new_full((1,), -torch.finfo(torch.float64).max)  # an empty shard's max
    extremes = torch.stack([torch.cat([floor, r]).max(), torch.cat([floor, -r]).max()])
    if global_batch:
        sums = dist.all_reduce(sums.to(dist.collective_device()), "sum").cpu()
        extremes = dist.all_reduce(extremes.to(dist.collective_device()), "max").cpu()
    if r.numel() == 0:
        return r.float()
    adv = _centre_and_scale(r, *sums, std_norm, leave_one_out, eps)
    if float(extremes[0]) == float(-extremes[1]):  # max == min: every reward equal
        adv = torch.zeros_like(adv)
    return adv.float()


def kl_penalty_to_go(logp: torch.Tensor, ref_logp: torch.Tensor, loss_mask: torch.Tensor,
                     kl_ctl: float) -> torch.Tensor:
    """Token advantages ``[B, L]`` of a per-token KL penalty ``-kl_ctl * (logp - ref_logp)`` used as reward, summed
    from each token to the end of its response (undiscounted)."""
    kl = (logp - ref_logp) * loss_mask
    to_go = torch.flip(torch.cumsum(torch.flip(kl, [-1]), -1), [-1])
    return -kl_ctl * to_go * loss_mask


def ppo_loss(logp: torch.Tensor, prox_logp: torch.Tensor, behav_logp: Optional[torch.Tensor], advantages: torch.Tensor,
             loss_mask: torch.Tensor, eps_clip: float = 0.2, c_clip: Optional[float] = None,
             behav_imp_weight_cap: Optional[float] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Decoupled PPO loss, a mean over ``loss_mask`` tokens (finite for an empty mask), and token-mean statistics;
    ``behav_logp=None`` is standard PPO (no behaviour importance weight)."""
    mask = loss_mask.bool()
    count = mask.sum().clamp(min=1).to(logp.dtype)
    prox_logp, advantages = prox_logp.detach(), advantages.detach()
    ratio = torch.where(mask, torch.exp(logp - prox_logp), torch.zeros_like(logp))
    clipped = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    pg1, pg2 = -advantages * ratio, -advantages * clipped
    clip_mask = (pg1.detach() < pg2.detach()) & mask
    pg = torch.maximum(pg1, pg2)
    dual_mask = torch.zeros_like(mask)
    if c_clip is not None:
        pg3 = c_clip * advantages.abs()
        dual_mask = (pg3 < pg.detach()) & mask
        pg = torch.minimum(pg, pg3)
    stats: Dict[str, torch.Tensor] = {}
    if behav_logp is not None:
        w = torch.exp(prox_logp - behav_logp.detach())
        keep = mask if behav_imp_weight_cap is None else mask & (w <= behav_imp_weight_cap)
        w = torch.where(keep, w, torch.zeros_like(w))
        pg = pg * w
        stats["behav_imp_weight"] = w.sum() / keep.sum().clamp(min=1)  # (w is 0 outside keep)
        stats["behav_capped_frac"] = (mask & ~keep).sum() / count
    loss = torch.where(mask, pg, torch.zeros_like(pg)).sum() / count
    stats.update(clip_frac=clip_mask.sum() / count, dual_clip_frac=dual_mask.sum() / count,
                 approx_kl=torch.where(mask, (logp - prox_logp).detach(), torch.zeros_like(logp)).sum() / count,
                 ratio=ratio.detach().sum() / count)
    return loss, stats


class PPOActor:
    """The policy side of PPO/GRPO on an `FSDPEngine`. ``temperature`` is the sampling temperature (logprobs must be
    of the distribution sampled from); ``phases`` (the trainer's) gets the recomputation as ``logprob``."""

    def __init__(self, config: PPOConfig, engine: FSDPEngine, group_size: int = 1, temperature: float = 1.0,
                 ref: Optional[FSDPEngine] = None):
        self.config, self.engine, self.group_size = config, engine, int(group_size)
        self.temperature, self.ref = float(temperature), ref
        self.phases = PhaseTimer()
        if config.kl_ctl > 0 and ref is None:
            raise ValueError("ppo.kl_ctl > 0 needs a reference engine (FSDPEngine(..., trainable=False))")

    @classmethod
    def build(cls, config: PPOConfig, total_steps: int, group_size: int = 1, temperature: float = 1.0) -> "PPOActor":
        """The actor engine, and a frozen reference engine of the same model when ``kl_ctl > 0``."""
        engine = FSDPEngine(config.actor, config.mb_spec, total_steps)
        ref = FSDPEngine(config.actor, config.mb_spec, total_steps, trainable=False) if config.kl_ctl > 0 else None
        return cls(config, engine, group_size, temperature, ref)

    def compute_logp(self, batch: Batch) -> torch.Tensor:
        return self.engine.forward(batch, temperature=self.temperature)

    def compute_advantages(self, batch: Batch) -> torch.Tensor:
        """Sets ``batch["advantages"]`` ``[B, L]`` (zero outside ``loss_mask``) and returns it."""
        cfg = self.config
        adv = compute_advantages(batch["rewards"].float(), self.group_size, cfg.adv_norm, cfg.adv_std_norm,
                                 cfg.leave_one_out, global_batch=True, groups=batch.get("group"))
        mask = batch["loss_mask"].float()
        tok = adv[:, None] * mask
        if cfg.kl_ctl > 0 and "ref_logp" in batch:
            logp = batch.get("prox_logp", batch["logprobs"])
            tok = tok + kl_penalty_to_go(logp.float(), batch["ref_logp"].float(), mask, cfg.kl_ctl)
        batch["advantages"] = tok
        return tok

    def _loss(self, out: Dict[str, torch.Tensor], mb: Dict[str, torch.Tensor], prox_from_forward: bool = False):
        cfg = self.config
        logp, behav = out["logprobs"], mb["logprobs"].float()
        if "prox_logp" in mb:
            prox = mb["prox_logp"].float()
        elif prox_from_forward:
            prox = logp.detach()
        else:
            prox = behav  # no recomputation (recompute_logprob=false, not decoupled): plain PPO on the behaviour
        loss, stats = ppo_loss(logp, prox, behav if cfg.use_decoupled_loss else None, mb["advantages"].float(),
                               mb["loss_mask"], cfg.eps_clip, cfg.c_clip, cfg.behav_imp_weight_cap)
        mask = mb["loss_mask"].float()
        entropy = masked_mean(out["entropy"], mask)
        stats.update(pg_loss=loss.detach(), entropy=entropy.detach(),
                     advantages=masked_mean(mb["advantages"].float(), mask))
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * entropy
        return loss, stats

    def ppo_update(self, batch: Batch, prox_from_forward: bool = False) -> Dict[str, float]:
        """``ppo_n_minibatches`` optimizer steps, then one LR step; statistics averaged over them.
        ``prox_from_forward``: the proximal logprobs are the update's own forward, detached (`prox_in_update`)."""
        parts = split_batch(batch, self.config.ppo_n_minibatches, self.group_size)
        if dist.all_reduce_scalar(len(parts), "max") != dist.all_reduce_scalar(len(parts), "min"):
            raise ValueError("every rank needs the same number of PPO minibatches; give each rank at least "
                             "ppo_n_minibatches groups")
        total: Counter = Counter()  # each statistic summed over the minibatches
        loss_fn = functools.partial(self._loss, prox_from_forward=prox_from_forward)
        for part in parts:
            total.update(self.engine.train_batch(part, loss_fn, loss_token_count, self.temperature))
        out = {k: (v if k in ("skipped_step", "n_tokens") else v / len(parts)) for k, v in total.items()}
        self.engine.step_lr_scheduler()
        return out

    def prox_in_update(self) -> bool:
        """Whether the proximal logprobs can be the update's own forward, detached: with one minibatch nothing has
        stepped yet (a KL penalty needs them before, in the advantages)."""
        return self.recomputes() and self.config.ppo_n_minibatches == 1 and self.ref is None

    def recomputes(self) -> bool:
        """Whether the proximal logprobs are recomputed: the decoupled loss needs them (as AReaL's, it implies
        ``recompute_logprob``; without them its importance weight would be 1: plain PPO on the stale behaviour)."""
        return self.config.recompute_logprob or self.config.use_decoupled_loss

    def train_step(self, batch: Batch) -> Dict[str, float]:
        """Recompute proximal (and reference) logprobs, advantages, then `ppo_update`."""
        fused = self.prox_in_update() and "prox_logp" not in batch
        with self.phases.phase("logprob", device=True):
            if self.recomputes() and not fused:
                batch["prox_logp"] = self.compute_logp(batch)
            if self.ref is not None:
                batch["ref_logp"] = self.ref.forward(batch, temperature=self.temperature)
        self.compute_advantages(batch)
        return self.ppo_update(batch, prox_from_forward=fused)
