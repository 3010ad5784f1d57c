"""The launch runtime (owner, local runner, control, status): bugs of the ninth pass, each shown by its test."""

from __future__ import annotations

import json
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
from helpers import MODEL_INFO, json_http_server, serve_argv

from areal_hpc.config import dump_yaml, load_config, parse_allocation
from areal_hpc.launch import control, external, local, outcome
from areal_hpc.launch.local import ProcessRunner, spawn
from areal_hpc.launch.owner import Runner, RunOwner, StepHandle
from areal_hpc.launch.plan import StepSpec, build_plan
from areal_hpc.registry import Registry


def local_cfg(tmp_path: Path, *words: str):
    return load_config(None, ["mode=local", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                              f"cluster.fileroot={tmp_path}", "launcher.heartbeat_s=0.2", *words])


class Ended(StepHandle):
    """A step that has ended with exit code 0."""

    def __init__(self, step: StepSpec):
        self.step = step

    def poll(self) -> Optional[int]:
        return 0

    def signal(self, sig: int) -> None:
        pass


class EndedRunner(Runner):
    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        return Ended(step)


def owner_of(tmp_path: Path, *words: str) -> RunOwner:
    cfg = local_cfg(tmp_path, *words)
    rd = tmp_path / "run"
    (rd / "logs").mkdir(parents=True, exist_ok=True)
    (rd / "config.yaml").write_text(dump_yaml(cfg))
    return RunOwner(cfg, build_plan(cfg, parse_allocation(cfg.allocation_mode), rd), rd, EndedRunner(), mode="local")


def test_a_rank_that_fails_to_start_leaves_no_rank_running(tmp_path, monkeypatch):
    """Rank 1 of a 2-rank step cannot start (its log cannot be opened): the step's start fails, and rank 0, started
    already, is killed; it ran on (waiting for a rank that never came) after the start failed."""
    started: List[subprocess.Popen] = []
    monkeypatch.setattr(local, "spawn", lambda *a, **kw: started.append(spawn(*a, **kw)) or started[-1])
    (tmp_path / "logs" / "trainer-1.log").mkdir(parents=True)  # a directory: rank 1's log cannot be opened
    step = StepSpec(role="trainer", name="trainer", nodes=1, ntasks=2, ntasks_per_node=2, gpus_per_task=0,
                    cpus_per_task=1, mem_per_node_mb=0, relative_node=0, log=str(tmp_path / "logs" / "trainer-%t.log"),
                    command=["sleep", "60"])
    try:
        with pytest.raises(IsADirectoryError):
            ProcessRunner(local_cfg(tmp_path)).start(step, [])
        assert len(started) == 1 and started[0].poll() is not None
    finally:
        for p in started:
            p.kill()


