"""The driver: the owner of a run's Slurm allocation, on its batch host, whose steps are ``srun --exact`` job steps
(`SrunRunner`). On USR2 (time limit, preemption) `prepare_requeue` has the trainer checkpoint; then the job is requeued
(by submitit, or ``scontrol requeue`` when started by hand) and the requeued driver starts everything again."""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

from areal_hpc.config import ExperimentConfig, load_resolved, run_umask
from areal_hpc.launch import outcome, slurm
from areal_hpc.launch.entry import RANK_VARS
from areal_hpc.launch.local import ProcessHandle, owner_log, stop_on_signals
from areal_hpc.launch.owner import Runner, RunOwner, StepHandle
from areal_hpc.launch.plan import Plan, StepSpec, node_load

log = logging.getLogger("areal_hpc.launch")

# Slurm sends USR2 90 s before the time limit: the trainer's time to checkpoint, then the servers' to deregister
REQUEUE_TRAINER_GRACE_S = 75.0
REQUEUE_SERVER_GRACE_S = 10.0
STEP_LISTED_TIMEOUT_S = 60.0  # then the next step starts anyway
# the job's environment that each step states for itself
_JOB_VARS = ("SLURM_CPUS_PER_TASK", "SLURM_TRES_PER_TASK", "SLURM_MEM_PER_CPU", "SLURM_GPUS_PER_NODE", "SLURM_GPUS")

_OWNER: Optional[RunOwner] = None  # the live run, for the USR2 path


class SrunHandle(ProcessHandle):
    """One job step: the ``srun`` client process (own process group) and the step it created."""

    def __init__(self, step: StepSpec, proc: subprocess.Popen, job_id: str, node: int):
        super().__init__(step, [proc], list(step.gpu_ids))
        self.proc, self.job_id, self.node = proc, job_id, node
        self.step_id: Optional[str] = None
        self.nodelist = ""
        self.srun_said: collections.deque = collections.deque(maxlen=10)  # srun's own last messages (`_relay`)
        self.relay: Optional[threading.Thread] = None

    @property
    def nodes(self) -> range:
        return range(self.node, self.node + self.step.nodes)

    def signal(self, sig: int) -> None:
        # To the step's tasks through slurmctld: srun answers SIGTERM by killing its step (no deregistering, no save).
        target = f"{self.job_id}.{self.step_id}"
        if self.proc.poll() is None and self.step_id and not slurm.scancel(target, signal.Signals(sig).name[3:]) \
                and sig != signal.SIGKILL:
            return
        super().signal(sig)

    def info(self) -> Dict[str, object]:
        return {"srun_pid": self.proc.pid, "slurm_job_id": self.job_id, "slurm_step_id": self.step_id,
                "nodes": self.nodelist, "relative_node": self.node, "gpus_per_node": self.step.gpus_per_node,
                "gpus": self.gpus, "ntasks": self.step.ntasks}


