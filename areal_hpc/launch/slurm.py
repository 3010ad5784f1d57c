"""`mode=slurm`: one allocation per run, submitted through submitit, whose payload is the driver.

Login node (`submit`)::

    submitit.AutoExecutor(folder={run}/submitit) -> sbatch of ONE allocation (plan.nodes nodes,
    gres/cpus/mem per node as in `sbatch/allocation.sbatch`, `--signal=B:USR2@90`, `--requeue`);
    payload = `Driver(run_dir)`, run in the batch script itself (``slurm_use_srun=False``, the
    interpreter ``exec``-ed so that the batch-shell signal reaches it).

Batch host (`driver.main`): a `RunOwner` whose `SrunRunner` turns each StepSpec into one
``srun --exact`` job step (own process group, log appended to {run}/logs/). USR2 (time limit,
preemption, or ``scancel --signal=USR2 --batch``) -> submitit calls `Driver.checkpoint` -> the
trainer checkpoints at its next step boundary, servers deregister -> submitit requeues the job ->
the requeued driver starts every step again and the trainer resumes (``recover.mode=auto``).

Also here: `submit_server_job` (a separate job of servers joining a live run, from the rendered
`sbatch/add-servers.sbatch`) and `restart_trainer` (a trainer restart routed through the live
driver as a ``start_trainer`` request instead of a new allocation).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import submitit

from areal_hpc.config import ConfigError, ExperimentConfig, dump_yaml, load_resolved, parse_allocation
from areal_hpc.launch import outcome
from areal_hpc.launch.control import serving_servers
from areal_hpc.launch.owner import Runner, StepHandle
from areal_hpc.launch.plan import Plan, StepSpec, build_plan, python_executable, srun_argv
from areal_hpc.launch.sbatch import render, sbatch_lines
from areal_hpc.registry import Registry, atomic_write

log = logging.getLogger("areal_hpc.launch")

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
# seconds the trainer gets to reach a step boundary and checkpoint after USR2 (Slurm signals 90 s
# before the time limit; the rest is for servers to deregister and for the requeue itself)
REQUEUE_TRAINER_GRACE_S = 75.0
REQUEUE_SERVER_GRACE_S = 10.0


# ----------------------------------------------------------------------------- Slurm queries

def _run(cmd: List[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def job_state(job_id: str) -> Optional[str]:
    """A job's state: scontrol while slurmctld remembers it (MinJobAge), else sacct; None if unknown."""
    try:
        r = _run(["scontrol", "show", "job", "-o", str(job_id)])
        m = re.search(r"\bJobState=(\S+)", r.stdout) if r.returncode == 0 else None
        if m:
            return m.group(1)
        r = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
        lines = [x for x in r.stdout.split() if x.strip()] if r.returncode == 0 else []
        if lines:
            return lines[-1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


def job_nodes(job_id: str) -> str:
    try:
        r = _run(["squeue", "-h", "-j", str(job_id), "-o", "%N"])
        return r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def time_minutes(spec: str) -> int:
    """A Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    spec = str(spec).strip()
    days = 0
    if "-" in spec:
        d, spec = spec.split("-", 1)
        days = int(d)
        parts = [int(x) for x in spec.split(":")]
        h, m, s = (parts + [0, 0])[:3]
    else:
        parts = [int(x) for x in spec.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts[:3]
    total_s = ((days * 24 + h) * 60 + m) * 60 + s
    return max(1, -(-total_s // 60))


def _sbatch_arg_dict(args: List[str]) -> Dict[str, Any]:
    """``cluster.sbatch_args`` (``--exclusive``, ``--reservation=x``, ``--reservation x``) -> sbatch options."""
    out: Dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = str(args[i]).strip()
        if a.startswith("#SBATCH"):
            a = a[len("#SBATCH"):].strip()
        if not a.startswith("--"):
            raise ConfigError("cluster.sbatch_args", f"cannot use {a!r} with submitit",
                              "give long options: --exclusive, --reservation=NAME, --gpu-bind=none")
        key, eq, value = a[2:].partition("=")
        if not eq and i + 1 < len(args) and not str(args[i + 1]).startswith("-"):
            value, eq = str(args[i + 1]), "="
            i += 1
        out[key] = value if eq else True
        i += 1
    return out


# ----------------------------------------------------------------------------- submission

@contextlib.contextmanager
def clean_env() -> Iterator[None]:
    """submitit's `clean_env` (no SLURM_*/SUBMITIT_* of an enclosing job leaks into a new job), but
    keeping SLURM_CONF: it says which cluster to talk to, not what the enclosing job was."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)  # clean_env restores the original on exit


def make_executor(cfg: ExperimentConfig, plan: Plan, rd: Path) -> "submitit.AutoExecutor":
    """A submitit executor for one allocation of ``plan``: the same #SBATCH values as the rendered
    `sbatch/allocation.sbatch` (`sbatch.sbatch_lines`), the driver run in the batch script."""
    opts = dict(line[len("#SBATCH --"):].split("=", 1) for line in sbatch_lines(cfg, plan)
                if line.startswith("#SBATCH --") and "=" in line)
    python = python_executable(cfg)
    ex = submitit.AutoExecutor(folder=rd / "submitit", cluster="slurm",
                               slurm_python=f"exec {shlex.quote(python)}", slurm_max_num_timeout=100)
    c = cfg.cluster
    additional: Dict[str, Any] = {
        # To the batch shell only (B:), i.e. to the driver (the exec-ed interpreter): the steps are
        # not signalled by Slurm; the driver asks the trainer to checkpoint, then requeues.
        "signal": "B:USR2@90",
        "output": opts["output"],
    }
    if cfg.launcher.requeue_on_preemption:
        additional["requeue"] = True
    if "gres" in opts:
        additional["gres"] = opts["gres"]
    additional.update(_sbatch_arg_dict(list(c.sbatch_args)))
    params: Dict[str, Any] = dict(
        name=opts["job-name"], nodes=int(opts["nodes"]), tasks_per_node=1, cpus_per_task=int(opts["cpus-per-task"]),
        timeout_min=time_minutes(c.time), slurm_mem=opts["mem"], slurm_use_srun=False, slurm_signal_delay_s=90,
        slurm_stderr_to_stdout=True, slurm_setup=list(c.setup_commands), slurm_additional_parameters=additional)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key):
            params[f"slurm_{key}"] = str(getattr(c, key))
    ex.update_parameters(**params)
    return ex


