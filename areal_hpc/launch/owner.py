"""The owner of a run, one for every launcher (a `Runner` says how a step becomes processes): starts the steps,
watches them, serves the requests (`requests/*.json`) of `add-servers`, `stop` and trainer restarts, shuts down."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from areal_hpc.config import ExperimentConfig, parse_allocation
from areal_hpc.launch import outcome, slurm
from areal_hpc.launch.external import watch_attached
from areal_hpc.launch.plan import Plan, StepSpec, next_server_index, server_step
from areal_hpc.registry import Heartbeat, Registry

log = logging.getLogger("areal_hpc.launch")
# a server that exits 0 from outside: the whole run may have been signalled (`scancel --signal=TERM JOB`), and then the
# trainer, signalled too, checkpoints and stops by itself; given this long, the run is STOPPED, not FAILED
OUTSIDE_EXIT_GRACE_S = 30.0


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
    # the trainer step restarts its own processes (torchrun's elastic agent): the owner does not
    trainer_restarts_itself: bool = False

    @abstractmethod
    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        """Start ``step``; ``running`` are the run's live steps (to place it beside them)."""

    def can_start(self, step: StepSpec, running: List[StepHandle]) -> bool:
        """Whether resources for ``step`` are free (Slurm: GPUs left in the allocation)."""
        return True

    def stopping(self) -> bool:
        """Whether the run is stopping (set by its owner): a runner waiting for resources stops waiting."""
        return False

    def lost(self, h: StepHandle) -> Optional[str]:
        """Why a step that exited 0 did not finish (Slurm ended it under its launcher), else None."""
        return None


