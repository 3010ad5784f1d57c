"""The driver: the one process that owns a run's Slurm allocation, on its batch host.

It loads the run's config.yaml and plan.json, starts every step as an ``srun --exact`` job step
(`slurm.SrunRunner`), watches them, serves registry requests (``add_servers``, ``start_trainer``,
``stop``), restarts a dead trainer up to ``trainer.max_restarts`` times, and with
``shutdown_server_on_exit=False`` keeps the allocation and its servers alive after the trainer
ends (until ``areal-hpc stop``, the servers exit, or the time limit). Logs: {run}/logs/driver.log
(and the job's {run}/logs/slurm-<job>.out).

USR2 (Slurm's warning before the time limit, preemption, ``scancel --signal=USR2 --batch``):
`prepare_requeue` asks the trainer to checkpoint (SIGUSR2: it stops at the next step boundary),
waits for it, stops the servers (they deregister); then the job is requeued -- by submitit when
the driver is its payload (`slurm.Driver.checkpoint`), by ``scontrol requeue`` otherwise -- and the
requeued driver starts everything again; the trainer resumes from its checkpoint.

Started by `areal-hpc submit` (mode=slurm) through submitit, or by hand inside an allocation:
``areal-hpc driver --run-dir RUN``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from areal_hpc.config import load_resolved
from areal_hpc.config.validate import run_umask
from areal_hpc.launch import outcome
from areal_hpc.launch.owner import RunOwner
from areal_hpc.launch.plan import Plan

log = logging.getLogger("areal_hpc.launch")

_OWNER: Optional[RunOwner] = None  # the live run, for the USR2 path


def _setup_logging(run_dir: Path) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    lg = logging.getLogger("areal_hpc.launch")
    lg.setLevel(logging.INFO)
    for h in list(lg.handlers):
        if getattr(h, "_areal_driver", False):
            lg.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s driver %(levelname)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(run_dir / "logs" / "driver.log")):
        h.setFormatter(fmt)
        h._areal_driver = True  # type: ignore[attr-defined]
        lg.addHandler(h)
    lg.propagate = False


def _wait(handles, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(h.poll() is None for h in handles):
        time.sleep(0.2)


def prepare_requeue(trainer_grace_s: Optional[float] = None, server_grace_s: Optional[float] = None) -> bool:
    """Checkpoint the trainer and stop the servers before the job is requeued (or ends).

    Returns whether the job should be requeued (``launcher.requeue_on_preemption``)."""
    from areal_hpc.launch.slurm import REQUEUE_SERVER_GRACE_S, REQUEUE_TRAINER_GRACE_S

    owner = _OWNER
    if owner is None:
        log.warning("USR2 before the run started: requeueing as is")
        return True
    owner.request_stop("time limit or preemption (USR2)")
    t0 = time.monotonic()
    trainer = owner.trainer
    if trainer is not None and trainer.poll() is None:
        log.warning("USR2: asking the trainer to checkpoint at its next step boundary")
        trainer.signal(signal.SIGUSR2)
        _wait([trainer], REQUEUE_TRAINER_GRACE_S if trainer_grace_s is None else trainer_grace_s)
        if trainer.poll() is None:
            log.error("the trainer did not stop within %.0fs: killing it (it resumes from its last checkpoint)",
                      time.monotonic() - t0)
            trainer.signal(signal.SIGKILL)
        else:
            log.info("trainer stopped (rc %s) after %.1fs", trainer.poll(), time.monotonic() - t0)
    servers = [h for h in owner.servers.values() if h.poll() is None]
    for h in servers:
        h.signal(signal.SIGTERM)
    _wait(servers, REQUEUE_SERVER_GRACE_S if server_grace_s is None else server_grace_s)
    for h in servers:
        if h.poll() is None:
            h.signal(signal.SIGKILL)
    for name in list(owner.servers):  # the requeued driver starts them again
        owner.registry.delete("servers", name)
    requeue = bool(owner.cfg.launcher.requeue_on_preemption)
    log.warning("USR2 handled in %.1fs: %s", time.monotonic() - t0,
                "requeueing the job" if requeue else "ending the job (launcher.requeue_on_preemption=False)")
    at = outcome.last_step(owner.run_dir / "metrics.jsonl")
    if requeue:
        owner.set_state(outcome.REQUEUED, f"time limit or preemption (USR2) at step {at}: checkpointed, the job "
                        "is requeued and resumes")
    else:
        owner.set_state(outcome.STOPPED, f"time limit or preemption (USR2) at step {at}: checkpointed, not "
                        "requeued (launcher.requeue_on_preemption=False); submit again to resume")
    return requeue


def _on_usr2_standalone(signum, frame) -> None:
    """USR2 when the driver is not submitit's payload (started by hand): same steps, own requeue."""
    if prepare_requeue():
        job = os.environ.get("SLURM_JOB_ID", "")
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        log.warning("scontrol requeue %s: %s", job, (r.stdout + r.stderr).strip() or "ok")
    raise SystemExit(0)


def _on_term_standalone(signum, frame) -> None:
    """SIGTERM/SIGINT when started by hand: a graceful stop; a second one forces it."""
    owner = _OWNER
    if owner is None:
        raise KeyboardInterrupt
    if owner.stopping:
        owner.request_force(f"forced stop ({signal.Signals(signum).name} twice)")
    else:
        owner.request_stop(f"stopped by {signal.Signals(signum).name}")


def cancel_own_job(job_id: str) -> None:
    """End this job as CANCELLED: a run stopped on purpose is neither COMPLETED (a success to
    ``--dependency=afterok``, mail, scripts) nor FAILED. Everything is stopped and recorded by now;
    Slurm signals this batch script and marks the job CANCELLED at once."""
    log.info("the run was stopped: ending job %s as CANCELLED", job_id)
    try:
        subprocess.run(["scancel", str(job_id)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"scancel {job_id} failed: {e}", file=sys.stderr)


def main(run_dir: Path) -> int:
    global _OWNER
    from areal_hpc.launch.slurm import SrunRunner

    run_dir = Path(run_dir).resolve()
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        print("areal-hpc driver: error: not inside a Slurm allocation (SLURM_JOB_ID is unset); "
              "`areal-hpc submit` with mode=slurm starts the driver for you", file=sys.stderr)
        return 2
    cfg = load_resolved(run_dir / "config.yaml")
    os.umask(run_umask(cfg))  # what the driver and its steps write stays private (cluster.group_readable)
    plan = Plan.from_json((run_dir / "plan.json").read_text())
    _setup_logging(run_dir)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    log.info("driver of job %s%s on %s (pid %d): %d step(s) on %d node(s) [%s]", job_id,
             f" (requeued {restarts}x)" if restarts else "", socket.gethostname(), os.getpid(), len(plan.steps),
             plan.nodes, os.environ.get("SLURM_JOB_NODELIST", "?"))
    runner = SrunRunner(cfg, plan, job_id)
    owner = RunOwner(cfg, plan, run_dir, runner, mode="slurm", job_id=job_id,
                     linger=not cfg.shutdown_server_on_exit)
    _OWNER = owner
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":  # submitit installs its own USR2 handler
        signal.signal(signal.SIGUSR2, _on_usr2_standalone)
        signal.signal(signal.SIGTERM, _on_term_standalone)
        signal.signal(signal.SIGINT, _on_term_standalone)
    try:
        rc = owner.run()
    finally:
        _OWNER = None
    log.info("driver exits with %s (run %s)", rc, outcome.summary_line(owner.record()))
    if owner.state == outcome.STOPPED:
        cancel_own_job(job_id)
    return rc
