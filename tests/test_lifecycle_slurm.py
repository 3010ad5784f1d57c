"""A run's lifecycle on a REAL local Slurm cluster (tests/conftest.py): the job's state in Slurm
and `status` tell the truth about how the run ended.

- a trainer that raises: restarted once, then the crash-loop brake; the job ends FAILED with a
  non-zero exit in ``sacct -X``; ``status --json`` says FAILED, the error line and the log;
- a trainer SIGKILLed with the default config: the driver restarts it from its checkpoint, the
  servers are untouched, the steps are contiguous, the run COMPLETES;
- a run stopped by ``stop``: checkpointed, the job ends CANCELLED (not COMPLETED), status STOPPED;
- USR2 without requeue (launcher.requeue_on_preemption=False): STOPPED, the job CANCELLED too;
- a driver started by hand: SIGTERMs after its graceful stop began do not force it.

Same settings as tests/test_slurm_e2e.py (small batches, quick heartbeats).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import TRAINER_PLUGINS, wait_until
from test_slurm_e2e import FINAL, assert_contiguous, job_field, job_state, root, run  # noqa: F401 - fixtures

pytestmark = pytest.mark.slurm


def sacct_x(job_id: str) -> tuple:
    """(State, ExitCode) of the job's allocation as ``sacct -X`` reports it once it has ended."""
    def ended():
        r = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"], capture_output=True,
                           text=True, timeout=60)
        line = r.stdout.strip().splitlines()[-1:] if r.returncode == 0 else []
        state, code = (line[0].split("|") + [""])[:2] if line else ("", "")
        return (state.split()[0], code) if state.split() and state.split()[0] in FINAL else None

    return wait_until(ended, 60, f"sacct to report job {job_id} ended", interval=0.5)


def in_squeue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=60)
    return bool(out.stdout.strip())


def test_a_trainer_that_raises_fails_the_job(run):
    plugin = run.root / "boom.py"
    plugin.write_text(TRAINER_PLUGINS)
    p = run.submit("trainer.type=boom", f"trainer.plugins=[{plugin}]", "launcher.wait=True", check=False, timeout=600)
    assert p.returncode == 1, (p.stdout, p.stderr, run.logs())
    assert "run FAILED: trainer exited with 1: RuntimeError: boom" in p.stdout, p.stdout
    state, code = sacct_x(run.job_id)
    assert state == "FAILED" and code.split(":")[0] != "0", (state, code)
    assert not in_squeue(run.job_id)
    st = run.status()
    assert st["state"] == "FAILED", st
    assert "RuntimeError: boom: this trainer fails on purpose" in st["reason"] and "crash loop" in st["reason"], st
    assert st["log"] == str(run.dir / "logs" / "trainer-0.log")
    assert st["servers"] == [] and st["trainer"] is None
    # restarted once (the default max_restarts is 3), then the crash-loop brake
    driver = (run.dir / "logs" / "driver.log").read_text()
    assert driver.count("restarting it (") == 1 and "before its first step 2 times in a row" in driver, driver
    text = subprocess.run([sys.executable, "-m", "areal_hpc", "status", *run.names], capture_output=True,
                          text=True, timeout=120).stdout
    assert "state    FAILED: trainer exited with 1: RuntimeError: boom" in text and "trainer-0.log" in text, text


def test_a_sigkilled_trainer_is_restarted_by_default(run):
    # 8 generated tokens a sample: steps long enough that the kill lands before the third checkpoint
    run.submit("allocation_mode=hf.d2p1m1+d1p1m1", "trainer.total_train_steps=16", "saver.freq_steps=3",
               "rollout.gen.max_new_tokens=8", "rollout.gen.ignore_eos=true")
    run.wait_steps(5)
    reg = run.registry()
    servers = {k: (v["pid"], v["slurm_step_id"]) for k, v in reg.list("servers").items()}
    trainer = reg.get("", "trainer")
    assert len(servers) == 2 and trainer is not None
    os.kill(int(trainer["pid"]), signal.SIGKILL)
    wait_until(lambda: (reg.get("", "trainer") or {}).get("pid") not in (None, trainer["pid"]), 120,
               f"a restarted trainer\n{run.logs()}")
    assert {k: (v["pid"], v["slurm_step_id"]) for k, v in reg.list("servers").items()} == servers
    assert run.wait_job(600) == "COMPLETED"
    assert sacct_x(run.job_id)[0] == "COMPLETED"
    assert_contiguous(run.steps(), 16)
    st = run.status()
    assert st["state"] == "COMPLETED" and st["trainer_restarts"] == 1, st
    log = (run.dir / "logs" / "trainer-0.log").read_text()
    assert re.search(r"recovered from checkpoint: step [36]\b", log), log[-3000:]
    assert "restarting it (1/3)" in (run.dir / "logs" / "driver.log").read_text()


