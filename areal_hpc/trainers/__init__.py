"""Trainers chosen by `trainer.type`: ppo (GRPO, sync/async), sft, null (rollout/eval only)."""

from areal_hpc.trainers.base import TrainContext, Trainer
from areal_hpc.trainers.factory import TRAINERS, make_trainer, register_trainer

__all__ = ["TrainContext", "Trainer", "TRAINERS", "make_trainer", "register_trainer"]
