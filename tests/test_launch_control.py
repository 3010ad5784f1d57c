"""The launch runtime (control commands, owner, status, local runner, location checks): bugs of the eleventh review,
each shown by its test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import types
from pathlib import Path
from typing import List, Optional

import pytest
from helpers import run, wait_until
from test_launch_runtime import Ended, local_cfg, owner_of

from areal_hpc.cli.main import main as cli_main
from areal_hpc.config import ConfigError, check_location, dump_yaml, load_config, parse_allocation
from areal_hpc.launch import control, slurm, status
from areal_hpc.launch.local import ProcessRunner
from areal_hpc.launch.owner import Runner, StepHandle
from areal_hpc.launch.plan import StepSpec, build_plan
from areal_hpc.registry import Registry


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def busy_owner(tmp_path: Path):
    """A run's owner alive (this process) that does not serve requests yet (busy starting a step, say)."""
    owner = owner_of(tmp_path)
    owner.registry.put("", "run", {"mode": "local", "pid": os.getpid(), "host": socket.gethostname(),
                                   "state": "RUNNING"})
    return owner


def test_an_add_servers_given_up_is_not_served_later(tmp_path, monkeypatch):
    """`add-servers` posts its request and waits; the user gives up (Ctrl-C), or the wait times out, before the busy
    owner got to it: the owner started the servers later anyway, behind the user's back. The request is withdrawn."""
    owner = busy_owner(tmp_path)
    assert control.add_servers(owner.run_dir, 1, timeout_s=0.5) == 1  # timed out
    owner.handle_requests()
    assert owner.servers == {}

    def ctrl_c(_s: float) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(control, "time", types.SimpleNamespace(time=time.time, time_ns=time.time_ns,
                                                               monotonic=time.monotonic, sleep=ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        control.add_servers(owner.run_dir, 1)
    owner.handle_requests()
    assert owner.servers == {} and owner.registry.list("requests", live_only=False) == {}


@pytest.fixture
def running_job(slurm_cluster):
    """The id of a real Slurm job that runs (a driver's, as far as `restart_trainer` asks Slurm)."""
    job_id = run("sbatch", "--parsable", "--wrap", "sleep 300").strip().split(";")[0]
    try:
        wait_until(lambda: slurm.job_state(job_id) == "RUNNING", 120, f"job {job_id} to run")
        yield job_id
    finally:
        slurm.scancel(job_id)


@pytest.mark.slurm
def test_a_trainer_restart_does_not_take_the_old_trainers_record_for_the_new_one(tmp_path, capsys, running_job):
    """`submit ... min_required_servers=N` on a live Slurm run: a trainer killed a moment ago left its record (alive
    until its TTL), and the restart declared "trainer started" at once, before the driver had even read the request.
    Only a trainer of a step the driver started for the request counts; a restart given up leaves no request."""
    cfg = local_cfg(tmp_path, "launcher.ttl_s=60")
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "config.yaml").write_text(dump_yaml(cfg))
    reg = Registry.for_run(rd, cfg.launcher)
    driver = {"mode": "slurm", "job_id": running_job, "pid": os.getpid(), "host": socket.gethostname(),
              "state": "RUNNING", "steps": {"trainer": {"slurm_step_id": "3"}}, "trainer_rc": -9}
    reg.put("", "run", driver)
    reg.put("", "trainer", {"pid": dead_pid(), "host": socket.gethostname(), "step": 5})  # the killed trainer's
    assert control.restart_trainer(cfg, rd, driver, timeout_s=1.0) == 1
    assert "no trainer registered within 1s" in capsys.readouterr().err
    assert reg.list("requests", live_only=False) == {}


class Running(Ended):
    """A step that runs until signalled."""

    rc: Optional[int] = None

    def poll(self) -> Optional[int]:
        return self.rc

    def signal(self, sig: int) -> None:
        self.rc = -int(sig)


class RunningRunner(Runner):
    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        return Running(step)


def test_a_trainer_restart_while_the_trainer_runs_is_refused(tmp_path):
    """A start_trainer request while the run's trainer still runs (it had not registered yet, so `submit` let it
    through): the owner ignored it without a word, and the restart waited out its timeout, or took the running
    trainer's record for the one it asked for. It is refused, saying why."""
    owner = owner_of(tmp_path)
    owner.runner = RunningRunner()
    owner.start_step(owner.plan.trainer)
    name = control.post_request(owner.registry, "start_trainer", 60.0)
    owner.handle_requests()
    assert control.take_reply(owner.registry, name) == {"error": "a trainer is running already",
                                                        "_age_s": pytest.approx(0, abs=5)}


def test_status_keeps_a_server_of_another_host_whose_heartbeat_is_fresh(tmp_path):
    """A local run with a server started by hand (`serve`) on another host: `status` judged it by its pid on THIS host,
    called it dead, and `stop` (remove_dead_records) deleted the record of a live server."""
    owner = busy_owner(tmp_path)
    elsewhere = {"external": True, "node": "node-9", "host": "10.9.9.9", "pid": dead_pid(), "address": "127.0.0.1:1",
                 "state": "ready"}
    owner.registry.put("servers", "ext-0", elsewhere)
    assert [s["id"] for s in status.collect_status(owner.run_dir)["servers"]] == ["ext-0"]
    status.remove_dead_records(owner.registry, owner.registry.get("", "run"))
    assert owner.registry.get("servers", "ext-0") is not None


def test_stop_stops_the_servers_of_a_local_run_started_inside_a_slurm_job(tmp_path, monkeypatch):
    """`submit mode=local` inside an sbatch job: its servers inherited the job's environment and recorded its node
    name (SLURMD_NODENAME) as theirs; serving on an address (server.host=127.0.0.1), `stop` after the owner had gone
    found no server of this host and left them running ("not ours to kill from here")."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    cfg = local_cfg(tmp_path, "server.model_path=toy:qwen3-h128-l2", "server.host=127.0.0.1", "launcher.ttl_s=30")
    rd = tmp_path / "run"
    (rd / "logs").mkdir(parents=True)
    (rd / "config.yaml").write_text(dump_yaml(cfg))
    plan = build_plan(cfg, parse_allocation(cfg.allocation_mode), rd)
    server = ProcessRunner(cfg).start(plan.servers[0], [])
    reg = Registry.for_run(rd, cfg.launcher)
    try:
        wait_until(lambda: (reg.get("servers", "server-0") or {}).get("state") == "ready" or server.poll() is not None,
                   120, "server-0 to serve")
        assert server.poll() is None, (rd / "logs" / "server-0.log").read_text()[-3000:]
        reg.put("", "run", {"mode": "local", "pid": dead_pid(), "host": socket.gethostname(), "state": "COMPLETED"})
        assert control.stop(rd, timeout_s=30.0) == 0
        wait_until(lambda: server.poll() is not None, 30, "server-0 to exit")
    finally:
        server.signal(signal.SIGKILL)


def test_a_symlinked_fileroot_is_measured_where_it_points(tmp_path):
    """cluster.fileroot a symlink: its length was measured as written, so a short link to a deep directory passed and
    the run failed at its first write (File name too long); a symlink loop was a traceback (RuntimeError), not
    bad input (exit 2)."""
    deep = tmp_path.joinpath(*["d" * 250] * 15)
    deep.mkdir(parents=True)
    (tmp_path / "short").symlink_to(deep)
    with pytest.raises(ConfigError, match="too long"):
        check_location(load_config(None, [f"cluster.fileroot={tmp_path / 'short'}"]))
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert cli_main(["status", f"cluster.fileroot={tmp_path / 'a' / 'x'}"]) == 2


@pytest.mark.slurm
def test_an_add_servers_given_up_cancels_the_job_it_submitted_unless_its_servers_joined(tmp_path, capsys, monkeypatch,
                                                                                       slurm_cluster):
    """`add-servers --new-job` (or the part of a partial add the allocation has no room for) submits a job of servers;
    a timeout or Ctrl-C left it queued, and its servers joined the run later, behind the user's back. A job none of
    whose servers joined is cancelled; one whose servers joined is the run's, kept. The message says which."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert cli_main(["submit", str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"), "mode=slurm",
                     "cluster.partition=debug", "cluster.time=00:05:00", "cluster.sbatch_args=[--hold]", "--dry-run",
                     *names]) == 0, capsys.readouterr().err
    rd = next(tmp_path.glob("*/e1/t1"))
    reg = Registry.for_run(rd)

    def given_up(join: bool) -> tuple:
        capsys.readouterr()
        if join:  # its server registers (still loading) before the wait ends
            monkeypatch.setattr(slurm, "polled_job_state", lambda job_id: lambda: reg.put(
                "servers", reg.get("jobs", job_id)["servers"][0], {"state": "loading"}, ttl=False))
        assert control.add_servers(rd, 1, new_job=True, timeout_s=1.0) == 1
        out, err = capsys.readouterr()
        return out.split("submitted job ")[1].split()[0], err

    job_id, err = given_up(join=False)  # timed out
    assert f"cancelled job {job_id}: its servers had not joined the run" in err and reg.list("jobs") == {}
    wait_until(lambda: slurm.job_state(job_id) == "CANCELLED", 60, f"job {job_id} to be cancelled")
    job_id, err = given_up(join=True)
    try:
        assert f"job {job_id} is kept: its server(s) {reg.get('jobs', job_id)['servers'][0]} joined the run" in err
        assert slurm.job_state(job_id) == "PENDING" and list(reg.list("jobs")) == [job_id]
    finally:
        slurm.scancel(job_id)


