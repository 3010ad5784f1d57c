"""`launch` without processes: plans -> srun lines, the owner's decisions on step exits (with a
fake runner), add-server placement and naming, and a golden rendered sbatch file.

The end-to-end tests (test_slurm_e2e, test_lifecycle_*) run the same code with real processes
and a real Slurm; these pin the decisions themselves, fast.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from helpers import health_answered_together

from areal_hpc.config import ConfigError, ExperimentConfig, dump_yaml, load_config, parse_allocation
from areal_hpc.launch import control, driver, outcome, slurm, slurm_submit
from areal_hpc.launch.control import add_servers, stop
from areal_hpc.launch.driver import SrunRunner
from areal_hpc.launch.owner import Runner, RunOwner, StepHandle
from areal_hpc.launch.plan import next_server_index
from areal_hpc.launch.plan import Plan, StepSpec, build_plan, has_servers
from areal_hpc.launch.sbatch import render, sbatch_options
from areal_hpc.launch.slurm import parse_counts, srun_argv, time_minutes
from areal_hpc.launch.slurm_submit import servers_plan
from areal_hpc.launch.status import _tail, collect_status, logs, run_state, status
from areal_hpc.launch.torchrun import TorchrunRunner
from areal_hpc.registry import Registry

GOLDEN = Path(__file__).resolve().parent / "golden" / "allocation.sbatch"
REGEN = "AREAL_HPC_REGEN_GOLDEN"

# 2 nodes x 4 GPUs: two tp-2 servers fill node 0, a 4-rank trainer node 1
GPU_WORDS = ["mode=slurm", "experiment_name=golden", "trial_name=t1", "allocation_mode=sglang:d2t2+fsdp:d4",
             "cluster.n_nodes=2", "cluster.n_gpus_per_node=4", "cluster.fileroot=/shared/runs",
             "cluster.hf_cache=/shared/hf-cache", "cluster.python=/opt/venv/bin/python",
             "cluster.partition=gpu",
             "cluster.time=2:00:00", "cluster.cpus_per_gpu=8", "cluster.mem_per_gpu_gb=64",
             "cluster.setup_commands=[module load cuda]", "cluster.srun_args=[--mpi=none]"]
GPU_RUN = Path("/shared/runs/alice/golden/t1")


@pytest.fixture(autouse=True)
def _no_slurm_env(monkeypatch):
    """Nothing here may depend on an enclosing job."""
    for var in list(os.environ):
        if var.startswith("SLURM_"):
            monkeypatch.delenv(var)


def gpu_plan():
    cfg = load_config(None, GPU_WORDS)
    return cfg, build_plan(cfg, parse_allocation(cfg.allocation_mode), GPU_RUN)


# ----------------------------------------------------------------------------- plans -> srun lines

def test_plan_to_srun_lines():
    cfg, plan = gpu_plan()
    lines = {s.name: srun_argv(s, plan.job_name, cfg.cluster.srun_args)[:-len(s.command)] for s in plan.steps}
    assert plan.nodes == 2 and plan.gpus_per_node == 4
    assert lines["server-0"] == [
        "srun", "--job-name=areal-golden-t1:server-0", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1",
        "--relative=0", "--exact", "--cpus-per-task=16", "--mem=131072M", "--gres=gpu:2", "--gpus-per-task=2",
        "--export=ALL", "--kill-on-bad-exit=1", "--unbuffered", f"--output={GPU_RUN}/logs/server-0.log",
        "--open-mode=append", "--mpi=none"]
    assert lines["server-1"][5] == "--relative=0" and plan.servers[1].gpu_ids == [2, 3]
    assert lines["trainer"] == [
        "srun", "--job-name=areal-golden-t1:trainer", "--nodes=1", "--ntasks=4", "--ntasks-per-node=4",
        "--relative=1", "--exact", "--cpus-per-task=8", "--mem=262144M", "--gres=gpu:4", "--gpus-per-task=1",
        "--export=ALL", "--kill-on-bad-exit=1", "--unbuffered", f"--output={GPU_RUN}/logs/trainer-%t.log",
        "--open-mode=append", "--mpi=none"]
    anywhere = StepSpec(**{**plan.servers[0].__dict__, "relative_node": -1})
    added = srun_argv(anywhere, plan.job_name, jobid="7")
    assert not any(a.startswith("--relative") for a in added) and "--jobid=7" in added
    cpu = load_config(None, ["allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0"])
    step = build_plan(cpu, parse_allocation(cpu.allocation_mode), GPU_RUN).trainer
    argv = srun_argv(step, "j")
    assert "--gres=none" in argv and not any("gpus-per-task" in a for a in argv)


def test_a_trainer_only_plan_keeps_off_the_servers_gpus():
    """A trainer restarted alone on one node (`submit ... min_required_servers=N`, mode=local) gets the GPUs the whole
    plan gives it, not the live servers' first ones."""
    cfg = load_config(None, ["allocation_mode=hf:d2+d2", "cluster.n_gpus_per_node=4"])
    alloc = parse_allocation(cfg.allocation_mode)
    full, alone = build_plan(cfg, alloc, GPU_RUN), build_plan(cfg, alloc, GPU_RUN, with_servers=False)
    assert [s.name for s in alone.steps] == ["trainer"] and alone.nodes == 1
    assert alone.trainer.gpu_ids == full.trainer.gpu_ids == [2, 3]


@pytest.mark.parametrize("trainer, alloc, servers", [("sft", "hf:d1+d1", False), ("null", "hf:d1+eval", True),
                                                      ("ppo", "hf:d1+d1", True)])
def test_every_trainer_but_sft_has_servers(trainer, alloc, servers):
    """One rule for the plan and torchrun's restarts: torchrun's said a null trainer had none (while the plan starts
    them and it evaluates through them), so a null trainer it restarted waited for every server, not one."""
    cfg = load_config(None, [f"allocation_mode={alloc}", "cluster.n_gpus_per_node=0"])
    cfg.trainer.type = trainer  # as `validate` leaves it (the words' trainer.type=null reads as None)
    assert has_servers(cfg, parse_allocation(alloc)) is servers
    assert bool(build_plan(cfg, parse_allocation(alloc), GPU_RUN).servers) is servers
    assert TorchrunRunner(cfg).servers is servers



def test_progress_follows_metrics_rewritten_by_a_restarted_trainer(tmp_path):
    """A restarted trainer rewrites metrics.jsonl without the lines past its checkpoint (`drop_after`), then appends
    its own: the progress bar reads the file again instead of going on from a byte offset in the middle of a line
    (a JSON error there failed the run as "the launcher failed")."""
    from areal_hpc.launch.local import Progress

    def lines(steps, pad=""):
        return "".join(json.dumps({"step": k, "reward_mean": 0.5, "version": k, "pad": pad}) + "\n" for k in steps)

    metrics = tmp_path / "metrics.jsonl"
    progress = Progress(load_config(None, ["trainer.total_train_steps=10"]), tmp_path)
    metrics.write_text(lines(range(1, 7)))
    progress.tick()
    assert progress._bar.n == 6
    metrics.write_text(lines(range(1, 5)))  # checkpoint at step 4: steps 5 and 6 are done again
    progress.tick()
    assert progress._bar.n == 4
    with open(metrics, "a") as f:
        f.write(lines(range(5, 9), pad="x" * 30))
    progress.tick()
    assert progress._bar.n == 8
    progress.close()

def test_golden_sbatch():
    """The rendered allocation script of a fixed config, byte for byte. After an intended change to
    the template or the plan, regenerate it: AREAL_HPC_REGEN_GOLDEN=1 pytest tests/test_launch_unit.py
    -k golden, and review the diff."""
    cfg, plan = gpu_plan()
    text = render("allocation.sbatch", cfg, plan)
    if os.environ.get(REGEN):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), f"rendered script differs from {GOLDEN} (see this test's docstring)"


def test_slurm_formats():
    assert [time_minutes(t) for t in ("30", "1:30", "2:00:00", "1-0", "1-2:30", "0-0:0:1")] == \
        [30, 2, 120, 1440, 1590, 1]
    assert parse_counts("16(x2),8") == [16, 16, 8] and parse_counts("") == []


# ----------------------------------------------------------------------------- add-server placement

class _Live:
    """A running srun step as the runner sees it."""

    def __init__(self, step: StepSpec, node: int):
        self.step, self.nodes = step, range(node, node + step.nodes)

    def poll(self) -> Optional[int]:
        return None


def test_added_server_placement():
    cfg, plan = gpu_plan()
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_CPUS_PER_NODE": "64(x2)",
           "SLURM_MEM_PER_NODE": str(512 * 1024)}
    runner = SrunRunner(cfg, plan, "7", env=env)
    assert runner.capacity == [{"gpus": 4, "cpus": 64, "mem": 512 * 1024}] * 2
    extra = StepSpec(**{**plan.servers[0].__dict__, "name": "server-2", "relative_node": -1,
                        "gpu_ids": []})
    running = [_Live(plan.servers[0], 0), _Live(plan.trainer, 1)]
    assert runner.place(extra, running) == 0  # node 0 has two GPUs left; node 1 none
    running.append(_Live(plan.servers[1], 0))
    assert not runner.can_start(extra, running)  # every GPU taken
    running.pop(0)
    assert runner.place(extra, running) == 0  # server-0 ended: its GPUs are free again
    small = SrunRunner(cfg, plan, "7", env={**env, "SLURM_MEM_PER_NODE": str(200 * 1024)})
    assert small.place(extra, running) is None  # node 0 has the GPUs but not the memory; node 1 neither
    assert runner.place(plan.trainer, running) == 1  # a planned step keeps its node


