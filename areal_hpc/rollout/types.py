"""What a rollout produces: one completion with everything the trainer needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class Trajectory:
    """One prompt + one completion. ``logprobs``/``versions`` are per completion token: the
    behaviour policy's logprob and the weight version that produced that token."""

    prompt_ids: List[int]
    output_ids: List[int]
    logprobs: List[float]
    versions: List[int]
    reward: float
    finish_reason: str = "stop"
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def oldest_version(self) -> int:
        return min(self.versions) if self.versions else -1

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Group:
    """The trajectories of one prompt (a GRPO group); the unit the controller counts."""

    trajectories: List[Trajectory]
    submit_version: int = 0  # trainer weight version when the episode started

    @property
    def oldest_version(self) -> int:
        return min((t.oldest_version for t in self.trajectories), default=-1)
