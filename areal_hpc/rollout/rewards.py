"""Reward functions, by name. ``reward_fn(prompt, completion, answer, **row) -> float``.

Add one with ``@register_reward("name")``; select it with ``rollout.reward_fn=name``."""

from __future__ import annotations

import threading
from typing import Callable, Dict

RewardFn = Callable[..., float]
REWARDS: Dict[str, RewardFn] = {}


def register_reward(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return deco


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward function {name!r}; known: {', '.join(sorted(REWARDS))}") from None


@register_reward("exact_match")
def exact_match(prompt: str, completion: str, answer: str, **_) -> float:
    """1 if the completion (whitespace-stripped) is exactly the answer: the toy tasks."""
    return float(completion.strip() == str(answer).strip())


@register_reward("math")
def math_answer(prompt: str, completion: str, answer: str, **_) -> float:
    """1 if the completion's final answer is mathematically equal to the reference (math-verify:
    LaTeX or plain expressions, \\boxed{}, fractions, sets; 0.5 == 1/2), not a regex on the last number."""
    from math_verify import parse, verify

    # math-verify bounds its work with signal.alarm, which only the main thread may use; the
    # rollout controller scores on its own thread, where parsing runs without that bound
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(str(answer) if str(answer).lstrip().startswith("$") else f"${answer}$", parsing_timeout=timeout)
    pred = parse(completion, parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    try:
        return float(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on some exotic inputs; an unparsable answer is wrong
        return 0.0
