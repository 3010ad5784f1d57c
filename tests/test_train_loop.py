"""A trainer's frame: `make_trainer`, and the loop every training trainer shares (`Trainer.run`), on one process
with a stand-in engine and checkpointer (and where it ends a real PPO run, the CPU quickstart)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from areal_hpc.config import ExperimentConfig, parse_allocation
from areal_hpc.registry import Registry
from areal_hpc.trainers import TrainContext, Trainer, make_trainer, register_trainer
from areal_hpc.trainers.base import STOPPED_EXIT
from areal_hpc.trainers.metrics import read_metrics

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


class FakeEngine:
    def get_version(self):
        return 0

    def current_lr(self):
        return 1e-3


class FakeCheckpointer:
    saved = []
    recovered = None  # load_latest's state

    def __init__(self, engine, keep_last):
        pass

    def load_latest(self, root):
        return self.recovered

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
    FakeCheckpointer.saved, FakeCheckpointer.recovered = [], None
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    cfg = ExperimentConfig()
    cfg.trainer.total_train_steps, cfg.saver.freq_steps = 10, 2
    cfg.stats.tensorboard = cfg.stats.plot = False
    yield StopsDuring(TrainContext(cfg, parse_allocation("hf:d1+d1"), tmp_path, Registry.for_run(tmp_path)))
    for s, h in handlers.items():
        signal.signal(s, h)


def test_a_stop_right_after_a_checkpoint_does_not_save_that_step_again(trainer):
    assert trainer.run() == STOPPED_EXIT  # stopped short of its goal: the run is STOPPED, not COMPLETED
    assert FakeCheckpointer.saved == [2]


def test_a_stop_between_checkpoints_saves_where_it_stopped(trainer):
    trainer.stop_at = 3
    assert trainer.run() == STOPPED_EXIT
    assert FakeCheckpointer.saved == [2, 3]


def test_a_recovered_trainer_stopped_before_its_first_step_does_not_save_the_checkpoint_it_loaded(trainer):
    """(A requeued trainer asked to stop again at once: its grace period is not spent rewriting that checkpoint.)"""
    FakeCheckpointer.recovered = {"global_step": 4, "weight_version": 0}
    trainer.stop.signal = signal.SIGUSR2
    assert trainer.run() == STOPPED_EXIT
    assert FakeCheckpointer.saved == []


class FailsToStart(StopsDuring):
    """Its start makes what `close` releases (a rollout side: thread, reward workers), then fails (the first push of
    weights)."""

    closed = False

    def start(self, state):
        raise RuntimeError("the first weight update failed")

    def close(self):
        self.closed = True


def test_what_a_failed_start_made_is_released(trainer):
    failing = FailsToStart(trainer.ctx)
    with pytest.raises(RuntimeError, match="the first weight update failed"):
        failing.run()
    assert failing.closed


class WarmsUp(StopsDuring):
    """Steps an optimizer as `FSDPEngine` does: at the scheduled LR (its stats' ``lr``), then the schedule moves on."""

    def setup(self):
        import torch

        self.opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / 4))  # warm-up
        engine = FakeEngine()
        engine.current_lr = lambda: self.opt.param_groups[0]["lr"]
        return engine

    def train_step(self, step):
        stats = {"lr": self.opt.param_groups[0]["lr"]}  # (train_batch: read before the LR scheduler steps)
        self.schedule.step()
        return stats


def test_a_steps_lr_is_the_one_it_trained_with_not_the_next_steps(trainer):
    """The metrics row replaced the step's own ``lr`` with the optimizer's after the LR scheduler had stepped: the next
    step's, so every warm-up step (and the last step of a cosine schedule) showed an LR it never trained with."""
    WarmsUp(trainer.ctx).run()
    assert [m["lr"] for m in read_metrics(trainer.ctx.run_dir / "metrics.jsonl")][:5] == [0.25, 0.5, 0.75, 1.0, 1.0]


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
    with pytest.raises(ValueError, match="trainer.type: 'no-such-trainer' is not one of .*test-needs-a-key"):
        make_trainer(TrainContext(cfg, parse_allocation("hf:d1"), tmp_path, Registry.for_run(tmp_path)))


def test_ppo_stops_after_total_train_epochs_passes_over_the_prompts(tmp_path):
    """The real CPU quickstart on 10 prompts, 4 a step, one pass: 2 full steps, then the run completes (before
    total_train_steps); the 2 prompts left over do not make a step. All 10 are in flight at once: none goes stale."""
    p = subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                        "stats.progress_bar=False", "stats.tensorboard=False", "stats.plot=False", "saver.freq_steps=0",
                        "train_dataset.limit=10", "rollout.batch_size=4", "rollout.n_samples=2",
                        "rollout.max_head_offpolicyness=8", "trainer.total_train_steps=5",
                        "trainer.total_train_epochs=1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0 and "run COMPLETED" in p.stdout, (p.stdout[-2000:], p.stderr[-2000:])
    rd = next(tmp_path.glob("*/quickstart/run0"))
    assert [r["step"] for r in read_metrics(rd / "metrics.jsonl")] == [1, 2]