class RunFailed(RuntimeError):
    """The run failed (its reason is the message): the payload's way to make the job FAILED."""


class Driver(submitit.helpers.Checkpointable):
    """The payload of a run's allocation: `driver.main(run_dir)` on the batch host.

    On USR2 submitit calls `checkpoint`: the live run's trainer checkpoints and stops, servers
    deregister, and the returned submission (this same driver) is what the requeued job runs.
    How the job ends says how the run did: COMPLETED; FAILED with exit 1 (`RunFailed`, whose
    message is the reason, also what `job.result()` raises); CANCELLED when stopped on purpose.
    """

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    def __call__(self) -> int:
        from areal_hpc.launch import driver

        rc = driver.main(Path(self.run_dir))
        if rc not in (0, outcome.exit_code(outcome.STOPPED)):
            # the job must end FAILED (non-zero exit), not COMPLETED: submitit records the error for
            # `job.result()` and re-raises it, so the batch script exits 1
            rec = Registry.for_run(self.run_dir, load_resolved(Path(self.run_dir) / "config.yaml").launcher).get(
                "", "run", live_only=False) or {}
            raise RunFailed(f"run {outcome.summary_line(rec)}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[submitit.helpers.DelayedSubmission]:
        from areal_hpc.launch import driver

        requeue = driver.prepare_requeue()
        if not requeue:
            return None  # submitit then ends the job instead of requeueing it
        return submitit.helpers.DelayedSubmission(Driver(self.run_dir))


def _follow_hint(cfg: ExperimentConfig) -> str:
    names = f"experiment_name={cfg.experiment_name} trial_name={cfg.trial_name} cluster.fileroot={cfg.cluster.fileroot}"
    return (f"  areal-hpc status {names}\n  areal-hpc logs -f {names}          (trainer; or driver, server-0, slurm)\n"
            f"  areal-hpc stop {names}")


def wait_running(job_id: str, poll_s: float = 0.3) -> Optional[str]:
    """Block until the job leaves PENDING; returns its state (Ctrl-C returns None: the job stays queued)."""
    t0, told = time.monotonic(), False
    try:
        while True:
            state = job_state(job_id)
            if not told and state == "PENDING" and time.monotonic() - t0 > 3.0:
                print(f"job {job_id} is pending (Ctrl-C stops waiting; the job stays queued)", flush=True)
                told = True
            if state is not None and state not in ("PENDING", "CONFIGURING", "REQUEUED"):
                return state
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return None


def wait_finished(job_id: str, poll_s: float = 1.0) -> str:
    """Block until the job reaches a final state (a requeue is not final); returns it ("UNKNOWN" when
    neither scontrol nor sacct has known the job for 5 minutes)."""
    unknown_since = None
    while True:
        state = job_state(job_id)
        if state in FINAL_STATES:
            return state
        if state is None:
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > 300:
                return "UNKNOWN"
        else:
            unknown_since = None
        time.sleep(poll_s)


def _driver_result(job: Any, timeout_s: float = 30.0) -> Optional[Any]:
    """What the driver returned (submitit's result pickle), or None."""
    from submitit.core.utils import pickle_load

    path = job.paths.result_pickle
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not path.exists():
        return None
    try:
        kind, value = pickle_load(path)
    except Exception:  # noqa: BLE001 - a torn or foreign pickle: no result
        return None
    return value if kind == "success" else None


# What Slurm's reason for refusing a job is about -> the key that asked for it.
_REJECTION_KEYS = (
    ("partition", "cluster.partition"), ("account", "cluster.account"), ("qos", "cluster.qos"),
    ("feature", "cluster.constraint"), ("constraint", "cluster.constraint"), ("time limit", "cluster.time"),
    ("memory", "{mem}"), ("processor", "{cpus}"), ("cpu", "{cpus}"), ("gres", "cluster.n_gpus_per_node"),
    ("gpu", "cluster.n_gpus_per_node"), ("node count", "cluster.n_nodes"), ("node configuration", "{shape}"),
)


def rejection(cfg: ExperimentConfig, message: str) -> ConfigError:
    """Slurm refused the allocation (sbatch failed): one line with Slurm's own reason, naming the key
    that most likely asked for it. Nothing was queued."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    reason = next((ln.split("submission failed:", 1)[1].strip() for ln in lines if "submission failed:" in ln), None)
    if reason is None:
        errors = [ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln]
        reason = errors[-1] if errors else (lines[-1] if lines else "sbatch failed")
    gpu = cfg.cluster.n_gpus_per_node > 0
    names = {"mem": "cluster.mem_per_gpu_gb" if gpu else "cluster.mem_per_task_cpu_gb",
             "cpus": "cluster.cpus_per_gpu" if gpu else "cluster.cpus_per_task_cpu",
             "shape": "cluster.n_nodes/" + ("cluster.cpus_per_gpu/cluster.mem_per_gpu_gb" if gpu else
                                            "cluster.cpus_per_task_cpu/cluster.mem_per_task_cpu_gb")}
    low = reason.lower()
    key = next((k.format(**names) for word, k in _REJECTION_KEYS if word in low), "cluster")
    return ConfigError(key, f"Slurm rejected the allocation: {reason}",
                       "nothing was queued; `sinfo` and `scontrol show partition` list what the cluster offers")


def test_allocation(cfg: ExperimentConfig, plan: Plan) -> None:
    """``sbatch --test-only`` of the allocation's #SBATCH options: Slurm says whether it would ever
    accept the job (partition, node count, CPUs, memory, GPUs, time) without queueing anything. A job
    no node can satisfy is otherwise accepted and left PENDING forever on clusters that do not set
    EnforcePartLimits."""
    script = "#!/bin/bash\n" + "\n".join(sbatch_lines(cfg, plan)) + "\ntrue\n"
    try:
        with clean_env():
            r = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError("mode", f"cannot ask Slurm about the allocation: {e}",
                          "run on a login node with the Slurm commands (sbatch) on PATH, or use mode=local") from None
    if r.returncode != 0:
        raise rejection(cfg, r.stderr.replace("allocation failure:", "Batch job submission failed:"))


def submit(cfg: ExperimentConfig, plan: Plan, rd: Path) -> int:
    """Submit the run's allocation; returns once it runs (or, with launcher.wait, once it ends).
    Slurm refusing it raises `ConfigError` (`rejection`)."""
    test_allocation(cfg, plan)
    ex = make_executor(cfg, plan, rd)
    try:
        with clean_env(), contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr
            job = ex.submit(Driver(str(rd)))
    except submitit.core.utils.FailedJobError as e:
        raise rejection(cfg, str(e)) from None
    job_id = str(job.job_id)
    reg = Registry.for_run(rd, cfg.launcher)
    cur = reg.get("", "run", live_only=False)
    if cur is None or str(cur.get("job_id")) != job_id:  # the driver may already have written its own
        reg.put("", "run", {"mode": "slurm", "job_id": job_id, "pid": None, "host": None, "state": "PENDING",
                            "submitted": time.time()}, ttl=True)
    print(f"submitted job {job_id} ({plan.job_name}): {plan.nodes} node(s); run dir {rd}", flush=True)
    state = wait_running(job_id)
    if state is None:
        print(f"job {job_id} still queued; follow it with:\n{_follow_hint(cfg)}")
        return 0
    print(f"job {job_id} {state} on {job_nodes(job_id) or '?'}; follow it with:\n{_follow_hint(cfg)}", flush=True)
    if not cfg.launcher.wait:
        return 0
    state = wait_finished(job_id)
    rc = _driver_result(job.task(0) if hasattr(job, "task") else job, timeout_s=30.0 if state == "COMPLETED" else 2.0)
    print(f"job {job_id} ended {state}" + (f", driver returned {rc}" if rc is not None else ""), flush=True)
    rec = reg.get("", "run", live_only=False) or {}
    if rec.get("state") in outcome.FINAL and str(rec.get("job_id")) == job_id:
        print(f"run {outcome.summary_line(rec)}", flush=True)
        return outcome.exit_code(str(rec["state"]))
    print(f"run FAILED: job {job_id} ended {state} before its driver recorded how the run ended; see "
          f"{rd}/logs/slurm-{job_id}.out", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- restart / add servers

def live_driver(cfg: ExperimentConfig, rd: Path) -> Optional[Dict[str, Any]]:
    """The run record of a live Slurm driver of this run (heartbeat fresh and job running), else None."""
    run = Registry.for_run(rd, cfg.launcher).get("", "run")
    if not run or run.get("mode") != "slurm" or not run.get("job_id") or not run.get("pid"):
        return None
    return run if job_state(str(run["job_id"])) == "RUNNING" else None


def restart_trainer(cfg: ExperimentConfig, rd: Path, run: Dict[str, Any], timeout_s: float = 300.0) -> int:
    """``submit ... min_required_servers=N`` on a run whose driver lives: the driver starts the trainer
    step inside its allocation (the trainer waits for N servers, recovers, pushes its weights)."""
    from areal_hpc.launch.control import post_request

    # The new trainer reads config.yaml (so other overrides of this submit apply), but the run keeps
    # its own min_required_servers there: a requeued or restarted allocation starts its servers
    # and must not wait for N. N goes with the request (the driver puts it in the step's env).
    cfg_path = rd / "config.yaml"
    try:
        keep = load_resolved(cfg_path).min_required_servers
    except Exception:  # noqa: BLE001 - unreadable: the submit's config is all we have
        keep = 0
    new_cfg = copy.deepcopy(cfg)
    new_cfg.min_required_servers = keep
    atomic_write(cfg_path, dump_yaml(new_cfg))
    reg = Registry.for_run(rd, cfg.launcher)

    def trainer_step_id(rec: Optional[Dict[str, Any]]) -> Optional[str]:
        return ((rec or {}).get("steps") or {}).get("trainer", {}).get("slurm_step_id")

    old_step = trainer_step_id(run)
    name = post_request(reg, "start_trainer", min_required_servers=cfg.min_required_servers)
    print(f"job {run['job_id']} is live: asked its driver to start a trainer (request {name})", flush=True)
    deadline = time.monotonic() + timeout_s
    trainer = None
    while time.monotonic() < deadline:
        trainer = reg.get("", "trainer")
        if trainer is not None:
            break
        rec = reg.get("", "run")
        if rec is None or live_driver(cfg, rd) is None:
            print(f"the driver of job {run['job_id']} went away before starting the trainer", file=sys.stderr)
            return 1
        if trainer_step_id(rec) not in (None, old_step) and rec.get("trainer_rc") is not None:
            print(f"the new trainer (step {run['job_id']}.{trainer_step_id(rec)}) exited with {rec['trainer_rc']} "
                  f"before it registered; see `areal-hpc logs trainer`", file=sys.stderr)
            return 1
        time.sleep(0.3)
    if trainer is None:
        print(f"no trainer registered within {timeout_s:.0f}s; see `areal-hpc logs driver`", file=sys.stderr)
        return 1
    print(f"trainer started (pid {trainer.get('pid')} on {trainer.get('host')}); follow it with:\n{_follow_hint(cfg)}",
          flush=True)
    if not cfg.launcher.wait:
        return 0
    while True:  # until the driver reports the new trainer step's exit code
        rec = reg.get("", "run", live_only=False) or {}
        if trainer_step_id(rec) not in (None, old_step) and rec.get("trainer_rc") is not None:
            rc = int(rec["trainer_rc"])
            print(f"trainer exited with {rc}", flush=True)
            return 0 if rc == 0 else 1
        if reg.get("", "run") is None and job_state(str(run["job_id"])) != "RUNNING":
            print(f"job {run['job_id']} ended before the trainer did", file=sys.stderr)
            return 1
        time.sleep(0.5)


def _servers_plan(cfg: ExperimentConfig, rd: Path, count: int, first: int) -> Plan:
    alloc = parse_allocation(cfg.allocation_mode)
    alloc = replace(alloc, gen=replace(alloc.gen, dp=count), train=None)
    plan = build_plan(cfg, alloc, rd, with_trainer=False, first_server=first)
    G = cfg.cluster.n_gpus_per_node
    if G:  # ask only for the GPUs the servers use on each node
        plan.gpus_per_node = max(s.gpus_per_node for s in plan.servers)
        if len(plan.servers) > 1:
            per_node: Dict[int, int] = {}
            for s in plan.servers:
                per_node[s.relative_node] = per_node.get(s.relative_node, 0) + s.gpus_per_node
            plan.gpus_per_node = max(per_node.values())
    plan.job_name = f"{plan.job_name}-servers"
    return plan


def next_server_index(reg: Registry) -> int:
    names = list(reg.list("servers", live_only=False))
    run = reg.get("", "run", live_only=False) or {}
    names += list(run.get("servers") or [])
    used = [int(n.split("-", 1)[1]) for n in names if n.startswith("server-") and n.split("-", 1)[1].isdigit()]
    return max(used, default=-1) + 1


def submit_server_job(cfg: ExperimentConfig, rd: Path, count: int, timeout_s: Optional[float] = None) -> int:
    """A separate job of ``count`` servers that join the run (same registry); waits until they are ready."""
    reg = Registry.for_run(rd, cfg.launcher)
    first = next_server_index(reg)
    plan = _servers_plan(cfg, rd, count, first)
    script = rd / "sbatch" / f"add-servers-{first}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render("add-servers.sbatch", cfg, plan))
    before = set(reg.list("servers"))
    with clean_env():
        r = _run(["sbatch", "--parsable", str(script)], timeout=120)
    if r.returncode != 0:
        print(f"sbatch {script} failed: {r.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = r.stdout.strip().split(";")[0]
    # `stop` cancels these jobs too; status lists them
    reg.put("jobs", job_id, {"job_id": job_id, "kind": "servers", "servers": [s.name for s in plan.servers],
                             "script": str(script), "submitted": time.time()}, ttl=False)
    print(f"submitted job {job_id} with {count} server(s) ({', '.join(s.name for s in plan.servers)}): {script}",
          flush=True)
    timeout = timeout_s or cfg.launcher.server_startup_timeout_s
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = serving_servers(reg) - before
        if len(ready) >= count:
            print(f"added {len(ready)} server(s) in job {job_id}: {', '.join(sorted(ready))}")
            return 0
        if job_state(job_id) in FINAL_STATES:
            print(f"job {job_id} ended {job_state(job_id)} before its servers were ready; see {rd}/logs",
                  file=sys.stderr)
            return 1
        time.sleep(0.3)
    print(f"timed out after {timeout:.0f}s waiting for the servers of job {job_id}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- srun steps (batch host)

def _parse_counts(text: str) -> List[int]:
    """``16(x2),8`` -> [16, 16, 8] (SLURM_JOB_CPUS_PER_NODE's format)."""
    out: List[int] = []
    for part in filter(None, (text or "").split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


class SrunHandle(StepHandle):
    """One job step: the ``srun`` client process (own process group) and the step it created."""

    def __init__(self, step: StepSpec, proc: subprocess.Popen, job_id: str, node: int):
        self.step, self.proc, self.job_id, self.node = step, proc, job_id, node
        self.step_id: Optional[str] = None
        self.nodelist: str = ""
        self.started = time.time()

    @property
    def nodes(self) -> range:
        return range(self.node, self.node + self.step.nodes) if self.node >= 0 else range(0)

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is not None:
            return
        if self.step_id:
            # To the step's tasks through slurmctld. Not through the srun client: srun answers
            # SIGTERM by killing its step ("forcing job termination"), so a server would die
            # without deregistering and a trainer without its checkpoint.
            try:
                r = subprocess.run(["scancel", f"--signal={signal.Signals(sig).name[3:]}",
                                    f"{self.job_id}.{self.step_id}"], capture_output=True, text=True, timeout=30)
                if r.returncode == 0 and sig != signal.SIGKILL:
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def info(self) -> Dict[str, object]:
        return {"srun_pid": self.proc.pid, "slurm_job_id": self.job_id, "slurm_step_id": self.step_id,
                "nodes": self.nodelist, "relative_node": self.node, "gpus_per_node": self.step.gpus_per_node,
                "gpus": list(self.step.gpu_ids), "ntasks": self.step.ntasks}


class SrunRunner(Runner):
    """Starts StepSpecs as ``srun --exact`` steps of the current allocation (the driver's job).

    Steps are created one after another (each waits until Slurm lists the previous one), so on a
    node the GPUs go to steps in plan order: the GPU ids the plan shows are the ones they get.
    Added servers (``relative_node=-1``) are placed on the first node with enough free GPUs, CPUs
    and memory, by accounting what the live steps use; `can_start` says whether there is one.
    """

    def __init__(self, cfg: ExperimentConfig, plan: Plan, job_id: str, step_timeout_s: float = 60.0):
        self.cfg, self.plan, self.job_id = cfg, plan, str(job_id)
        self.step_timeout_s = step_timeout_s
        n = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or plan.nodes)
        cpus = _parse_counts(os.environ.get("SLURM_JOB_CPUS_PER_NODE", ""))
        mem = int(os.environ.get("SLURM_MEM_PER_NODE") or 0)
        gpus = plan.gpus_per_node
        self.capacity = [{"gpus": gpus, "cpus": cpus[k] if k < len(cpus) else 0, "mem": mem} for k in range(n)]
        self._known_steps: set = set()

    # ---------------------------------------------------------------- placement
    def _usage(self, running: List[StepHandle]) -> List[Dict[str, int]]:
        used = [{"gpus": 0, "cpus": 0, "mem": 0} for _ in self.capacity]
        for h in running:
            if h.poll() is not None or not isinstance(h, SrunHandle):
                continue
            s = h.step
            for k in h.nodes:
                if k < len(used):
                    used[k]["gpus"] += s.gpus_per_node
                    used[k]["cpus"] += s.cpus_per_task * s.ntasks_per_node
                    used[k]["mem"] += s.mem_per_node_mb
        return used

    def _fits(self, step: StepSpec, k: int, used: List[Dict[str, int]]) -> bool:
        for j in range(k, k + step.nodes):
            if j >= len(self.capacity):
                return False
            cap, u = self.capacity[j], used[j]
            if u["gpus"] + step.gpus_per_node > cap["gpus"]:
                return False
            if cap["cpus"] and u["cpus"] + step.cpus_per_task * step.ntasks_per_node > cap["cpus"]:
                return False
            if cap["mem"] and u["mem"] + step.mem_per_node_mb > cap["mem"]:
                return False
        return True

    def place(self, step: StepSpec, running: List[StepHandle]) -> Optional[int]:
        if step.relative_node >= 0:
            return step.relative_node
        used = self._usage(running)
        return next((k for k in range(len(self.capacity)) if self._fits(step, k, used)), None)

    def can_start(self, step: StepSpec, running: List[StepHandle]) -> bool:
        return self.place(step, running) is not None

    # ---------------------------------------------------------------- steps
    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        node = self.place(step, running)
        if node is None:
            raise RuntimeError(f"no room in job {self.job_id} for {step.name}")
        placed = replace(step, relative_node=node)
        if self.plan.gpus_per_node and step.gpus_per_node:
            # Slurm hands a step the lowest free GPUs of its node: for plan steps started in order
            # these are the plan's gpu_ids; for added/restarted steps, whatever the others left
            taken = {g for h in running if isinstance(h, SrunHandle) and h.poll() is None and node in h.nodes
                     for g in h.step.gpu_ids}
            free = [g for g in range(self.plan.gpus_per_node) if g not in taken]
            placed.gpu_ids = free[:step.gpus_per_node]
            if step.gpu_ids and step.relative_node >= 0 and placed.gpu_ids != list(step.gpu_ids):
                log.info("%s: planned GPUs %s are taken; expecting %s", step.name, step.gpu_ids, placed.gpu_ids)
        argv = srun_argv(placed, self.plan.job_name, ["--open-mode=append", *self.cfg.cluster.srun_args],
                         jobid=self.job_id)
        Path(step.log).parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **step.env, PYTHONUNBUFFERED="1")
        for var in ("SLURM_CPUS_PER_TASK", "SLURM_TRES_PER_TASK", "SLURM_MEM_PER_CPU", "SLURM_GPUS_PER_NODE"):
            env.pop(var, None)  # the job's values: each step states its own
        log.info("srun %s", " ".join(shlex.quote(a) for a in argv))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                cwd=str(Path(self.plan.run_dir)))
        h = SrunHandle(placed, proc, self.job_id, node)
        self._await_step(h)
        return h

    def _list_steps(self) -> List[List[str]]:
        try:
            r = _run(["squeue", "-h", "-s", "-j", self.job_id, "-o", "%i|%j|%N"], timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.split("|") for line in r.stdout.splitlines() if line.count("|") == 2]

    def _await_step(self, h: SrunHandle) -> None:
        """Wait until Slurm lists the step (its resources are then taken): records its step id."""
        name = f"{self.plan.job_name}:{h.step.name}"
        deadline = time.monotonic() + self.step_timeout_s
        delay = 0.02
        while time.monotonic() < deadline and h.proc.poll() is None:
            for sid, sname, nodes in self._list_steps():
                if sname == name and sid not in self._known_steps:
                    self._known_steps.add(sid)
                    h.step_id, h.nodelist = sid.split(".", 1)[1], nodes
                    return
            time.sleep(delay)
            delay = min(0.2, delay * 2)
        if h.proc.poll() is None:
            log.warning("%s: Slurm did not list the step within %.0fs (still waiting for resources?)", h.step.name,
                        self.step_timeout_s)
        else:
            log.warning("%s: srun exited with %s before its step was listed", h.step.name, h.proc.poll())

