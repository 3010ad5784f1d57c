"""Workflows: one dataset row -> one `Group` of `Trajectory`s. Add one by subclassing `RolloutWorkflow` with
``@register_workflow("name")``; select it with ``rollout.workflow=name``."""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Dict, List, Optional

from areal_hpc.rollout.names import NameTable
from areal_hpc.rollout.prompts import PromptEncoder, PromptFormat, stop_token_ids
from areal_hpc.rollout.rewards import RewardScorer


@dataclass
class Trajectory:
    """One prompt + one completion; per completion token, the behaviour policy's logprob and weight version, and
    whether it is trained on (``loss_mask``: 1 the model's token, 0 one a multi-turn workflow put there, a tool's or
    the environment's; None: all 1, as ``mask`` reads it)."""

    prompt_ids: List[int]
    output_ids: List[int]
    logprobs: List[float]
    versions: List[int]
    reward: float
    finish_reason: str = "stop"
    info: Dict[str, Any] = field(default_factory=dict)
    loss_mask: Optional[List[int]] = None

    def __post_init__(self) -> None:  # (a batch lays them out by position: one short shifts the next sample's)
        if not len(self.output_ids) == len(self.logprobs) == len(self.versions) == len(self.mask):
            raise ValueError(f"a trajectory of {len(self.output_ids)} output_ids, {len(self.logprobs)} logprobs, "
                             f"{len(self.versions)} versions, {len(self.mask)} loss_mask: give each output token its "
                             "logprob and weight version (and loss_mask entry)")

    @property
    def mask(self) -> List[int]:  # 1 per trained output token: loss_mask as given, or all 1
        return [1] * len(self.output_ids) if self.loss_mask is None else self.loss_mask

    @property
    def trained_versions(self) -> List[int]:
        """The versions of its trained tokens, the model's (a tool's tokens carry no policy's version)."""
        return [v for v, trained in zip(self.versions, self.mask) if trained]

    @property
    def oldest_version(self) -> int:
        """Of its trained tokens; -1 when it has none."""
        return min(self.trained_versions, default=-1)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Group:
    """The trajectories of one prompt (a GRPO group); the unit the controller counts."""

    trajectories: List[Trajectory]
    submit_version: int = 0  # weight version when the episode started
    row_index: int = -1  # among the rows the controller took (`RolloutController.rows_state`)

    @property
    def oldest_version(self) -> int:
        """Of its oldest token; a group that generated none is as fresh as its episode (not stale)."""
        return min((t.oldest_version for t in self.trajectories if t.oldest_version >= 0), default=self.submit_version)


WORKFLOWS = NameTable("workflow")
register_workflow = WORKFLOWS.register


def make_workflow(name: str, **kwargs) -> "RolloutWorkflow":
    return WORKFLOWS[name](**kwargs)


class RolloutWorkflow(ABC):
    """One episode: ``arun_episode(client, row) -> Group`` (or None to skip the row). Built with the run's settings,
    its attributes here: tokenizer, gen_config (``rollout.gen``), reward_fn (a name), n_samples, reward_timeout_s and
    the dataset's prompt_key, answer_key, messages_key, chat_template, system_prompt, chat_template_kwargs; and
    context_length (``server.context_length``: a multi-turn input must stay below it less ``SGLANG_INPUT_MARGIN``).
    Its own settings are class attributes (their defaults), which ``rollout.workflow_args`` sets for a run.
    `params`: what to generate with."""

    def __init__(self, **settings):
        vars(self).update(settings)

    @functools.cached_property
    def params(self) -> Dict[str, Any]:
        """``gen_config`` as a request's sampling params, with every token that ends a reply among its stop tokens
        (the model's EOS, the chat template's end of turn; none with ignore_eos):
        ``client.generate(ids, self.params)``"""
        params = asdict(self.gen_config) if is_dataclass(self.gen_config) else dict(self.gen_config)
        if not params.get("ignore_eos"):
            stops = stop_token_ids(self.tokenizer, getattr(self, "chat_template", "auto"))
            params["stop_token_ids"] = sorted({*(params.get("stop_token_ids") or []), *stops})
        return params

    @abstractmethod
    async def arun_episode(self, client: Any, row: Dict[str, Any]) -> Optional[Group]:
        ...


@register_workflow("rlvr")
class RLVRWorkflow(RolloutWorkflow):
    """RL with verifiable rewards: one prompt -> ``n_samples`` completions -> reward each -> one group."""

    def __init__(self, tokenizer, gen_config, reward_fn: str = "exact_match", n_samples: int = 8,
                 prompt_key: str = "prompt", answer_key: str = "answer", messages_key: str = "messages",
                 chat_template: str = "auto", system_prompt: str = "", reward_timeout_s: float = 60.0,
                 chat_template_kwargs: Optional[Dict[str, Any]] = None):
        self.tokenizer, self.gen_config, self.chat_template = tokenizer, gen_config, chat_template
        fmt = PromptFormat(prompt_key, messages_key, chat_template, system_prompt, dict(chat_template_kwargs or {}))
        self.prompts = PromptEncoder(tokenizer, fmt)
        self.scorer, self.n_samples = RewardScorer(reward_fn, reward_timeout_s), n_samples
        self.prompt_key, self.answer_key = prompt_key, answer_key

    async def arun_episode(self, client, row: Dict[str, Any]) -> Optional[Group]:
        prompt_ids = self.prompts.encode(row)
        if self.n_samples > 1 and hasattr(client, "generate_group"):  # one request for the group
            results = await client.generate_group(prompt_ids, self.n_samples, self.params)
        else:
            results = await asyncio.gather(*(client.generate(prompt_ids, self.params) for _ in range(self.n_samples)))
        own = (self.prompt_key, self.answer_key, "prompt", "completion", "answer")
        extras = {k: v for k, v in row.items() if k not in own}
        prompt = self.prompts.prompt_text(row)
        stops = set(self.params.get("stop_token_ids") or [])  # a matched stop token is no text (SGLang trims it)
        texts = [self.tokenizer.decode(res.output_ids[:-1] if res.finish_reason == "stop" and res.output_ids
                                       and res.output_ids[-1] in stops else res.output_ids, skip_special_tokens=True)
                 for res in results]
        rewards = await self.scorer.score(prompt, texts, row.get(self.answer_key, ""), extras)
        return Group(trajectories=[Trajectory(prompt_ids=list(prompt_ids), output_ids=list(res.output_ids),
                                              logprobs=list(res.logprobs), versions=list(res.versions), reward=reward,
                                              finish_reason=res.finish_reason, info={"completion": text})
                                   for res, text, reward in zip(results, texts, rewards)])

    def close(self) -> None:
        self.scorer.close()
