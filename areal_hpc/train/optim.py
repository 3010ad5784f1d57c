"""AdamW, the learning-rate schedule and gradient clipping for FSDP2 (DTensor) parameters."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from areal_hpc.config.schema import OptimizerConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the fused kernel (one pass over parameters, gradients
    and moments) on GPU, the multi-tensor one on CPU."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused, foreach=not fused)


def lr_lambda(cfg: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at a step: linear warm-up, then constant or cosine to ``min_lr_ratio``."""
    warmup = max(0, int(cfg.warmup_steps))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of all gradients (sharded ones included), as a plain tensor on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    return total.full_tensor() if isinstance(total, DTensor) else total


def clip_grads(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm,
                                             total_norm, foreach=True)
