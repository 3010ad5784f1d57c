"""Rollout: the staleness-bounded controller, workflows and rewards (knows nothing of Slurm)."""

from areal_hpc.rollout.adapters import ADAPTERS, apply_adapter, register_adapter
from areal_hpc.rollout.controller import RolloutController, RolloutError
from areal_hpc.rollout.data import PromptLoader, load_rows
from areal_hpc.rollout.rewards import REWARDS, get_reward, register_reward
from areal_hpc.rollout.workflow import (WORKFLOWS, Group, RLVRWorkflow, RolloutWorkflow, Trajectory, make_workflow,
                                        register_workflow)

__all__ = ["ADAPTERS", "apply_adapter", "register_adapter", "RolloutController", "RolloutError", "PromptLoader",
           "load_rows", "REWARDS", "get_reward", "register_reward", "Group", "Trajectory", "WORKFLOWS", "RLVRWorkflow",
           "RolloutWorkflow", "make_workflow", "register_workflow"]
