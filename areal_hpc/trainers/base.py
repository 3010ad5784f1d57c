"""What every trainer gets, and the base class a user subclasses to add one."""

from __future__ import annotations

import logging
import os
import signal
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from areal_hpc.config import AllocationMode, ExperimentConfig
from areal_hpc.registry import Heartbeat, Registry

log = logging.getLogger("areal_hpc.trainer")


@dataclass
class TrainContext:
    """Everything a trainer needs to know about its run (no Slurm, no process placement)."""

    cfg: ExperimentConfig
    alloc: AllocationMode
    run_dir: Path
    registry: Registry

    @property
    def weights_dir(self) -> Path:
        return self.run_dir / "weights"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


class StopRequested:
    """Set by SIGTERM/SIGUSR2 (stop, preemption, time limit): checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: give up on the graceful path
        self.signal = signum
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)

    def __bool__(self) -> bool:
        return self.signal is not None


class Trainer(ABC):
    """A training (or evaluation) loop. Subclass, then ``@register_trainer("name")``.

    ``run()`` returns the process exit code. Rank 0 owns the rollout side (client pool,
    controller) and the trainer's registry record; every rank runs the model.
    """

    def __init__(self, ctx: TrainContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.stop = StopRequested()
        self._record: Dict[str, Any] = {}
        self._heartbeat: Optional[Heartbeat] = None

    def publish_state(self, **fields) -> None:
        """Update this trainer's registry record (rank 0; other ranks call it harmlessly)."""
        self._record.update(fields)
        if not self.is_main:
            return
        if self._heartbeat is None:
            self._record.update(pid=os.getpid(), host=socket.gethostname())
            self._heartbeat = Heartbeat(self.ctx.registry, "", "trainer", lambda: dict(self._record),
                                        interval_s=self.cfg.launcher.heartbeat_s).start()
        else:
            self._heartbeat.beat()  # `status` sees the new step now, not one heartbeat later

    def close_state(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    @property
    def is_main(self) -> bool:
        return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0

    @abstractmethod
    def run(self) -> int:
        ...