# ----------------------------------------------------------------------------- the owner's decisions

class FakeHandle(StepHandle):
    def __init__(self, step: StepSpec, rc: Optional[int]):
        self.step, self.rc, self.signals = step, rc, []

    def poll(self) -> Optional[int]:
        return self.rc

    def signal(self, sig: int) -> None:
        self.signals.append(sig)
        if self.rc is None:  # a trainer checkpoints and exits 0 on SIGTERM, as ours does
            self.rc = 0 if sig == signal.SIGTERM and self.step.role == "trainer" else -sig


class FakeRunner(Runner):
    """Starts nothing. ``exits[name]`` gives each start of a step its exit code (None: runs until
    signalled); ``on_start`` runs as a step starts (a trainer writing metrics rows); ``room`` is
    how many added servers fit."""

    def __init__(self, exits: Dict[str, List[Optional[int]]], room: int = 0,
                 on_start: Optional[Callable[[StepSpec], None]] = None):
        self.exits, self.room, self.on_start = exits, room, on_start
        self.started: List[FakeHandle] = []

    def can_start(self, step: StepSpec, running: List[StepHandle]) -> bool:
        return step.relative_node >= 0 or self.room > 0

    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        if step.relative_node < 0:
            self.room -= 1
        codes = self.exits.get(step.name) or [None]
        h = FakeHandle(step, codes.pop(0) if len(codes) > 1 else codes[0])
        if self.on_start:
            self.on_start(step)
        self.started.append(h)
        return h

    def names(self) -> List[str]:
        return [h.step.name for h in self.started]


def owner_for(tmp_path: Path, runner: Runner, *words: str, linger: bool = False) -> RunOwner:
    cfg = load_config(None, ["mode=local", "allocation_mode=hf:d2+d1", "cluster.n_gpus_per_node=0",
                             f"cluster.fileroot={tmp_path}", "launcher.heartbeat_s=0.2", *words])
    rd = tmp_path / "run"
    (rd / "logs").mkdir(parents=True)
    return RunOwner(cfg, build_plan(cfg, parse_allocation(cfg.allocation_mode), rd), rd, runner, mode="local",
                    linger=linger)


def when(condition: Callable[[], bool], action: Callable[[], None], timeout_s: float = 30.0) -> None:
    """Run ``action`` on a thread once ``condition`` holds (the owner's loop runs meanwhile)."""
    def wait() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        action()
    threading.Thread(target=wait, daemon=True).start()


