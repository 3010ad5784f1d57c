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


class Instant(RolloutWorkflow):
    async def arun_episode(self, client, row):
        return None  # rejected: the controller asks for the next row at once


def test_a_loader_that_fails_ends_get_batch_with_its_error_not_a_stall():
    """A row iterator raising anything but StopIteration (a broken shard, a custom loader's bug) killed the rollout
    loop without a word: the trainer waited in get_batch until rollout.stall_timeout_s (an hour by default)."""

    def rows():
        yield {"prompt": "1+1="}
        raise OSError("shard 3 is unreadable")

    c = RolloutController(Instant(), object(), rows(), batch_size=2, max_head_offpolicyness=0)
    try:
        with pytest.raises(RuntimeError, match="shard 3 is unreadable"):  # from start, or from get_batch
            c.start().get_batch(timeout=10)
    finally:
        c.stop()


class EmptyGroups(RolloutWorkflow):
    """Odd rows: a group with no trajectories; even rows: one whose completions have no tokens (at version 0)."""

    async def arun_episode(self, client, row):
        from areal_hpc.rollout.workflow import Group, Trajectory
        if int(row["prompt"]) % 2:
            return Group([])
        return Group([Trajectory([1], [], [], [], 0.0, "length")])


def test_groups_without_tokens_are_rejected_or_fresh_never_dropped_as_stale():
    """Their oldest version read -1, so at any trainer version past the bound they were dropped "as stale" (and the
    stall report blamed a server's lagging weights); an empty group is rejected, tokenless completions are fresh."""
    c = RolloutController(EmptyGroups(), object(), iter([{"prompt": str(i)} for i in range(4)]), batch_size=2,
                          max_head_offpolicyness=0, start_version=3).start()
    try:
        batch = c.get_batch(timeout=10)
        assert [len(g.trajectories) for g in batch] == [1, 1] and all(g.oldest_version == 3 for g in batch)
        c.set_version(4)  # room for the last row
        with pytest.raises(StopIteration):  # every row done
            c.get_batch(timeout=10)
        assert c.stats["rejected"] == 2 and c.stats["dropped_stale"] == 0, c.stats
    finally:
        c.stop()


class ToolTurns(RolloutWorkflow):
    """A two-turn episode at the controller's version 3: the model's tokens at version 3, a tool's reply between them
    (masked out of the loss) at version 0, and, on odd rows, an untrained mask over a model token of version 0."""

    async def arun_episode(self, client, row):
        from areal_hpc.rollout.workflow import Group, Trajectory
        old_model_token = int(row["prompt"]) % 2
        return Group([Trajectory([1], [7, 8, 8, 9], [-0.1] * 4, [3, 0, 0, 0 if old_model_token else 3], 1.0,
                                 loss_mask=[1, 0, 0, 1])], submit_version=3)


def test_a_tools_tokens_masked_out_of_the_loss_do_not_make_a_group_stale():
    """Staleness is that of the policy that produced the trained tokens: a tool's tokens carry no policy's version, so
    masked ones do not drop the group; a trained token of an old version still does."""
    c = RolloutController(ToolTurns(), object(), iter([{"prompt": str(i)} for i in range(2)]), batch_size=1,
                          max_head_offpolicyness=1, start_version=3).start()
    try:
        (group,) = c.get_batch(timeout=10)
        assert group.oldest_version == 3
        with pytest.raises(StopIteration):  # row 1 trains a token of version 0, 3 behind: dropped as stale
            c.get_batch(timeout=10)
        assert c.stats["dropped_stale"] == 1, c.stats
    finally:
        c.stop()


class Recording(RolloutWorkflow):
    """Records the rows it is given (in the order their episodes start); row ``hang`` runs until stopped."""

    def __init__(self, hang: str = ""):
        self.seen, self.hang = [], hang

    async def arun_episode(self, client, row):
        from areal_hpc.rollout.workflow import Group, Trajectory
        self.seen.append(row["prompt"])
        if row["prompt"] == self.hang:
            await asyncio.sleep(60)
        return Group([Trajectory([int(row["prompt"])], [2], [0.0], [0], 1.0)])


