"""mode=torchrun: servers as local processes, the trainer under torchrun's elastic agent (real
processes, the real CLI)."""

import glob
import json
import os
import signal
import subprocess
import sys

from helpers import wait_until
from test_e2e_local import QUICKSTART, SMALL, metrics, run_dir, submit, wait_for_steps

from areal_hpc.config import load_config
from areal_hpc.launch.plan import StepSpec
from areal_hpc.launch.torchrun import TorchrunRunner
from areal_hpc.registry import pid_alive


def test_quickstart_learns_under_torchrun(tmp_path):
    submit(tmp_path, "mode=torchrun", "trainer.total_train_steps=80", "saver.freq_steps=0", timeout=900)
    rd = run_dir(tmp_path)
    r = [x["reward_mean"] for x in metrics(rd)]
    first, last = sum(r[:10]) / 10, sum(r[-10:]) / 10
    assert last > first + 0.1, (first, last)
    assert "started trainer: {'torchrun_pid':" in (rd / "logs" / "driver.log").read_text()  # under the agent


def test_a_killed_trainer_rank_is_restarted_by_the_elastic_agent(tmp_path):
    """Two ranks under torchrun; one is SIGKILLed: the agent restarts both, they resume from the last
    checkpoint (no step lost or repeated), the server is untouched and the owner restarts nothing."""
    total = 24
    owner = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                              "stats.progress_bar=False", "mode=torchrun", "allocation_mode=hf:d1+d2", *SMALL[:-1],
                              "saver.freq_steps=3", f"trainer.total_train_steps={total}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        rd = wait_for_steps(tmp_path, 5)
        server = json.loads((rd / "registry" / "servers" / "server-0.json").read_text())["pid"]
        os.kill(json.loads((rd / "registry" / "trainer.json").read_text())["pid"], signal.SIGKILL)  # rank 0
        out, _ = owner.communicate(timeout=600)
        assert owner.returncode == 0, out
    finally:
        if owner.poll() is None:
            owner.kill()
    assert [m["step"] for m in metrics(rd)] == list(range(1, total + 1))  # contiguous across the restart
    trainer_log = (rd / "logs" / "trainer-0.log").read_text()
    assert "recovered from checkpoint: step" in trainer_log
    assert "failed (exitcode: -9)" in (rd / "logs" / "torchrun.log").read_text()
    run = json.loads((rd / "registry" / "run.json").read_text())
    assert run["state"] == "COMPLETED" and run["trainer_restarts"] == 0  # the agent restarted it, not the owner
    driver = (rd / "logs" / "driver.log").read_text()
    assert driver.count("started server-0") == 1 and f"'pids': [{server}]" in driver  # one server, never restarted


def test_a_killed_trainer_step_leaves_no_rank_behind(tmp_path):
    """SIGKILL (what the owner sends a trainer that does not stop on SIGTERM) reaches torchrun's ranks too: the agent
    starts each in a session of its own, outside the agent's process group, where killing the group missed them."""
    cfg = load_config(QUICKSTART, ["mode=torchrun", f"cluster.fileroot={tmp_path}"])
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    step = StepSpec("trainer", "trainer", nodes=1, ntasks=2, ntasks_per_node=2, gpus_per_task=0, cpus_per_task=1,
                    mem_per_node_mb=0, relative_node=0, command=[sys.executable, "-c", deaf],
                    log=str(tmp_path / "logs" / "trainer-%t.log"))
    handle = TorchrunRunner(cfg).start(step, [])
    ranks = wait_until(lambda: handle.info()["pids"] if len(handle.info()["pids"]) == 2 else None, 120, "two ranks")
    try:
        handle.signal(signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(pid) for pid in ranks), 60, "the ranks to end")
    finally:
        for pid in ranks:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_stops_the_torchrun_trainer_at_its_checkpoint(tmp_path):
    """Ctrl-C: the ranks checkpoint and exit, and the run ends STOPPED (130) at that checkpoint. The ranks' exit code of
    a stop (130) was a failure to the elastic agent, which restarted them: they trained on until killed 60 s later,
    past the checkpoint the run said it resumes from."""
    owner = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                              "stats.progress_bar=False", "mode=torchrun", *SMALL, "trainer.total_train_steps=100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        rd = wait_for_steps(tmp_path, 3)
        owner.send_signal(signal.SIGINT)
        out, _ = owner.communicate(timeout=50)  # within the owner's 60 s grace: no SIGKILL
    finally:
        if owner.poll() is None:
            owner.kill()
    assert owner.returncode == 130, out
    run = json.loads((rd / "registry" / "run.json").read_text())
    assert run["state"] == "STOPPED" and "SIGKILL" not in run["reason"], run
    last = metrics(rd)[-1]["step"]
    assert f"at step {last}; resumes from checkpoint step_{last:08d}" in run["reason"], run
    assert "recovered from checkpoint" not in (rd / "logs" / "trainer-0.log").read_text()  # not restarted


