"""Trainers by `trainer.type`. Add yours with ``@register_trainer("name")`` on a `Trainer` subclass."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from areal_hpc.config.errors import ConfigError
from areal_hpc.config.validate import check_choices
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
            # by path: files of one name in two directories are two plugins
            name = f"areal_plugin_{Path(p).stem}_{hashlib.sha1(os.path.abspath(p).encode()).hexdigest()[:8]}"
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


def plugin_failure(e: BaseException) -> str:
    """A plugin's import error in one line, with the file and line of the user's code that raised it: the deepest
    frame outside areal_hpc, the standard library and installed packages (a SyntaxError's own)."""
    if isinstance(e, SyntaxError):
        return f"{type(e).__name__}: {e.msg} ({e.filename}, line {e.lineno})"
    skip = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(os.__file__), "<")
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if not f.filename.startswith(skip) and "-packages" not in f.filename] or frames[-1:]
    return f"{type(e).__name__}: {e}" + "".join(f" ({f.filename}, line {f.lineno})" for f in ours[-1:])


def known_types():
    return sorted(set(TRAINERS) | set(_BUILTIN))


def check_names(cfg) -> None:
    """Load ``trainer.plugins``; refuse a name no registry knows (`validate` checks built-in ones only without them)."""
    from areal_hpc.rollout import ADAPTERS, REWARDS, WORKFLOWS

    load_plugins(cfg.trainer.plugins)
    check_choices(cfg, {"trainer.type": known_types(), "rollout.workflow": sorted(WORKFLOWS),
                        "rollout.reward_fn": sorted(REWARDS), "{ds}.adapter": sorted(ADAPTERS)})
    workflow = WORKFLOWS[cfg.rollout.workflow]
    settings = sorted(a for a in dir(workflow) if not a.startswith("_") and not callable(getattr(workflow, a))
                      and not isinstance(getattr(workflow, a), (property, functools.cached_property)))
    for key in cfg.rollout.workflow_args:
        if key not in settings:
            raise ConfigError(f"rollout.workflow_args.{key}", f"is no setting of workflow {cfg.rollout.workflow!r}: "
                              f"its settings are its class attributes: {', '.join(settings) or 'it has none'}",
                              "check the name, or give the workflow a class attribute of that name (its default)")


def make_trainer(ctx: TrainContext) -> Trainer:
    check_names(ctx.cfg)
    kind = ctx.cfg.trainer.type  # (validate wrote null for a None; check_names refuses a None)
    if kind not in TRAINERS:
        importlib.import_module(_BUILTIN[kind])
    return TRAINERS[kind](ctx)
