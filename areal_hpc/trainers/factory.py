"""Trainers by `trainer.type`. Add yours with ``@register_trainer("name")`` on a `Trainer` subclass."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from areal_hpc.rollout.names import NameTable
from areal_hpc.trainers.base import TrainContext, Trainer

TRAINERS = NameTable("trainer.type")
register_trainer = TRAINERS.register
# Built-in trainers are imported on demand, so an eval-only run never imports the FSDP engine.
_BUILTIN = {"ppo": "areal_hpc.trainers.ppo_trainer", "sft": "areal_hpc.trainers.sft_trainer",
            "null": "areal_hpc.trainers.null"}


def load_plugins(paths) -> None:
    """Import user modules (``pkg.mod`` or ``/path/mod.py``) that register trainers, workflows, rewards or adapters."""
    for p in paths:
        if p.endswith(".py"):
            name = f"areal_plugin_{Path(p).stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, p)  # (a .py path always has a spec and loader)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:  # as importlib does: a failed import leaves no module behind
                del sys.modules[name]
                raise
        else:
            importlib.import_module(p)


def known_types():
    return sorted(set(TRAINERS) | set(_BUILTIN))


def make_trainer(ctx: TrainContext) -> Trainer:
    load_plugins(ctx.cfg.trainer.plugins)
    kind = ctx.cfg.trainer.type or "null"
    if kind not in TRAINERS and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[kind])
    if kind not in TRAINERS:
        raise KeyError(f"unknown trainer.type {kind!r}; known: {', '.join(known_types())}")
    return TRAINERS[kind](ctx)