def test_a_stopped_run_is_not_completed(run):
    run.submit("trainer.total_train_steps=100000", "saver.freq_steps=0")
    run.wait_steps(2)
    t0 = time.monotonic()
    p = run.cli("stop", *run.names, "--timeout", "180")
    assert "stopped" in p.stdout and "run STOPPED: stop requested (areal-hpc stop) at step" in p.stdout, p.stdout
    assert not in_squeue(run.job_id)
    state, _ = sacct_x(run.job_id)
    assert state == "CANCELLED", state  # not COMPLETED: `--dependency=afterok` must not fire
    st = run.status()
    assert st["state"] == "STOPPED" and "resumes from checkpoint" in st["reason"], st
    assert st["servers"] == [] and st["trainer"] is None
    assert run.registry().list("servers", live_only=False) == {}
    assert any((run.dir / "checkpoints").glob("step_*"))
    print(f"stop: {time.monotonic() - t0:.1f}s")


def test_usr2_without_requeue_ends_the_job_cancelled(run):
    """launcher.requeue_on_preemption=False: USR2 (a time limit, preemption) stops the run, STOPPED; the job ended
    FAILED (submitit's error for a payload it does not requeue). It ends CANCELLED, as a stopped run's job does."""
    run.submit("trainer.total_train_steps=100000", "saver.freq_steps=0", "launcher.requeue_on_preemption=False")
    run.wait_steps(2)
    subprocess.run(["scancel", "--signal=USR2", "--batch", run.job_id], check=True, timeout=60)
    wait_until(lambda: not in_squeue(run.job_id), 300, f"job {run.job_id} to end\n{run.logs()}", interval=1.0)
    assert sacct_x(run.job_id)[0] == "CANCELLED", run.logs()
    rec = run.run_record()
    assert rec["state"] == "STOPPED" and "not requeued (launcher.requeue_on_preemption=False)" in rec["reason"], rec


def test_a_driver_started_by_hand_is_not_forced_by_slurms_sigterms(run):
    """A driver started by hand in a batch script gets SIGTERM (scancel): it stops gracefully, the trainer gets its
    grace to checkpoint. The SIGTERMs that follow while it stops (Slurm's at the job's end, its own scancel of its
    job) were taken for a second stop and forced it: the trainer was killed mid-checkpoint. Only Ctrl-C again forces
    it."""
    plugin = run.root / "stubborn.py"
    plugin.write_text(TRAINER_PLUGINS)
    run.submit("trainer.type=stubborn", f"trainer.plugins=[{plugin}]", "--dry-run")
    lines = (run.dir / "sbatch" / "allocation.sbatch").read_text().splitlines()
    script = run.dir / "sbatch" / "driver.sbatch"
    script.write_text("\n".join(["#!/bin/bash", *[ln for ln in lines if ln.startswith("#SBATCH")],
                                 f"exec {sys.executable} -m areal_hpc driver --run-dir {run.dir}", ""]))
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60,
                            check=True).stdout.strip().split(";")[0]
    wait_until(lambda: run.registry().get("", "trainer"), 300, f"the trainer to register\n{run.logs()}")
    for _ in range(2):
        subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], check=True, timeout=60)
        time.sleep(2)
    wait_until(lambda: not in_squeue(job_id), 300, f"job {job_id} to end\n{run.logs()}", interval=1.0)
    assert sacct_x(job_id)[0] == "CANCELLED"
    rec = run.run_record()
    assert rec["state"] == "STOPPED" and rec["reason"].startswith("interrupted (SIGTERM)"), (rec, run.logs())
    out = (run.dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "SIGTERM: stopping" in out and "SIGTERM again: killing" not in out, out[-3000:]


def test_a_node_failure_is_not_a_completed_run(run):
    """The job's node fails (set DOWN): Slurm ends the job NODE_FAIL, and srun exits 0 for a step whose node was lost
    (its tasks never report an exit). The driver took that 0 for a trainer that finished: run.json and `status` said
    COMPLETED for a run killed at step ~10 of 100000."""
    run.submit("trainer.total_train_steps=100000", "saver.freq_steps=0", "launcher.requeue_on_preemption=False",
               "cluster.sbatch_args=[--no-requeue]")  # Slurm's JobRequeue=1 requeues a node failure otherwise
    run.wait_steps(3)
    node = run.run_record()["steps"]["trainer"]["nodes"]
    try:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=test"], check=True, timeout=60)
        wait_until(lambda: not in_squeue(run.job_id), 120, f"job {run.job_id} to end\n{run.logs()}", interval=1.0)
        assert sacct_x(run.job_id)[0] == "NODE_FAIL"
        time.sleep(6)  # the driver's last words (KillWait=5)
        st = run.status()
        assert st["state"] == "FAILED" and ("NODE_FAIL" in st["reason"] or "lost a node" in st["reason"]), st
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], timeout=60)
        wait_until(lambda: "down" not in subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True,
                                                        text=True, timeout=60).stdout, 120, f"{node} back up")


