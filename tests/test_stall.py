"""No silent stalls (issue 16, item 5): a real `hf` server, the real client pool, workflow and
controller, waited on exactly as the PPO trainer waits (`RolloutController.next_batch`).

- a server whose weight version lags the trainer's with max_head_offpolicyness=0: every group is
  dropped as stale; the wait fails within rollout.drop_timeout_s, saying so and naming versions;
- generation slower than rollout.stall_timeout_s with a live server: fails with "no batch";
- a normal wait returns batches and raises nothing.
A CPU run of the trainer (`test_trainer_fails_the_run_on_a_stall`) shows the reason reaching its log.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from areal_hpc.config.schema import GenerationConfig
from areal_hpc.inference.client import ServerPool
from areal_hpc.rollout import RolloutController, make_workflow
from areal_hpc.rollout.controller import RolloutError, RolloutStall
from areal_hpc.toy import resolve_model
from test_inference_server import Cluster

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
ROWS = [{"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)} for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("run"), resolve_model("toy:qwen3-h128-l2"))
    c.start("s0")
    try:
        c.wait_ready("s0")
        yield c
    finally:
        c.kill_all()


def controller(server, start_version: int, staleness: int, max_new_tokens: int, batch_size: int = 2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.model)
    wf = make_workflow("rlvr", tokenizer=tok, gen_config=GenerationConfig(max_new_tokens=max_new_tokens,
                                                                         ignore_eos=True),
                       reward_fn="exact_match", n_samples=2)
    pool = ServerPool(server.reg, server.key, refresh_s=0.3)
    return RolloutController(wf, pool, itertools.cycle(ROWS), batch_size=batch_size,
                             max_head_offpolicyness=staleness, start_version=start_version).start()


def test_a_normal_wait_returns_batches(server):
    c = controller(server, start_version=0, staleness=0, max_new_tokens=2)
    try:
        assert len(c.next_batch(drop_timeout_s=5, stall_timeout_s=30)) == 2
    finally:
        c.stop()


def test_lagging_server_version_fails_within_the_drop_bound(server, caplog):
    """The issue's case: the trainer is at version 3, the server still reports 0, staleness 0."""
    c = controller(server, start_version=3, staleness=0, max_new_tokens=2)
    caplog.set_level(logging.WARNING, logger="areal_hpc.rollout.controller")
    t0 = time.monotonic()
    try:
        with pytest.raises(RolloutStall) as e:
            c.next_batch(drop_timeout_s=2.0, stall_timeout_s=600)
    finally:
        c.stop()
    took = time.monotonic() - t0
    msg = str(e.value)
    assert 2.0 <= took < 10, took
    assert "rollout.drop_timeout_s" in msg and "dropped as stale" in msg, msg
    assert "weight version 0" in msg and "trainer is at version 3" in msg and "max_head_offpolicyness=0" in msg, msg
    assert "s0 v0" in msg, msg  # the lagging server, by name and version
    # nothing was ever kept: every accepted group was dropped, or waits in line to be
    assert c.stats["dropped_stale"] > 0 and c.stats["accepted"] - c.stats["dropped_stale"] <= 2
    logged = caplog.text
    assert "dropped" in logged and "stale group(s)" in logged  # the drops themselves are logged
    assert "waiting for a batch" in logged  # and the wait, before the bound


def test_groups_are_stale_against_the_trainers_version_not_the_servers(server):
    """A weight update on its way (written and loaded beside the next step): the servers, and the
    controller's version, are still at 0 while the trainer is at 1. With staleness 0 the groups of
    version 0 must not reach the trainer: they are dropped, and the wait fails within the bound."""
    c = controller(server, start_version=0, staleness=0, max_new_tokens=2)
    try:
        c.set_trainer_version(1)
        with pytest.raises(RolloutStall) as e:
            c.next_batch(drop_timeout_s=2.0, stall_timeout_s=600)
    finally:
        c.stop()
    assert "trainer is at version 1" in str(e.value) and c.stats["dropped_stale"] > 0, str(e.value)
    assert c.last_drop == {"oldest_version": 0, "version": 1, "max_staleness": 0}


def test_no_batch_while_a_server_is_live_fails_within_the_stall_bound(server):
    c = controller(server, start_version=0, staleness=0, max_new_tokens=2000, batch_size=2)  # toy: 2048 positions
    t0 = time.monotonic()
    try:
        with pytest.raises(RolloutStall) as e:
            c.next_batch(drop_timeout_s=600, stall_timeout_s=1.5)
    finally:
        c.stop()
    msg = str(e.value)
    assert 1.5 <= time.monotonic() - t0 < 8
    assert "rollout.stall_timeout_s" in msg and "no batch for" in msg and "running" in msg, msg
    assert "s0 v0 healthy" in msg, msg


def test_trainer_fails_the_run_on_a_stall(tmp_path):
    """The real CPU quickstart (one server, one trainer) with generation slower than the bound: the
    trainer ends the run with the reason in its log instead of waiting forever."""
    p = subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                        "stats.progress_bar=False", "rollout.batch_size=2", "rollout.n_samples=2",
                        "rollout.gen.max_new_tokens=2000", "rollout.gen.ignore_eos=True",  # the toy model holds 2048
                        "rollout.stall_timeout_s=2", "trainer.total_train_steps=2"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    rd = next(tmp_path.glob("*/quickstart/run0"))
    log = (rd / "logs" / "trainer-0.log").read_text()
    assert "rollout stalled (rollout.stall_timeout_s): no batch for" in log, log[-3000:]
    assert not (rd / "metrics.jsonl").exists() or (rd / "metrics.jsonl").read_text().strip() == ""
    assert p.returncode != 0, (p.stdout[-2000:], p.stderr[-2000:])


class _FailOrReject:
    """A workflow whose episode raises on odd rows and returns no group (a rejection) on even ones."""

    async def arun_episode(self, client, row):
        if row["i"] % 2:
            raise ValueError(f"bad row {row['i']}")
        return None


def test_each_episode_counts_once_as_failed_or_rejected():
    """The stall check's `wasted` and `finished` counts, and the wait message, add failed and rejected."""
    c = RolloutController(_FailOrReject(), None, iter([{"i": i} for i in range(8)]), batch_size=2,
                          max_head_offpolicyness=3).start()
    try:
        deadline = time.monotonic() + 30
        while c.stats["failed"] + c.stats["rejected"] < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # a double count would land just after
        assert c.stats["submitted"] == 8
        assert (c.stats["failed"], c.stats["rejected"], c.stats["accepted"]) == (4, 4, 0), c.stats
    finally:
        c.stop()


class _ClientThatCannotStart:
    def __init__(self):
        self.closed = False

    async def start(self):
        raise ConnectionError("no registry")

    async def close(self):
        self.closed = True


def test_stop_after_a_failed_start_or_twice_does_not_raise():
    """The trainer's `close` stops the controller whatever happened: after a start that failed (the client is
    closed, the start error stays the one reported) and after an earlier stop, `stop` must not raise."""
    client = _ClientThatCannotStart()
    c = RolloutController(_FailOrReject(), client, iter([]), batch_size=2, max_head_offpolicyness=0)
    with pytest.raises(RolloutError, match="no registry"):
        c.start()
    c.stop()
    assert client.closed
    c = RolloutController(_FailOrReject(), None, iter([]), batch_size=2, max_head_offpolicyness=0).start()
    c.stop()
    c.stop()
