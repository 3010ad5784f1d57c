"""`mode=slurm` from the login node: the run's allocation (submitit; its payload `Driver` runs `driver.main` in the
batch script, ``exec``-ed so that the batch shell's USR2 reaches it), and server jobs (templates/add-servers.sbatch)."""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import submitit

from areal_hpc.config import ConfigError, ExperimentConfig, parse_allocation
from areal_hpc.launch import driver, outcome, slurm
from areal_hpc.launch.plan import Plan, build_plan, next_server_index, node_load, python_executable
from areal_hpc.launch.sbatch import extra_options, render, sbatch_lines, sbatch_opts, setup_lines
from areal_hpc.launch.status import batch_error, run_registry
from areal_hpc.registry import Registry


def make_executor(cfg: ExperimentConfig, plan: Plan, rd: Path) -> "submitit.AutoExecutor":
    """A submitit executor for one allocation of ``plan`` (submitit quotes the values itself)."""
    opts, c = sbatch_opts(cfg, plan), cfg.cluster
    ex = submitit.AutoExecutor(folder=rd / "submitit", cluster="slurm",
                               slurm_python=f"exec {shlex.quote(python_executable(cfg))}", slurm_max_num_timeout=100)
    # USR2 to the batch shell only (B:), the driver: it has the trainer checkpoint, then requeues
    additional: Dict[str, Any] = {"signal": "B:USR2@90", "output": opts["output"]}
    if cfg.launcher.requeue_on_preemption:
        additional["requeue"] = True
    if "gres" in opts:
        additional["gres"] = opts["gres"]
    additional.update(extra_options(cfg, plan))
    params: Dict[str, Any] = dict(
        name=opts["job-name"], nodes=int(opts["nodes"]), tasks_per_node=1, cpus_per_task=int(opts["cpus-per-task"]),
        timeout_min=slurm.time_minutes(c.time), slurm_mem=opts["mem"], slurm_use_srun=False, slurm_signal_delay_s=90,
        slurm_stderr_to_stdout=True, slurm_setup=setup_lines(cfg), slurm_additional_parameters=additional)
    params.update({f"slurm_{key}": opts[key] for key in ("partition", "account", "qos", "constraint") if key in opts})
    ex.update_parameters(**params)
    return ex


class RunFailed(RuntimeError):
    """The run failed (its reason is the message): the payload's way to make the job FAILED."""


