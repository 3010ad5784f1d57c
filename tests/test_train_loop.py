"""A trainer's frame: `make_trainer`, and the loop every training trainer shares (`Trainer.run`), on one process
with a stand-in engine and checkpointer."""

from __future__ import annotations

import signal

import pytest

from areal_hpc.config import ExperimentConfig, parse_allocation
from areal_hpc.registry import Registry
from areal_hpc.trainers import TrainContext, Trainer, make_trainer, register_trainer


class FakeEngine:
    def get_version(self):
        return 0

    def current_lr(self):
        return 1e-3


class FakeCheckpointer:
    saved = []

    def __init__(self, engine, keep_last):
        pass

    def load_latest(self, root):
        return None

    def save(self, root, step, extra):
        self.saved.append(step)


class StopsDuring(Trainer):
    """Asked to stop (SIGTERM) during step ``stop_at``."""

    stop_at = 2

    def setup(self):
        return FakeEngine()

    def train_step(self, step):
        if step == self.stop_at:
            self.stop.signal = signal.SIGTERM
        return {"loss": 1.0}


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    monkeypatch.setattr("areal_hpc.train.checkpoint.Checkpointer", FakeCheckpointer)
    FakeCheckpointer.saved = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    cfg = ExperimentConfig()
    cfg.trainer.total_train_steps, cfg.saver.freq_steps = 10, 2
    cfg.stats.tensorboard = cfg.stats.plot = False
    yield StopsDuring(TrainContext(cfg, parse_allocation("hf:d1+d1"), tmp_path, Registry.for_run(tmp_path)))
    for s, h in handlers.items():
        signal.signal(s, h)


def test_a_stop_right_after_a_checkpoint_does_not_save_that_step_again(trainer):
    assert trainer.run() == 0
    assert FakeCheckpointer.saved == [2]


def test_a_stop_between_checkpoints_saves_where_it_stopped(trainer):
    trainer.stop_at = 3
    assert trainer.run() == 0
    assert FakeCheckpointer.saved == [2, 3]


@register_trainer("test-needs-a-key")
class NeedsAKey(Trainer):
    def __init__(self, ctx):
        raise KeyError("dataset_column")


def test_a_key_error_of_a_trainer_is_not_reported_as_an_unknown_type(tmp_path):
    cfg = ExperimentConfig()
    cfg.trainer.type = "test-needs-a-key"
    with pytest.raises(KeyError, match="dataset_column"):
        make_trainer(TrainContext(cfg, parse_allocation("hf:d1"), tmp_path, Registry.for_run(tmp_path)))
    cfg.trainer.type = "no-such-trainer"
    with pytest.raises(KeyError, match="unknown trainer.type 'no-such-trainer'; known: .*test-needs-a-key"):
        make_trainer(TrainContext(cfg, parse_allocation("hf:d1"), tmp_path, Registry.for_run(tmp_path)))
