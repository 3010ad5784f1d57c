"""Reward functions, by name. ``reward_fn(prompt, completion, answer, **row) -> float``.

Add one with ``@register_reward("name")``; select it with ``rollout.reward_fn=name``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import math
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from areal_hpc.registry.util import die_with_parent
from areal_hpc.rollout.names import NameTable

log = logging.getLogger(__name__)
REWARDS = NameTable("reward function")
register_reward, get_reward = REWARDS.register, REWARDS.__getitem__
IN_PROCESS = ("math",)  # scored in spawned worker processes
ON_THE_LOOP = ("exact_match",)  # cheaper than a thread hop: scored in place
N_THREAD_SLOTS = min(32, len(os.sched_getaffinity(0)) + 4)  # user rewards running at once (an executor's default)
_overdue: Set[concurrent.futures.Future] = set()  # user reward calls that ran out of time and still run


class RewardScorer:
    """Scores a group's completions, the whole group within ``timeout_s``; a reward that raises or runs out of time
    scores 0, with a warning. `close` ends the workers.

    `IN_PROCESS` rewards run in spawned processes, where math-verify's signal-based timeouts work (on a worker's main
    thread) and sympy holding the GIL for minutes (``9^{9^{9}}``) stalls no rollout I/O. User rewards, maybe not
    importable in a fresh process, run on `RewardThreads` (an ``async def`` one on the loop). A thread cannot be
    ended: once every slot is held by a call that ran out of time, scoring raises RuntimeError rather than let every
    later reward time out and score 0."""

    def __init__(self, name: str, timeout_s: float = 60.0):
        self.name, self.fn, self.timeout_s = name, get_reward(name), timeout_s
        # (the built-in one: a worker cannot import a plugin file's reward registered under its name)
        builtin = getattr(self.fn, "__module__", None) == __name__
        self.in_process, self.in_place = builtin and name in IN_PROCESS, builtin and name in ON_THE_LOOP
        self.on_threads = not self.in_process and not inspect.iscoroutinefunction(self.fn)  # else awaited on the loop
        self._pool: Optional[ProcessPoolExecutor] = None
        self._warned = False

    def _float(self, value: Any) -> float:
        """A reward's value; None (a missing ``return``), nan or inf (a nan loss) scores 0, as a raising reward does."""
        try:
            if value is not None and math.isfinite(float(value)):
                return float(value)
        except (TypeError, ValueError):  # a string, a list: the episode fails, saying so
            raise TypeError(f"reward {self.name!r} returned {str(value)[:80]!r}: it should return a float") from None
        if not self._warned:
            self._warned = True
            log.warning("reward %r returned %s: scored 0 (it should return a finite float)", self.name, value)
        return 0.0

    async def score(self, prompt: str, completions: Sequence[str], answer: str,
                    row: Optional[Dict[str, Any]] = None) -> List[float]:
        """``row``: the row's other columns, the reward's keyword arguments. Completions whose workers another
        group ended are scored again on fresh ones, in the time left."""
        calls = [functools.partial(self.fn, prompt, c, answer, **(row or {})) for c in completions]
        if self.in_place:
            return [self._float(call()) for call in calls]
        deadline, futs, late, todo = time.monotonic() + self.timeout_s, {}, set(), list(range(len(calls)))
        _overdue.difference_update([f for f in list(_overdue) if f.done()])
        if self.on_threads and len(_overdue) >= N_THREAD_SLOTS:
            raise RuntimeError(f"reward {self.name!r}: {len(_overdue)} calls ran past rollout.reward_timeout_s="
                               f"{self.timeout_s} and never returned, holding every thread for user rewards: the "
                               "reward function hangs (make it return, or bound its own time)")
        while todo:
            if self.in_process and (self._pool is None or self._pool._broken):  # (a worker died while idle)
                self.close()
                self._pool = ProcessPoolExecutor(min(4, len(os.sched_getaffinity(0))),
                                                 mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=die_with_parent, initargs=(os.getpid(),))
            pool = self._pool
            if pool is not None:
                submit = pool.submit
            elif self.on_threads:
                submit = RewardThreads.of_this_process().submit
            else:  # an async def reward: a task on the loop
                submit = lambda call: asyncio.ensure_future(call())  # noqa: E731
            started = {i: submit(calls[i]) for i in todo}
            futs.update({i: asyncio.wrap_future(f) for i, f in started.items()})
            _, now_late = await asyncio.wait([futs[i] for i in todo], timeout=max(0.0, deadline - time.monotonic()))
            for f in now_late:
                f.cancel()
            if self.on_threads:  # (a call not started yet is cancelled: done)
                _overdue.update(f for i, f in started.items() if futs[i] in now_late and not f.done())
            late |= now_late
            lost = pool is not None and pool is not self._pool  # another group ended these workers
            todo = [i for i in todo if lost and futs[i] not in late
                    and (futs[i].cancelled() or isinstance(futs[i].exception(), BrokenProcessPool))]
        bad = [f for f in futs.values() if f in late or f.exception() is not None]
        if bad:
            if pool is not None and pool is self._pool:  # a worker stuck in C code (no alarm reaches it), or dead:
                self.close()  # fresh ones (not a pool another group has started since)
            why = "timed out" if late else repr(bad[0].exception())
            log.warning("reward %r: %d of %d completions score 0 (%s; rollout.reward_timeout_s=%s)",
                        self.name, len(bad), len(calls), why, self.timeout_s)
        return [0.0 if futs[i] in bad else self._float(futs[i].result()) for i in range(len(calls))]

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for p in list((pool._processes or {}).values()):  # shutdown alone would wait for a stuck worker forever
                p.kill()
            pool.shutdown(wait=True, cancel_futures=True)