def test_a_trainer_started_by_request_is_not_reported_as_the_dead_one(tmp_path):
    """shutdown_server_on_exit=False: the trainer died, the driver kept the servers (run RUNNING, reason 'trainer
    exited with 137 ...'); `submit ... min_required_servers=1` started a new one, yet `status` went on saying the
    trainer had exited (with the dead one's log) while the new one trained. The run's reason says it started again."""
    owner = owner_of(tmp_path)
    owner.runner = RunningRunner()
    owner.set_state("RUNNING", "trainer exited with 137 (SIGKILL?); servers stay up", str(tmp_path / "trainer-0.log"))
    name = control.post_request(owner.registry, "start_trainer", 60.0, min_required_servers=1)
    owner.handle_requests()
    assert control.take_reply(owner.registry, name) is None and owner.trainer is not None
    assert (owner.state, owner.log_path) == ("RUNNING", None) and "137" not in (owner.reason or "")


def test_the_follow_hint_says_where_a_log_role_goes(tmp_path, capsys):
    """`submit` (mode=slurm) printed `areal-hpc logs -f NAMES   (trainer; or driver, server-0, slurm)`: a user who
    added the role after the names, as that reads, got "unexpected argument 'driver'". `logs` takes the role as its
    first word; the hint shows it there, and the command it shows works with a role."""
    from areal_hpc.config import run_dir
    from areal_hpc.launch.slurm_submit import follow_hint

    cfg = load_config(None, [f"cluster.fileroot={tmp_path}", "experiment_name=e", "trial_name=t"])
    rd = run_dir(cfg)
    (rd / "logs").mkdir(parents=True)
    (rd / "config.yaml").write_text(dump_yaml(cfg))
    (rd / "logs" / "driver.log").write_text("the driver's log\n")
    words = next(line for line in follow_hint(cfg).splitlines() if " logs " in line).split("(")[0].split()[1:]
    assert "[ROLE]" in words, words
    argv = ["driver" if w == "[ROLE]" else w for w in words if w != "-f"]  # -f would follow forever
    assert cli_main(argv) == 0 and capsys.readouterr().out == "the driver's log\n"


