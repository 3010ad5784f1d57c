"""PhaseTimer: exclusive, nested phases that add up to a step's wall time."""

import pytest

from areal_hpc.train.phases import PhaseTimer


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def tick(self, dt):
        self.t += dt


def test_nested_phases_are_exclusive_and_add_up():
    clock = Clock()
    synced = []
    timer = PhaseTimer(sync=lambda: synced.append(clock.t), clock=clock)
    timer.begin()
    clock.tick(0.5)  # unclaimed: other
    with timer.phase("wait"):
        clock.tick(2.0)
    with timer.phase("train", device=True):
        clock.tick(1.0)
        with timer.phase("logprob", device=True):
            clock.tick(3.0)
        clock.tick(0.25)
    with timer.phase("wait"):  # a phase entered twice adds up
        clock.tick(1.0)
    split = timer.split()
    assert split == {"phase/wait": 3.0, "phase/train": 1.25, "phase/logprob": 3.0, "phase/other": 0.5,
                     "step_time_s": 7.75}
    assert len(synced) == 2  # once per device phase, not for host ones


def test_time_after_a_split_belongs_to_the_next_step():
    clock = Clock()
    timer = PhaseTimer(clock=clock)
    timer.begin()
    with timer.phase("train"):
        clock.tick(1.0)
    assert timer.split()["step_time_s"] == 1.0
    with timer.phase("metrics"):  # writing step 1's metrics
        clock.tick(0.2)
    clock.tick(0.1)
    with timer.phase("train"):
        clock.tick(2.0)
    second = timer.split()
    assert second == {"phase/metrics": pytest.approx(0.2), "phase/train": 2.0, "phase/other": pytest.approx(0.1),
                      "step_time_s": pytest.approx(2.3)}


def test_a_phase_that_raises_is_still_booked():
    clock = Clock()
    timer = PhaseTimer(clock=clock)
    timer.begin()
    with pytest.raises(KeyError):
        with timer.phase("train"):
            clock.tick(1.0)
            raise KeyError("x")
    assert timer.split()["phase/train"] == 1.0


def test_split_needs_begin_and_no_open_phase():
    timer = PhaseTimer()
    with pytest.raises(RuntimeError, match="before begin"):
        timer.split()
    timer.begin()
    with pytest.raises(RuntimeError, match="inside phase 'train'"):
        with timer.phase("train"):
            timer.split()