def test_a_rank_killed_by_a_signal_is_reported_so_under_torchrun(tmp_path):
    """trainer.max_restarts=0, rank 0 SIGKILLed (as by the OOM killer): the run ends FAILED saying so. The agent exits 1
    whatever ended its ranks, and the run said 'trainer exited with 1' and the other rank's lost connection."""
    owner = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                              "stats.progress_bar=False", "mode=torchrun", "allocation_mode=hf:d1+d2", *SMALL,
                              "trainer.max_restarts=0", "trainer.total_train_steps=100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        rd = wait_for_steps(tmp_path, 3)
        os.kill(json.loads((rd / "registry" / "trainer.json").read_text())["pid"], signal.SIGKILL)  # rank 0
        out, _ = owner.communicate(timeout=120)
    finally:
        if owner.poll() is None:
            owner.kill()
    assert owner.returncode == 1, out
    run = json.loads((rd / "registry" / "run.json").read_text())
    assert run["state"] == "FAILED" and run["reason"].startswith("trainer killed by SIGKILL"), run


def test_a_killed_agent_leaves_no_rank_behind(tmp_path):
    """torchrun's agent SIGKILLed (`kill -9` of the torchrun pid `status` shows, the OOM killer): its ranks, each in a
    session of its own, kept training as orphans after the step ended and the run was FAILED."""
    cfg = load_config(QUICKSTART, ["mode=torchrun", f"cluster.fileroot={tmp_path}"])
    step = StepSpec("trainer", "trainer", nodes=1, ntasks=2, ntasks_per_node=2, gpus_per_task=0, cpus_per_task=1,
                    mem_per_node_mb=0, relative_node=0, command=[sys.executable, "-c", "import time; time.sleep(600)"],
                    log=str(tmp_path / "logs" / "trainer-%t.log"))
    handle = TorchrunRunner(cfg).start(step, [])
    ranks = wait_until(lambda: handle.info()["pids"] if len(handle.info()["pids"]) == 2 else None, 120, "two ranks")
    try:
        handle.poll()
        os.kill(handle.procs[0].pid, signal.SIGKILL)
        assert wait_until(lambda: handle.poll(), 30, "the agent's end") == -signal.SIGKILL
        wait_until(lambda: not any(pid_alive(pid) for pid in ranks), 30, "the ranks to end")
    finally:
        for pid in ranks:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_to_the_agent_from_outside_stops_the_run(tmp_path):
    """`kill <torchrun_pid>` (the pid `status` shows): the agent passes SIGTERM to the ranks, which checkpoint, and
    exits 1 on the signal; the run ends STOPPED (130) as one whose trainer got SIGTERM from outside does. It ended
    FAILED: 'trainer exited with 1: ...SignalException: Process N got signal: 15'."""
    owner = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                              "stats.progress_bar=False", "mode=torchrun", *SMALL, "trainer.total_train_steps=100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        rd = wait_for_steps(tmp_path, 3)
        run = json.loads((rd / "registry" / "run.json").read_text())
        os.kill(run["steps"]["trainer"]["torchrun_pid"], signal.SIGTERM)
        out, _ = owner.communicate(timeout=120)
    finally:
        if owner.poll() is None:
            owner.kill()
    run = json.loads((rd / "registry" / "run.json").read_text())
    assert owner.returncode == 130 and run["state"] == "STOPPED", (out, run)
    assert "stopped by a signal from outside" in run["reason"], run


def test_stop_of_a_torchrun_run_checkpoints_and_leaves_nothing(tmp_path):
    """`areal-hpc stop` (a request through the run's registry, which the owner passes to the ranks): both ranks
    checkpoint and exit, the agent ends without restarting them, the run ends STOPPED (130) at that checkpoint with no
    process of it left. Untested: only Ctrl-C and a SIGTERM to the agent were."""
    owner = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                              "stats.progress_bar=False", "mode=torchrun", "allocation_mode=hf:d1+d2", *SMALL,
                              "trainer.total_train_steps=100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    pids: list = []
    try:
        rd = wait_for_steps(tmp_path, 3)
        run = json.loads((rd / "registry" / "run.json").read_text())
        agent = run["steps"]["trainer"]["torchrun_pid"]
        server = json.loads((rd / "registry" / "servers" / "server-0.json").read_text())["pid"]
        ranks = [int(c) for f in glob.glob(f"/proc/{agent}/task/*/children") for c in open(f).read().split()]
        pids = [agent, server, *ranks]
        assert len(ranks) == 2 and all(pid_alive(p) for p in pids), (ranks, pids)
        stop = subprocess.run([sys.executable, "-m", "areal_hpc", "stop", f"cluster.fileroot={tmp_path}",
                               "experiment_name=quickstart", "trial_name=run0", "--timeout", "120"],
                              capture_output=True, text=True, timeout=180, cwd=tmp_path)
        out, _ = owner.communicate(timeout=60)
    finally:
        if owner.poll() is None:
            owner.kill()
        left = [p for p in pids if pid_alive(p)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert stop.returncode == 0 and "run STOPPED: stop requested (areal-hpc stop) at step" in stop.stdout, stop
    assert owner.returncode == 130 and "run STOPPED" in out, out
    assert left == [], f"left running: {left} of agent, server, ranks {pids}"
    run = json.loads((rd / "registry" / "run.json").read_text())
    last = metrics(rd)[-1]["step"]
    assert run["state"] == "STOPPED", run
    assert f"at step {last}; resumes from checkpoint step_{last:08d}" in run["reason"], run
    assert (rd / "checkpoints" / f"step_{last:08d}").is_dir()
    assert "recovered from checkpoint" not in (rd / "logs" / "trainer-0.log").read_text()  # the agent restarted none