# r2-a: launch bugs of the twelfth review

def test_a_second_stop_right_after_the_first_forces_it(tmp_path):
    """A second `stop` before the owner's next heartbeat: the owner had taken the first (it stops), but run.json did
    not say "stopping" yet, so the second posted a plain stop, taken as the first one again: nothing was forced
    (README: a second `stop` forces it). A stop request to a stopping run forces it."""
    owner = busy_owner(tmp_path)
    control.post_request(owner.registry, "stop", 60.0)  # the first `stop`
    owner.handle_requests()
    assert owner.stopping and not owner.force and not owner.registry.get("", "run").get("stopping")
    assert control.stop(owner.run_dir, timeout_s=0.3) == 1  # the second: the busy owner does not answer in time
    owner.handle_requests()
    assert owner.force



def test_a_second_stop_says_it_forces_the_stop_whatever_run_json_said(tmp_path, capsys):
    """A second `stop` before the owner's heartbeat said "stopping": the owner forced the stop (killed what was left),
    but `stop` printed nothing of it (it said "forcing it" only when run.json said stopping). It says so now."""
    owner = busy_owner(tmp_path)
    control.post_request(owner.registry, "stop", 60.0)  # the first `stop`
    owner.handle_requests()
    capsys.readouterr()
    serving = threading.Thread(target=lambda: wait_until(lambda: owner.registry.list("requests"), 10, "the request")
                               and owner.handle_requests())
    serving.start()
    control.stop(owner.run_dir, timeout_s=1.0)  # the owner forces it, but never ends here
    serving.join()
    assert owner.force and "a stop is already under way: forcing it" in capsys.readouterr().out

