"""A run's lifecycle in mode=local, with the real CLI, servers and trainers: Ctrl-C waits for the
run and prints the summary (a second one forces), a failing trainer fails the run (non-zero exit,
`status` FAILED with the error line and the log), a SIGKILLed trainer is restarted with servers
untouched, a SIGKILLed server's record is removed at once. Plus `outcome`'s error-line reading."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TRAINER_PLUGINS, wait_until

from areal_hpc.launch import outcome
from areal_hpc.registry import Registry
from areal_hpc.trainers.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SMALL = ["rollout.batch_size=8", "rollout.n_samples=4", "stats.progress_bar=False", "launcher.heartbeat_s=1",
         "launcher.ttl_s=8"]


def cli(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal_hpc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def names(tmp_path: Path) -> list:
    return [f"cluster.fileroot={tmp_path}", "experiment_name=quickstart", "trial_name=run0"]


def submit_args(tmp_path: Path, *overrides: str) -> list:
    return [sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}", *SMALL,
            *overrides]


def start(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """`submit` as a user runs it in a terminal: Ctrl-C reaches this process only (its steps run in
    sessions of their own)."""
    return subprocess.Popen(submit_args(tmp_path, *overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)


def rd_of(tmp_path: Path) -> Path:
    return wait_until(lambda: next(tmp_path.glob("*/quickstart/run0"), None), 60, "the run dir")


def step_pids(rd: Path) -> dict:
    """{step name: [pids]} from the owner's log (`started NAME: {'pids': [...]}`), last start wins."""
    out = {}
    for name, pids in re.findall(r"started (\S+): \{'pids': \[([\d, ]+)\]", (rd / "logs" / "driver.log").read_text()):
        out[name] = [int(p) for p in pids.split(",")]
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def status(tmp_path: Path) -> dict:
    return json.loads(cli(tmp_path, "status", "--json", *names(tmp_path)).stdout)