def test_ppo_with_fewer_prompts_than_a_batch_in_its_epochs_fails_naming_the_key(tmp_path):
    """5 usable prompts, one pass, 8 a step: no step could be made, and the run said COMPLETED (exit 0, an untrained
    model) with only a warning in the trainer's log. SFT refused it already (trainer.sft.batch_size)."""
    p = subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                        "stats.progress_bar=False", "saver.freq_steps=0", "train_dataset.limit=5",
                        "rollout.batch_size=8", "rollout.n_samples=2", "trainer.total_train_epochs=1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 1 and "run FAILED" in p.stderr, (p.stdout[-2000:], p.stderr[-2000:])
    assert "rollout.batch_size: 5 usable prompt(s) x 1 epoch(s) fill no batch of 8" in p.stderr, p.stderr[-2000:]


def test_the_main_rank_is_the_process_groups_not_a_stray_rank_variable(trainer, monkeypatch, tmp_path):
    """`is_main` read RANK (else SLURM_PROCID) itself, while `dist` forms the group from RANK only with WORLD_SIZE:
    a stray RANK=1 made the one rank of a one-process run no main rank (no metrics, no record)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert trainer.is_main
    trainer.run()
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_plugin_file_that_failed_to_import_fails_again_not_silently(tmp_path):
    """A failed import left the half-made module in sys.modules, which the next load took for loaded: its trainers
    were then 'unknown' with no word of the import error."""
    from areal_hpc.trainers.factory import load_plugins

    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("raise RuntimeError('plugin bug')\n")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="plugin bug"):
            load_plugins([str(plugin)])


@pytest.mark.parametrize("key, value", [("rollout.reward_fn", "exact_matc"), ("rollout.workflow", "rvlr"),
                                        ("trainer.type", "rtf"), ("valid_dataset.adapter", "gsm8")])
def test_plugins_do_not_hide_a_misspelt_name(tmp_path, key, value):
    """With trainer.plugins `validate` cannot know every name (a plugin may add one), so it checked none: a typo in a
    built-in name passed. Once the plugins are loaded, every selected name must be registered."""
    from areal_hpc.config import ConfigError
    from areal_hpc.config.validate import get
    from areal_hpc.trainers.factory import check_names

    plugin = tmp_path / "names_plugin.py"
    plugin.write_text("from areal_hpc.rollout import register_reward\nfrom areal_hpc.trainers import register_trainer\n"
                      "from areal_hpc.trainers.ppo_trainer import PPOTrainer\n\n"
                      "register_trainer('rft')(type('RFT', (PPOTrainer,), {}))\n"
                      "register_reward('length')(lambda prompt, completion, answer, **row: float(len(completion)))\n")
    cfg = ExperimentConfig()
    cfg.trainer.plugins, cfg.trainer.type, cfg.rollout.reward_fn = [str(plugin)], "rft", "length"
    check_names(cfg)  # the plugin's names, and the built-in ones
    section, _, attr = key.rpartition(".")
    setattr(get(cfg, section), attr, value)
    with pytest.raises(ConfigError, match=rf"^{key}: {value!r} is not one of "):
        check_names(cfg)
    with pytest.raises(ConfigError, match=rf"^{key}: "):  # on the node too, before the trainer is built
        make_trainer(TrainContext(cfg, parse_allocation("hf:d1"), tmp_path, Registry.for_run(tmp_path)))


def test_two_plugin_files_of_one_name_in_different_directories_both_load(tmp_path):
    """Plugins were imported as `areal_plugin_<stem>`: a second `rewards.py` (another directory) was taken for loaded
    already and skipped without a word, so its names were 'unknown'."""
    from areal_hpc.rollout import REWARDS
    from areal_hpc.trainers.factory import load_plugins

    paths = []
    for d in ("team_a", "team_b"):
        (tmp_path / d).mkdir()
        paths.append(tmp_path / d / "same_stem_rewards.py")
        paths[-1].write_text(f"from areal_hpc.rollout import register_reward\n\n"
                             f"register_reward('{d}_reward')(lambda prompt, completion, answer, **row: 1.0)\n")
    load_plugins([str(p) for p in paths])
    assert {"team_a_reward", "team_b_reward"} <= set(REWARDS)
    load_plugins([str(p) for p in paths])  # loaded once per process: a second load (trainer after submit) is a no-op