def trainer_progresses(rd: Path) -> Callable[[StepSpec], None]:
    """Each trainer start writes a metrics row one step further (it got past its first step)."""
    def on_start(step: StepSpec) -> None:
        if step.role == "trainer":
            with open(rd / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": outcome.last_step(rd / "metrics.jsonl") + 1}) + "\n")
    return on_start


def test_trainer_completes_and_servers_shut_down(tmp_path):
    runner = FakeRunner({"trainer": [0]})
    owner = owner_for(tmp_path, runner)
    assert owner.run() == 0 and owner.state == outcome.COMPLETED
    assert runner.names() == ["server-0", "server-1", "trainer"]
    assert all(h.signals == [signal.SIGTERM] for h in runner.started if h.step.role == "server")


def test_trainer_completes_and_servers_stay(tmp_path):
    """shutdown_server_on_exit=False: the servers are left running for a later trainer."""
    runner = FakeRunner({"trainer": [0]})
    owner = owner_for(tmp_path, runner, "shutdown_server_on_exit=False")
    assert owner.run() == 0 and owner.state == outcome.COMPLETED
    assert all(h.signals == [] and h.poll() is None for h in runner.started if h.step.role == "server")


def test_server_dies_run_goes_on(tmp_path):
    """A dead server is dropped (its record too); the trainer goes on and completes the run."""
    runner = FakeRunner({"server-1": [1]})
    owner = owner_for(tmp_path, runner)
    owner.registry.put("servers", "server-1", {"address": "h:1"})
    when(lambda: owner.trainer is not None and "server-1" not in owner.servers,
         lambda: setattr(owner.trainer, "rc", 0))
    assert owner.run() == 0 and owner.state == outcome.COMPLETED
    assert owner.registry.get("servers", "server-1", live_only=False) is None
    assert [r for r, _ in owner.server_failures] == ["server-1 exited with 1"]


def test_dead_trainer_restarts_up_to_max_restarts(tmp_path):
    runner = FakeRunner({"trainer": [1, 1, 1]}, on_start=trainer_progresses(tmp_path / "run"))
    owner = owner_for(tmp_path, runner, "trainer.max_restarts=2")
    assert owner.run() == 1 and owner.state == outcome.FAILED
    trainers = [h for h in runner.started if h.step.role == "trainer"]
    assert len(trainers) == 3 and owner.restarts == 2
    # a restarted trainer waits for one live server and pushes its weights before generating
    assert [t.step.env.get("AREAL_HPC_MIN_REQUIRED_SERVERS") for t in trainers] == [None, "1", "1"]
    assert "after 2 restart(s), trainer.max_restarts=2" in owner.reason
    assert all(h.signals for h in runner.started if h.step.role == "server")  # servers shut down at the end


def test_crash_loop_is_not_restarted(tmp_path):
    """Two deaths in a row before the first step: not restarted, whatever max_restarts says."""
    runner = FakeRunner({"trainer": [1]})
    owner = owner_for(tmp_path, runner, "trainer.max_restarts=5")
    assert owner.run() == 1
    assert runner.names().count("trainer") == 2 and "crash loop" in owner.reason


def test_trainer_that_restarts_itself(tmp_path):
    """torchrun's agent restarts its ranks itself: the owner does not."""
    runner = FakeRunner({"trainer": [1]})
    runner.trainer_restarts_itself = True
    owner = owner_for(tmp_path, runner)
    assert owner.run() == 1 and runner.names().count("trainer") == 1


def test_failed_trainer_with_servers_kept_lingers_until_stop(tmp_path):
    """A Slurm driver with shutdown_server_on_exit=False: after the trainer fails (no restarts
    left) the run waits with its servers for a restart by hand or a `stop`."""
    runner = FakeRunner({"trainer": [1]})
    owner = owner_for(tmp_path, runner, "shutdown_server_on_exit=False", "trainer.max_restarts=0",
                      linger=True)
    when(lambda: owner.trainer_rc is not None and owner.state == outcome.RUNNING,
         lambda: owner.registry.put("requests", "1-stop", {"kind": "stop"}, ttl=False))
    assert owner.run() == 1 and owner.state == outcome.FAILED
    assert "then stop requested" in owner.reason
    assert all(h.signals for h in runner.started if h.step.role == "server")


# ----------------------------------------------------------------------------- add servers, naming

def test_add_servers_in_the_allocation(tmp_path):
    runner = FakeRunner({}, room=1)
    owner = owner_for(tmp_path, runner)
    for step in owner.plan.servers:
        owner.start_step(step)
    assert owner.add_servers(2) == ["server-2"]  # room for one: the caller is told, and submits the rest as a job
    assert runner.names()[-1] == "server-2" and runner.started[-1].step.relative_node == -1


def test_server_names_never_collide(tmp_path):
    """One rule for both ways of adding servers: in the allocation (the owner) and as a job of their
    own (`servers_plan`), in either order, before any of them registered."""
    runner = FakeRunner({}, room=2)
    owner = owner_for(tmp_path, runner)
    rd = owner.run_dir
    (rd / "plan.json").write_text(owner.plan.to_json())
    owner.add_servers(1)
    job = [s.name for s in servers_plan(owner.cfg, rd, 2).servers]
    owner.add_servers(1)
    assert (runner.names(), job) == (["server-2", "server-5"], ["server-3", "server-4"])
    assert next_server_index(owner.registry) == 6
    # a name once handed out is never handed out again, even with no record of it left
    assert next_server_index(Registry.for_run(rd), reserve=1) == 6 and next_server_index(owner.registry) == 7


def test_plan_json_round_trip():
    _, plan = gpu_plan()
    assert Plan.from_json(plan.to_json()) == plan


# ----------------------------------------------------------------------------- `stop` (no owner answering)

def stopped_run(tmp_path: Path, mode: str, owner_pid: int, server: Dict[str, object]) -> Path:
    """A run dir whose run record names ``owner_pid`` (on this host) and one server record."""
    cfg = load_config(None, ["mode=local", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             f"cluster.fileroot={tmp_path}", "launcher.ttl_s=60"])
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "config.yaml").write_text(dump_yaml(cfg))
    reg = Registry.for_run(rd, cfg.launcher)
    reg.put("", "run", {"mode": mode, "pid": owner_pid, "host": socket.gethostname(), "state": "RUNNING"})
    reg.put("servers", "server-0", server)
    return rd


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stop_terms_what_a_dead_owner_left_whatever_address_it_serves_on(tmp_path):
    """A local run's owner is gone (shutdown_server_on_exit=False): `stop` sends SIGTERM to the server it left
    on this host, even one serving on an address (server.host=127.0.0.1) rather than the host's name."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        rd = stopped_run(tmp_path, "local", dead_pid(), {"host": "127.0.0.1", "node": socket.gethostname(),
                                                          "pid": sleeper.pid})
        assert stop(rd, timeout_s=5.0) == 0
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        sleeper.kill()


def test_stop_of_a_run_that_had_ended_says_nothing_was_running(tmp_path, capsys):
    """`stop` of a run that had already ended printed "stopped <run dir>", as if it had stopped something."""
    rd = stopped_run(tmp_path, "local", dead_pid(), {})
    reg = Registry.for_run(rd)
    reg.delete("servers", "server-0")
    reg.put("", "run", {**reg.get("", "run"), "state": outcome.COMPLETED, "reason": "trainer completed"})
    assert stop(rd, timeout_s=5.0) == 0
    assert capsys.readouterr().out == f"nothing was running in {rd}\nrun COMPLETED: trainer completed\n"


def test_stop_that_times_out_kills_no_pid_of_another_host(tmp_path, capsys):
    """A stop that times out kills what is left on this host; a record's pid on another node (mode=ray) is
    not a process of this host, and is left alone: `stop` says so and keeps its record (it said "killed what was
    left" and deleted the record of a server still running)."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        rd = stopped_run(tmp_path, "ray", os.getpid(), {"host": "node-9", "node": "node-9", "pid": bystander.pid})
        assert stop(rd, timeout_s=1.0) == 1
        assert bystander.poll() is None
        assert Registry.for_run(rd).get("servers", "server-0", live_only=False) is not None
        assert (f"killed nothing on this host; server-0 (pid {bystander.pid} on node-9) is not ours to kill from here"
                in capsys.readouterr().out)
    finally:
        bystander.kill()


def test_add_servers_without_room_outside_slurm_says_so_at_once(tmp_path, capsys):
    """mode=local has no separate job to put what the machine has no room for: `add-servers` says so as soon as
    the owner answers, instead of waiting out its timeout and then blaming the servers' start-up."""
    rd = stopped_run(tmp_path, "local", os.getpid(), {"host": "h", "node": "h", "pid": None})
    reg = Registry.for_run(rd)

    def owner_answers() -> None:
        name = next(iter(reg.list("requests")))
        reg.delete("requests", name)
        reg.put("replies", name, {"wanted": 1, "servers": []})
    when(lambda: bool(reg.list("requests")), owner_answers)
    t0 = time.monotonic()
    assert add_servers(rd, 1, timeout_s=10.0) == 1
    assert time.monotonic() - t0 < 5.0
    assert "room for 0 of 1 server(s)" in capsys.readouterr().err


def test_status_while_a_server_job_is_submitted(tmp_path, monkeypatch):
    """`add-servers --new-job` may record a job while `status` asks Slurm about the others: `status` shows the
    jobs it asked about (it listed the job records twice, and failed with a KeyError on the new one)."""
    rd = stopped_run(tmp_path, "slurm", 1, {"host": "n1", "node": "n1", "pid": 2})
    reg = Registry.for_run(rd)
    reg.put("", "run", {**reg.get("", "run"), "job_id": "10"})
    reg.put("jobs", "11", {"servers": ["server-1"]}, ttl=False)

    def job(job_id: str) -> Dict[str, str]:
        reg.put("jobs", "12", {"servers": ["server-2"]}, ttl=False)  # submitted meanwhile
        return {"state": "RUNNING", "nodes": "n1"}
    monkeypatch.setattr(slurm, "job", job)
    monkeypatch.setattr(slurm, "job_steps", lambda job_id: [])
    st = collect_status(rd)
    assert st["job"]["job_id"] == "10" and st["server_jobs"] == [
        {"job_id": "11", "state": "RUNNING", "nodes": "n1", "steps": [], "servers": ["server-1"]}]


def test_status_of_a_job_being_requeued(tmp_path, monkeypatch):
    """`scontrol requeue` (submitit's, after USR2) leaves the job COMPLETING while its steps end and the epilog runs
    (seconds to a minute), then PENDING: `status` said RUNNING meanwhile, for a run checkpointed and waiting to run
    again, and counted the requeued driver as a live owner."""
    rd = stopped_run(tmp_path, "slurm", 1, {"host": "n1", "node": "n1", "pid": 2})
    reg = Registry.for_run(rd)
    why = "time limit or preemption (USR2) at step 5: checkpointed, the job is requeued and resumes"
    reg.put("", "run", {**reg.get("", "run"), "job_id": "10", "state": "REQUEUED", "reason": why})
    monkeypatch.setattr(slurm, "job_steps", lambda job_id: [])
    for state in ("COMPLETING", "PENDING"):
        monkeypatch.setattr(slurm, "job", lambda job_id: {"state": state, "nodes": "n1"})
        st = collect_status(rd)
        assert (st["state"], st["reason"]) == ("REQUEUED", why), (state, st)
    monkeypatch.setattr(slurm, "job", lambda job_id: {"state": "RUNNING", "nodes": "n1"})  # before its new driver
    assert collect_status(rd)["state"] == "RUNNING"                                       # wrote run.json


def test_submit_of_a_job_that_fails_at_once_is_no_success(tmp_path, monkeypatch, capsys):
    """A job already ended when `submit` (launcher.wait=False) first asks about it, e.g. FAILED because
    cluster.python does not exist: `submit` says how the run ended and exits 1, not 0 ("job 5 FAILED on n1")."""
    cfg = load_config(None, ["mode=slurm", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             f"cluster.fileroot={tmp_path}"])
    rd = tmp_path / "run"
    rd.mkdir()
    plan = build_plan(cfg, parse_allocation(cfg.allocation_mode), rd)
    job = type("Job", (), {"job_id": "5"})()
    executor = type("Executor", (), {"submit": lambda self, driver: job})()
    monkeypatch.setattr(slurm_submit, "test_allocation", lambda cfg, plan: None)
    monkeypatch.setattr(slurm_submit, "make_executor", lambda cfg, plan, rd: executor)
    monkeypatch.setattr(slurm, "job", lambda job_id: {"state": "FAILED", "nodes": "n1"})
    assert not cfg.launcher.wait and slurm_submit.submit(cfg, plan, rd) == 1
    assert "run FAILED: job 5 ended FAILED before its driver recorded how the run ended" in capsys.readouterr().err


def test_logs_slurm_is_the_runs_job_not_a_server_jobs(tmp_path, capsys):
    """`logs slurm` is the batch log of the run's job, also once a server job (`add-servers --new-job`) wrote a
    newer slurm-*.out next to it."""
    rd = stopped_run(tmp_path, "slurm", 1, {})
    reg = Registry.for_run(rd)
    reg.put("", "run", {**reg.get("", "run"), "job_id": "10"})
    (rd / "logs").mkdir()
    (rd / "logs" / "slurm-10.out").write_text("the run's job\n")
    time.sleep(0.01)
    (rd / "logs" / "slurm-11.out").write_text("a server job\n")
    assert logs(rd, "slurm") == 0 and capsys.readouterr().out == "the run's job\n"


def test_usr2_without_requeue_ends_a_hand_started_driver_unsuccessfully(tmp_path, monkeypatch):
    """A driver started by hand, launcher.requeue_on_preemption=False: USR2 stops the run (STOPPED) and the
    driver exits with STOPPED's code, so the job does not end COMPLETED (a success to --dependency=afterok)."""
    owner = owner_for(tmp_path, FakeRunner({}), "launcher.requeue_on_preemption=False")
    for step in owner.plan.steps:
        owner.start_step(step)
    monkeypatch.setattr(driver, "_OWNER", owner)
    with pytest.raises(SystemExit) as ended:
        driver._on_usr2_standalone(signal.SIGUSR2, None)
    assert owner.state == outcome.STOPPED and ended.value.code == outcome.exit_code(outcome.STOPPED) != 0


def test_status_of_a_run_whose_metrics_have_no_reward(tmp_path, capsys):
    """An SFT run's metrics rows have a loss, no reward_mean: `status` prints its progress (it failed formatting
    the missing reward with a TypeError)."""
    rd = stopped_run(tmp_path, "local", dead_pid(), {"host": socket.gethostname(), "pid": dead_pid()})
    (rd / "metrics.jsonl").write_text(json.dumps({"step": 3, "version": 3, "loss": 0.5}) + "\n")
    assert status(rd) == 0
    assert "progress step 3 v3  0 trained tok/s  0 gen tok/s" in capsys.readouterr().out


# fix7-A

def test_stop_that_times_out_kills_the_trainer_too(tmp_path):
    """The owner does not answer (hung): a stop that times out kills the trainer it left on this host too, not only
    the servers, and removes its record (a SIGKILLed trainer cannot deregister)."""
    trainer = subprocess.Popen(["sleep", "60"])
    try:
        rd = stopped_run(tmp_path, "local", os.getpid(), {"host": "h", "node": "h", "pid": None})
        Registry.for_run(rd).put("", "trainer", {"host": socket.gethostname(), "pid": trainer.pid})
        assert stop(rd, timeout_s=1.0) == 1
        assert trainer.wait(timeout=5) == -signal.SIGKILL
        assert Registry.for_run(rd).get("", "trainer", live_only=False) is None
    finally:
        trainer.kill()


def test_requests_to_a_stopping_run_are_refused_at_once(tmp_path, monkeypatch, capsys):
    """While the run stops, its owner answers `add-servers` and a trainer restart with an error, so both fail at
    once saying why, instead of waiting out their timeouts for a request that was dropped."""
    owner = owner_for(tmp_path, FakeRunner({}, room=1))
    rd = owner.run_dir
    (rd / "config.yaml").write_text(dump_yaml(owner.cfg))
    owner.registry.put("", "run", {**owner.record(), "job_id": "7"})
    owner.request_stop()
    monkeypatch.setattr(slurm, "job_state", lambda job_id: "RUNNING")
    for ask in (lambda: add_servers(rd, 1, timeout_s=3.0),
                lambda: control.restart_trainer(owner.cfg, rd, owner.registry.get("", "run"), timeout_s=3.0)):
        when(lambda: bool(owner.registry.list("requests")), owner.handle_requests)
        assert ask() == 1
        assert "the run is stopping" in capsys.readouterr().err
    assert owner.servers == {} and owner.trainer is None


def test_logs_of_a_huge_log_reads_only_its_end(tmp_path):
    """`logs` prints the last lines of a log larger than the memory it may use (a sparse 2 GiB file here): it reads
    from the end, where it read the whole file (MemoryError)."""
    rd = stopped_run(tmp_path, "local", dead_pid(), {})
    (rd / "logs").mkdir()
    with open(rd / "logs" / "driver.log", "wb") as f:
        f.truncate(2 << 30)
        f.seek(0, os.SEEK_END)
        f.write(b"".join(b"line %d\n" % i for i in range(1000)))
    script = ("import resource, sys; from pathlib import Path; from areal_hpc.launch.status import logs\n"
              "vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024\n"
              "resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20),) * 2)\n"
              "sys.exit(logs(Path(sys.argv[1]), 'driver', lines=3))")
    p = subprocess.run([sys.executable, "-c", script, str(rd)], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "line 997\nline 998\nline 999\n"), p.stderr[-2000:]


@pytest.mark.parametrize("text", [b"", b"one", b"a\nbb\n\nccc\r\ndddd\n" * 5, b"x" * 50 + b"\ny\n", b"\n\n\n",
                                  b"step\r" * 30 + b"done\n"])  # a progress bar's \r: line breaks to splitlines
def test_tail_reads_the_same_lines_as_reading_the_whole_file(tmp_path, text):
    (tmp_path / "f").write_bytes(text)
    for block in (1, 3, 7, 1 << 16):
        for n in (0, 1, 2, 5, 40):
            with open(tmp_path / "f", "rb") as f:
                assert _tail(f, n, block) == (text.splitlines()[-n:] if n else []) and f.tell() == len(text)


def test_an_added_server_that_fails_to_start_does_not_end_the_run(tmp_path):
    """A server the owner cannot start (an exception from its runner: on Ray, a node without the run dir) is an
    error reply to `add-servers`, which then fails at once saying why; the exception ended the run (FAILED)."""
    class Refusing(FakeRunner):
        def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
            if step.relative_node < 0:
                raise FileNotFoundError(f"no run dir for {step.name}")
            return super().start(step, running)
    owner = owner_for(tmp_path, Refusing({}, room=1))
    for step in owner.plan.steps:
        owner.start_step(step)
    name = control.post_request(owner.registry, "add_servers", count=1)
    owner.handle_requests()
    assert owner.registry.get("replies", name) == {
        "error": "FileNotFoundError: no run dir for server-2", "_age_s": pytest.approx(0, abs=5)}
    assert sorted(owner.servers) == ["server-0", "server-1"] and owner.state == outcome.RUNNING


def test_add_servers_fails_once_the_owner_is_gone(tmp_path, capsys):
    """The run's owner ends (its trainer finished, it crashed) before it served the request: `add-servers` says so
    once the owner is gone, instead of waiting out launcher.server_startup_timeout_s for servers nobody starts."""
    owner = subprocess.Popen(["sleep", "60"])
    try:
        rd = stopped_run(tmp_path, "local", owner.pid, {"host": "h", "node": "h", "pid": None})
        when(lambda: bool(Registry.for_run(rd).list("requests")), lambda: (owner.kill(), owner.wait()))
        assert add_servers(rd, 1, timeout_s=5.0) == 1
        assert "the run's owner ended before it served the request" in capsys.readouterr().err
    finally:
        owner.kill()


# ----------------------------------------------------------------------------- fix7-D
from areal_hpc.config.allocation import nodes_needed  # noqa: E402  (kept in this section: others append above)
from areal_hpc.launch.sbatch import sbatch_lines  # noqa: E402


def _sbatch_opts(words: List[str]) -> tuple:
    cfg = load_config(None, ["mode=slurm", "cluster.fileroot=/shared/runs", *words])
    alloc = parse_allocation(cfg.allocation_mode)
    plan = build_plan(cfg, alloc, GPU_RUN)
    return plan, alloc, dict(line[len("#SBATCH --"):].split("=", 1) for line in sbatch_lines(cfg, plan))


def test_allocation_has_room_for_a_rollout_runner_next_to_servers_filling_a_node():
    """sglang:d4 on 4 GPUs with no trainer: the servers take every GPU's CPUs and memory; the runner's CPU step
    needs its own on top (else `srun --exact` waits for it forever)."""
    plan, _, opts = _sbatch_opts(["allocation_mode=sglang:d4", "trainer.type=null", "cluster.n_gpus_per_node=4",
                                  "cluster.cpus_per_gpu=8", "cluster.mem_per_gpu_gb=64", "cluster.cpus_per_task_cpu=2",
                                  "cluster.mem_per_task_cpu_gb=3"])
    assert [s.relative_node for s in plan.steps] == [0] * 5
    assert opts["cpus-per-task"] == "34" and opts["mem"] == "259G"


def test_cpu_allocation_is_sized_per_node_and_a_gpu_one_by_its_gpus():
    _, _, opts = _sbatch_opts(["allocation_mode=hf:d2+d2", "cluster.n_gpus_per_node=0",
                               "cluster.cpus_per_task_cpu=2", "cluster.mem_per_task_cpu_gb=3"])
    assert opts["cpus-per-task"] == "8" and opts["mem"] == "12G"  # 2 servers + 2 trainer ranks, all on node 0
    _, _, opts = _sbatch_opts(["allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=4", "cluster.cpus_per_gpu=8",
                               "cluster.mem_per_gpu_gb=64"])
    assert opts["cpus-per-task"] == "32" and opts["mem"] == "256G" and opts["gres"] == "gpu:4"


def test_multi_node_rollout_only_takes_no_extra_node_for_its_runner():
    """sglang:d8 on 2 nodes x 4 GPUs: validation says 2 nodes; the runner (a CPU process) used to get a third."""
    plan, alloc, opts = _sbatch_opts(["allocation_mode=sglang:d8", "trainer.type=null", "cluster.n_nodes=2",
                                      "cluster.n_gpus_per_node=4"])
    assert plan.nodes == nodes_needed(alloc, 4) == 2 and opts["nodes"] == "2"
    assert plan.trainer.relative_node == 0


def test_wait_running_waits_through_every_queued_state(monkeypatch):
    """A job held after a requeue (REQUEUE_HOLD) is still queued: submit must not report it as started."""
    states = iter(["PENDING", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RUNNING"])
    monkeypatch.setattr(slurm, "job_state", lambda job_id: next(states))
    assert slurm_submit.wait_job("7", running=True, first_s=0) == "RUNNING"


# fix8-A

def slurm_run(tmp_path: Path, monkeypatch, state: str, server: Dict[str, object]) -> tuple:
    """A Slurm run (job 10, its driver's record not final) with one server record; a fake Slurm whose job 10 is in
    ``state`` until cancelled. Returns the run dir and the list of Slurm calls."""
    rd = stopped_run(tmp_path, "slurm", 1, server)
    reg = Registry.for_run(rd)
    reg.put("", "run", {**reg.get("", "run"), "host": "n1", "job_id": "10"})
    states, calls = {"10": state}, []

    def scancel(job_id: str, signal_name: Optional[str] = None) -> str:
        calls.append(("scancel", job_id))
        states[job_id] = "CANCELLED"
        return ""
    monkeypatch.setattr(slurm, "scancel", scancel)
    monkeypatch.setattr(slurm, "job_state", lambda job_id: calls.append(("state", job_id)) or states[job_id])
    monkeypatch.setattr(slurm, "job", lambda job_id: calls.append(("job", job_id)) or {"state": states[job_id]})
    monkeypatch.setattr(slurm, "job_steps", lambda job_id: calls.append(("steps", job_id)) or [])
    return rd, calls


@pytest.mark.parametrize("state", ["PENDING", "REQUEUE_HOLD", "CONFIGURING", "SUSPENDED"])
def test_stop_cancels_a_job_that_has_not_started_at_once(tmp_path, monkeypatch, capsys, state):
    """A job with no driver yet (queued, held after a requeue, booting its nodes) has nothing to checkpoint: `stop`
    cancels it at once (it waited out its timeout for REQUEUE_HOLD and CONFIGURING, then cancelled it). A SUSPENDED
    job has started: its driver stops it gracefully once it runs again, so `stop` waits, and cancels it only then.
    A cancelled job's driver never records how the run ended: `stop` does (it said "run RUNNING")."""
    rd, calls = slurm_run(tmp_path, monkeypatch, state, {"host": "n1", "node": "n1", "pid": 2,
                                                         "slurm_job_id": "10", "slurm_step_id": 0})
    assert stop(rd, timeout_s=2.0) == (1 if state == "SUSPENDED" else 0)
    assert calls.count(("scancel", "10")) == 1
    if state != "SUSPENDED":  # the run's end is recorded: its record said RUNNING (or PENDING) after the stop
        said = f"run STOPPED: stop requested (areal-hpc stop) while job 10 was {state}: cancelled"
        assert said in capsys.readouterr().out
        assert Registry.for_run(rd).get("", "run", live_only=False)["state"] == outcome.STOPPED
        assert Registry.for_run(rd).list("requests") == {}  # no stop request is left for a later run's driver


def test_stop_asks_slurm_every_few_seconds_not_twice_a_second(tmp_path, monkeypatch):
    """The driver is dead and a server's record lives on: `stop` waits out its timeout reading the registry and asks
    Slurm (a controller every user shares) at growing intervals; it ran scontrol and sacct twice a second."""
    rd, calls = slurm_run(tmp_path, monkeypatch, "FAILED", {"host": "n1", "node": "n1", "pid": 2})
    assert stop(rd, timeout_s=3.0) == 1
    assert len([c for c in calls if c[0] != "scancel"]) <= 8, calls


def test_stop_notices_the_end_its_driver_records_without_slurm(tmp_path, monkeypatch):
    """The driver records how the run ended (and its steps deregistered): `stop` ends at once, not when Slurm says
    the job ended."""
    rd, calls = slurm_run(tmp_path, monkeypatch, "RUNNING", {})
    reg = Registry.for_run(rd)
    when(lambda: bool(reg.list("requests")), lambda: (reg.delete("servers", "server-0"), reg.put(
        "", "run", {**reg.get("", "run"), "state": outcome.STOPPED, "reason": "stop requested"})))
    assert stop(rd, timeout_s=10.0) == 0


@pytest.mark.parametrize("rows, said", [
    ([{"step": 1, "loss": 2.0, "time_s": 5}, {"step": 2, "loss": 1.0, "time_s": 9}],
     "done: step 2, loss 2.000 -> 1.000 (mean of the last 2 steps 1.500) in 9.0s of training; metrics "),
    ([{"step": 1, "reward_mean": 0.25}, {"step": 2, "reward_mean": None}, {"step": 3, "reward_mean": 0.75}],
     "done: step 3, reward 0.250 -> 0.750 (mean of the last 2 steps 0.500) in 0.0s of training; metrics ")])
def test_the_summary_of_a_run_says_its_loss_when_it_has_no_reward(tmp_path, capsys, rows, said):
    """An SFT run's rows have a loss and no reward: the summary said "reward 0.000 -> 0.000"; a step whose reward was
    not finite (None in metrics.jsonl) failed it with a TypeError."""
    from areal_hpc.launch.local import summarize

    cfg = load_config(None, ["mode=local", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0"])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summarize(cfg, tmp_path, {"state": outcome.COMPLETED})
    out = capsys.readouterr().out
    assert said in out and ("reward.png" in out) == ("reward" in said)


@pytest.mark.parametrize("mode, hint", [("auto", "resume: the same `areal-hpc submit` command\n"),
                                        ("disabled", "resume: the same `areal-hpc submit` command without "
                                                     "recover.mode=disabled (that starts over)\n")])
def test_a_stopped_run_says_how_to_resume_it(tmp_path, capsys, mode, hint):
    """A run stopped with recover.mode=disabled said to resume with the same command, which starts over (its
    checkpoints set aside)."""
    from areal_hpc.launch.local import summarize

    cfg = load_config(None, ["mode=local", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             f"recover.mode={mode}"])
    summarize(cfg, tmp_path, {"state": outcome.STOPPED, "reason": "stop requested"})
    assert capsys.readouterr().out.endswith(hint)


def test_the_progress_bar_takes_a_step_whose_reward_is_not_finite(tmp_path, capsys):
    """metrics.jsonl has null for a reward that was not finite: the local owner's progress bar failed formatting it
    (TypeError), which ended the run as FAILED ("the launcher failed"). An SFT run's bar shows its loss."""
    from areal_hpc.launch.local import Progress

    cfg = load_config(None, ["mode=local", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0"])
    bar = Progress(cfg, tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "version": 1, "reward_mean": None}) + "\n"
                                            + json.dumps({"step": 2, "version": 2, "loss": 0.5}) + "\n")
    bar.close()
    assert "loss=0.500" in capsys.readouterr().err


def test_status_checks_the_servers_health_at_once(tmp_path):
    """`status` checks every server's /health at the same time: one after another (2 s each), a run with many servers
    and a few dead ones took tens of seconds. The servers here answer only once all three checks are in flight."""
    with health_answered_together(3) as port:
        rec = {"host": socket.gethostname(), "node": socket.gethostname(), "pid": os.getpid(),
               "address": f"127.0.0.1:{port}"}
        rd = stopped_run(tmp_path, "local", dead_pid(), rec)
        for sid in ("server-1", "server-2"):
            Registry.for_run(rd).put("servers", sid, rec)
        assert [(s["id"], s["healthy"]) for s in collect_status(rd)["servers"]] == [
            ("server-0", True), ("server-1", True), ("server-2", True)]


def test_a_trainer_restart_waits_without_asking_slurm_twice_a_second(tmp_path, monkeypatch, capsys):
    """A restart's wait for the new trainer (minutes of model loading) reads the registry, and asks Slurm whether the
    driver's job still runs at growing intervals; it ran scontrol every 0.3 s."""
    from areal_hpc.config import load_resolved

    rd, calls = slurm_run(tmp_path, monkeypatch, "RUNNING", {})
    run = Registry.for_run(rd).get("", "run")
    assert control.restart_trainer(load_resolved(rd / "config.yaml"), rd, run, timeout_s=4.0) == 1
    assert "no trainer registered within 4s" in capsys.readouterr().err
    assert 1 <= len(calls) <= 6, calls


def test_the_progress_bar_follows_metrics_replaced_and_grown_between_two_ticks(tmp_path, capsys):
    """A restarted trainer replaces metrics.jsonl (`drop_after`) and writes rows past the bar's offset before its next
    tick (the owner was busy): the bar reads the new file from its start. It read from the old offset, mid-line, and
    the JSONDecodeError ended the local run as FAILED."""
    from areal_hpc.launch.local import Progress
    from areal_hpc.registry import atomic_write

    cfg = load_config(None, ["mode=local", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0"])
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "version": s, "reward_mean": 0.5}) + "\n" for s in (1, 2, 3)))
    bar = Progress(cfg, tmp_path)
    bar.tick()
    rows = [{"step": 1, "version": 1, "reward_mean": 0.5}] + [
        {"step": s, "version": s, "reward_mean": 0.25, "loss": 0.125} for s in (2, 3, 4)]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    bar.close()
    assert bar._bar.n == 4 and "reward=0.250" in capsys.readouterr().err


def test_a_stop_posted_while_the_owner_starts_is_served(tmp_path):
    """`stop` right after a job started, before its driver serves requests: the driver served it (the run stops);
    it dropped every request it found as left by an earlier owner, and `stop` waited out its timeout, then scancel.
    A request whose poster no longer waits is still dropped."""
    owner = owner_for(tmp_path, FakeRunner({}, room=1))
    control.post_request(owner.registry, "add_servers", count=1)  # its poster is gone
    control.post_request(owner.registry, "stop", wait_s=60.0)
    ran = threading.Thread(target=owner.run, daemon=True)
    ran.start()
    ran.join(timeout=10)
    try:
        assert not ran.is_alive() and owner.state == outcome.STOPPED
        assert list(owner.servers) == [] and "server-2" not in [h.step.name for h in owner.runner.started]
    finally:
        owner.request_force()
        ran.join(timeout=10)


# fix8-B

def test_srun_steps_get_no_rank_vars_of_the_login_shell(tmp_path, monkeypatch):
    """sbatch exports the submitting shell: a RANK/WORLD_SIZE/MASTER_ADDR left there from an earlier torchrun
    used to reach the trainer's srun step, where they won over SLURM_PROCID/SLURM_NTASKS (every rank rank 3 of
    99, rendezvous at a login node). The driver starts steps without them; the rendered script unsets them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", f"env > {tmp_path / 'env'}"), ("squeue", "true")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for var, value in (("RANK", "3"), ("WORLD_SIZE", "99"), ("MASTER_ADDR", "login1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    cfg, plan = gpu_plan()
    plan.run_dir = str(tmp_path)
    step = StepSpec(**{**plan.trainer.__dict__, "log": str(tmp_path / "trainer.log")})
    SrunRunner(cfg, plan, "7", env={}).start(step, []).proc.wait(timeout=30)
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert "\nunset RANK LOCAL_RANK WORLD_SIZE " in render("allocation.sbatch", cfg, gpu_plan()[1])


def test_an_srun_that_fails_before_its_step_leaves_its_words_in_the_step_log(tmp_path, monkeypatch):
    """srun refusing a step (an unknown option in cluster.srun_args, a GRES it cannot give) wrote only to the batch
    log: the step's own log never came, and the run FAILED naming no error line and no log. The driver writes srun's
    words to the step's log (where `error_line` finds them); they still reach the driver's stderr too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "echo \"srun: unrecognized option '--nope'\" >&2; exit 255"), ("squeue", "true")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg, plan = gpu_plan()
    plan.run_dir = str(tmp_path)
    step = StepSpec(**{**plan.trainer.__dict__, "log": str(tmp_path / "trainer-%t.log")})
    h = SrunRunner(cfg, plan, "7", env={}).start(step, [])
    assert h.proc.wait(timeout=30) == 255
    line, path = outcome.error_line(step.log)
    assert path == str(tmp_path / "trainer-0.log") and "unrecognized option '--nope'" in line, (line, path)


def test_sbatch_args_pasted_with_their_prefix_are_rendered_once():
    """Validation accepts ``cluster.sbatch_args=["#SBATCH --exclusive"]`` (as pasted from a script) and submitit gets
    --exclusive; the rendered script (and the `--test-only` check) used to say ``#SBATCH #SBATCH --exclusive``, a
    line sbatch ignores."""
    cfg, plan = gpu_plan()
    cfg.cluster.sbatch_args = ["#SBATCH --exclusive"]
    text = render("allocation.sbatch", cfg, plan)
    assert "\n#SBATCH --exclusive\n" in text and "#SBATCH #SBATCH" not in text


def test_sbatch_arg_pasted_with_its_prefix_is_not_the_value_of_a_bare_flag_before_it():
    """``["--exclusive", "#SBATCH --reservation=x"]``: the second entry is an option of its own; it was taken as
    ``--exclusive``'s value (it does not start with "-" until its prefix is stripped), and the reservation lost."""
    args = ["--exclusive", "#SBATCH --reservation=x", "#SBATCH --hold", "--qos", "#SBATCH --mail-type=END"]
    assert sbatch_options(args) == {"exclusive": True, "reservation": "x", "hold": True, "qos": True,
                                                   "mail-type": "END"}
    assert sbatch_options(["--reservation", "x", "--exclusive"]) == {"reservation": "x",
                                                                                   "exclusive": True}


def test_sbatch_args_render_as_submitit_gets_them():
    """An option and its value in two entries (``--reservation``, ``x``) were two #SBATCH lines, the first of which
    sbatch refuses (in the `--test-only` check, so such a run never submitted); an entry pasted with a space before
    its prefix was ``#SBATCH #SBATCH --hold``, which sbatch ignores, while submitit got --hold."""
    cfg, plan = gpu_plan()
    cfg.cluster.sbatch_args = ["--reservation", "x", " #SBATCH --hold", "--exclusive"]
    assert sbatch_lines(cfg, plan)[-3:] == ["#SBATCH --reservation=x", "#SBATCH --hold", "#SBATCH --exclusive"]
    assert "\n#SBATCH --reservation=x\n#SBATCH --hold\n" in render("allocation.sbatch", cfg, plan)


def test_rendered_scripts_run_setup_commands_that_read_unset_variables(tmp_path):
    """Activation scripts (conda's, a site's modules) often read variables nobody set; the scripts ran
    cluster.setup_commands under ``set -u``, so bash ended them there, before any step started."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho started >> {tmp_path / 'steps'}\n")
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / "activate").write_text(': "$AREAL_TEST_NEVER_SET"\n')
    cfg, plan = gpu_plan()
    cfg.cluster.setup_commands = [f". {tmp_path / 'activate'}"]
    cfg.shutdown_server_on_exit = False  # no server step is killed before it writes its line
    plan.run_dir = str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "AREAL_TEST_NEVER_SET"}
    for template in ("allocation.sbatch", "add-servers.sbatch"):
        r = subprocess.run(["bash", "-c", render(template, cfg, plan)], capture_output=True, text=True, timeout=30,
                           env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
        assert r.returncode == 0, (template, r.stderr)
    assert (tmp_path / "steps").read_text().count("started") == 3 + 2  # servers and trainer; then the servers


def test_a_failing_setup_command_ends_the_job_before_any_step(tmp_path):
    """A `module load` of a module the site lacks (or a venv not on the compute nodes): bash went on, every step
    started without it (the servers failing later on a missing library, or running on the wrong one) and the job's
    log alone held the error. Now the job fails there, naming the key; in the driver's (submitit's) script too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho started >> {tmp_path / 'steps'}\n")
    (bin_dir / "srun").chmod(0o755)
    cfg, plan = gpu_plan()
    cfg.cluster.setup_commands = ["export AREAL_TEST_SETUP=1", "false  # module load nosuch", "echo never-reached"]
    plan.run_dir = str(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    submitit_script = slurm_submit.make_executor(cfg, plan, tmp_path)._executor._make_submission_file_text(
        "echo payload-ran", "u")
    scripts = [render(t, cfg, plan) for t in ("allocation.sbatch", "add-servers.sbatch")] + [submitit_script]
    for script in scripts:
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode != 0 and "cluster.setup_commands[1]" in r.stderr, (script, r.stdout, r.stderr)
        assert "never-reached" not in r.stdout and "payload-ran" not in r.stdout, script


def test_a_job_ended_by_its_setup_commands_says_which_line_in_status(tmp_path):
    """The job's failed setup line was named only inside slurm-J.out: `status` and `submit launcher.wait=True` said
    'job 2 ended FAILED before its driver recorded how the run ended', which reads like a crash of the driver."""
    cfg, plan = gpu_plan()
    cfg.cluster.setup_commands = ["module load nosuchmodule"]
    script = slurm_submit.make_executor(cfg, plan, tmp_path)._executor._make_submission_file_text("echo ran", "u")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    (tmp_path / "module").write_text("#!/bin/sh\necho 'no module nosuchmodule' >&2\nexit 3\n")
    (tmp_path / "module").chmod(0o755)
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "slurm-2.out").write_text(r.stdout + r.stderr)
    st = run_state({"mode": "slurm", "job_id": "2", "state": "PENDING"}, {"state": "FAILED"}, tmp_path, False)
    assert st["state"] == "FAILED" and st["log"] == str(tmp_path / "logs" / "slurm-2.out"), st
    assert st["reason"] == ("job 2 ended FAILED before its driver recorded how the run ended: areal-hpc: error: "
                            "cluster.setup_commands[0] failed (exit 3): module load nosuchmodule"), st["reason"]
    assert not (tmp_path / "steps").exists()


def test_wait_finished_ends_at_a_preemption_that_is_not_requeued(monkeypatch):
    """A job preempted without requeue ends PREEMPTED: `submit` with launcher.wait waited for it forever."""
    states = iter(["RUNNING", "PREEMPTED", "PREEMPTED"])
    monkeypatch.setattr(slurm, "job_state", lambda job_id: next(states))
    assert slurm_submit.wait_job("7", running=False, first_s=0) == "PREEMPTED"


def test_wait_running_gives_up_on_a_job_slurm_does_not_know(monkeypatch):
    """A job Slurm never reports (e.g. sent elsewhere with --clusters) was waited for forever, without a word."""
    monkeypatch.setattr(slurm, "job_state", lambda job_id: None)
    assert slurm_submit.wait_job("7", running=True, first_s=0, unknown_s=0) == "UNKNOWN"



def test_wait_job_wakes_only_to_ask_slurm(tmp_path, monkeypatch):
    """`wait_job` woke every 0.1 s while `polled_job_state` asked Slurm at most every few seconds: each wake-up asks."""
    asks, sleeps, real = [], [], slurm.job_state
    monkeypatch.setenv("PATH", str(tmp_path))  # a host without Slurm: the job is not known
    monkeypatch.setattr(slurm, "job_state", lambda job_id: asks.append(job_id) or real(job_id))
    monkeypatch.setattr(slurm_submit, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=lambda s: sleeps.append(s) or time.sleep(s)))
    assert slurm_submit.wait_job("7", running=True, first_s=0.3, unknown_s=2.0) == "UNKNOWN"
    assert len(sleeps) < len(asks) <= 5, (sleeps, asks)

