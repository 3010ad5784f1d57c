"""The owner of a run: starts its steps, watches them, serves control requests, shuts down.

One implementation for both launchers; only how a step becomes processes differs (`Runner`):
`local.ProcessRunner` forks subprocesses, `slurm.SrunRunner` starts ``srun`` job steps inside
the allocation. Requests (`requests/*.json` in the registry) come from `areal-hpc add-servers`,
`stop` and trainer-restart submits; the owner is the only process that acts on them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

from areal_hpc.config import ExperimentConfig, parse_allocation
from areal_hpc.launch.plan import Plan, StepSpec, build_plan, server_step
from areal_hpc.registry import Heartbeat, Registry

log = logging.getLogger("areal_hpc.launch")


class StepHandle(ABC):
    """A running step (one or more processes)."""

    step: StepSpec

    @abstractmethod
    def poll(self) -> Optional[int]:
        """None while running, else the exit code (worst of its tasks)."""

    @abstractmethod
    def signal(self, sig: int) -> None:
        ...

    def info(self) -> Dict[str, object]:
        return {}


class Runner(ABC):
    @abstractmethod
    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        """Start ``step``; ``running`` are the run's live steps (to place it beside them)."""

    def can_start(self, step: StepSpec, running: List[StepHandle]) -> bool:
        """Whether resources for ``step`` are free (Slurm: GPUs left in the allocation)."""
        return True


