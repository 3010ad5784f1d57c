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
        assert c.stats["failed"] == 1 and c.in_flight() == 0 and "CancelledError" in c.last_failure
    finally:
        c.stop()