def test_a_node_failure_slurm_requeues_is_still_owned(run):
    """The job's node fails and Slurm requeues the job itself (JobRequeue=1, the default; submitit does not pass
    --no-requeue). While the requeued job waits, the run has an owner to come: a second submit of the trial must be
    refused (two jobs would own one run dir), and `status` must not call the run over."""
    run.submit("trainer.total_train_steps=100000", "saver.freq_steps=0")
    run.wait_steps(3)
    jid = run.job_id
    node = run.run_record()["steps"]["trainer"]["nodes"]
    try:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=test"], check=True, timeout=60)
        wait_until(lambda: job_field(jid, "Restarts") == "1", 120, f"job {jid} to be requeued\n{run.logs()}")
        wait_until(lambda: job_state(jid) == "PENDING", 120, f"job {jid} pending again")
        time.sleep(6)  # the driver's last words (KillWait=5)
        assert run.status()["state"] in ("PENDING", "REQUEUED"), (run.status(), run.logs())
        p = run.submit(check=False)
        assert p.returncode != 0 and "submitted already" in p.stderr, (p.stdout, p.stderr)
        assert run.job_id == jid
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], timeout=60)
        wait_until(lambda: "down" not in subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True,
                                                        text=True, timeout=60).stdout, 120, f"{node} back up")


def test_usr2_to_a_driver_by_hand_whose_job_cannot_be_requeued(run):
    """A driver started by hand in a job Slurm will not requeue (--no-requeue here; JobRequeue=0 on some clusters):
    USR2 has the trainer checkpoint, then `scontrol requeue` fails. The job must not end COMPLETED (a
    --dependency=afterok would fire) nor run.json say REQUEUED ("resumes") for a run nobody will start again."""
    run.submit("trainer.total_train_steps=100000", "saver.freq_steps=0", "--dry-run")
    lines = (run.dir / "sbatch" / "allocation.sbatch").read_text().splitlines()
    script = run.dir / "sbatch" / "driver.sbatch"
    script.write_text("\n".join(["#!/bin/bash", *[ln for ln in lines if ln.startswith("#SBATCH")],
                                 "#SBATCH --no-requeue",
                                 f"exec {sys.executable} -m areal_hpc driver --run-dir {run.dir}", ""]))
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60,
                            check=True).stdout.strip().split(";")[0]
    run.wait_steps(2)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True, timeout=60)
    wait_until(lambda: not in_squeue(job_id), 300, f"job {job_id} to end\n{run.logs()}", interval=1.0)
    assert sacct_x(job_id)[0] == "CANCELLED", run.logs()
    rec = run.run_record()
    assert rec["state"] == "STOPPED" and "not requeued" in rec["reason"], (rec, run.logs())
    assert run.status()["state"] == "STOPPED"


def test_a_job_requeued_from_outside_resumes(run):
    """`scontrol requeue` of the running job (an admin, preemption with PreemptMode=REQUEUE): Slurm ends its
    processes (SIGTERM, then SIGKILL after KillWait) and queues it again. The requeued job must stay queued, not be
    cancelled by its own driver on the way out, and resume from the checkpoint when it runs."""
    run.submit("trainer.total_train_steps=40", "saver.freq_steps=2")
    run.wait_steps(4)
    jid = run.job_id
    subprocess.run(["scontrol", "requeue", jid], check=True, timeout=60)
    wait_until(lambda: job_field(jid, "Restarts") == "1", 120, f"job {jid} to be requeued\n{run.logs()}")
    # the driver's last words (KillWait=5; slower on a loaded machine), then what a cancel would have done by now
    wait_until(lambda: (run.run_record() or {}).get("state") == "REQUEUED", 120,
               f"the driver to record REQUEUED\n{run.run_record()}\n{run.logs(6000)}")
    time.sleep(5)
    assert job_state(jid) == "PENDING", (job_state(jid), run.run_record(), run.logs(6000))
    assert run.status()["state"] == "REQUEUED" and run.run_record()["state"] == "REQUEUED", run.logs()
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], timeout=60)
    assert run.wait_job(600) == "COMPLETED"
    assert run.steps()[-1] == 40 and "recovered from checkpoint" in (run.dir / "logs" / "trainer-0.log").read_text()


