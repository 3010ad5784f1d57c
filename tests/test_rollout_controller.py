"""The rollout controller's bookkeeping, with stand-in workflows (no servers)."""

from __future__ import annotations

import asyncio

import pytest

from areal_hpc.rollout import RolloutController, RolloutWorkflow


class CancelledInside(RolloutWorkflow):
    """An episode that awaits something cancelled elsewhere (its task is not being cancelled)."""

    async def arun_episode(self, client, row):
        fut = asyncio.get_running_loop().create_future()
        fut.cancel()
        await fut


def test_an_episode_ended_by_a_cancellation_from_inside_is_a_failure_not_a_lost_task():
    """It escaped the controller's ``except Exception``: the episode was never counted, ``_running`` never went back
    down, and a run at the end of its prompts waited forever instead of stopping."""
    c = RolloutController(CancelledInside(), object(), iter([{"prompt": "1+1="}]), batch_size=1,
                          max_head_offpolicyness=0).start()
    try:
        with pytest.raises(StopIteration):
            c.get_batch(timeout=10)
        assert c.stats["failed"] == 1 and c._running == 0 and "CancelledError" in c.last_failure
    finally:
        c.stop()


class Hangs(RolloutWorkflow):
    async def arun_episode(self, client, row):
        await asyncio.sleep(60)


def test_a_row_taken_while_the_checkpoint_reads_the_position_is_generated_again_after_a_restart():
    """The in-flight count was read before the loader's position: a row the loop took between the two reads was in
    neither, so the checkpoint's position lay past it and a restart never generated it."""
    import threading
    from types import SimpleNamespace

    from areal_hpc.rollout.data import PromptLoader
    from areal_hpc.trainers.rollout_side import RolloutSide

    class Loader(PromptLoader):
        """The first `state_dict` lets the paused loop take a row (waiting up to 1 s for it) before it reads."""

        taken = threading.Event()

        def __next__(self):
            row = super().__next__()
            self.taken.set()
            return row

        def state_dict(self, rewind=0):
            if not self.taken.is_set():
                c.resume()
                self.taken.wait(1)
            return super().state_dict(rewind)

    loader = Loader([{"prompt": str(i)} for i in range(4)], shuffle=False)
    c = RolloutController(Hangs(), object(), loader, batch_size=1, max_head_offpolicyness=0)
    c.pause()
    c.start()
    try:
        state = RolloutSide.loader_state(SimpleNamespace(loader=loader, controller=c))
        assert state == {"epoch": 0, "pos": 0}  # row "0", taken meanwhile or after, is generated again
        assert loader.taken.wait(5) and c.rows_state() == {"epoch": 0, "pos": 0}  # and once running, it is in flight
    finally:
        c.stop()