def finish(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            p.communicate(timeout=60)


# ----------------------------------------------------------------------------- outcome (no processes)

def test_error_line_reads_this_attempts_traceback(tmp_path):
    log = tmp_path / "trainer-0.log"
    log.write_text("12:00:00 trainer[0] INFO x: step 1\nTraceback (most recent call last):\n  File \"a.py\"\n"
                   "ValueError: an earlier attempt\n")
    offsets = outcome.log_sizes(str(tmp_path / "trainer-%t.log"))
    assert outcome.error_line(str(tmp_path / "trainer-%t.log")) == ("ValueError: an earlier attempt", str(log))
    with open(log, "a") as f:  # this attempt: killed, no error of its own
        f.write("12:01:00 trainer[0] INFO x: waiting for 1 healthy server(s)\n")
    assert outcome.error_line(str(tmp_path / "trainer-%t.log"), offsets) == (None, str(log))
    (tmp_path / "trainer-1.log").write_text(
        "Traceback (most recent call last):\n  File \"b.py\", line 3, in run\n    raise KeyError('prompt')\n"
        "KeyError: 'prompt'\n")
    assert outcome.error_line(str(tmp_path / "trainer-%t.log"), offsets) == \
        ("KeyError: 'prompt'", str(tmp_path / "trainer-1.log"))
    (tmp_path / "server-0.log").write_text("areal-hpc serve: error: server.port: in use (pick another)\nbye\n")
    assert outcome.error_line(str(tmp_path / "server-0.log"))[0].startswith("areal-hpc serve: error: server.port")



def test_error_line_reads_a_traceback_torch_prefixed_with_the_rank(tmp_path):
    """Once the process group is up, torch prints an uncaught exception as `[rank0]: ...` lines: a trainer that
    raised in a step failed the run as `trainer exited with 1`, without the error line the README promises."""
    (tmp_path / "trainer-0.log").write_text(
        "[rank0]: Traceback (most recent call last):\n[rank0]:   File \"boom.py\", line 6, in train_on\n"
        "[rank0]:     raise RuntimeError(\"boom\")\n[rank0]: RuntimeError: boom\n")
    assert outcome.error_line(str(tmp_path / "trainer-%t.log"))[0] == "RuntimeError: boom"

def test_exit_descriptions_and_codes():
    assert outcome.describe_exit(1) == "exited with 1"
    assert outcome.describe_exit(-9) == "killed by SIGKILL"
    assert outcome.describe_exit(137) == "exited with 137 (SIGKILL?)"
    assert [outcome.exit_code(s) for s in ("COMPLETED", "FAILED", "STOPPED", None)] == [0, 1, 130, 1]


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_waits_for_the_run_prints_the_summary_and_a_resubmit_resumes(tmp_path):
    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0")
    try:
        rd = rd_of(tmp_path)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 2, 300, "2 steps", interval=0.5)
        pids = [q for v in step_pids(rd).values() for q in v]
        assert len(pids) == 2 and all(alive(q) for q in pids)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        # submit returned only once trainer and server had exited, with the summary
        assert not [q for q in pids if alive(q)]
        assert p.returncode == 130, (out, err)
        assert "Ctrl-C: stopping" in err and "run STOPPED: interrupted (Ctrl-C) at step" in out, (out, err)
        assert re.search(r"^stopped: step \d+, reward", out, re.M), out
        reg = Registry.for_run(rd)
        assert reg.list("servers", live_only=False) == {} and reg.get("", "trainer", live_only=False) is None
        st = status(tmp_path)
        assert st["state"] == "STOPPED" and st["servers"] == [] and st["trainer"] is None, st
        stopped_at = read_metrics(rd / "metrics.jsonl")[-1]["step"]
        # an immediate resubmit is not refused, and resumes where the run stopped
        r = subprocess.run(submit_args(tmp_path, f"trainer.total_train_steps={stopped_at + 1}", "saver.freq_steps=0"),
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "run COMPLETED" in r.stdout
        assert f"recovered from checkpoint: step {stopped_at}" in (rd / "logs" / "trainer-0.log").read_text()
        assert [m["step"] for m in read_metrics(rd / "metrics.jsonl")] == list(range(1, stopped_at + 2))
    finally:
        finish(p)


def test_a_second_ctrl_c_forces_the_stop(tmp_path):
    (tmp_path / "plugins.py").write_text(TRAINER_PLUGINS)
    p = start(tmp_path, "trainer.type=stubborn", f"trainer.plugins=[{tmp_path / 'plugins.py'}]")
    try:
        rd = rd_of(tmp_path)
        reg = Registry.for_run(rd)
        wait_until(lambda: reg.get("", "trainer"), 120, "the trainer's record")
        pids = [q for v in step_pids(rd).values() for q in v]
        p.send_signal(signal.SIGINT)
        time.sleep(3)
        assert p.poll() is None  # the trainer ignores the graceful stop: submit waits for it
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert time.monotonic() - t0 < 30  # forced: killed at once, not after the 60 s grace
        assert p.returncode == 130 and "Ctrl-C again: killing" in err, (out, err)
        assert "run STOPPED: interrupted (Ctrl-C)" in out, out
        assert not [q for q in pids if alive(q)]
        assert reg.list("servers", live_only=False) == {} and reg.get("", "trainer", live_only=False) is None
    finally:
        finish(p)


# ----------------------------------------------------------------------------- failures and restarts

def test_a_failing_trainer_fails_the_run(tmp_path):
    (tmp_path / "plugins.py").write_text(TRAINER_PLUGINS)
    r = subprocess.run(submit_args(tmp_path, "trainer.type=boom", f"trainer.plugins=[{tmp_path / 'plugins.py'}]"),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "run FAILED: trainer exited with 1: RuntimeError: boom: this trainer fails on purpose" in r.stderr
    rd = rd_of(tmp_path)
    st = status(tmp_path)
    assert st["state"] == "FAILED" and st["log"] == str(rd / "logs" / "trainer-0.log"), st
    assert "RuntimeError: boom" in st["reason"] and "crash loop" in st["reason"] and st["trainer_restarts"] == 1
    text = cli(tmp_path, "status", *names(tmp_path)).stdout
    assert "state    FAILED: trainer exited with 1: RuntimeError: boom" in text and "see " in text, text


NAN_PLUGIN = """
from areal_hpc.trainers import register_trainer
from areal_hpc.trainers.ppo_trainer import PPOTrainer


@register_trainer("nan-loss")
class NanLoss(PPOTrainer):
    def train_on(self, actor, batch):
        batch["rewards"] = batch["rewards"] * float("nan")  # a NaN loss, every step
        return actor.train_step(batch)
"""


def test_a_loss_that_is_nan_every_step_fails_the_run(tmp_path):
    """Every optimizer step skipped (a non-finite gradient norm) for the whole run: it said COMPLETED, exit 0, with a
    warning per step in the trainer's log only. Now the trainer fails after a bounded number of such steps."""
    (tmp_path / "nan.py").write_text(NAN_PLUGIN)
    r = subprocess.run(submit_args(tmp_path, "trainer.type=nan-loss", f"trainer.plugins=[{tmp_path / 'nan.py'}]",
                                   "trainer.total_train_steps=40", "trainer.max_restarts=0", "saver.freq_steps=0"),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr[-3000:])
    st = status(tmp_path)
    assert st["state"] == "FAILED" and "FloatingPointError" in st["reason"] and "not finite" in st["reason"], st
    assert [m["step"] for m in read_metrics(rd_of(tmp_path) / "metrics.jsonl")][-1] < 40


def test_sigkilled_trainer_restarts_and_a_dead_servers_record_goes(tmp_path):
    p = start(tmp_path, "allocation_mode=hf.d2p1m1+d1p1m1", "trainer.total_train_steps=30", "saver.freq_steps=2")
    try:
        rd = rd_of(tmp_path)
        reg = Registry.for_run(rd)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 3, 300, "3 steps", interval=0.05)
        survivor = reg.get("servers", "server-0")["pid"]
        trainer = reg.get("", "trainer")["pid"]
        os.kill(reg.get("servers", "server-1")["pid"], signal.SIGKILL)
        os.kill(trainer, signal.SIGKILL)  # at once: the run must still be mid-way (30 steps of 20-50 ms)
        # the owner sees the step end and removes the record: status never lists it as live
        wait_until(lambda: reg.get("servers", "server-1", live_only=False) is None, 10, "server-1's record to go")
        assert [s["id"] for s in status(tmp_path)["servers"]] == ["server-0"]
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (out, err)
        assert "run COMPLETED" in out
        assert [m["step"] for m in read_metrics(rd / "metrics.jsonl")] == list(range(1, 31))
        assert re.search(r"trainer killed by SIGKILL[^;]*; restarting it \(1/3\)", (rd / "logs" / "driver.log").read_text())
        assert "recovered from checkpoint" in (rd / "logs" / "trainer-0.log").read_text()
        assert step_pids(rd)["server-0"] == [survivor]  # the server was never restarted
        st = status(tmp_path)
        assert st["state"] == "COMPLETED" and st["trainer_restarts"] == 1, st
    finally:
        finish(p)


def test_a_restarted_trainer_of_a_run_that_started_over_resumes_from_its_checkpoint(tmp_path):
    """recover.mode=disabled starts a run over (submit sets the earlier run's checkpoints aside); a trainer that died
    mid-run was restarted from step 1, not from the run's own last checkpoint: its steps were lost and the servers'
    weights went back to v1."""
    p = start(tmp_path, "recover.mode=disabled", "trainer.total_train_steps=30", "saver.freq_steps=2")
    try:
        rd = rd_of(tmp_path)
        reg = Registry.for_run(rd)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 3, 300, "3 steps", interval=0.05)
        os.kill(reg.get("", "trainer")["pid"], signal.SIGKILL)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "run COMPLETED" in out, (out, err)
        assert "recovered from checkpoint" in (rd / "logs" / "trainer-0.log").read_text()
        assert [m["step"] for m in read_metrics(rd / "metrics.jsonl")] == list(range(1, 31))
        assert len(re.findall(r"step 1 v1 ", (rd / "logs" / "trainer-0.log").read_text())) == 1
    finally:
        finish(p)