class RunOwner:
    def __init__(self, cfg: ExperimentConfig, plan: Plan, run_dir: Path, runner: Runner, mode: str,
                 job_id: Optional[str] = None, linger: bool = False):
        self.cfg, self.plan, self.run_dir, self.runner, self.mode = cfg, plan, run_dir, runner, mode
        # linger: with shutdown_server_on_exit=False keep serving requests while servers live after
        # the trainer ends (the Slurm driver: its allocation must outlive the trainer step)
        self.linger = linger
        self.registry = Registry(run_dir / "registry", lock_kind=cfg.launcher.lock_kind, ttl_s=cfg.launcher.ttl_s)
        self.job_id = job_id
        self.servers: Dict[str, StepHandle] = {}
        self.trainer: Optional[StepHandle] = None
        self.trainer_rc: Optional[int] = None
        self.restarts = 0
        self.stopping = False
        self._heartbeat: Optional[Heartbeat] = None

    # ------------------------------------------------------------------ records
    def _run_record(self) -> Dict[str, object]:
        return {"mode": self.mode, "pid": os.getpid(), "host": socket.gethostname(), "job_id": self.job_id,
                "started": self._started, "servers": sorted(self.servers), "trainer_restarts": self.restarts,
                "trainer_rc": self.trainer_rc,
                "steps": {name: h.info() for name, h in self._handles().items()}}

    def _handles(self) -> Dict[str, StepHandle]:
        out = dict(self.servers)
        if self.trainer is not None:
            out["trainer"] = self.trainer
        return out

    # ------------------------------------------------------------------ steps
    def start_step(self, step: StepSpec) -> StepHandle:
        h = self.runner.start(step, list(self._handles().values()))
        if step.role == "server":
            self.servers[step.name] = h
        else:
            self.trainer, self.trainer_rc = h, None
        log.info("started %s: %s", step.name, h.info())
        return h

    def next_server_index(self) -> int:
        used = [int(n.split("-", 1)[1]) for n in self.servers] + \
               [int(n.split("-", 1)[1]) for n in self.registry.list("servers") if n.startswith("server-")]
        return max(used, default=-1) + 1

    def add_servers(self, count: int) -> int:
        """Start up to ``count`` more servers; returns how many the resources allowed. Added servers
        are not pinned to a node or GPUs (``relative_node=-1``): the runner puts them where room is."""
        alloc = parse_allocation(self.cfg.allocation_mode)
        started = 0
        for _ in range(count):
            step = server_step(self.cfg, alloc, self.run_dir, self.next_server_index(), relative_node=-1, gpu_ids=[])
            if not self.runner.can_start(step, list(self._handles().values())):
                break
            self.start_step(step)
            started += 1
        return started

    # ------------------------------------------------------------------ requests
    def handle_requests(self) -> None:
        for name, req in sorted(self.registry.list("requests").items()):
            self.registry.delete("requests", name)
            kind = req.get("kind")
            log.info("request %s: %s", name, req)
            if kind == "stop":
                self.stopping = True
            elif kind == "add_servers":
                n = self.add_servers(int(req.get("count", 1)))
                if n < int(req.get("count", 1)):
                    log.warning("started %d of %d requested servers (no free resources)", n, req.get("count"))
                    # the answer for `add-servers`, which then submits the rest as a separate job
                    self.registry.put("replies", f"{name}-unserved", {"wanted": req.get("count"), "started": n},
                                      ttl=True)
            elif kind == "start_trainer":
                if self.trainer is None or self.trainer.poll() is not None:
                    step = self._trainer_step()
                    if req.get("min_required_servers"):  # this trainer only; config.yaml keeps the run's value
                        step.env = {**step.env, "AREAL_HPC_MIN_REQUIRED_SERVERS": str(req["min_required_servers"])}
                    self.start_step(step)

    def _trainer_step(self) -> StepSpec:
        alloc = parse_allocation(self.cfg.allocation_mode)
        step = build_plan(self.cfg, alloc, self.run_dir, with_servers=False).trainer
        return replace(step, relative_node=self.plan.trainer.relative_node if self.plan.trainer else step.relative_node)

    # ------------------------------------------------------------------ main loop
    def run(self, on_tick=None) -> int:
        self._started = time.time()
        for name in self.registry.list("requests", live_only=False):  # left by an earlier owner
            log.info("dropping stale request %s", name)
            self.registry.delete("requests", name)
        self._heartbeat = Heartbeat(self.registry, "", "run", self._run_record,
                                    interval_s=self.cfg.launcher.heartbeat_s, remove_on_exit=False).start()
        for step in self.plan.steps:
            self.start_step(step)
        try:
            while True:
                self.handle_requests()
                if self.stopping:
                    return self.shutdown(reason="stop requested")
                if self.trainer is not None and self.trainer_rc is None:
                    rc = self.trainer.poll()
                    if rc is not None:
                        self.trainer_rc = rc
                        log.info("trainer exited with %s", rc)
                        if rc != 0:  # a killed trainer's record would block a restart until its TTL
                            self.registry.delete("", "trainer")
                        if rc != 0 and self.restarts < self.cfg.trainer.max_restarts:
                            self.restarts += 1
                            log.warning("restarting the trainer (%d/%d); servers keep running", self.restarts,
                                        self.cfg.trainer.max_restarts)
                            self.start_step(self._trainer_step())
                            continue
                        if self.cfg.shutdown_server_on_exit:
                            return self.shutdown(reason=f"trainer exited ({rc})", rc=rc)
                        log.info("shutdown_server_on_exit=False: servers stay up")
                        if not self.linger:
                            return rc
                for name, h in list(self.servers.items()):
                    rc = h.poll()
                    if rc is not None:
                        log.warning("%s exited with %s", name, rc)
                        del self.servers[name]
                if (self.trainer is None or self.trainer_rc is not None) and not self.servers:
                    return self.trainer_rc or 0
                if on_tick is not None:
                    on_tick()
                time.sleep(0.2)
        except KeyboardInterrupt:
            return self.shutdown(reason="interrupted", rc=130)
        finally:
            if self._heartbeat is not None:
                self._heartbeat.beat()
                self._heartbeat.stop()

    def shutdown(self, reason: str, rc: int = 0, grace_s: float = 60.0) -> int:
        """Trainer first (SIGTERM: it checkpoints at the step boundary), then servers (they deregister)."""
        log.info("shutting down: %s", reason)
        if self.trainer is not None and self.trainer.poll() is None:
            self.trainer.signal(signal.SIGTERM)
            self._wait([self.trainer], grace_s)
        for h in self.servers.values():
            if h.poll() is None:
                h.signal(signal.SIGTERM)
        self._wait(list(self.servers.values()), 30.0)
        return rc if self.trainer_rc in (None, 0) else self.trainer_rc

    @staticmethod
    def _wait(handles: List[StepHandle], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(h.poll() is None for h in handles):
            time.sleep(0.1)
        for h in handles:
            if h.poll() is None:
                h.signal(signal.SIGKILL)