class SrunRunner(Runner):
    """Starts steps as ``srun --exact`` steps of the driver's job, each once Slurm lists the previous one, so that a
    node's GPUs go to steps in plan order: the plan's GPU ids are theirs."""

    def __init__(self, cfg: ExperimentConfig, plan: Plan, job_id: str, env: Optional[Dict[str, str]] = None):
        env = os.environ if env is None else env
        self.cfg, self.plan, self.job_id = cfg, plan, str(job_id)
        n = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or plan.nodes)
        cpus = slurm.parse_counts(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
        self.capacity = [{"gpus": plan.gpus_per_node, "cpus": cpus[k] if k < len(cpus) else 0,
                          "mem": int(env.get("SLURM_MEM_PER_NODE") or 0)} for k in range(n)]
        self._known_steps: set = set()

    @staticmethod
    def _live(running: List[StepHandle]) -> List[StepHandle]:
        return [h for h in running if h.poll() is None and hasattr(h, "nodes")]

    def place(self, step: StepSpec, running: List[StepHandle]) -> Optional[int]:
        """The first node of ``step``: the plan's, or (added servers) the first with room; None without."""
        if step.relative_node >= 0:
            return step.relative_node
        used = node_load([h.step for h in self._live(running)], len(self.capacity))  # placed: on their own nodes
        need = {"gpus": step.gpus_per_node, "cpus": step.cpus_per_task * step.ntasks_per_node,
                "mem": step.mem_per_node_mb}

        def fits(k: int) -> bool:
            nodes = range(k, k + step.nodes)
            return nodes[-1] < len(self.capacity) and all(
                used[j][r] + need[r] <= self.capacity[j][r] for j in nodes for r in need
                if r == "gpus" or self.capacity[j][r])  # cpus/mem: 0 = not known, not checked

        return next((k for k in range(len(self.capacity)) if fits(k)), None)

    def can_start(self, step: StepSpec, running: List[StepHandle]) -> bool:
        return self.place(step, running) is not None

    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        node = self.place(step, running)
        if node is None:
            raise RuntimeError(f"no room in job {self.job_id} for {step.name}")
        placed = replace(step, relative_node=node)
        if self.plan.gpus_per_node and step.gpus_per_node:
            # Slurm hands a step the lowest free GPUs of its node: the plan's for plan steps started in order
            taken = {g for h in self._live(running) if node in h.nodes for g in h.step.gpu_ids}
            placed.gpu_ids = [g for g in range(self.plan.gpus_per_node) if g not in taken][:step.gpus_per_node]
            if step.gpu_ids and step.relative_node >= 0 and placed.gpu_ids != list(step.gpu_ids):
                log.info("%s: planned GPUs %s are taken; expecting %s", step.name, step.gpu_ids, placed.gpu_ids)
        argv = slurm.srun_argv(placed, self.plan.job_name, self.cfg.cluster.srun_args, jobid=self.job_id)
        Path(step.log).parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _JOB_VARS and k not in RANK_VARS}
        env.update(step.env, PYTHONUNBUFFERED="1")
        log.info("srun %s", slurm.shell_line(argv))
        sizes = outcome.log_sizes(str(step.log))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
                                cwd=str(Path(self.plan.run_dir)))
        h = SrunHandle(placed, proc, self.job_id, node)
        h.relay = threading.Thread(target=_relay, args=(proc.stderr, h.srun_said), daemon=True)
        h.relay.start()
        self._await_step(h, sizes)
        return h

    def lost(self, h: StepHandle) -> Optional[str]:
        # srun exits 0 for a step Slurm ended under it (a node failure: its tasks never report an exit code)
        state = slurm.state_word(slurm.job_state(self.job_id))
        return None if state in ("", "RUNNING") else (
            f"{h.step.name}'s srun exited 0 but job {self.job_id} is {state}: Slurm ended the step before it finished "
            f"(a node failure?); see {self.plan.run_dir}/logs/slurm-{self.job_id}.out")

    def _await_step(self, h: SrunHandle, log_sizes: Dict[str, int]) -> None:
        """Wait until Slurm lists the step (its resources are then taken); records its step id. An srun that fails
        before its step ran (its log as it was) has its words written to that log, as the step's error."""
        name = f"{self.plan.job_name}:{h.step.name}"
        deadline, delay = time.monotonic() + STEP_LISTED_TIMEOUT_S, 0.02
        while time.monotonic() < deadline and h.proc.poll() is None:
            for sid, sname, nodes in slurm.live_steps(self.job_id):
                if sname == name and sid not in self._known_steps:
                    self._known_steps.add(sid)
                    h.step_id, h.nodelist = sid.split(".", 1)[1], nodes
                    return
            time.sleep(delay)
            delay = min(0.2, delay * 2)
        if h.proc.poll() is None:
            log.warning("%s: Slurm did not list the step within %.0fs (still waiting for resources?)", h.step.name,
                        STEP_LISTED_TIMEOUT_S)
        else:
            h.relay.join(5.0)
            said = "; ".join(x for x in h.srun_said if x) or "no message"
            log.warning("%s: srun exited with %s before its step was listed: %s", h.step.name, h.proc.poll(), said)
            if h.proc.poll() != 0 and outcome.log_sizes(str(h.step.log)) == log_sizes:  # no task wrote a word
                with open(str(h.step.log).replace("%t", "0"), "a") as f:
                    f.write(f"srun: error: srun exited with {h.proc.poll()} before the step started: {said}\n")