class RunOwner:
    """Owns one run: its steps, its requests, and the record of how it ended (`outcome`).

    Stopping: `request_stop` (a ``stop`` request, Ctrl-C, SIGTERM) has the trainer checkpoint and
    the servers deregister; `request_force` (a second Ctrl-C, ``stop`` again) kills what is left."""

    def __init__(self, cfg: ExperimentConfig, plan: Plan, run_dir: Path, runner: Runner, mode: str,
                 job_id: Optional[str] = None, linger: bool = False):
        self.cfg, self.plan, self.run_dir, self.runner, self.mode = cfg, plan, run_dir, runner, mode
        runner.stopping = self._stopping_now
        # linger (the Slurm driver): with shutdown_server_on_exit=False serve requests while servers outlive the trainer
        self.linger, self.job_id = linger, job_id
        self.registry = Registry.for_run(run_dir, cfg.launcher)
        self.servers: Dict[str, StepHandle] = {}
        self.trainer: Optional[StepHandle] = None
        self.trainer_rc: Optional[int] = None
        self.restarts, self.stopping, self.force, self.stop_reason = 0, False, False, "stop requested"
        self.stop_grace_s = 60.0
        self.state, self.reason, self.log_path = outcome.RUNNING, None, None  # run.json's
        # (state, reason, log) of how the last trainer ended
        self.trainer_end: Optional[Tuple[str, Optional[str], Optional[str]]] = None
        self.server_failures: List[Tuple[str, Optional[str]]] = []
        self.early_failures = 0  # consecutive trainer deaths before their first step (crash-loop brake)
        self._attempt: Dict[str, Any] = {}  # the running trainer's start time, resume step, progress
        self._log_offsets: Dict[str, Dict[str, int]] = {}
        self._started = time.time()
        self._ended: Optional[float] = None
        self._heartbeat: Optional[Heartbeat] = None
        self._server_jobs: Dict[str, Any] = {}  # job id: its polled state (`_server_jobs_coming`), None once ended
        self._server_failure_counts_from = 0.0  # (monotonic) the last failure, after `OUTSIDE_EXIT_GRACE_S` if rc 0

    def record(self) -> Dict[str, object]:
        """run.json, as the heartbeat writes it."""
        return {"mode": self.mode, "pid": os.getpid(), "host": socket.gethostname(), "job_id": self.job_id,
                "started": self._started, "ended": self._ended, "state": self.state, "reason": self.reason,
                "log": self.log_path, "stopping": self.stopping, "servers": sorted(self.servers),
                "trainer_restarts": self.restarts, "trainer_rc": self.trainer_rc,
                "steps": {name: h.info() for name, h in self._handles().items()}}

    def _handles(self) -> Dict[str, StepHandle]:
        return {**self.servers, **({"trainer": self.trainer} if self.trainer is not None else {})}

    def set_state(self, state: str, reason: Optional[str] = None, log_path: Optional[str] = None) -> None:
        """Record the run's state, why, and which log tells more in run.json now."""
        self.state, self.reason, self.log_path = state, reason, log_path
        if state in outcome.FINAL:
            self._ended = time.time()
            (log.error if state == outcome.FAILED else log.info)("run %s", outcome.summary_line(
                {"state": state, "reason": reason, "log": log_path}))
        if self._heartbeat is not None:
            self._heartbeat.beat()

    def request_stop(self, reason: str = "stop requested", grace_s: float = 60.0) -> None:
        if not self.stopping:
            self.stopping, self.stop_reason, self.stop_grace_s = True, reason, grace_s

    def request_force(self, reason: str = "forced stop") -> None:
        self.request_stop(reason)
        self.force = True

    def start_step(self, step: StepSpec) -> StepHandle:
        offsets = outcome.log_sizes(step.log)  # an error line must come from this attempt, not an earlier one
        if step.role != "server":  # progress is past the checkpoint it resumes from
            resume = outcome.latest_checkpoint_step(self.run_dir / "checkpoints")  # (disabled: the run's own)
            # the metrics' last row now: a trainer that never writes one leaves it as it is (no clock compared)
            self._attempt = {"from_step": resume, "row": outcome.last_row(self.run_dir / "metrics.jsonl"),
                             "progressed": False}
        h = self.runner.start(step, list(self._handles().values()))
        self._log_offsets[step.name] = offsets
        if step.role == "server":
            self.servers[step.name] = h
        else:
            self.trainer, self.trainer_rc = h, None
        log.info("started %s: %s", step.name, h.info())
        return h

    def add_servers(self, count: int) -> List[str]:
        """Start up to ``count`` more servers, where the runner finds room (``relative_node=-1``); their names."""
        alloc = parse_allocation(self.cfg.allocation_mode)
        known = [s.name for s in self.plan.servers] + list(self.servers)

        def step(reserve: int = 0) -> StepSpec:  # reserved: a server job may have taken the index asked before
            index = next_server_index(self.registry, known, reserve=reserve)
            return server_step(self.cfg, alloc, self.run_dir, index, relative_node=-1, gpu_ids=[])
        started: List[str] = []
        while len(started) < count and self.runner.can_start(step(), list(self._handles().values())):
            started.append(self.start_step(step(reserve=1)).step.name)
        return started

    def _stopping_now(self) -> bool:
        """The runner's `Runner.stopping` while it waits for room: a `stop` request posted meanwhile is served first."""
        self.handle_requests(only="stop")
        return self.stopping

    def handle_requests(self, only: Optional[str] = None) -> None:
        """Serve the requests posted (`control`); ``only``: those of that kind (a runner waiting for room asks for
        ``stop``s, and must not start other steps meanwhile)."""
        for name, req in sorted(self.registry.list("requests").items()):
            if only is not None and req.get("kind") != only:
                continue
            if not self.registry.delete("requests", name) or req.get("until", math.inf) < self._started:
                continue  # withdrawn by its poster (`control.withdraw`), or given up before this owner started
            kind, reply = req.get("kind"), None  # the reply: the servers added, or why a request was not served
            log.info("request %s: %s", name, req)
            try:
                if kind == "stop" and (req.get("force") or self.stopping):  # a second stop, whatever run.json said
                    self.request_force("forced stop (areal-hpc stop, twice)")
                    reply = None if req.get("force") else {"forced": True}  # for `stop` to say so
                elif kind == "stop":
                    self.request_stop("stop requested (areal-hpc stop)", float(req.get("grace_s", 60.0)))
                elif self.stopping and kind in ("add_servers", "start_trainer"):
                    reply = {"error": "the run is stopping"}
                elif kind == "add_servers":
                    wanted = int(req.get("count", 1))
                    reply = {"wanted": wanted, "servers": self.add_servers(wanted)}  # `add-servers` waits for these
                    if self._heartbeat is not None:  # run.json lists them before the reply: one it drops has exited
                        self._heartbeat.beat()
                    if len(reply["servers"]) < wanted:  # and submits the rest as a job of their own
                        log.warning("started %d of %d requested servers (no free resources)", len(reply["servers"]),
                                    wanted)
                elif kind == "start_trainer" and self.trainer is not None and self.trainer.poll() is None:
                    reply = {"error": "a trainer is running already"}
                elif kind == "start_trainer":
                    self.early_failures = 0  # a trainer started by hand gets a fresh crash-loop count
                    self.registry.delete("", "trainer")  # the last one's, if it died unregistered: not the new one's
                    self.start_step(self._trainer_step(req.get("min_required_servers")))
                    # how the last trainer ended is history, not the state of the new one
                    self.set_state(outcome.RUNNING, "trainer started again (submit ... min_required_servers)")
            except Exception as e:  # noqa: BLE001 - a step that fails to start must not end the run
                log.exception("request %s failed", name)
                reply = {"error": f"{type(e).__name__}: {e}"}
            if reply:
                self.registry.put("replies", name, reply, ttl=True)

    def _trainer_step(self, min_required_servers: Optional[int] = None) -> StepSpec:
        """The plan's trainer step again; ``min_required_servers`` for this trainer only (config.yaml keeps the run's):
        it waits for that many servers, then pushes its weights before generating."""
        step = self.plan.trainer
        if min_required_servers:
            return replace(step, env={**step.env, "AREAL_HPC_MIN_REQUIRED_SERVERS": str(min_required_servers)})
        return step

    def _watch_progress(self) -> None:
        """Note, for `_progressed`, whether the running trainer's record moved past its first step."""
        a = self._attempt
        if a["progressed"]:
            return
        step = (self.registry.get("", "trainer") or {}).get("step")
        if isinstance(step, int):
            a["progressed"] = step > a.setdefault("first_step", step)

    def _progressed(self) -> bool:
        """Did the trainer that just ended complete a step (its record moved, or metrics.jsonl ends in a row past its
        resume step that was not there when it started)? Rows are compared, not mtimes: a file's clock (coarse, or
        a file server's) can read earlier than this host's."""
        a = self._attempt
        row = outcome.last_row(self.run_dir / "metrics.jsonl")
        return a["progressed"] or (row != a["row"] and int(row.get("step", 0)) > a["from_step"])

    def _on_trainer_exit(self, rc: int) -> bool:
        """Note how the trainer ended; restart it when allowed. True if a new trainer was started."""
        self.trainer_rc = rc
        log.info("trainer %s", outcome.describe_exit(rc))
        if rc in (0, outcome.TRAINER_STOPPED):
            lost = self.runner.lost(self.trainer) if rc == 0 and not self.stopping else None
            if lost:
                self.trainer_end = (outcome.FAILED, lost, None)
            elif rc == 0 and not self.stopping:
                self.trainer_end, self.early_failures = (outcome.COMPLETED, None, None), 0
            elif not self.stopping:  # a signal from outside areal-hpc (kill, scancel)
                self.trainer_end = (outcome.STOPPED, "the trainer was stopped by a signal from outside areal-hpc"
                                    + self._where_stopped(), None)
            return False
        self.registry.delete("", "trainer")  # a killed trainer's record would block a restart until its TTL
        reason, path = self._failure(self.trainer, rc)
        self.trainer_end = (outcome.FAILED, reason, path)
        if self.stopping:
            return False
        self.early_failures = 0 if self._progressed() else self.early_failures + 1
        limit = 0 if self.runner.trainer_restarts_itself else self.cfg.trainer.max_restarts
        if self.early_failures >= 2:
            self.trainer_end = (outcome.FAILED, f"{reason} (crash loop: it died before its first step "
                                f"{self.early_failures} times in a row; not restarted)", path)
            log.error("trainer died before its first step %d times in a row: not restarting it", self.early_failures)
            return False
        if self.restarts >= limit:
            if limit:
                self.trainer_end = (outcome.FAILED, f"{reason} (after {self.restarts} restart(s), "
                                    f"trainer.max_restarts={limit})", path)
            return False
        self.restarts += 1
        log.warning("%s; restarting it (%d/%d) from its last checkpoint; servers keep running", reason,
                    self.restarts, limit)
        # it waits for one server only: the others are registered, or dead and would keep it waiting
        self.start_step(self._trainer_step(min_required_servers=1 if self.plan.servers else None))
        self.set_state(outcome.RUNNING, f"trainer restarted {self.restarts}x; last: {reason}", path)
        return True

    def _final(self) -> Tuple[str, Optional[str], Optional[str]]:
        """(state, reason, log) of a run whose trainer is over, from how it ended."""
        if self.trainer_end is not None and self.trainer_end[0] == outcome.FAILED and self.server_failures:
            return outcome.FAILED, f"{self.trainer_end[1]}; earlier, {self.server_failures[0][0]}", self.trainer_end[2]
        if self.trainer_end is not None:
            return self.trainer_end
        if self.server_failures:
            reason, path = self.server_failures[-1]  # the one that left none
            if len(self.server_failures) > 1:
                reason = f"{reason}; first, {self.server_failures[0][0]}"
            return outcome.FAILED, f"every server exited; {reason}", path
        return outcome.FAILED, "the trainer ended without a result", None

    def _on_server_exit(self, name: str, h: StepHandle, rc: int) -> None:
        (log.info if self.stopping else log.warning)("%s %s", name, outcome.describe_exit(rc))
        del self.servers[name]
        # its record must not outlive it (a SIGKILLed server cannot deregister itself)
        if self.registry.delete("servers", name):
            log.info("removed the registry record of %s", name)
        # exit 0, not asked to and not at the whole job's end: a kill or scancel of its step, while the run needs it
        if not self.stopping and (rc != 0 or self.trainer_rc is None and not self.runner.lost(h)):
            self.server_failures.append(self._failure(h, rc))
            self._server_failure_counts_from = time.monotonic() + (OUTSIDE_EXIT_GRACE_S if rc == 0 else 0.0)

    def _failure(self, h: StepHandle, rc: int) -> Tuple[str, Optional[str]]:
        """(reason, log) of a step that failed: how it exited and the error line this attempt logged."""
        line, path = outcome.error_line(h.step.log, self._log_offsets.get(h.step.name))
        why = " (out of memory? the kernel's OOM killer sends SIGKILL)" if rc in (-9, 137) and not line else ""
        if rc == 0:  # a server the run still needed
            why = " (stopped from outside areal-hpc, while the run needed it)"
        return f"{h.step.name} {outcome.describe_exit(rc)}{why}" + (f": {line}" if line else ""), path

    def run(self, on_tick=None) -> int:
        """Start the plan's steps and own them until the run ends; returns `outcome.exit_code`."""
        self._started = time.time()
        self._heartbeat = Heartbeat(self.registry, "", "run", self.record,
                                    interval_s=self.cfg.launcher.heartbeat_s, remove_on_exit=False).start()
        # servers attached by URL have no heartbeat of their own: the owner checks their /health
        watch = watch_attached(self.registry, self.cfg.launcher.heartbeat_s)
        try:
            try:
                for step in self.plan.steps:
                    self.start_step(step)
                self._loop(on_tick)
            except KeyboardInterrupt:  # where no handler turned Ctrl-C into request_stop, or a runner's wait it ended
                if not self.stopping:
                    self.request_force("interrupted")
                self._stop_run()
            except Exception as e:  # noqa: BLE001 - the owner itself failed: the run did too, and says why
                if self.state == outcome.REQUEUED or self.state in outcome.FINAL:
                    raise  # from a signal handler that already ended the run (submitit's USR2 path)
                log.exception("the run's owner failed")
                self.set_state(outcome.FAILED, f"the launcher failed: {type(e).__name__}: {e}",
                               str(self.run_dir / "logs" / "driver.log"))
                self.shutdown(reason="the launcher failed", grace_s=30.0)
            return outcome.exit_code(self.state)
        finally:
            watch.set()
            if self._heartbeat is not None:
                self._heartbeat.beat()
                self._heartbeat.stop()

    def _loop(self, on_tick) -> None:
        while True:
            self.handle_requests()
            if self.stopping:
                return self._stop_run()
            for name, h in list(self.servers.items()):  # first: a trainer may fail as one did
                rc = h.poll()
                if rc is not None:
                    self._on_server_exit(name, h, rc)
            if self.trainer is not None and self.trainer_rc is None:
                self._watch_progress()
                rc = self.trainer.poll()
                if rc is not None:
                    if self._on_trainer_exit(rc):
                        continue
                    state, reason, path = self._final()
                    if self.cfg.shutdown_server_on_exit:
                        self.shutdown(reason=f"trainer {outcome.describe_exit(rc)}")
                        return self.set_state(state, reason, path)
                    log.info("shutdown_server_on_exit=False: servers stay up")
                    if not self.linger:
                        return self.set_state(state, reason, path)
                    # the run waits for `stop` (or, the trainer failed, a restart by hand): not the last restart's words
                    self.set_state(outcome.RUNNING, f"{reason or 'the trainer completed'}; servers stay up "
                                   "(shutdown_server_on_exit=False)", path)
            if (self.trainer is None or self.trainer_rc is not None) and not self.servers:
                return self.set_state(*self._final())
            failures_count = self.server_failures and time.monotonic() >= self._server_failure_counts_from
            if failures_count and not self.servers and self.trainer_rc is None and not self.registry.list(
                    "servers") and not self._server_jobs_coming():  # none attached, by hand, in a job
                self.shutdown(reason="every server failed, none is left or coming")  # (else the trainer waits 10 min)
                return self.set_state(*self._final())
            if on_tick is not None:
                on_tick()
            time.sleep(0.2)

    def _server_jobs_coming(self) -> bool:
        """Whether a server job (`add-servers`) may still bring servers; one Slurm ended is a failure of its servers."""
        coming = False
        for job_id, rec in self.registry.list("jobs", live_only=False).items():
            polled = self._server_jobs.setdefault(job_id, slurm.polled_job_state(job_id))
            state = slurm.state_word(polled()) if polled else None
            if state is None:
                continue  # ended, noted already
            if state not in slurm.FINAL_STATES:  # running, queued, or unknown to Slurm now
                coming = True
                continue
            self._server_jobs[job_id] = None
            names = rec.get("servers") or ["?"]
            self.server_failures.append((f"server job {job_id} ({', '.join(names)}) ended {state}",
                                         str(self.run_dir / "logs" / f"{names[0]}.log")))
        return coming

    def _stop_run(self) -> None:
        """A stop on purpose: COMPLETED if the trainer had already finished, else STOPPED (or FAILED
        if the trainer had failed and was not restarted)."""
        trainer_was_running = self.trainer is not None and self.trainer_rc is None
        self.shutdown(reason=self.stop_reason, grace_s=self.stop_grace_s)
        if not trainer_was_running and self.trainer is not None:
            state, reason, path = self._final()
            if state != outcome.COMPLETED:
                reason = f"{reason}; then {self.stop_reason}"
            return self.set_state(state, reason, path)
        reason = self.stop_reason + self._where_stopped()
        if trainer_was_running and self.trainer_rc not in (None, 0, outcome.TRAINER_STOPPED):
            reason += f"; the trainer {outcome.describe_exit(self.trainer_rc)} on the way out"
        self.set_state(outcome.STOPPED, reason, None)

    def _where_stopped(self) -> str:
        at = outcome.last_step(self.run_dir / "metrics.jsonl")
        ckpt = outcome.latest_checkpoint_step(self.run_dir / "checkpoints")
        return (f" at step {at}" if at else "") + (
            f"; resumes from checkpoint step_{ckpt:08d}" if ckpt and self.cfg.recover.mode != "disabled" else "")

    def shutdown(self, reason: str, grace_s: float = 60.0, trainer_signal: int = signal.SIGTERM,
                 server_grace_s: float = 30.0) -> None:
        """Trainer first (SIGTERM, or USR2 before a requeue: it checkpoints at the step boundary), then
        servers (they deregister); what does not stop within its grace (or at once after `request_force`)
        is killed. No record of a step of this run is left behind."""
        log.info("shutting down: %s", reason)
        self.stopping = True  # what is asked meanwhile is refused (`handle_requests`), but for a forced stop
        if self.trainer is not None and self.trainer.poll() is None:
            self.trainer.signal(trainer_signal)
            self.wait_or_kill([self.trainer], grace_s)
        if self.trainer is not None and self.trainer_rc is None:
            self.trainer_rc = self.trainer.poll()
            if self.trainer_rc not in (None, 0):
                self.registry.delete("", "trainer")
        for h in [h for h in self.servers.values() if h.poll() is None]:
            h.signal(signal.SIGTERM)
        self.wait_or_kill(list(self.servers.values()), server_grace_s)
        for name in list(self.servers):
            self.registry.delete("servers", name)  # normally gone already: they deregister on SIGTERM
        self.servers.clear()

    def wait_or_kill(self, handles: List[StepHandle], timeout: float) -> None:
        """Wait for ``handles`` to end; SIGKILL them after ``timeout`` (at once once forced), then
        wait for that too (a killed step must be gone before its records are removed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(h.poll() is None for h in handles) and not self._forced():
            time.sleep(0.1)
        alive = [h for h in handles if h.poll() is None]
        for h in alive:
            log.warning("killing %s", h.step.name)
            h.signal(signal.SIGKILL)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and any(h.poll() is None for h in alive):
            time.sleep(0.1)

    def _forced(self) -> bool:
        """Whether the stop is forced, by now or by a ``stop`` request served meanwhile (a second `areal-hpc stop`)."""
        if not self.force:
            self.handle_requests()  # others are refused: the run is stopping
        return self.force
