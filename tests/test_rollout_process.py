"""`RolloutProcess`: a side answering from a forked child, its errors raised in the trainer, a stop
request reaching a child that waits, a dead child reported instead of waited for."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from ranks import run_ranks

from areal_hpc.registry import RegistryTimeout
from areal_hpc.registry.util import pid_alive
from areal_hpc.rollout import RolloutError
from areal_hpc.trainers.rollout_process import RolloutProcess, _reply


class FakeSide:
    """What the child builds: a stand-in for `RolloutSide` with the methods the trainer calls."""

    def __init__(self, should_stop):
        self.should_stop = should_stop
        self.version = 0

    def start(self):
        self.pid = os.getpid()

    def next_trajectories(self, version):
        if version == 99:
            raise RolloutError("no batch for 3600s")
        if version == 98:
            os._exit(3)
        if version == 97:  # a batch that never comes: only a stop request ends the wait
            while not self.should_stop():
                time.sleep(0.01)
            return None
        return [f"traj-{version}-{os.getpid()}"]

    def stats(self):
        return {"dropped_stale": 0.0}

    def loader_state(self):
        return {"epoch": 1, "pos": 7}

    def apply_update(self, write, version):
        self.version = version
        return {"servers_updated": 1.0, "bg_time_s": 0.25, "loaded": str(write())}

    def stop(self):
        pass


def test_calls_are_answered_by_a_child_and_its_errors_raised_here(tmp_path):
    side = RolloutProcess(FakeSide, should_stop=lambda: False)
    try:
        side.start()
        [traj] = side.next_batch(3)
        assert traj.startswith("traj-3-") and traj != f"traj-3-{os.getpid()}"  # built in another process
        assert side.loader_state() == {"epoch": 1, "pos": 7}
        # the write runs here (it reads this process's staged weights), the load in the child
        written = []
        side.update_weights_later(lambda: written.append(os.getpid()) or tmp_path / "v1", 1)
        out = side.wait_update()
        assert written == [os.getpid()] and out["loaded"] == str(tmp_path / "v1") and out["bg_time_s"] >= 0.25
        with pytest.raises(RolloutError, match="no batch for 3600s"):
            side.next_batch(99)
        assert side.stats() == {"dropped_stale": 0.0}  # the child lives on after an error
    finally:
        side.stop()
    assert not side._proc.is_alive()


def test_a_stop_request_reaches_a_child_that_waits_for_a_batch():
    stop = threading.Event()
    side = RolloutProcess(FakeSide, should_stop=stop.is_set)
    try:
        threading.Timer(0.3, stop.set).start()
        assert side.next_batch(97) is None
    finally:
        side.stop()


def test_a_dead_child_is_an_error_not_a_hang():
    side = RolloutProcess(FakeSide, should_stop=lambda: False)
    try:
        with pytest.raises(RuntimeError, match="rollout process (died|exited)"):
            side.next_batch(98)
    finally:
        side.stop()


def test_an_error_while_the_side_is_built_is_raised_by_the_constructor():
    def make(should_stop):
        raise RegistryTimeout("no healthy server after 600s")

    with pytest.raises(RegistryTimeout, match="no healthy server"):
        RolloutProcess(make, should_stop=lambda: False)


def _a_bug_deep_in_the_child():
    return {}["missing"]


class Buggy(FakeSide):
    def next_trajectories(self, version):
        return _a_bug_deep_in_the_child()


def test_an_error_in_the_child_carries_the_childs_traceback():
    """The trainer's traceback ended at `_call`'s ``raise value``: a bare KeyError, nothing saying where it came from."""
    import traceback

    side = RolloutProcess(Buggy, should_stop=lambda: False)
    try:
        with pytest.raises(KeyError) as e:
            side.next_batch(1)
        text = "".join(traceback.format_exception(e.value))
        assert "_a_bug_deep_in_the_child" in text and "rollout process" in text, text
    finally:
        side.stop()


class FailingStop(FakeSide):
    def stop(self):
        raise RuntimeError("the last weight update failed")


def test_an_error_while_the_side_stops_is_raised_at_once():
    side = RolloutProcess(FailingStop, should_stop=lambda: False)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="the last weight update failed"):
        side.stop()  # the child ends after its stop, whether it failed or not: no wait for the join timeouts
    assert time.monotonic() - t0 < 5 and not side._proc.is_alive()


class _TwoArgumentError(ValueError):
    """Pickles, but cannot be unpickled: its __init__ takes two arguments and it has no __reduce__."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")