def _relay(stream, keep: collections.deque) -> None:
    """srun's own messages (not its tasks'): on to the driver's stderr, the job's batch log; the last ones kept."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sys.stderr.write(line)
        sys.stderr.flush()
        keep.append(line.strip())


def prepare_requeue() -> bool:
    """Checkpoint the trainer and stop the servers before the job is requeued (or ends); whether to requeue."""
    owner = _OWNER
    if owner is None:
        log.warning("USR2 before the run started: requeueing as is")
        return True
    why = "time limit or preemption (USR2)"
    owner.request_stop(why)
    t0 = time.monotonic()
    log.warning("USR2: asking the trainer to checkpoint at its next step boundary")
    owner.shutdown(why, REQUEUE_TRAINER_GRACE_S, signal.SIGUSR2, REQUEUE_SERVER_GRACE_S)
    requeue = bool(owner.cfg.launcher.requeue_on_preemption)
    log.warning("USR2 handled in %.1fs (trainer rc %s): %s", time.monotonic() - t0, owner.trainer_rc,
                "requeueing the job" if requeue else "ending the job (launcher.requeue_on_preemption=False)")
    why += f" at step {outcome.last_step(owner.run_dir / 'metrics.jsonl')}: checkpointed, " + (
        "the job is requeued and resumes" if requeue else
        "not requeued (launcher.requeue_on_preemption=False); submit again to resume")
    owner.set_state(outcome.REQUEUED if requeue else outcome.STOPPED, why)
    return requeue


def _on_usr2_standalone(signum, frame) -> None:
    """USR2 to a driver started by hand (not submitit's payload): its own requeue; not requeued, the job must not end
    COMPLETED."""
    if prepare_requeue():
        job = os.environ.get("SLURM_JOB_ID", "")
        err = slurm.requeue(job)
        if not err:
            log.warning("requeued job %s", job)
            raise SystemExit(0)
        log.error("scontrol requeue %s failed: %s", job, err)
        if _OWNER is not None:  # checkpointed, and nothing will run it again: stopped (main cancels the job)
            _OWNER.set_state(outcome.STOPPED, str(_OWNER.reason).replace(
                "the job is requeued and resumes", f"not requeued ({err}); submit again to resume"))
    raise SystemExit(outcome.exit_code(outcome.STOPPED))


def end_server_jobs(reg) -> Dict[str, str]:
    """Cancel the run's server jobs (`add-servers` past the allocation's room; their servers deregister on scancel's
    SIGTERM). Those scancel could not end, with why: their records stay (`status` lists them, a later `stop` cancels)."""
    failed = {}
    for job_id in reg.list("jobs", live_only=False):
        err = slurm.scancel(job_id)
        if err:
            failed[job_id] = err
        else:
            reg.delete("jobs", job_id)
    return failed


def main(run_dir: Path) -> int:
    global _OWNER

    run_dir = Path(run_dir).resolve()
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        print("areal-hpc driver: error: not inside a Slurm allocation (SLURM_JOB_ID is unset); "
              "`areal-hpc submit` with mode=slurm starts the driver for you", file=sys.stderr)
        return 2
    cfg = load_resolved(run_dir / "config.yaml")
    os.umask(run_umask(cfg))  # what the driver and its steps write stays private (cluster.group_readable)
    plan = Plan.from_json((run_dir / "plan.json").read_text())
    with owner_log(run_dir):
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        log.info("driver of job %s%s on %s (pid %d): %d step(s) on %d node(s) [%s]", job_id,
                 f" (requeued {restarts}x)" if restarts else "", socket.gethostname(), os.getpid(), len(plan.steps),
                 plan.nodes, os.environ.get("SLURM_JOB_NODELIST", "?"))
        owner = RunOwner(cfg, plan, run_dir, SrunRunner(cfg, plan, job_id), mode="slurm", job_id=job_id,
                         linger=not cfg.shutdown_server_on_exit)
        _OWNER = owner
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":  # submitit installs its own USR2 handler
            signal.signal(signal.SIGUSR2, _on_usr2_standalone)
            # SIGTERM, SIGINT: a graceful stop; a SIGTERM after it is Slurm's (the job's end) and must not kill steps
            # mid-checkpoint: only Ctrl-C again forces
            stop_on_signals(owner, forced_by=(signal.SIGINT,))
        try:
            rc = owner.run()
        finally:  # also when USR2 without requeue stopped the run: submitit's error or SystemExit would end it FAILED
            _OWNER = None
            if owner.state in outcome.FINAL and int(slurm.job(job_id).get("restarts") or 0) > restarts:
                why = (f"Slurm requeued job {job_id} (scontrol requeue, preemption, a lost node); it resumes when it "
                       f"runs again. Before: {outcome.summary_line(owner.record())}")
                log.warning("run REQUEUED: %s", why)
                owner.state = outcome.REQUEUED
                owner.registry.update("", "run", lambda old: {**(old or {}), "state": owner.state, "reason": why})
            elif owner.state in outcome.FINAL:
                if cfg.shutdown_server_on_exit or owner.state == outcome.STOPPED:
                    # they would hold their GPUs to their time limit; before this job's own scancel, which ends us
                    for server_job, err in end_server_jobs(owner.registry).items():
                        log.warning("could not cancel server job %s: %s", server_job, err)
                if owner.state == outcome.STOPPED:
                    log.info("the run was stopped: ending job %s as CANCELLED (no success to --dependency=afterok)",
                             job_id)
                    err = slurm.scancel(job_id)
                    if err:
                        print(f"scancel {job_id} failed: {err}", file=sys.stderr)
        log.info("driver exits with %s (run %s)", rc, outcome.summary_line(owner.record()))
    return rc