def test_add_servers_does_not_count_a_server_started_by_hand_meanwhile(tmp_path, capsys):
    """While `add-servers` waited for the owner's new server, one started by hand (`serve`, external) registered: it
    was counted as the one asked for ("added 1 server(s): ext-0"), and `add-servers` returned before its own served."""
    owner = busy_owner(tmp_path)
    by_hand = threading.Timer(0.2, owner.registry.put, ("servers", "ext-0", {"state": "ready", "external": True}))
    by_hand.start()
    try:
        assert control.add_servers(owner.run_dir, 1, timeout_s=1.0) == 1  # the owner never started one
    finally:
        by_hand.cancel()
    assert "timed out" in capsys.readouterr().err


def test_status_says_a_server_still_starting_is_starting(tmp_path, capsys):
    """Just submitted: a server registers before its backend answers (SGLang loads for minutes). `status` said it was
    UNHEALTHY (it is starting, and says so in its record): the user took a run coming up for a broken one."""
    owner = busy_owner(tmp_path)
    here = socket.gethostname()
    owner.registry.put("servers", "server-0", {"address": "127.0.0.1:1", "backend": "hf", "weight_version": 0,
                                               "pid": os.getpid(), "node": here, "host": here, "state": "starting"})
    assert status.status(owner.run_dir) == 0
    out = capsys.readouterr().out
    assert "starting" in out.split("server-0")[1] and "UNHEALTHY" not in out, out
    st = status.collect_status(owner.run_dir)
    assert st["servers"][0]["state"] == "starting"


def test_status_of_a_run_stopping_says_it_stops(tmp_path, capsys):
    """`stop` posted; the trainer checkpoints (minutes for a large model), then the servers go: `status` said `RUNNING`
    and nothing else, as if the stop had not been heard (a user stops again: that forces it, no checkpoint)."""
    owner = busy_owner(tmp_path)
    owner.registry.update("", "run", lambda r: {**r, "stopping": True})
    assert status.status(owner.run_dir) == 0
    assert "state    RUNNING: shutting down" in capsys.readouterr().out
    assert "shutting down" in status.collect_status(owner.run_dir)["reason"]


@pytest.mark.slurm
def test_status_of_a_queued_run_says_why_slurm_holds_it(tmp_path, capsys, slurm_cluster):
    """Just submitted, the job queued: `status` said `PENDING` and not why (Resources and Priority: wait; a reason
    such as PartitionTimeLimit, QOSMaxGRESPerUser or a hold: it never runs unless the user acts). Slurm's reason shows."""
    cfg = local_cfg(tmp_path)
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "config.yaml").write_text(dump_yaml(cfg))
    job_id = run("sbatch", "--parsable", "--hold", "--wrap", "sleep 300").strip().split(";")[0]
    try:
        Registry.for_run(rd, cfg.launcher).put("", "run", {"mode": "slurm", "job_id": job_id, "pid": None,
                                                           "host": None, "state": "PENDING"})
        assert status.status(rd) == 0
        out = capsys.readouterr().out
        assert "state    PENDING: queued: JobHeldUser (Slurm)" in out, out
    finally:
        slurm.scancel(job_id)


def test_status_of_a_running_run_whose_trainer_failed_names_its_log(tmp_path, capsys):
    """The trainer failed and was restarted (or, shutdown_server_on_exit=False on Slurm, waits for a restart by hand
    with its servers up): the run is RUNNING and its record names the failing log, but `status` printed the log only
    for ended runs: the user saw an error line and not where the traceback is."""
    owner = busy_owner(tmp_path)
    log = str(owner.run_dir / "logs" / "trainer-0.log")
    owner.registry.update("", "run", lambda r: {**r, "log": log, "reason": "trainer restarted 1x; last: trainer "
                                                "exited with 1: KeyError: 'prompt'", "trainer_restarts": 1})
    assert status.status(owner.run_dir) == 0
    assert f"see {log}" in capsys.readouterr().out