def test_an_error_the_trainer_cannot_rebuild_arrives_as_its_text():
    def make(should_stop):
        raise _TwoArgumentError("rollout.workflow", "no such workflow")

    with pytest.raises(RuntimeError, match="rollout.workflow: no such workflow"):
        RolloutProcess(make, should_stop=lambda: False)


@pytest.mark.parametrize("kind, value", [("err", _TwoArgumentError("k", "why")), ("ok", lambda: 0)],
                         ids=["err", "ok"])
def test_an_answer_that_does_not_pickle_ends_quietly_when_the_trainer_is_gone(kind, value):
    """Its text is sent instead; with the trainer's end closed, that send failed too and the child died with a
    traceback, where an answer that pickles ends quietly."""
    conn, trainer_end = multiprocessing.Pipe()
    trainer_end.close()
    _reply(conn, kind, value)


# fix8-C
class MathSide(FakeSide):
    def next_trajectories(self, version):
        from areal_hpc.rollout.rewards import RewardScorer

        scorer = RewardScorer("math")
        try:
            return asyncio.run(scorer.score("q", ["\\boxed{7}", "\\boxed{8}"], "7"))
        finally:
            scorer.close()


def test_the_child_scores_math_in_reward_workers():
    """The child is a daemonic process, which multiprocessing forbids children unless it says otherwise."""
    side = RolloutProcess(MathSide, should_stop=lambda: False)
    try:
        assert side.next_batch(1) == [1.0, 0.0]
    finally:
        side.stop()
    assert side._proc.exitcode == 0


def _rank0_fails(rank: int, run_dir: str, where: str) -> None:
    """Rank 0 fails with something other than a `RolloutError` (a bad model path; a dead child) ``where``: both
    ranks raise at once, the follower with rank 0's error, instead of the follower waiting out the collective."""
    from areal_hpc.config import ExperimentConfig, parse_allocation
    from areal_hpc.registry import Registry
    from areal_hpc.train import dist
    from areal_hpc.trainers import TrainContext
    from areal_hpc.trainers.rollout_side import FollowerSide, rollout_side

    dist.init_distributed(timeout_s=60)  # (what the old code waited for: the test then fails on a gloo timeout)
    if where == "start":
        cfg = ExperimentConfig()
        cfg.trainer.ppo.actor.path = f"{run_dir}/no-such-model"
        ctx = TrainContext(cfg, parse_allocation("hf:d2"), Path(run_dir), Registry.for_run(Path(run_dir)))
        with pytest.raises(RolloutError if rank else OSError, match="no-such-model"):
            rollout_side(ctx, None, 0, should_stop=lambda: False)
        return
    side = RolloutProcess(FakeSide, should_stop=lambda: False) if rank == 0 else FollowerSide()
    try:
        with pytest.raises(RolloutError if rank else RuntimeError, match="rollout process (died|exited)"):
            side.next_batch(98)
    finally:
        side.stop()


@pytest.mark.parametrize("where", ["start", "next_batch"])
def test_a_failure_of_rank_0_ends_every_rank_at_once(tmp_path, where):
    run_ranks(_rank0_fails, 2, args=(str(tmp_path), where))


class KeepsRewardWorkers(FakeSide):
    """Scores with workers it keeps (as the controller's scorer does) and answers their pids."""

    def next_trajectories(self, version):
        from areal_hpc.rollout.rewards import RewardScorer

        self.scorer = getattr(self, "scorer", None) or RewardScorer("math")
        assert asyncio.run(self.scorer.score("q", ["\\boxed{7}"], "7")) == [1.0]
        return sorted(self.scorer._pool._processes)


_TRAINER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_rollout_process import KeepsRewardWorkers
from areal_hpc.trainers.rollout_process import RolloutProcess
if __name__ == "__main__":
    side = RolloutProcess(KeepsRewardWorkers, should_stop=lambda: False)
    print(side._proc.pid, *side.next_batch(1), flush=True)
    time.sleep(600)
"""


def test_reward_workers_die_with_a_killed_trainer(tmp_path):
    """A SIGKILLed trainer (OOM killer, a restart by its owner) took its rollout child along (PR_SET_PDEATHSIG), but
    the child's math reward workers lived on as orphans, with their resource tracker, until the machine's end."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER.format(tests=str(Path(__file__).parent)))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert len(pids) >= 2, pids  # the child, then its reward workers
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in pids if pid_alive(p)]
    for p in alive:  # (a failed test leaves no orphans either)
        os.kill(p, signal.SIGKILL)
    assert not alive, f"orphaned after the trainer's death: {alive}"