class RewardThreads:
    """Daemon threads for user rewards, started as needed (at most `N_THREAD_SLOTS`) and reused: an executor joins its
    threads at exit, so one stuck for good would hold up exit."""

    _mine: Optional["RewardThreads"] = None

    def __init__(self) -> None:
        self.pid, self.jobs, self.idle = os.getpid(), queue.SimpleQueue(), threading.Semaphore(0)
        self.started, self.lock = 0, threading.Lock()

    @classmethod
    def of_this_process(cls) -> "RewardThreads":
        """This process's threads (a forked rollout process does not inherit its parent's)."""
        if cls._mine is None or cls._mine.pid != os.getpid():
            cls._mine = cls()
        return cls._mine

    def submit(self, fn: Callable[[], float]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((fut, fn))
        if not self.idle.acquire(blocking=False):
            with self.lock:
                if self.started < N_THREAD_SLOTS:
                    self.started += 1
                    threading.Thread(target=self._work, name="reward", daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            fut, fn = self.jobs.get()
            if fut.set_running_or_notify_cancel():  # one scored late (cancelled meanwhile) is not run at all
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the scorer reports it
                    fut.set_exception(e)
            self.idle.release()


@register_reward("exact_match")
def exact_match(prompt: str, completion: str, answer: str, **_) -> float:
    """1 if the completion (whitespace-stripped) is exactly the answer: the toy tasks."""
    return float(completion.strip() == str(answer).strip())


@register_reward("math")
def math_answer(prompt: str, completion: str, answer: str, **_) -> float:
    """1 if the completion's final answer is mathematically equal to the reference (math-verify: LaTeX or plain
    expressions, \\boxed{}, fractions, sets; 0.5 == 1/2), not a regex on the last number."""
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm: main thread only (a worker's, under `RewardScorer`)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(str(answer) if str(answer).lstrip().startswith("$") else f"${answer}$", parsing_timeout=timeout)
    pred = parse(completion, parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    try:
        return float(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on some exotic inputs; an unparsable answer is wrong
        return 0.0