def test_a_sigkilled_trainer_without_restarts_fails_the_run_saying_it_may_be_out_of_memory(tmp_path):
    """The kernel's OOM killer sends SIGKILL and the trainer's log has no error: the reason said only `trainer killed
    by SIGKILL`, which does not point at memory."""
    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0", "trainer.max_restarts=0")
    try:
        rd = rd_of(tmp_path)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 1, 300, "a step", interval=0.2)
        os.kill(Registry.for_run(rd).get("", "trainer")["pid"], signal.SIGKILL)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1, (out, err)
        st = status(tmp_path)
        assert st["state"] == "FAILED" and st["reason"].startswith("trainer killed by SIGKILL"), st
        assert "out of memory?" in st["reason"], st
    finally:
        finish(p)


def test_stop_of_a_local_run_says_stopped(tmp_path):
    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0")
    try:
        rd = rd_of(tmp_path)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 1, 300, "a step", interval=0.5)
        s = cli(tmp_path, "stop", *names(tmp_path), timeout=180)
        assert s.returncode == 0 and "run STOPPED: stop requested (areal-hpc stop) at step" in s.stdout, s.stdout
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 130 and "run STOPPED" in out
    finally:
        finish(p)


SLOW_STOP = """
import time

from areal_hpc.trainers import register_trainer
from areal_hpc.trainers.base import STOPPED_EXIT, Trainer


@register_trainer("slow_stop")
class SlowStop(Trainer):
    \"\"\"Takes 75 s from SIGTERM to its exit: the step under way ends, then a large model's checkpoint.\"\"\"

    def run(self) -> int:
        self.publish_state(step=0, state="training")
        while not self.stop:
            time.sleep(0.2)
        time.sleep(75)
        print("checkpointed", flush=True)
        return STOPPED_EXIT
"""


