"""Every Slurm command the package runs (queries, sbatch, scancel, scontrol, a step's ``srun`` line); no other
module runs a Slurm binary."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import time
from typing import Callable, Dict, Iterator, List, Optional

from areal_hpc.config.validate import slurm_time_seconds
from areal_hpc.launch.plan import StepSpec

# PREEMPTED: ended by preemption and not requeued (a requeued job is REQUEUED, then PENDING)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "REVOKED", "PREEMPTED"}
WAITING_STATES = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESIZING")
LIVE_STATES = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")
POLL_MAX_S = 5.0  # waits ask Slurm (a controller every user shares) about a job at most this often


def _run(cmd: List[str], timeout: float = 30.0, **kw) -> Optional[subprocess.CompletedProcess]:
    """The finished command, or None when it cannot run (no Slurm here) or hangs."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired):
        return None


def state_word(state: Optional[str]) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``."""
    return state.split()[0] if state else ""


def job(job_id: str) -> Dict[str, str]:
    """A job's ``state``, ``nodes`` (and scontrol's ``restarts`` and ``reason``, why it waits): scontrol while slurmctld
    remembers it (MinJobAge), else sacct; {} if unknown."""
    r = _run(["scontrol", "show", "job", "-o", str(job_id)])
    fields = dict(w.split("=", 1) for w in r.stdout.split() if "=" in w) if r and r.returncode == 0 else {}
    if "JobState" in fields:
        reason = fields.get("Reason", "None")
        return {"state": fields["JobState"], "nodes": "" if fields.get("NodeList") == "(null)"
                else fields.get("NodeList", ""), "restarts": fields.get("Restarts", "0"),
                "reason": "" if reason == "None" else reason}
    r = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,NodeList"])
    lines = [x for x in r.stdout.splitlines() if x.strip()] if r and r.returncode == 0 else []
    if not lines:
        return {}
    state, _, nodes = lines[-1].partition("|")
    return {"state": state_word(state), "nodes": "" if nodes == "None assigned" else nodes}


def job_state(job_id: str) -> Optional[str]:
    """The state of a job (`job`), None if unknown: the one job-state query."""
    return job(job_id).get("state")


def polled_job_state(job_id: str, first_s: float = 0.5) -> Callable[[], Optional[str]]:
    """A job's state, for waits that poll often: asked of Slurm at intervals doubling from ``first_s`` to POLL_MAX_S;
    its ``next_at()`` says when it asks next (`time.monotonic`), for a wait with nothing else to do till then."""
    asked = {"at": float("-inf"), "wait": first_s / 2, "state": None}

    def state() -> Optional[str]:
        if time.monotonic() >= asked["at"] + asked["wait"]:
            asked.update(at=time.monotonic(), wait=min(2 * asked["wait"], POLL_MAX_S), state=job_state(job_id))
        return asked["state"]
    state.next_at = lambda: asked["at"] + asked["wait"]
    return state


def job_steps(job_id: str) -> List[Dict[str, str]]:
    """The steps Slurm accounted for a job (sacct): step id, name, state, nodes."""
    r = _run(["sacct", "-n", "-P", "-j", str(job_id), "-o", "JobID,JobName,State,NodeList"], timeout=10)
    out = []
    for line in r.stdout.splitlines() if r else []:
        jid, name, state, nodes = (line.split("|") + ["", "", "", ""])[:4]
        if "." in jid:
            out.append({"step": jid, "name": name, "state": state, "nodes": nodes})
    return out


def live_steps(job_id: str) -> List[List[str]]:
    """``[step id, step name, nodes]`` of a job's running steps (squeue: no accounting delay)."""
    r = _run(["squeue", "-h", "-s", "-j", str(job_id), "-o", "%i|%j|%N"])
    return [line.split("|") for line in r.stdout.splitlines() if line.count("|") == 2] if r else []


def scancel(target: str, signal_name: Optional[str] = None) -> str:
    """Cancel ``JOB`` or ``JOB.STEP``, or send it ``signal_name`` (``TERM``, ``USR2``...); "" on success, else why."""
    r = _run(["scancel", *([f"--signal={signal_name}"] if signal_name else []), str(target)], timeout=60)
    if r is None:
        return "scancel did not run"
    return "" if r.returncode == 0 else (r.stderr or r.stdout).strip() or f"exit {r.returncode}"


def requeue(job_id: str) -> str:
    """``scontrol requeue JOB``; "" on success, else why."""
    r = _run(["scontrol", "requeue", str(job_id)], timeout=60)
    if r is None:
        return "scontrol did not run"
    return "" if r.returncode == 0 else (r.stderr or r.stdout).strip() or f"exit {r.returncode}"


def hostnames(nodelist: str) -> List[str]:
    """``n[1-2]`` -> ``["n1", "n2"]``."""
    r = _run(["scontrol", "show", "hostnames", nodelist])
    return r.stdout.split() if r else []


def node_addr(node: str) -> Optional[str]:
    """A node's NodeAddr (fake multi-node clusters give node names no DNS entry)."""
    r = _run(["scontrol", "show", "node", node])
    return next((w.split("=", 1)[1] for w in r.stdout.split() if w.startswith("NodeAddr=")), None) if r else None


@contextlib.contextmanager
def clean_env() -> Iterator[None]:
    """submitit's `clean_env` (no SLURM_*/SUBMITIT_* of an enclosing job leaks into a new one), keeping SLURM_CONF:
    it says which cluster to talk to."""
    import submitit  # not on compute nodes' paths: the steps never submit

    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)  # clean_env restores the original on exit


def sbatch(*args: str, script: Optional[str] = None) -> Optional[subprocess.CompletedProcess]:
    """``sbatch ARGS`` (``script`` on its stdin) outside any enclosing job; None when sbatch did not run."""
    with clean_env():
        return _run(["sbatch", *args], timeout=120, input=script)


def time_minutes(spec: str) -> int:
    """A Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    return -(-slurm_time_seconds(str(spec)) // 60)


def parse_counts(text: str) -> List[int]:
    """``16(x2),8`` -> [16, 16, 8] (SLURM_JOB_CPUS_PER_NODE's format)."""
    out: List[int] = []
    for part in filter(None, (text or "").split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def srun_argv(step: StepSpec, job_name: str, extra: List[str] = (), jobid: Optional[str] = None) -> List[str]:
    """The ``srun`` line of one step, sized exactly (``--exact``, ``--gres``): steps never wait on each other or share
    a GPU; its log is appended to (a requeue's); ``--export=ALL`` also in a job submitted with ``--export=NONE``."""
    argv = ["srun", f"--job-name={job_name}:{step.name}", f"--nodes={step.nodes}", f"--ntasks={step.ntasks}",
            f"--ntasks-per-node={step.ntasks_per_node}", "--exact",
            f"--cpus-per-task={step.cpus_per_task}", f"--mem={step.mem_per_node_mb}M"]
    if step.relative_node >= 0:  # -1: anywhere in the allocation with room (added servers)
        argv.insert(5, f"--relative={step.relative_node}")
    if jobid:
        argv.append(f"--jobid={jobid}")
    if step.gpus_per_task:
        argv += [f"--gres=gpu:{step.gpus_per_node}", f"--gpus-per-task={step.gpus_per_task}"]
    else:
        argv.append("--gres=none")
    argv += ["--export=ALL", "--kill-on-bad-exit=1", "--unbuffered"]
    if step.log:
        argv += [f"--output={step.log}", "--open-mode=append"]
    return argv + list(extra) + step.command


def shell_line(argv: List[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