def test_a_restart_generates_the_rows_in_flight_not_the_last_rows_taken():
    """Groups finish out of order: rows 1-3 finished while row 0 still ran, and rows 1 and 2 were trained on. The
    checkpoint moved the position back by the number in flight (2), to row 2: a restart trained on row 2 again and
    never on row 0. It resumes at the oldest row in flight and skips the rows trained on since."""
    from areal_hpc.rollout.data import PromptLoader

    rows = [{"prompt": str(i)} for i in range(8)]
    c = RolloutController(Recording(hang="0"), object(), PromptLoader(rows, shuffle=False), batch_size=2,
                          max_head_offpolicyness=1).start()  # room for 4 rows at version 0
    try:
        assert [g.trajectories[0].prompt_ids for g in c.get_batch(timeout=10)] == [[1], [2]]
        state = c.rows_state()
    finally:
        c.stop()
    assert state == {"epoch": 0, "pos": 0, "skip": [1, 2]}
    loader = PromptLoader(rows, shuffle=False)
    loader.load_state_dict(state)
    wf = Recording()
    c = RolloutController(wf, object(), loader, batch_size=2, max_head_offpolicyness=1, skip=state["skip"])
    c.pause()
    c.start()
    try:
        assert c.rows_state() == state  # a checkpoint before the loop has reached the rows to skip still skips them
        c.resume()
        c.get_batch(timeout=10)
        c.get_batch(timeout=10)
        assert wf.seen == ["0", "3", "4", "5"] and c.rows_state() == {"epoch": 0, "pos": 6}
    finally:
        c.stop()


def test_a_workflow_written_as_the_readme_shows_is_built_with_the_runs_settings():
    """The README's workflow is a subclass with one ``async def arun_episode``; the trainer builds it with the run's
    settings as keyword arguments, which such a class (no ``__init__``) refused: 'TypeError: ...() takes no
    arguments' on rank 0 before the first step. They are the workflow's attributes."""
    from areal_hpc.config.schema import ExperimentConfig
    from areal_hpc.rollout import WORKFLOWS, Group, Trajectory, register_workflow
    from areal_hpc.trainers.rollout_side import make_rollout_workflow

    @register_workflow("test-readme")
    class TwoTurns(RolloutWorkflow):
        async def arun_episode(self, client, row):
            return Group([Trajectory([1], [2], [0.0], [0], float(self.n_samples))])

    cfg = ExperimentConfig()
    cfg.rollout.workflow, cfg.rollout.n_samples = "test-readme", 3
    try:
        wf = make_rollout_workflow(cfg, "the tokenizer", cfg.train_dataset)
    finally:
        WORKFLOWS.pop("test-readme")
    assert wf.tokenizer == "the tokenizer" and wf.gen_config == cfg.rollout.gen and wf.reward_fn == cfg.rollout.reward_fn
    assert asyncio.run(wf.arun_episode(None, {})).trajectories[0].reward == 3.0


class EnvTokensWithoutLogprobs(RolloutWorkflow):
    """Two turns; the environment's reply (3 tokens) appended to the completion without its logprobs and versions,
    the other sample one logprob too many: the totals agree, the samples do not."""

    async def arun_episode(self, client, row):
        from areal_hpc.rollout import Group, Trajectory
        return Group([Trajectory([1], [2, 7, 7, 7, 3], [-0.1, -0.3], [0, 0], 1.0),
                      Trajectory([1], [2], [-0.1, -0.2, -0.3, -0.4], [0, 0, 0, 0], 0.0)])


def test_a_trajectory_whose_logprobs_do_not_match_its_tokens_fails_its_episode():
    """The batch fills every sample's logprobs and versions from one flat list: a trajectory with fewer than its
    tokens shifted the next sample's onto it (silently wrong importance ratios) or crashed the training step with a
    'shape mismatch'. The episode fails, saying why."""
    c = RolloutController(EnvTokensWithoutLogprobs(), object(), iter([{"prompt": "1+1="}]), batch_size=1,
                          max_head_offpolicyness=0).start()
    try:
        with pytest.raises(StopIteration):
            c.get_batch(timeout=10)
        assert c.stats["failed"] == 1 and "5 output_ids, 2 logprobs, 2 versions" in c.last_failure
    finally:
        c.stop()


class ReturnsAList(RolloutWorkflow):
    """Returns its trajectories as a list (AReaL's workflows return a dict of tensors), not a `Group`."""

    async def arun_episode(self, client, row):
        from areal_hpc.rollout import Trajectory
        return [Trajectory([1], [2], [0.0], [0], 1.0)]


def test_a_workflow_returning_no_group_fails_its_episode_not_the_loop():
    """The controller read ``.trajectories`` of what came back outside its ``try``: the episode's task died with an
    AttributeError no one saw, uncounted, and the loop was never woken: the run waited for a batch forever."""
    c = RolloutController(ReturnsAList(), object(), iter([{"prompt": "1+1="}]), batch_size=1,
                          max_head_offpolicyness=0).start()
    try:
        with pytest.raises(StopIteration):
            c.get_batch(timeout=10)
        assert c.stats["failed"] == 1 and "returned a list" in c.last_failure
    finally:
        c.stop()