def test_a_stop_given_up_with_a_second_ctrl_c_does_not_stop_a_later_run(tmp_path, monkeypatch):
    """`areal-hpc stop`, Ctrl-C (it forces the stop), Ctrl-C again (it gives up waiting), while the run's owner does
    not answer: its stop requests stayed in the registry, valid for two minutes, and the next `submit` of the trial
    stopped at once. They stay for the owner they were for; a later owner drops them."""
    owner = owner_of(tmp_path)
    owner.registry.put("", "run", {"mode": "local", "pid": os.getpid(), "host": socket.gethostname(),
                                   "state": "RUNNING"})  # an owner alive that does not serve requests (busy)

    def ctrl_c(_s: float) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(control, "time", types.SimpleNamespace(time=time.time, time_ns=time.time_ns,
                                                               monotonic=time.monotonic, sleep=ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        control.stop(owner.run_dir, timeout_s=30.0)
    assert [r.get("force") for _, r in sorted(owner.registry.list("requests").items())] == [False, True]
    assert owner.run() == 0 and owner.state == outcome.COMPLETED


def test_a_stopped_runs_reason_names_its_checkpoint_as_it_is_on_disk(tmp_path):
    """The trainer writes checkpoints/step_00000005; a stopped run said "resumes from checkpoint step_5". It named
    step_00000007 too, a checkpoint whose writer died before its meta.json (the trainer resumes from the last complete
    one)."""
    owner = owner_of(tmp_path)
    (owner.run_dir / "checkpoints" / "step_00000005").mkdir(parents=True)
    (owner.run_dir / "checkpoints" / "step_00000005" / "meta.json").write_text("{}")
    (owner.run_dir / "checkpoints" / "step_00000007").mkdir()
    owner.request_stop()
    assert owner.run() == outcome.exit_code(outcome.STOPPED)
    assert owner.reason.endswith("resumes from checkpoint step_00000005"), owner.reason
    assert (owner.run_dir / "checkpoints" / owner.reason.rsplit(" ", 1)[1]).is_dir()


def test_an_attach_that_loads_the_weights_again_returns_the_version_it_loaded(tmp_path):
    """A trainer publishes while `add-servers url=` has the server load the run's weights: the attach loads the newer
    ones too, and its record says so; the record it returned (and printed) still had the older version."""
    reg = Registry(tmp_path / "registry", ttl_s=60)
    reg.put("weights", "latest", {"path": str(tmp_path / "v1"), "version": 1}, ttl=False)

    def respond(method, path, body):
        if method == "POST":  # /update_weights_from_disk; version 2 is published meanwhile
            reg.put("weights", "latest", {"path": str(tmp_path / "v2"), "version": 2}, ttl=False)
            return 200, {"success": True}
        return 200, MODEL_INFO

    with json_http_server(respond) as port:
        sid, rec = external.attach(reg, f"http://127.0.0.1:{port}")
    assert reg.get("servers", sid)["weight_version"] == 2 and rec["weight_version"] == 2


class Stubborn(Ended):
    """A step that ignores SIGTERM: only SIGKILL ends it."""

    rc: Optional[int] = None

    def poll(self) -> Optional[int]:
        return self.rc

    def signal(self, sig: int) -> None:
        if sig == signal.SIGKILL:
            self.rc = -int(sig)


def test_requests_that_come_while_the_owner_shuts_down_are_answered(tmp_path):
    """While the owner waits for its steps to stop (a trainer that ignores SIGTERM gets 60 s), a second `stop` forces
    the stop, and an `add-servers` is refused at once; it was left unanswered until the owner had ended."""
    owner = owner_of(tmp_path)
    owner.runner = types.SimpleNamespace(start=lambda step, running: Stubborn(step), trainer_restarts_itself=False)
    ran = threading.Thread(target=owner.run, daemon=True)
    ran.start()
    control.post_request(owner.registry, "stop", 60.0)
    deadline = time.monotonic() + 10
    while not owner.stopping:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # in its shutdown by now: it waits for the trainer
    added = control.post_request(owner.registry, "add_servers", 60.0, count=1)
    control.post_request(owner.registry, "stop", 60.0, force=True)
    ran.join(timeout=20)
    assert not ran.is_alive() and owner.state == outcome.STOPPED
    assert control.take_reply(owner.registry, added)["error"] == "the run is stopping"


def test_a_server_step_across_nodes_gives_each_task_its_node_rank_and_one_rendezvous(tmp_path):
    """A server spanning nodes (cluster.multi_node_tp: a task a node) starts SGLang with --nnodes, --node-rank and one
    --dist-init-addr on every task; before, each task started a server of its own with the whole --tp-size. The hf
    backend refuses a server across nodes, which shows the values reached it."""
    argv = serve_argv(tmp_path / "run", "server-0", f"cluster.fileroot={tmp_path}", "cluster.n_gpus_per_node=0",
                      "server.model_path=toy:qwen3-h128-l2")
    env = dict(os.environ, SLURM_JOB_ID="41", SLURM_STEP_ID="3", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1",
               SLURM_STEP_NODELIST="localhost")
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "nnodes=2" in res.stdout + res.stderr