# fix14-P

def test_a_trainer_restart_keeps_the_runs_registry_settings(tmp_path, monkeypatch):
    """A resubmit that restarts the trainer of a live run without the run's `launcher.lock_kind`/TTL: the new trainer
    reads config.yaml, and must lock and expire records as the live servers and driver do (config.yaml took the
    resubmit's, so the new trainer used another lock than the live processes). The resubmit's other overrides apply."""
    import dataclasses

    from areal_hpc.config import load_resolved

    rd, _ = slurm_run(tmp_path, monkeypatch, "RUNNING", {})
    run_cfg = load_resolved(rd / "config.yaml")
    resubmit = dataclasses.replace(run_cfg, min_required_servers=1, launcher=dataclasses.replace(
        run_cfg.launcher, lock_kind="lease", ttl_s=30.0, heartbeat_s=1.0, trainer_wait_servers_timeout_s=123.0))
    assert control.restart_trainer(resubmit, rd, Registry.for_run(rd).get("", "run"), timeout_s=1.0) == 1
    new = load_resolved(rd / "config.yaml")
    assert (new.launcher.lock_kind, new.launcher.ttl_s, new.launcher.heartbeat_s) == ("flock", 60.0, 2.0)
    assert (new.launcher.trainer_wait_servers_timeout_s, new.min_required_servers) == (123.0, 0)