class Driver(submitit.helpers.Checkpointable):
    """The payload of a run's allocation: `driver.main(run_dir)`. On USR2 submitit calls `checkpoint`, whose returned
    submission the requeued job runs. The job ends COMPLETED, FAILED (`RunFailed`) or CANCELLED (stopped)."""

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    def __call__(self) -> int:
        rc = driver.main(Path(self.run_dir))
        if rc not in (0, outcome.exit_code(outcome.STOPPED)):  # submitit re-raises it: the batch script exits 1
            rec = run_registry(Path(self.run_dir)).run_record()
            raise RunFailed(f"run {outcome.summary_line(rec)}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[submitit.helpers.DelayedSubmission]:
        # None: submitit ends the job instead of requeueing it
        return submitit.helpers.DelayedSubmission(Driver(self.run_dir)) if driver.prepare_requeue() else None


def follow_hint(cfg: ExperimentConfig) -> str:
    names = f"experiment_name={cfg.experiment_name} trial_name={cfg.trial_name} cluster.fileroot={cfg.cluster.fileroot}"
    return (f"  areal-hpc status {names}\n  areal-hpc logs -f [ROLE] {names}   (ROLE: trainer (default), driver, "
            f"server-0, slurm)\n  areal-hpc stop {names}")


def wait_job(job_id: str, running: bool, first_s: float = 0.3, unknown_s: float = 300.0) -> str:
    """Block until the job runs (``running``: it left `slurm.WAITING_STATES`) or ended (a requeue is no end); returns
    its state, "UNKNOWN" when Slurm has not known it for ``unknown_s``. Asks as `slurm.polled_job_state` does."""
    t0 = known_at = time.monotonic()
    told, job_state = not running, slurm.polled_job_state(job_id, first_s)
    while True:
        state = job_state()
        if state is None and time.monotonic() - known_at >= unknown_s:
            return "UNKNOWN"
        if state is not None:
            if (state not in slurm.WAITING_STATES) if running else (state in slurm.FINAL_STATES):
                return state
            known_at = time.monotonic()
            if not told and known_at - t0 > 3.0:
                print(f"job {job_id} is {state} (Ctrl-C stops waiting; the job stays queued)", flush=True)
                told = True
        time.sleep(max(0.0, job_state.next_at() - time.monotonic()))  # nothing to do till Slurm is asked again


# What Slurm's reason for refusing a job is about -> the key that asked for it.
_REJECTION_KEYS = (
    ("partition", "cluster.partition"), ("account", "cluster.account"), ("qos", "cluster.qos"),
    ("feature", "cluster.constraint"), ("constraint", "cluster.constraint"), ("time limit", "cluster.time"),
    ("memory", "{mem}"), ("processor", "{cpus}"), ("cpu", "{cpus}"), ("gres", "cluster.n_gpus_per_node"),
    ("gpu", "cluster.n_gpus_per_node"), ("node count", "cluster.n_nodes"), ("node configuration", "{shape}"),
)


def rejection(cfg: ExperimentConfig, message: str) -> ConfigError:
    """Slurm refused the allocation: one line with Slurm's own reason, naming the key most likely behind it."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    reason = next((ln.split("submission failed:", 1)[1].strip() for ln in lines if "submission failed:" in ln), None)
    if reason is None:
        errors = [ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln]
        reason = errors[-1] if errors else (lines[-1] if lines else "sbatch failed")
    gpu = cfg.cluster.n_gpus_per_node > 0
    names = {"mem": "cluster.mem_per_gpu_gb" if gpu else "cluster.mem_per_task_cpu_gb",
             "cpus": "cluster.cpus_per_gpu" if gpu else "cluster.cpus_per_task_cpu",
             "shape": "cluster.n_nodes/" + ("cluster.n_gpus_per_node/cluster.cpus_per_gpu/cluster.mem_per_gpu_gb"
                                            if gpu else "cluster.cpus_per_task_cpu/cluster.mem_per_task_cpu_gb")}
    low = reason.lower()
    if any(word in low for word in ("unable to contact", "timed out", "connection refused")):  # no refusal: no answer
        return ConfigError("cluster", f"Slurm did not answer: {reason}",
                           "nothing was queued; submit again once `scontrol ping` says the controller is UP")
    key = next((k.format(**names) for word, k in _REJECTION_KEYS if word in low), "cluster")
    return ConfigError(key, f"Slurm rejected the allocation: {reason}",
                       "nothing was queued; `sinfo` and `scontrol show partition` list what the cluster offers")


def test_allocation(cfg: ExperimentConfig, plan: Plan) -> None:
    """``sbatch --test-only``: would Slurm ever run the allocation? (without EnforcePartLimits, Slurm queues a job no
    node can satisfy for good)"""
    script = "#!/bin/bash\n" + "\n".join(sbatch_lines(cfg, plan)) + "\ntrue\n"
    r = slurm.sbatch("--test-only", script=script)  # queues nothing
    if r is None:
        raise ConfigError("mode", "cannot ask Slurm about the allocation: sbatch did not run",
                          "run on a login node with the Slurm commands (sbatch) on PATH, or use mode=local")
    if r.returncode != 0:
        raise rejection(cfg, r.stderr.replace("allocation failure:", "Batch job submission failed:"))


def submit(cfg: ExperimentConfig, plan: Plan, rd: Path) -> int:
    """Submit the run's allocation; returns once it runs, or (launcher.wait, or ended already) the run's exit code."""
    test_allocation(cfg, plan)
    ex = make_executor(cfg, plan, rd)
    try:
        with slurm.clean_env(), contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr
            job = ex.submit(Driver(str(rd)))
    except submitit.core.utils.FailedJobError as e:
        raise rejection(cfg, str(e)) from None
    job_id = str(job.job_id)
    reg = Registry.for_run(rd, cfg.launcher)
    if str(reg.run_record().get("job_id")) != job_id:  # the driver may already have written its own
        reg.put("", "run", {"mode": "slurm", "job_id": job_id, "pid": None, "host": None, "state": "PENDING",
                            "submitted": time.time()}, ttl=True)
    print(f"submitted job {job_id} ({plan.job_name}): {plan.nodes} node(s); run dir {rd}", flush=True)
    try:
        state = wait_job(job_id, running=True)
    except KeyboardInterrupt:
        print(f"job {job_id} still queued; follow it with:\n{follow_hint(cfg)}")
        return 0
    nodes = slurm.job(job_id).get("nodes") or "?"
    print(f"job {job_id} {state} on {nodes}; follow it with:\n{follow_hint(cfg)}", flush=True)
    if not cfg.launcher.wait and state not in slurm.FINAL_STATES:  # one that ended already says how
        return 0
    try:
        state = wait_job(job_id, running=False)
    except KeyboardInterrupt:  # the driver owns the run, not this process: the job runs on, and must say so
        print(f"\nstopped waiting; job {job_id} runs on (`areal-hpc stop` ends it):\n{follow_hint(cfg)}",
              file=sys.stderr, flush=True)
        return outcome.exit_code(outcome.STOPPED)
    print(f"job {job_id} ended {state}", flush=True)  # how the run ended is in its record (the driver's code too)
    rec = reg.run_record()
    if rec.get("state") in outcome.FINAL and str(rec.get("job_id")) == job_id:
        print(f"run {outcome.summary_line(rec)}", flush=True)
        return outcome.exit_code(str(rec["state"]))
    line = batch_error(str(rd / "logs" / f"slurm-{job_id}.out"))
    print(f"run FAILED: job {job_id} ended {state} before its driver recorded how the run ended" + (
        f": {line}" if line else "") + f"; see {rd}/logs/slurm-{job_id}.out", file=sys.stderr)
    return 1


def servers_plan(cfg: ExperimentConfig, rd: Path, count: int) -> Plan:
    """A plan of ``count`` servers only (named by `next_server_index`), asking for just the GPUs they use."""
    alloc = parse_allocation(cfg.allocation_mode)
    if alloc.gen is None:
        raise ConfigError("allocation_mode", f"{cfg.allocation_mode!r} has no inference servers (trainer.type="
                          f"{cfg.trainer.type}): there are none to add", "add servers to a run that generates rollouts")
    alloc = replace(alloc, gen=replace(alloc.gen, dp=count), train=None)
    known = [s.name for s in Plan.from_json((rd / "plan.json").read_text()).servers]
    first = next_server_index(Registry.for_run(rd, cfg.launcher), known, reserve=count)
    plan = build_plan(cfg, alloc, rd, with_trainer=False, first_server=first)
    if cfg.cluster.n_gpus_per_node:
        plan.gpus_per_node = max(n["gpus"] for n in node_load(plan.steps, plan.nodes))
    plan.job_name = f"{plan.job_name}-servers"
    return plan


def submit_server_job(cfg: ExperimentConfig, rd: Path, count: int) -> Optional[str]:
    """Submit a job of ``count`` servers that join the run; its job id, None when sbatch refused it."""
    plan = servers_plan(cfg, rd, count)
    names = [s.name for s in plan.servers]
    script = rd / "sbatch" / f"add-servers-{names[0].split('-', 1)[1]}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render("add-servers.sbatch", cfg, plan))
    r = slurm.sbatch("--parsable", str(script))  # stdout: JOBID[;CLUSTER]
    if r is None or r.returncode != 0:
        why = r.stderr.strip() if r else "sbatch did not run (not on PATH, or it hung)"
        print(f"sbatch {script} failed: {why}", file=sys.stderr)
        return None
    job_id = r.stdout.strip().split(";")[0]
    Registry.for_run(rd, cfg.launcher).put("jobs", job_id, {"job_id": job_id, "kind": "servers", "servers": names,
                                                            "script": str(script), "submitted": time.time()}, ttl=False)
    print(f"submitted job {job_id} with {count} server(s) ({', '.join(names)}): {script}", flush=True)
    return job_id
