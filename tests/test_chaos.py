"""Chaos on a REAL local Slurm cluster: during one quickstart run, SIGKILL the trainer twice and a
server once, at random moments. The driver restarts the trainer from its last checkpoint (default
``trainer.max_restarts``), the surviving server carries the rollouts, the dead server's record is
removed at once; the run COMPLETES with every step exactly once, the reward still rises, and
nothing of it is left in ``squeue`` or ``ps``.

The settings of tests/test_slurm_e2e.py (quick heartbeats) with the quickstart's own batch, so that
learning shows within 60 steps (test_quickstart_learns_on_slurm: the mean reward of the last 10
steps is 0.15-0.3 above the first 10 at step 60-80). Set AREAL_CHAOS_SEED to replay a schedule.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest
from helpers import wait_until
from test_lifecycle_slurm import in_squeue, root, run, sacct_x  # noqa: F401 - fixtures
from test_slurm_e2e import CLUSTER, QUICKSTART, SMALL, assert_contiguous

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TOTAL = 90  # the three events come within ~75 steps, even with a status call between two


def _pid_of(reg, kind: str, name: str, timeout: float = 300.0) -> int:
    rec = wait_until(lambda: reg.get(kind, name), timeout, f"a live {kind or 'top'}/{name} record")
    return int(rec["pid"])


def _leftovers(run_dir) -> list:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, timeout=60).stdout
    return [line.strip() for line in out.splitlines() if str(run_dir) in line and "ps -eo" not in line]


def test_chaos_trainer_killed_twice_server_once(run):
    seed = int(os.environ.get("AREAL_CHAOS_SEED") or time.time())
    rng = random.Random(seed)
    # each event a few steps after the one before it took effect (a quickstart step takes 0.05-0.3 s,
    # so absolute steps would be passed, or the run over, while a trainer restarts)
    whats = ["trainer", "trainer"]
    whats.insert(rng.randint(0, 2), "server")
    events = [(rng.randint(6, 16) if i == 0 else rng.randint(4, 12), what) for i, what in enumerate(whats)]
    victim = rng.choice(["server-0", "server-1"])
    print(f"chaos seed {seed}: {events} (steps after the previous event), server victim {victim}")
    # SMALL of test_slurm_e2e without its batch sizes: the quickstart's own
    run.cli("submit", QUICKSTART, *CLUSTER, *run.names, *[o for o in SMALL if not o.startswith("rollout.")],
            "allocation_mode=hf.d2p1m1+d1p1m1", f"trainer.total_train_steps={TOTAL}", "saver.freq_steps=5")
    reg = run.registry()
    t0, at = time.monotonic(), 0
    for gap, what in events:
        at = max(run.steps(), default=0) + gap
        wait_until(lambda: max(run.steps(), default=0) >= at, 600, f"step {at}\n{run.logs()}", interval=0.05)
        # anywhere in a step: generating, training, updating weights
        time.sleep(rng.uniform(0.0, run.metrics()[-1]["step_time_s"]))
        if what == "trainer":
            pid = _pid_of(reg, "", "trainer")
            os.kill(pid, signal.SIGKILL)
            print(f"{time.monotonic() - t0:6.1f}s killed the trainer (pid {pid}) after step {max(run.steps())}")
            wait_until(lambda: (reg.get("", "trainer") or {}).get("pid") not in (None, pid), 300,
                       f"a restarted trainer\n{run.logs()}")
        else:
            pid = _pid_of(reg, "servers", victim)
            os.kill(pid, signal.SIGKILL)
            print(f"{time.monotonic() - t0:6.1f}s killed {victim} (pid {pid}) after step {max(run.steps())}")
            # the driver sees its step end and removes its record: status never shows it live
            wait_until(lambda: reg.get("servers", victim, live_only=False) is None, 30,
                       f"the record of the killed {victim} to be removed\n{run.logs()}")
            assert victim not in {s["id"] for s in run.status()["servers"]}
    assert run.wait_job(900) == "COMPLETED"
    print(f"{time.monotonic() - t0:6.1f}s run completed")
    assert sacct_x(run.job_id)[0] == "COMPLETED"
    assert_contiguous(run.steps(), TOTAL)  # no step lost or repeated across the restarts
    st = run.status()
    assert st["state"] == "COMPLETED" and st["trainer_restarts"] == 2, st
    assert st["servers"] == [] and st["trainer"] is None
    rewards = [m["reward_mean"] for m in run.metrics()]
    early, late = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print(f"reward: first 10 steps {early:.3f}, last 10 {late:.3f}")
    assert late > early + 0.05, (early, late)
    driver = (run.dir / "logs" / "driver.log").read_text()
    assert len(re.findall(r"restarting it \(\d/3\)", driver)) == 2, driver
    assert not in_squeue(run.job_id)
    wait_until(lambda: not _leftovers(run.dir), 30, f"no process of the run left: {_leftovers(run.dir)}")
    assert reg.list("servers", live_only=False) == {} and reg.get("", "trainer", live_only=False) is None