def test_a_step_rendezvous_takes_the_port_slurm_reserved(monkeypatch):
    """Under srun, the ranks' rendezvous port came from the job and step ids only, which another job on the node (or
    any service) may hold; where Slurm reserves ports for the step (MpiParams=ports), the first one is used."""
    from areal_hpc.launch.entry import step_rendezvous

    monkeypatch.setenv("SLURM_STEP_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_STEP_ID", "2")
    monkeypatch.delenv("SLURM_STEP_RESV_PORTS", raising=False)
    addr, derived = step_rendezvous()
    assert addr == "127.0.0.1" and 20000 <= derived < 32768
    for job in range(1000, 1300):  # never in Linux's ephemeral range, which outgoing connections take ports from
        monkeypatch.setenv("SLURM_JOB_ID", str(job))
        assert 20000 <= step_rendezvous()[1] < 32768
    for reserved in ("12000-12003", "12000,12002", "12000"):
        monkeypatch.setenv("SLURM_STEP_RESV_PORTS", reserved)
        assert step_rendezvous() == ("127.0.0.1", 12000)


def test_a_multi_node_step_whose_nodelist_cannot_be_expanded_fails_loudly(monkeypatch):
    """Without `scontrol show hostnames` (not on a node's PATH, slurmctld unreachable), each node of a multi-node
    trainer took its own localhost as the rendezvous and waited 30 minutes, silently."""
    from areal_hpc.launch.entry import step_rendezvous

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[01-02]")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    with pytest.raises(RuntimeError, match="SLURM_STEP_NODELIST=gpu\\[01-02\\]"):
        step_rendezvous()
    monkeypatch.setenv("SLURM_STEP_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "1")  # one node: its own address serves
    assert step_rendezvous()[0] == "127.0.0.1"


def test_a_second_submit_of_a_run_whose_job_is_queued_or_owner_lives_is_refused(tmp_path, monkeypatch):
    """Before its trainer registers (a job queued for hours, servers loading), a run has no trainer record: a second
    `submit` of the same trial queued a second allocation, whose driver later ran beside the first one in the same
    run dir, and run.json forgot the first job (`stop` cancelled only the second). Refused while the recorded job is
    queued or running, or a local owner lives; a run that ended (or whose job did) is submitted again (resumes)."""
    from areal_hpc.launch import submit as submit_mod

    cfg = load_config(None, ["mode=slurm", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             f"cluster.fileroot={tmp_path}", "trainer.ppo.actor.path=toy:qwen3-h128-l2"])
    reg = Registry.for_run(submit_mod.run_dir(cfg), cfg.launcher)
    submitted: List[str] = []
    monkeypatch.setattr(submit_mod, "resolve", lambda cfg: None)
    monkeypatch.setattr(slurm_submit, "submit", lambda cfg, plan, rd: submitted.append(rd) or 0)
    states = {"10": "PENDING"}
    monkeypatch.setattr(slurm, "job_state", lambda job_id: states.get(job_id))
    alloc = parse_allocation(cfg.allocation_mode)
    reg.put("", "run", {"mode": "slurm", "job_id": "10", "pid": None, "host": None, "state": "PENDING"}, ttl=True)
    with pytest.raises(ConfigError, match="job 10 is PENDING"):
        submit_mod.submit(cfg, alloc)
    states["10"] = "RUNNING"  # its driver is starting the servers: no trainer record yet
    with pytest.raises(ConfigError, match="job 10 is RUNNING"):
        submit_mod.submit(cfg, alloc)
    assert submitted == []
    states["10"] = "CANCELLED"
    assert submit_mod.submit(cfg, alloc) == 0 and len(submitted) == 1
    # a local owner still starting its steps
    local = load_config(None, ["mode=local", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                               f"cluster.fileroot={tmp_path}", "trainer.ppo.actor.path=toy:qwen3-h128-l2"])
    reg.put("", "run", {"mode": "local", "pid": os.getpid(), "host": socket.gethostname(), "state": "RUNNING"})
    with pytest.raises(ConfigError, match=f"its owner lives \\(pid {os.getpid()}"):
        submit_mod.submit(local, alloc)


def test_a_dry_run_of_a_live_run_leaves_its_config_alone(tmp_path, monkeypatch):
    """`submit --dry-run` of a trial whose job is queued (or whose trainer runs) rewrote the run's config.yaml and
    plan.json: the queued job's driver, a requeue or a trainer restart then ran the preview's settings (say
    trainer.total_train_steps=5) without a word. Refused, naming the live run; a run that ended is previewed."""
    from areal_hpc.launch import submit as submit_mod

    words = ["mode=slurm", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0", f"cluster.fileroot={tmp_path}",
             "trainer.ppo.actor.path=toy:qwen3-h128-l2"]
    cfg, preview = load_config(None, words), load_config(None, [*words, "trainer.total_train_steps=5"])
    alloc = parse_allocation(cfg.allocation_mode)
    monkeypatch.setattr(submit_mod, "resolve", lambda cfg: None)
    assert submit_mod.submit(cfg, alloc, dry_run=True) == 0
    rd = submit_mod.run_dir(cfg)
    written = (rd / "config.yaml").read_text()
    reg = Registry.for_run(rd, cfg.launcher)
    states = {"10": "PENDING"}
    monkeypatch.setattr(slurm, "job_state", lambda job_id: states.get(job_id))
    reg.put("", "run", {"mode": "slurm", "job_id": "10", "pid": None, "host": None, "state": "PENDING"}, ttl=True)
    with pytest.raises(ConfigError, match="is live \\(job 10 is PENDING\\): a dry run would rewrite"):
        submit_mod.submit(preview, alloc, dry_run=True)
    reg.put("", "trainer", {"pid": 1, "host": "n1"})
    states["10"] = "RUNNING"
    with pytest.raises(ConfigError, match="is live \\(a live trainer\\)"):
        submit_mod.submit(preview, alloc, dry_run=True)
    assert (rd / "config.yaml").read_text() == written
    reg.delete("", "trainer")
    states["10"] = "COMPLETED"
    assert submit_mod.submit(preview, alloc, dry_run=True) == 0 and (rd / "config.yaml").read_text() != written


def test_a_dry_run_that_starts_over_says_a_by_hand_sbatch_would_resume(tmp_path, monkeypatch, capsys):
    """recover.mode=disabled starts over because `submit` sets the trial's checkpoints aside; a restarted trainer then
    resumes from the new run's own. A dry run moves nothing: the sbatch it renders, run by hand, would resume from the
    earlier run's checkpoints, so it says so."""
    from areal_hpc.launch import submit as submit_mod

    cfg = load_config(None, ["mode=slurm", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             f"cluster.fileroot={tmp_path}", "trainer.ppo.actor.path=toy:qwen3-h128-l2",
                             "recover.mode=disabled"])
    monkeypatch.setattr(submit_mod, "resolve", lambda cfg: None)
    assert submit_mod.submit(cfg, parse_allocation(cfg.allocation_mode), dry_run=True) == 0
    assert "by-hand sbatch" not in capsys.readouterr().out  # nothing to resume from
    (submit_mod.run_dir(cfg) / "checkpoints" / "step_00000020").mkdir(parents=True)
    (submit_mod.run_dir(cfg) / "checkpoints" / "step_00000020" / "meta.json").write_text("{}")
    assert submit_mod.submit(cfg, parse_allocation(cfg.allocation_mode), dry_run=True) == 0
    out = capsys.readouterr().out
    assert "a by-hand sbatch of it resumes from the checkpoints" in out and "nothing submitted" in out
    assert (submit_mod.run_dir(cfg) / "checkpoints" / "step_00000020").is_dir()  # moved nowhere


def test_stop_keeps_a_server_job_it_could_not_cancel(tmp_path, monkeypatch, capsys):
    """`stop` cancels the server jobs of `add-servers --new-job`; when scancel failed (slurmctld busy or down) it
    deleted the job's record anyway, without a word: the job ran on to its time limit with its servers, and neither
    `status` nor another `stop` knew of it. The record stays and `stop` says so; the next `stop` cancels the job."""
    rd, calls = slurm_run(tmp_path, monkeypatch, "COMPLETED", {})
    reg = Registry.for_run(rd)
    reg.put("", "run", {**reg.get("", "run"), "state": outcome.COMPLETED})
    reg.delete("servers", "server-0")
    reg.put("jobs", "11", {"job_id": "11", "kind": "servers", "servers": ["server-1"]}, ttl=False)
    monkeypatch.setattr(slurm, "job_state", lambda job_id: "RUNNING" if job_id == "11" else "COMPLETED")
    monkeypatch.setattr(slurm, "job", lambda job_id: {"state": slurm.job_state(job_id)})
    monkeypatch.setattr(slurm, "scancel", lambda job_id, signal_name=None: "Unable to contact slurm controller")
    assert stop(rd, timeout_s=1.0) == 1
    assert "could not cancel server job 11: Unable to contact slurm controller" in capsys.readouterr().err
    assert list(reg.list("jobs", live_only=False)) == ["11"]
    monkeypatch.setattr(slurm, "scancel", lambda job_id, signal_name=None: calls.append(("scancel", job_id)) or "")
    assert stop(rd, timeout_s=1.0) == 0 and ("scancel", "11") in calls and reg.list("jobs", live_only=False) == {}


def test_ctrl_c_while_submit_waits_for_a_slurm_job_says_it_runs_on(tmp_path, monkeypatch, capsys):
    """launcher.wait=True: Ctrl-C while `submit` waits for the job to end left the job running (the driver owns the
    run) but `submit` ended with 130 and not a word, as a local run does once Ctrl-C has stopped it: the researcher
    took the run for stopped while it held its GPUs. It says the job runs on and how to stop it."""
    cfg = load_config(None, ["mode=slurm", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             f"cluster.fileroot={tmp_path}", "launcher.wait=True"])
    rd = tmp_path / "run"
    rd.mkdir()
    plan = build_plan(cfg, parse_allocation(cfg.allocation_mode), rd)
    job = type("Job", (), {"job_id": "5"})()
    monkeypatch.setattr(slurm_submit, "test_allocation", lambda cfg, plan: None)
    executor = type("Executor", (), {"submit": lambda self, driver: job})()
    monkeypatch.setattr(slurm_submit, "make_executor", lambda cfg, plan, rd: executor)
    monkeypatch.setattr(slurm, "job", lambda job_id: {"state": "RUNNING", "nodes": "n1"})

    def wait_job(job_id: str, running: bool) -> str:
        if running:
            return "RUNNING"
        raise KeyboardInterrupt
    monkeypatch.setattr(slurm_submit, "wait_job", wait_job)
    try:
        rc = slurm_submit.submit(cfg, plan, rd)
    except KeyboardInterrupt:  # not to pytest, which would take it for the user's
        pytest.fail("Ctrl-C went through submit without a word")
    assert rc == 130 and "stopped waiting; job 5 runs on (`areal-hpc stop` ends it)" in capsys.readouterr().err


def test_a_multi_node_server_writes_a_log_per_node_and_logs_shows_its_first(tmp_path, capsys):
    """A server across nodes (cluster.multi_node_tp) had one --output file that every node appended to, lines of its
    nodes interleaved in one file on the shared filesystem; now a file per node, and `logs server-0` shows node 0's."""
    words = [w for w in GPU_WORDS if not w.startswith(("allocation_mode=", "cluster.n_nodes="))]
    cfg = load_config(None, [*words, "allocation_mode=sglang:d1t8+fsdp:d4", "cluster.n_nodes=3",
                             "cluster.multi_node_tp=True"])
    plan = build_plan(cfg, parse_allocation(cfg.allocation_mode), GPU_RUN)
    server = plan.servers[0]
    assert server.nodes == 2 and server.log == f"{GPU_RUN}/logs/server-0-%t.log"
    assert f"--output={GPU_RUN}/logs/server-0-%t.log" in srun_argv(server, plan.job_name, [])
    assert plan.trainer.log.endswith("/trainer-%t.log")
    rd = stopped_run(tmp_path, "slurm", 1, {})
    (rd / "logs").mkdir()
    for name, text in (("server-0-0.log", "node 0\n"), ("server-0-1.log", "node 1\n"), ("server-1.log", "one\n")):
        (rd / "logs" / name).write_text(text)
    assert logs(rd, "server-0") == 0 and capsys.readouterr().out == "node 0\n"
    assert logs(rd, "server-1") == 0 and capsys.readouterr().out == "one\n"


def test_logs_of_an_unknown_role_lists_the_roles_it_takes(tmp_path):
    """The "available:" list names what `logs` accepts: `trainer` and `slurm` too, not only the *.log files' names."""
    rd = stopped_run(tmp_path, "slurm", 1, {})
    (rd / "logs").mkdir()
    for name in ("trainer-0.log", "driver.log", "server-0.log", "slurm-10.out"):
        (rd / "logs" / name).write_text("x\n")
    with pytest.raises(ConfigError, match="available: driver, server-0, slurm, trainer, trainer-0"):
        logs(rd, "nope")


@pytest.mark.parametrize("cvd, gpus", [("2,3", [2, 3]), ("GPU-8f6a3c1e-aaaa,GPU-0b1c2d3e-bbbb", [0, 1]),
                                       ("MIG-5c4b3a29-cccc", [0]), ("-1", [])])
def test_visible_gpus_counts_gpus_named_by_uuid_or_mig_name(monkeypatch, cvd, gpus):
    from areal_hpc.launch.entry import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    monkeypatch.setenv("SLURM_STEP_GPUS", "5,6,7")
    assert visible_gpus() == gpus


def test_a_run_dir_with_a_space_is_one_sbatch_value(tmp_path):
    """A space in cluster.fileroot: the rendered --output is quoted (sbatch reads quotes in #SBATCH lines; unquoted it
    took the path up to the space); submitit gets the path itself, and quotes it."""
    import shlex

    from areal_hpc.config import run_dir

    cfg = load_config(None, ["mode=slurm", f"cluster.fileroot={tmp_path}/my runs", "allocation_mode=hf:d1+d1",
                             "cluster.n_gpus_per_node=0"])
    plan = build_plan(cfg, parse_allocation(cfg.allocation_mode), run_dir(cfg))
    want = f"{plan.run_dir}/logs/slurm-%j.out"
    out = next(line for line in sbatch_lines(cfg, plan) if line.startswith("#SBATCH --output="))
    assert " " in want and shlex.split(out[len("#SBATCH --output="):]) == [want]
    executor = slurm_submit.make_executor(cfg, plan, Path(plan.run_dir))
    assert executor._executor.parameters["additional_parameters"]["output"] == want


def test_progress_does_not_trust_file_clocks(tmp_path):
    """A trainer's metrics row whose mtime reads before the owner started it (a coarse file clock under load, or a
    file server's clock behind the batch host's) is still progress: two such restarts are not a crash loop."""
    write = trainer_progresses(tmp_path / "run")

    def on_start(step: StepSpec) -> None:
        write(step)
        if step.role == "trainer":
            os.utime(tmp_path / "run" / "metrics.jsonl", (time.time() - 5, time.time() - 5))
    runner = FakeRunner({"trainer": [1, 1, 1]}, on_start=on_start)
    owner = owner_for(tmp_path, runner, "trainer.max_restarts=2")
    assert owner.run() == 1 and owner.restarts == 2 and "crash loop" not in owner.reason


def test_two_submits_of_one_trial_at_once_do_not_both_submit(tmp_path, monkeypatch):
    """A second submit of the trial ran while the first resolved its model (or at the same instant): both had found
    the run free before either claimed it, and both submitted a job for one run dir. The check and the claim are one
    step under a lock, and a submit under way counts as an owner."""
    from areal_hpc.launch import submit as submit_mod

    cfg = load_config(None, ["mode=slurm", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             f"cluster.fileroot={tmp_path}", "trainer.ppo.actor.path=toy:qwen3-h128-l2"])
    alloc, rd = parse_allocation(cfg.allocation_mode), submit_mod.run_dir(cfg)
    reg = Registry.for_run(rd, cfg.launcher)
    submitted: List[str] = []
    states: Dict[str, str] = {}
    monkeypatch.setattr(slurm, "job_state", lambda job_id: states.get(job_id))

    def slurm_submit_(cfg, plan, rd) -> int:
        job_id = str(10 + len(submitted))
        submitted.append(job_id)
        states[job_id] = "PENDING"
        reg.put("", "run", {"mode": "slurm", "job_id": job_id, "pid": None, "host": None, "state": "PENDING"})
        return 0
    monkeypatch.setattr(slurm_submit, "submit", slurm_submit_)
    resolving = []

    def resolve(cfg) -> None:  # the first submit resolves its model while the second runs all the way
        resolving.append(cfg)
        if len(resolving) == 1:
            assert submit_mod.submit(cfg, alloc) == 0
    monkeypatch.setattr(submit_mod, "resolve", resolve)
    with pytest.raises(ConfigError, match="is submitted already: job 10 is PENDING"):
        submit_mod.submit(cfg, alloc)
    assert submitted == ["10"] and reg.get("", "submit") is None
    states["10"] = "COMPLETED"  # a submit under way, on this host (or heartbeating elsewhere), owns the run
    reg.put("", "submit", {"pid": os.getppid(), "host": socket.gethostname()})
    with pytest.raises(ConfigError, match=f"a submit of it runs \\(pid {os.getppid()}"):
        submit_mod.submit(cfg, alloc)
    assert submitted == ["10"]


def test_usr2_without_requeue_ends_the_job_cancelled(tmp_path, monkeypatch):
    """launcher.requeue_on_preemption=False, USR2 (time limit, preemption): the run said STOPPED, but submitit's payload
    returned no requeue, so submitit raised through the driver, which skipped the scancel a stopped run's job gets:
    the job ended FAILED (a hand-started driver's SystemExit too). Slurm agrees with the run: the job is cancelled."""
    owner = owner_for(tmp_path, FakeRunner({}), "launcher.requeue_on_preemption=False")
    (owner.run_dir / "config.yaml").write_text(dump_yaml(owner.cfg))
    (owner.run_dir / "plan.json").write_text(owner.plan.to_json())
    cancelled: List[str] = []
    monkeypatch.setattr(slurm, "scancel", lambda target, signal_name=None: cancelled.append(target) or "")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # USR2 is submitit's to handle

    def usr2_while_running(self, on_tick=None) -> int:  # submitit asks the payload, which does not requeue: it raises
        assert slurm_submit.Driver(str(self.run_dir)).checkpoint() is None and self.state == outcome.STOPPED
        raise RuntimeError("Job not requeued because: checkpoint function returned None.")
    monkeypatch.setattr(driver.RunOwner, "run", usr2_while_running)
    with pytest.raises(RuntimeError, match="not requeued"):
        driver.main(owner.run_dir)
    assert cancelled == ["42"]


def test_a_local_owner_that_recorded_its_end_owns_the_run_until_a_ttl_later(tmp_path, monkeypatch):
    """A local owner has recorded how the run ended and not exited yet: `submit` took the run as free (a second owner
    would start, whose record the first overwrites with its last beat), while `stop` waited for it, also when the
    record was old and the pid another process's. One rule for both (`status.why_owned`): the process owns the run
    until a TTL after its end record."""
    from areal_hpc.launch import local as local_mod
    from areal_hpc.launch import submit as submit_mod

    cfg = load_config(None, ["mode=local", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             f"cluster.fileroot={tmp_path}", "trainer.ppo.actor.path=toy:qwen3-h128-l2"])
    alloc, rd = parse_allocation(cfg.allocation_mode), submit_mod.run_dir(cfg)
    monkeypatch.setattr(submit_mod, "resolve", lambda cfg: None)
    monkeypatch.setattr(local_mod, "run", lambda cfg, plan, rd, runner=None: 0)
    assert submit_mod.submit(cfg, alloc) == 0
    reg = Registry.for_run(rd, cfg.launcher)
    reg.put("", "run", {"mode": "local", "pid": os.getpid(), "host": socket.gethostname(), "state": "COMPLETED"})
    with pytest.raises(ConfigError, match=f"its owner lives \\(pid {os.getpid()}"):
        submit_mod.submit(cfg, alloc)
    long_ago = time.time() - 2 * reg.ttl_s
    os.utime(reg.path("", "run"), (long_ago, long_ago))
    assert stop(rd, timeout_s=1.0) == 0  # no owner to wait for: nothing left to stop
    assert submit_mod.submit(cfg, alloc) == 0


def test_a_slurm_controller_that_does_not_answer_is_no_rejection():
    """`submit` with slurmctld down said 'cluster: Slurm rejected the allocation: Unable to contact slurm controller
    (connect failure)' and pointed at sinfo/partitions, as if the config asked for what the cluster lacks."""
    cfg = ExperimentConfig()
    err = str(slurm_submit.rejection(cfg, "sbatch: error: Batch job submission failed: Unable to contact slurm "
                                          "controller (connect failure)"))
    assert "Slurm did not answer: Unable to contact slurm controller" in err and "rejected" not in err, err
    assert "scontrol ping" in err, err
    assert "rejected the allocation: Invalid partition" in str(slurm_submit.rejection(
        cfg, "sbatch: error: Batch job submission failed: Invalid partition name specified"))