def test_stop_gives_the_trainer_the_time_the_user_gave_stop(tmp_path):
    """`stop --timeout 300` for a trainer whose step and checkpoint take over a minute: the owner SIGKILLed it after a
    fixed 60 s (no checkpoint) whatever --timeout said; `stop` then printed STOPPED '... the trainer killed by SIGKILL
    on the way out'. The owner gives the trainer what the user gave `stop`, less the servers' time."""
    plugin = tmp_path / "slow_stop.py"
    plugin.write_text(SLOW_STOP)
    p = start(tmp_path, "trainer.type=slow_stop", f"trainer.plugins=[{plugin}]")
    try:
        rd = rd_of(tmp_path)
        wait_until(lambda: Registry.for_run(rd).get("", "trainer"), 300, "the trainer")
        s = cli(tmp_path, "stop", *names(tmp_path), "--timeout", "300", timeout=400)
        assert s.returncode == 0 and "run STOPPED" in s.stdout and "SIGKILL" not in s.stdout, (s.stdout, s.stderr)
        assert "checkpointed" in (rd / "logs" / "trainer-0.log").read_text()
    finally:
        finish(p)


def test_a_trainer_stopped_by_a_signal_from_outside_stops_the_run_not_completes_it(tmp_path):
    """`kill <trainer pid>` (or scancel of its step): the trainer checkpoints and ends cleanly, short of its goal. It
    exited 0 like a finished one, so the run said COMPLETED at step 34 of 300."""
    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0")
    try:
        rd = rd_of(tmp_path)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 2, 300, "2 steps", interval=0.2)
        os.kill(Registry.for_run(rd).get("", "trainer")["pid"], signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "run STOPPED: the trainer was stopped by a signal from outside" in out, (out, err)
        assert "resumes from checkpoint step_" in out  # it checkpointed on the way out
        assert status(tmp_path)["state"] == "STOPPED"
    finally:
        finish(p)


def test_two_add_servers_at_once_each_wait_for_their_own(tmp_path):
    """Two `add-servers count=1` at once: each counted every new server in the registry, the other's too, so both said
    "added" naming the same server (or "added 2"), one before its own served. Each waits for the servers the owner
    started for its own request and names them."""
    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0")
    try:
        rd = rd_of(tmp_path)
        reg = Registry.for_run(rd)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 1, 300, "a step", interval=0.5)
        os.kill(p.pid, signal.SIGSTOP)  # the owner takes both requests at once, before either command saw a server
        try:
            adds = [subprocess.Popen([sys.executable, "-m", "areal_hpc", "add-servers", "count=1", *names(tmp_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
                    for _ in range(2)]
            wait_until(lambda: len(reg.list("requests")) == 2, 60, "both requests")
        finally:
            os.kill(p.pid, signal.SIGCONT)
        outs = [a.communicate(timeout=180) for a in adds]
        assert [a.returncode for a in adds] == [0, 0], outs
        added = sorted(re.findall(r"added 1 server\(s\): (server-\d+)", out)[0] for out, _ in outs)
        assert added == ["server-1", "server-2"], outs
    finally:
        finish(p)


def test_add_servers_whose_server_dies_starting_says_so_at_once(tmp_path):
    """The server `add-servers` asked for died while starting (here: a model path that does not load; on a cluster an
    OOM, a bad SGLang flag): `add-servers` waited for it to serve until launcher.server_startup_timeout_s (15 min),
    then said "timed out". The owner's record drops a server once it exited: `add-servers` says which died, now."""
    import yaml

    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0")
    try:
        rd = rd_of(tmp_path)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 1, 300, "a step", interval=0.5)
        cfg = yaml.safe_load((rd / "config.yaml").read_text())
        cfg["server"]["model_path"] = str(tmp_path / "no-such-model")  # read by the new server only
        (rd / "config.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.monotonic()
        r = cli(tmp_path, "add-servers", "count=1", *names(tmp_path), timeout=120)
        assert r.returncode == 1 and "server-1 exited before serving" in r.stderr, (r.stdout, r.stderr)
        assert "areal-hpc logs server-1" in r.stderr and time.monotonic() - t0 < 60, r.stderr
    finally:
        finish(p)


def test_recover_disabled_sets_the_earlier_runs_checkpoints_and_weights_aside(tmp_path):
    """recover.mode=disabled in a run dir of an earlier run: the new run started over, but the earlier run's
    higher-numbered checkpoints/step_N and weights/vN stayed: keep-last pruning removed the new run's checkpoints
    first (lower step numbers), `weights/latest` named the old model until the first publish (servers loaded it) and
    weights/ offered it. They are moved aside (not deleted), and the submit says where."""
    saver = ["saver.freq_steps=1", "saver.keep_last=2"]
    r = subprocess.run(submit_args(tmp_path, "trainer.total_train_steps=4", *saver), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rd = rd_of(tmp_path)
    r = subprocess.run(submit_args(tmp_path, "trainer.total_train_steps=2", "recover.mode=disabled", *saver),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert sorted(p.name for p in (rd / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert max(int(p.name[1:]) for p in (rd / "weights").glob("v*")) == 2
    aside = [p for p in rd.glob("previous-*/checkpoints/step_00000004")]
    assert aside and "moved the earlier run's checkpoints, weights, metrics.jsonl to" in r.stdout, r.stdout
    old_rows = [json.loads(line) for line in (aside[0].parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in old_rows] == [1, 2, 3, 4]  # the earlier curve, kept


def test_a_model_in_the_trials_own_weights_is_refused_not_moved_aside_from_under_the_new_run(tmp_path):
    """A second trial started over (recover.mode=disabled) in the same run dir from one of its own weights/vN: submit
    checked the model, then moved weights/ aside, and the trainer failed to load a directory that was gone (a crash
    loop, exit 1, after the queue on Slurm). It is bad input now, nothing moved; a new trial_name starts from it."""
    r = subprocess.run(submit_args(tmp_path, "trainer.total_train_steps=2", "saver.freq_steps=0"),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    v1 = rd_of(tmp_path) / "weights" / "v1"
    r = subprocess.run(submit_args(tmp_path, "trainer.total_train_steps=1", "recover.mode=disabled",
                                   f"trainer.ppo.actor.path={v1}"), capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 2 and "trainer.ppo.actor.path" in r.stderr and "trial_name" in r.stderr, (r.stdout, r.stderr)
    assert (v1 / "model.safetensors").exists() and not list(v1.parent.parent.glob("previous-*"))
    r = subprocess.run(submit_args(tmp_path, "trainer.total_train_steps=1", "trial_name=run1",
                                   f"trainer.ppo.actor.path={v1}"), capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)


@pytest.mark.parametrize("sig, reason", [(signal.SIGKILL, "server-0 killed by SIGKILL"),
                                         (signal.SIGTERM, "server-0 exited with 0 (stopped from outside areal-hpc")])
def test_a_run_whose_every_server_died_fails_promptly_naming_the_server(tmp_path, sig, reason):
    """Every server of the run died (none restarted, none attached or coming): the trainer waited for a server ("servers:
    none live") for 10 minutes while `status` said RUNNING. The owner knows none is left: the run fails now, saying
    which server failed. SIGTERM (`kill`, a scancel of its step): the server deregisters and exits 0, like one the run
    stopped, and was taken for a clean exit; a server that ends while the run needs it, not asked to, has failed."""
    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0")
    try:
        rd = rd_of(tmp_path)
        reg = Registry.for_run(rd)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 1, 300, "a step", interval=0.2)
        os.kill(reg.get("servers", "server-0")["pid"], sig)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1, (out, err[-3000:])
        st = status(tmp_path)
        assert st["state"] == "FAILED" and reason in st["reason"], st
        assert "run FAILED" in err and reason in err, err[-3000:]
    finally:
        finish(p)


def test_a_run_whose_every_step_was_sigtermed_from_outside_stops_it_does_not_fail(tmp_path):
    """`scancel --signal=TERM JOB` signals every step at once: the server exits 0 at once, the trainer checkpoints and
    stops by itself. The server's exit made the run FAILED ("every server exited") before the trainer was done."""
    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0")
    try:
        rd = rd_of(tmp_path)
        reg = Registry.for_run(rd)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 1, 300, "a step", interval=0.2)
        for pid in (reg.get("servers", "server-0")["pid"], reg.get("", "trainer")["pid"]):
            os.kill(pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "run STOPPED: the trainer was stopped by a signal from outside" in out, (
            out, err[-3000:])
    finally:
        finish(p)


def test_status_says_a_trainer_waiting_for_servers_is_starting_not_that_it_is_not_running(tmp_path):
    """A trainer loads its model and waits for servers (SGLang: minutes) before it registers: `status` said `trainer
    not running`, the words for a dead one. The owner knows its trainer step lives: `starting`, until it registers."""
    p = start(tmp_path, "trainer.total_train_steps=100000", "saver.freq_steps=0")
    try:
        rd = rd_of(tmp_path)
        server = wait_until(lambda: (rd / "logs" / "driver.log").exists() and step_pids(rd).get("server-0"), 60,
                            "server-0 to start")[0]
        os.kill(server, signal.SIGSTOP)  # before it serves: the trainer waits for it
        try:
            wait_until(lambda: "trainer" in (Registry.for_run(rd).run_record().get("steps") or {}), 60, "the trainer")
            st = status(tmp_path)
            assert st["trainer"] == {"state": "starting"}, st
            out = cli(tmp_path, "status", *names(tmp_path)).stdout
            assert "trainer  starting (loading its model or waiting for servers)" in out, out
        finally:
            os.kill(server, signal.SIGCONT)
        wait_until(lambda: (status(tmp_path)["trainer"] or {}).get("step"), 300, "the trainer's first step")
    finally:
        finish(p)
    assert "trainer  not running" in cli(tmp_path, "status", *names(tmp_path)).stdout


def test_an_eval_whose_every_server_died_fails_promptly_naming_the_server(tmp_path):
    """The same for an evaluation (trainer.type=null): its episodes waited for a server that would never come."""
    p = start(tmp_path, "trainer.type=null", "allocation_mode=hf:d1+eval", "valid_dataset.path=toy:sum-20000")
    try:
        reg = Registry.for_run(wait_until(lambda: next(tmp_path.glob("*/quickstart/run0"), None), 300, "the run"))
        wait_until(lambda: (reg.get("", "trainer") or {}).get("state") == "evaluating", 300, "the evaluation")
        os.kill(reg.get("servers", "server-0")["pid"], signal.SIGKILL)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1, (out, err[-3000:])
        st = status(tmp_path)
        assert st["state"] == "FAILED" and "server-0 killed by SIGKILL" in st["reason"], st
    finally:
        finish(p)


def test_a_trainer_that_fails_after_a_server_died_names_the_server_too(tmp_path):
    """A server died, then the trainer failed (e.g. its gloo weight broadcast: "Server disconnected"): the reason named
    only the trainer's error, though the owner had seen the server die first. (The trainer is killed here once the owner
    saw server-1 die: a broadcast fails only when the server dies during it.)"""
    p = start(tmp_path, "allocation_mode=hf.d2p1m1+d1p1m1", "trainer.total_train_steps=100000", "saver.freq_steps=0",
              "trainer.max_restarts=0")
    try:
        rd = rd_of(tmp_path)
        reg = Registry.for_run(rd)
        wait_until(lambda: len(read_metrics(rd / "metrics.jsonl")) >= 1, 300, "a step", interval=0.2)
        os.kill(reg.get("servers", "server-1")["pid"], signal.SIGKILL)
        wait_until(lambda: "removed the registry record of server-1" in (rd / "logs" / "driver.log").read_text(), 60,
                   "the owner to see server-1 die")
        os.kill(reg.get("", "trainer")["pid"], signal.SIGKILL)
        out, err = p.communicate(timeout=180)
        assert p.returncode == 1, (out, err[-3000:])
        st = status(tmp_path)
        assert st["state"] == "FAILED" and st["reason"].startswith("trainer killed by SIGKILL"), st
        assert "earlier, server-1 killed by SIGKILL" in st["reason"], st
    finally:
        finish(p)


def test_the_summary_says_how_long_the_run_took_not_only_its_training_loop(tmp_path):
    """The summary said "in 0s" for a run of 10 s: the trainer loop's time (metrics' time_s, from its first step),
    not the run's. It says which is which, with the run's wall time (run.json's started -> ended)."""
    r = subprocess.run(submit_args(tmp_path, "trainer.total_train_steps=2", "saver.freq_steps=0"),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    run = Registry.for_run(rd_of(tmp_path)).run_record()
    loop = read_metrics(rd_of(tmp_path) / "metrics.jsonl")[-1]["time_s"]
    assert f"in {loop:.1f}s of training (run {run['ended'] - run['started']:.0f}s); metrics" in r.stdout, r.stdout
