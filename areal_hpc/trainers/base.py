"""What every trainer gets, and the base class (with the loop PPO and SFT share) a user subclasses."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from areal_hpc.config import AllocationMode, ConfigError, ExperimentConfig
from areal_hpc.registry import Heartbeat, Registry

log = logging.getLogger("areal_hpc.trainer")
# exit code of a trainer a signal stopped short of its goal: the run is STOPPED, not COMPLETED (`launch.outcome`)
STOPPED_EXIT = 130
NONFINITE_STEPS = 10  # steps in a row with a non-finite gradient norm (optimizer step skipped): the trainer fails


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
    """Set by SIGTERM, SIGUSR2 or SIGINT (stop, preemption, time limit, Ctrl-C): checkpoint at the next step."""

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


class Trainer:
    """A training (or evaluation) loop. Subclass, then ``@register_trainer("name")``.

    `run`, on every rank: recovery, stop requests, checkpoints, per-step metrics and the registry record (rank 0). A
    subclass supplies `setup` and `train_step`, and where needed `start`, `checkpoint_extra`, `finish`; or `run`."""

    def __init__(self, ctx: TrainContext):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.stop = StopRequested()
        self.engine: Any = None
        self.phases: Any = None
        self._record: Dict[str, Any] = {}
        self._heartbeat: Optional[Heartbeat] = None
        self._beat_t = 0.0  # when the record was last written

    def setup(self) -> Any:
        """Build the model (every rank) and return its `FSDPEngine`; ``self.phases`` is set."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither run nor setup")

    def start(self, state: Dict[str, Any]) -> bool:
        """Ready the data after recovery (``state``: the checkpoint's, or ``{}``). False: stopped before step 1."""
        return True

    def train_step(self, step: int) -> Optional[Dict[str, Any]]:
        """Make step ``step`` (from 1): its metrics, or None to end the run without it."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither run nor train_step")

    def checkpoint_extra(self) -> Dict[str, Any]:
        """What a checkpoint keeps besides the engine's state (rank 0's goes to every rank)."""
        return {}

    def finish(self, step: int) -> None:
        """After the last checkpoint, on every rank."""

    def close(self) -> None:
        """Release what `start` made, however the run ends (`start` may have made nothing)."""

    def run(self) -> int:
        import torch

        from areal_hpc.train import dist
        from areal_hpc.train.checkpoint import Checkpointer
        from areal_hpc.train.phases import PhaseTimer
        from areal_hpc.trainers.metrics import MetricsWriter

        cfg, total = self.cfg, self.cfg.trainer.total_train_steps
        self.phases = PhaseTimer(sync=torch.cuda.synchronize if torch.cuda.is_available() else None)
        # the other ranks wait in a collective while rank 0 waits for servers or a batch: outlast that
        r = cfg.rollout
        dist.init_distributed(600 + max(cfg.launcher.trainer_wait_servers_timeout_s, r.stall_timeout_s,
                                        r.request_timeout_s, r.drop_timeout_s))
        engine = self.engine = self.setup()
        ckpt = Checkpointer(engine, keep_last=cfg.saver.keep_last)
        state = self._recover(ckpt)
        step = int(state.get("global_step", 0))
        rc, metrics, settled_gc, saved = 0, None, dist.SettledGC(), step  # saved: the step last checkpointed
        first, nonfinite = step, 0  # this attempt's first step; steps in a row with a non-finite gradient norm
        try:
            if not self.start(state):
                return STOPPED_EXIT if self.stop else 0
            if self.is_main:
                metrics = MetricsWriter(self.ctx.run_dir, cfg.stats.tensorboard, cfg.stats.plot, step)
            self.publish_state(step=step, version=engine.get_version(), world_size=dist.world_size(), state="training")
            t_start = time.monotonic() - float(state.get("time_s", 0.0))
            self.phases.begin()
            while step < total:
                stop = dist.all_reduce_scalar(1.0 if self.stop else 0.0, "max") > 0
                stats = None if stop else self.train_step(step + 1)
                if stats is None:  # a stop while train_step waited, or no data left (trainer.total_train_epochs)
                    # stopped short of its goal by a signal (not "no data left"); every rank: the stop is all-reduced
                    rc = STOPPED_EXIT if stop or self.stop else 0
                    log.warning("stopping at step %d: %s", step, "on request" if rc else "no data left")
                    break
                step += 1
                settled_gc.step()
                split = self.phases.split()
                if metrics is not None:
                    with self.phases.phase("metrics"):
                        metrics.write(self._metrics(step, stats, split, t_start))
                        self.publish_state(step=step, version=engine.get_version(), within_s=1.0)
                nonfinite = nonfinite + 1 if stats.get("skipped_step") else 0  # the norm is global: every rank alike
                if nonfinite >= min(NONFINITE_STEPS, total - first):  # a run that never steps must not end COMPLETED
                    raise FloatingPointError(f"the gradient norm was not finite (a NaN/inf loss) {nonfinite} step(s) "
                                             f"in a row, to step {step}: optimizer steps skipped; check the rewards, "
                                             "the loss (a custom trainer's) and the learning rate")
                if cfg.saver.freq_steps and step % cfg.saver.freq_steps == 0 and step < total:
                    with self.phases.phase("checkpoint"):
                        self._save(ckpt, step, t_start)
                    saved = step
            if step != saved:  # (else the last checkpoint holds this step already)
                self._save(ckpt, step, t_start)
            self.finish(step)
        except KeyboardInterrupt:
            rc = STOPPED_EXIT
        finally:
            try:
                self.close()  # may raise (the last weight update failed): the record still goes
            finally:
                if metrics is not None:
                    metrics.close()
                self.close_state()
        log.info("trainer finished at step %d (version %d)", step, engine.get_version())
        return rc

    def _metrics(self, step: int, stats: Dict[str, Any], split: Dict[str, float], t_start: float) -> Dict[str, Any]:
        # the step's own lr (read before the LR scheduler stepped); the optimizer's now is the next step's
        m = {"step": step, "version": self.engine.get_version(), "time_s": time.monotonic() - t_start, **stats,
             **split, "lr": stats.get("lr", self.engine.current_lr())}
        for key, rate in (("gen_tokens", "gen_tokens_per_s"), ("tokens", "trained_tokens_per_s")):
            if key in m:
                m[rate] = m[key] / split["step_time_s"]
        return m

    def _recover(self, ckpt) -> Dict[str, Any]:
        """The last checkpoint's state (engine restored), or ``{}`` to start fresh (``recover.mode``). With
        ``disabled`` the checkpoints here are this run's own (submit set the earlier run's aside): a restarted trainer
        (the owner's, torchrun's, a requeued job's) resumes from them too."""
        mode = self.cfg.recover.mode
        state = ckpt.load_latest(self.ctx.checkpoint_dir)
        if state is None:
            if mode == "resume":
                raise ConfigError("recover.mode", f"resume asked but no checkpoint in {self.ctx.checkpoint_dir}",
                                  "use recover.mode=auto to start fresh when there is none")
            return {}
        log.info("recovered from checkpoint: step %d, weight version %d", state["global_step"], state["weight_version"])
        return state

    def _save(self, ckpt, step: int, t_start: float) -> None:
        from areal_hpc.train import dist

        extra = dist.broadcast_object({**self.checkpoint_extra(), "time_s": time.monotonic() - t_start})
        t0 = time.monotonic()
        ckpt.save(self.ctx.checkpoint_dir, step, extra)
        log.info("checkpoint at step %d (%.2fs)", step, time.monotonic() - t0)

    def publish_state(self, within_s: float = 0.0, **fields) -> None:
        """Update this trainer's registry record (rank 0 writes it), at once or at most ``within_s`` late (no file write
        every step on a shared filesystem)."""
        self._record.update(fields)
        if not self.is_main:
            return
        if self._heartbeat is None:
            self._record.update(pid=os.getpid(), host=socket.gethostname())
            self._heartbeat = Heartbeat(self.ctx.registry, "", "trainer", lambda: dict(self._record),
                                        interval_s=self.cfg.launcher.heartbeat_s).start()
        elif time.monotonic() - self._beat_t >= within_s:
            self._heartbeat.beat()  # `status` sees the new step now, not one heartbeat later
            self._beat_t = time.monotonic()

    def close_state(self) -> None:
        """Remove the record: to `submit`, `stop` and `status` it means a live trainer (how the run ended is the
        owner's to record)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    @property
    def is_main(self) -> bool:
        from areal_hpc.train import dist

        return dist.rank() == 0
