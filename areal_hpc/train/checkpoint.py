"""Sharded training checkpoints (DCP) that survive a crash mid-save: ``step_N/`` (``dcp/``: model + optimizer;
``rank<r>.pt``: LR scheduler, RNG, the caller's ``extra``; ``meta.json``) is written as ``step_N.tmp/``, renamed when
every rank is done, then named in ``latest``."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from areal_hpc.registry.util import atomic_write
from areal_hpc.train import dist
from areal_hpc.train.checkpoint_dirs import LATEST, complete_checkpoints, latest_checkpoint
from areal_hpc.train.engine import FSDPEngine
from areal_hpc.train.publish import replace_dir


def rng_state() -> Dict[str, Any]:
    """The generators' states; CUDA's of this rank's device only (a resume may see other GPUs, e.g. one a task)."""
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(), **cuda}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    cuda = state.get("cuda") if torch.cuda.is_available() else None
    if isinstance(cuda, list):  # earlier checkpoints: one state per GPU the rank saw
        i = torch.cuda.current_device()
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


class Checkpointer:
    """Saves and restores an `FSDPEngine`'s full training state. All ranks call every method."""

    def __init__(self, engine: FSDPEngine, keep_last: int = 2):
        if engine.optimizer is None:
            raise ValueError("checkpointing needs a trainable engine")
        self.engine, self.keep_last = engine, max(1, int(keep_last))

    def _model_optim_state(self) -> Dict[str, Any]:
        msd, osd = get_state_dict(self.engine.model, self.engine.optimizer)
        return {"model": msd, "optim": osd}

    def save(self, root: str | os.PathLike, step: int, extra: Optional[Dict[str, Any]] = None) -> Path:
        root, rank = Path(root), dist.rank()
        final = root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        dcp.save(self._model_optim_state(), checkpoint_id=str(tmp / "dcp"))
        eng = self.engine
        torch.save({"rng": rng_state(), "lr_scheduler": eng.lr_scheduler.state_dict(), "extra": extra or {},
                    "step": int(step), "version": eng.get_version()}, tmp / f"rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            meta = {"step": int(step), "version": eng.get_version(), "world_size": dist.world_size()}
            atomic_write(tmp / "meta.json", json.dumps(meta), fsync=True)
            replace_dir(tmp, final)  # a step saved again: the old copy goes once the new one is whole
            atomic_write(root / LATEST, final.name, fsync=True)
            done = [p for p in complete_checkpoints(root) if p != final]
            for old in done[: max(0, len(done) - (self.keep_last - 1))]:
                trash = old.with_name(old.name + ".tmp")  # a deletion cut short (preempted): the next save removes it
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
        dist.barrier()
        return final

    def load_latest(self, root: str | os.PathLike) -> Optional[Dict[str, Any]]:
        """Restore the newest complete checkpoint: its ``extra`` plus ``global_step`` and ``weight_version``, or None
        when there is none. A rank beyond the saved world size restores rank 0's RNG and LR scheduler state."""
        path = latest_checkpoint(Path(root))
        if path is None:
            return None
        state = self._model_optim_state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        # the checkpoint gives the optimizer's state and the schedule's position; this run's config the values (lr,
        # weight decay, betas: a run resumed with a lower lr trains at it)
        optim, sched = self.engine.optimizer, self.engine.lr_scheduler
        hyper, bases = [{k: v for k, v in g.items() if k != "params"} for g in optim.param_groups], sched.base_lrs
        set_state_dict(self.engine.model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for group, values in zip(optim.param_groups, hyper):
            group.update(values)
        own = path / f"rank{dist.rank()}.pt"
        rest = torch.load(own if own.exists() else path / "rank0.pt", weights_only=False)
        sched.load_state_dict(rest["lr_scheduler"])
        sched.base_lrs = bases
        for group, base, f in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):  # this run's
            group["lr"] = base * f(sched.last_epoch)  # schedule (total_train_steps may have changed), not the saved LR
        self.engine.set_version(rest["version"])
        set_rng_state(rest["rng"])
        dist.barrier()
        return {**rest["extra"], "global_step": rest["step"], "weight_version": rest["version"]}