def test_a_run_whose_last_servers_were_a_server_job_that_ended_fails_at_once(run):
    """server-0 (in the allocation) SIGTERMed from outside: it exited 0, taken for a clean exit; then the server job of
    `add-servers --new-job` was cancelled. Its record ("a job may still bring servers") kept the trainer waiting 10
    minutes for a server, the run RUNNING. A server job Slurm ended, with none of its servers left, is a failure of
    those servers: the run fails at once, naming the job and, first, server-0."""
    run.submit("trainer.total_train_steps=100000", "saver.freq_steps=0")
    run.wait_steps(2)
    p = run.cli("add-servers", "count=1", "--new-job", *run.names)
    server_job = re.search(r"server-1 \(job (\d+)\)", p.stdout).group(1)
    os.kill(int(run.registry().get("servers", "server-0")["pid"]), signal.SIGTERM)
    wait_until(lambda: "server-0 exited with 0" in (run.dir / "logs" / "driver.log").read_text(), 60, "server-0 to end")
    subprocess.run(["scancel", server_job], check=True, timeout=60)
    wait_until(lambda: run.run_record().get("state") == "FAILED", 90, f"the run to fail\n{run.logs()}")
    reason = run.status()["reason"]
    assert f"server job {server_job} (server-1) ended CANCELLED" in reason, reason
    assert "first, server-0 exited with 0 (stopped from outside areal-hpc" in reason, reason
    assert run.wait_job(120, want=None) == "FAILED"
    s = run.cli("stop", *run.names, "--timeout", "60", check=False)  # nothing left to stop: the ended job is no error
    assert s.returncode == 0 and "could not cancel" not in s.stderr, (s.stdout, s.stderr)


def test_a_server_job_ends_with_the_run_that_completed(run):
    """A run with a server job of `add-servers --new-job` that COMPLETED on its own: the driver shut down the
    allocation's servers but not the server job, whose servers ran on (holding their GPUs) to its time limit, and
    `status` listed them live under a COMPLETED run. The server job ends with the run."""
    run.submit("trainer.total_train_steps=400", "saver.freq_steps=0")  # long enough for server-1 to join
    run.wait_steps(2)
    p = run.cli("add-servers", "count=1", "--new-job", *run.names)
    server_job = re.search(r"server-1 \(job (\d+)\)", p.stdout).group(1)
    assert run.wait_job(600) == "COMPLETED"
    wait_until(lambda: job_state(server_job) in FINAL, 60, f"server job {server_job} to end\n{run.logs()}")
    st = run.status()
    assert st["state"] == "COMPLETED" and st["servers"] == [], st
    assert run.registry().list("servers", live_only=False) == {}


def test_a_step_srun_refuses_to_start_says_why(run):
    """An srun that fails before Slurm starts its step (here an option it does not know, from cluster.srun_args) wrote
    its reason to the driver's batch log only: the run FAILED with 'trainer exited with 255 ...; earlier, server-0
    exited with 255', no error line and no log named. The reason now has srun's own words, and the step's log."""
    p = run.submit("trainer.total_train_steps=2", "cluster.srun_args=[--no-such-srun-option]", "launcher.wait=True",
                   check=False)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    st = run.status()
    assert st["state"] == "FAILED" and "unrecognized option '--no-such-srun-option'" in st["reason"], st
    assert st["log"] in (str(run.dir / "logs" / "server-0.log"), str(run.dir / "logs" / "trainer-0.log")), st
    assert "--no-such-srun-option" in open(st["log"]).read()


def test_a_completed_trainer_whose_servers_stay_up_is_not_shown_restarting(run):
    """shutdown_server_on_exit=False: once the trainer restarted after a SIGKILL had completed, `status` went on saying
    'RUNNING: trainer restarted 1x; last: trainer exited with 137' while the servers waited for `stop`. It says the
    trainer completed and the servers stay up."""
    run.submit("trainer.total_train_steps=60", "saver.freq_steps=3", "shutdown_server_on_exit=False")
    run.wait_steps(4)
    os.kill(int(run.registry().get("", "trainer")["pid"]), signal.SIGKILL)
    driver = run.dir / "logs" / "driver.log"
    wait_until(lambda: "trainer exited with 0" in driver.read_text(), 300, f"the trainer to complete\n{run.logs()}")
    time.sleep(1.0)
    st = run.status()
    assert st["state"] == "RUNNING" and st["trainer_restarts"] == 1, st
    assert st["reason"].startswith("the trainer completed; servers stay up"), st["reason"]
    run.cli("stop", *run.names, "--timeout", "60")
    assert run.status()["state"] == "COMPLETED"
