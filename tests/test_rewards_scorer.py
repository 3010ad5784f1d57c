"""Rewards are scored off the rollout loop and bounded in time: a slow or hanging reward neither stalls the loop's
other work (requests, weight-version checks) nor the run; the `math` reward runs in worker processes, where
math-verify's own timeouts work; no worker outlives the scorer."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from types import SimpleNamespace

import pytest
from chatml import build_chatml_tokenizer

from areal_hpc.config.schema import GenerationConfig
from areal_hpc.rollout import REWARDS, RolloutController, register_reward
from areal_hpc.rollout.workflow import RLVRWorkflow

HANG = "\\boxed{9^{9^{9}}}"  # sympy computes this power for minutes, holding the GIL, unless interrupted


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_chatml_tokenizer(tmp_path_factory.mktemp("tok"), template=None)


class Client:
    """Answers each prompt with the next completion of ``texts``."""

    def __init__(self, tok, texts):
        self.tok, self.texts = tok, list(texts)

    async def generate(self, prompt_ids, params):
        ids = self.tok(self.texts.pop(0), add_special_tokens=False)["input_ids"]
        return SimpleNamespace(output_ids=ids, logprobs=[0.0] * len(ids), versions=[0] * len(ids),
                               finish_reason="stop")


async def _ticking(coro):
    """``coro``'s result and how often a 10 ms ticker ran meanwhile on the same loop."""
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
    ticker = asyncio.create_task(tick())
    try:
        return await coro, ticks
    finally:
        ticker.cancel()


def test_a_hanging_user_reward_scores_zero_without_blocking_the_loop(tok, caplog):
    release = threading.Event()

    @register_reward("test-hang")
    def hang(prompt, completion, answer, **_):
        if completion == "hang":
            release.wait(5)  # old code: the loop waits here, then the reward counts
        return 1.0

    try:
        wf = RLVRWorkflow(tok, GenerationConfig(), reward_fn="test-hang", n_samples=2, reward_timeout_s=0.5)

        async def episode():
            try:
                return await wf.arun_episode(Client(tok, ["hang", "7"]), {"prompt": "3+4="})
            finally:
                release.set()  # the loop's end waits for its threads
        with caplog.at_level(logging.WARNING):
            group, ticks = asyncio.run(_ticking(episode()))
        assert [t.reward for t in group.trajectories] == [0.0, 1.0] and ticks > 10
        assert "1 of 2 completions score 0 (timed out" in caplog.text
    finally:
        release.set()
        REWARDS.pop("test-hang")


def test_a_raising_reward_scores_zero(tok, caplog):
    @register_reward("test-raise")
    def boom(prompt, completion, answer, **_):
        if completion == "bad":
            raise ValueError("cannot score")
        return 1.0

    try:
        wf = RLVRWorkflow(tok, GenerationConfig(), reward_fn="test-raise", n_samples=2)
        with caplog.at_level(logging.WARNING):
            group = asyncio.run(wf.arun_episode(Client(tok, ["bad", "7"]), {"prompt": "3+4="}))
        assert [t.reward for t in group.trajectories] == [0.0, 1.0] and "cannot score" in caplog.text
    finally:
        REWARDS.pop("test-raise")


@pytest.mark.parametrize("in_place", [False, True])
def test_a_reward_returning_none_scores_zero_with_one_warning(tok, caplog, monkeypatch, in_place):
    """A reward that returns None (a missing `return`) failed every episode (float(None)); it scores 0, as a reward
    that raises does, and says so once."""
    def none(prompt, completion, answer, **_):
        return None if completion == "bad" else 1.0
    name = "exact_match" if in_place else "test-none"
    monkeypatch.setitem(REWARDS, name, none)
    wf = RLVRWorkflow(tok, GenerationConfig(), reward_fn=name, n_samples=2)
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                group = asyncio.run(wf.arun_episode(Client(tok, ["bad", "7"]), {"prompt": "3+4="}))
                assert [t.reward for t in group.trajectories] == [0.0, 1.0]
    finally:
        wf.close()
    assert caplog.text.count("returned None") == 1 and name in caplog.text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_reward_scores_zero_not_a_nan_batch(tok, caplog, monkeypatch, bad):
    """A reward of nan or inf (0/0 in a user's scoring) made its group's advantages nan, the loss nan and the whole
    batch's optimizer step skipped; it scores 0, as a reward that raises does, with a warning."""
    monkeypatch.setitem(REWARDS, "test-nan", lambda prompt, completion, answer, **_: bad if completion == "bad" else 1.0)
    wf = RLVRWorkflow(tok, GenerationConfig(), reward_fn="test-nan", n_samples=2)
    try:
        with caplog.at_level(logging.WARNING):
            group = asyncio.run(wf.arun_episode(Client(tok, ["bad", "7"]), {"prompt": "3+4="}))
    finally:
        wf.close()
    assert [t.reward for t in group.trajectories] == [0.0, 1.0] and "test-nan" in caplog.text


def test_math_scores_in_workers_that_the_controller_ends(tok):
    """math-verify's 5 s alarm stops sympy in a worker; the loop ticks meanwhile; stop() leaves no worker."""
    wf = RLVRWorkflow(tok, GenerationConfig(), reward_fn="math", n_samples=2)
    c = RolloutController(wf, Client(tok, [HANG, "\\boxed{7}"]), iter([{"prompt": "3+4=", "answer": "7"}]),
                          batch_size=1, max_head_offpolicyness=0)
    c.pause()  # the episode below is the only one
    c.start()
    try:
        group, ticks = c.run(_ticking(wf.arun_episode(c.client, {"prompt": "3+4=", "answer": "7"})), timeout=25)
    finally:
        c.stop()
    assert [t.reward for t in group.trajectories] == [0.0, 1.0] and ticks > 50
    assert multiprocessing.active_children() == []


def test_stuck_or_dead_workers_are_replaced():
    from areal_hpc.rollout.rewards import RewardScorer

    async def score_thrice(scorer):
        stuck = await scorer.score("q", [HANG], "7")
        scorer.timeout_s = 20  # fresh workers start (and import math-verify) within it
        killed = asyncio.create_task(scorer.score("q", [HANG], "7"))
        while scorer._pool is None or not scorer._pool._processes:
            await asyncio.sleep(0.01)
        for p in list(scorer._pool._processes.values()):  # e.g. the OOM killer
            p.kill()
        return stuck, await killed, await scorer.score("q", ["\\boxed{7}", "\\boxed{8}"], "7")

    scorer = RewardScorer("math", timeout_s=1)
    try:
        assert asyncio.run(score_thrice(scorer)) == ([0.0], [0.0], [1.0, 0.0])
    finally:
        scorer.close()
    assert multiprocessing.active_children() == []


def test_workers_that_died_between_groups_are_replaced():
    """Workers killed while idle (e.g. the OOM killer) broke the pool: the next group failed instead of scoring."""
    from areal_hpc.rollout.rewards import RewardScorer

    async def score_twice(scorer):
        first = await scorer.score("q", ["\\boxed{7}"], "7")
        for p in list(scorer._pool._processes.values()):
            p.kill()
            p.join()
        for _ in range(200):  # until the pool's manager thread notices
            if scorer._pool._broken:
                break
            await asyncio.sleep(0.05)
        return first, await scorer.score("q", ["\\boxed{7}", "\\boxed{8}"], "7")

    scorer = RewardScorer("math", timeout_s=20)
    try:
        assert asyncio.run(score_twice(scorer)) == ([1.0], [1.0, 0.0])
    finally:
        scorer.close()
    assert multiprocessing.active_children() == []


def test_a_reward_that_never_returns_holds_up_no_exit():
    """User rewards ran on the loop's default executor, whose threads interpreter exit (and asyncio.run's end) joins:
    a reward stuck for good kept the trainer from ever exiting."""
    import subprocess
    import sys

    script = ("import asyncio, threading\n"
              "from areal_hpc.rollout.rewards import RewardScorer, register_reward\n"
              "register_reward('test-forever')(lambda prompt, completion, answer, **_: threading.Event().wait())\n"
              "print(asyncio.run(RewardScorer('test-forever', timeout_s=0.2).score('q', ['a'], '7')), flush=True)\n")
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the process did not exit: {e.stdout!r}")
    assert out.returncode == 0 and out.stdout.strip() == "[0.0]", out.stderr


def test_a_row_column_named_like_a_scorer_argument_reaches_the_reward(tok):
    """The row's other columns went to the scorer as keyword arguments: a column named ``completions`` (or ``self``)
    collided with its own parameters, and every episode of such a dataset failed with a TypeError."""
    seen = []

    @register_reward("test-columns")
    def columns(prompt, completion, answer, **row):
        seen.append(row)
        return 1.0

    try:
        wf = RLVRWorkflow(tok, GenerationConfig(), reward_fn="test-columns", n_samples=1)
        group = asyncio.run(wf.arun_episode(Client(tok, ["7"]), {"prompt": "3+4=", "answer": "7",
                                                                  "completions": ["x"], "self": 1}))
        assert [t.reward for t in group.trajectories] == [1.0] and seen == [{"completions": ["x"], "self": 1}]
    finally:
        REWARDS.pop("test-columns")


def test_a_group_that_ends_the_workers_costs_other_groups_nothing():
    """A group out of time ends the workers it shares with the groups scoring beside it: their queued completions
    were cancelled (score() raised CancelledError, the episode vanished uncounted) or broken (scored 0). They are
    scored again on fresh workers, within their own time."""
    import os

    from areal_hpc.rollout.rewards import RewardScorer

    async def two_groups(scorer):
        stuck = asyncio.create_task(scorer.score("q", [HANG] * min(4, len(os.sched_getaffinity(0))), "7"))
        await asyncio.sleep(0.2)  # its completions hold every worker; the next group's wait behind them
        scorer.timeout_s = 30
        return await scorer.score("q", ["\\boxed{7}", "\\boxed{8}"], "7"), await stuck

    scorer = RewardScorer("math", timeout_s=1)
    try:
        behind, stuck = asyncio.run(two_groups(scorer))
    finally:
        scorer.close()
    assert behind == [1.0, 0.0] and set(stuck) == {0.0}
    assert multiprocessing.active_children() == []


def test_user_rewards_run_at_most_thread_slots_at_once():
    """User rewards ran on one daemon thread per completion with no cap: a large group (or many at once) ran them all
    together. Now at most an executor's default number run at once, still on daemon threads."""
    import os
    import time

    from areal_hpc.rollout.rewards import RewardScorer

    running, peak, lock = 0, 0, threading.Lock()

    @register_reward("test-counts")
    def counts(prompt, completion, answer, **_):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return 1.0

    try:
        scores = asyncio.run(RewardScorer("test-counts", timeout_s=30).score("q", ["x"] * 100, "x"))
        assert scores == [1.0] * 100 and 1 < peak <= min(32, len(os.sched_getaffinity(0)) + 4), peak
    finally:
        REWARDS.pop("test-counts", None)


def test_user_rewards_that_never_return_fail_the_episode_once_they_hold_every_thread():
    """A user reward that runs out of time keeps its thread slot (a thread cannot be ended): once every slot was held,
    every later reward waited for one, ran out of time and scored 0, silently, for the rest of the run. Now scoring
    raises, naming the reward, and the episode fails."""
    from areal_hpc.rollout.rewards import N_THREAD_SLOTS, RewardScorer

    release = threading.Event()
    register_reward("test-never")(lambda prompt, completion, answer, **_: release.wait() and 1.0)
    try:
        scorer = RewardScorer("test-never", timeout_s=0.2)
        assert asyncio.run(scorer.score("q", ["x"] * N_THREAD_SLOTS, "x")) == [0.0] * N_THREAD_SLOTS
        with pytest.raises(RuntimeError, match=f"'test-never': {N_THREAD_SLOTS} calls ran past rollout.reward_timeout"):
            asyncio.run(scorer.score("q", ["x"], "x"))
    finally:
        release.set()
        REWARDS.pop("test-never", None)


def test_user_rewards_reuse_their_threads():
    """User rewards started a thread a completion (256 a quickstart step), which doubled the quickstart's step time;
    they now run on at most N_THREAD_SLOTS daemon threads, reused from group to group."""
    from areal_hpc.rollout.rewards import N_THREAD_SLOTS, RewardScorer

    seen = []
    register_reward("test-threads")(lambda *a, **kw: seen.append(threading.current_thread()) or 1.0)
    try:
        scorer = RewardScorer("test-threads", timeout_s=10)
        for _ in range(5):
            assert asyncio.run(scorer.score("q", ["x"] * 8, "x")) == [1.0] * 8
    finally:
        REWARDS.pop("test-threads", None)
    threads = set(seen)
    assert len(seen) == 40 and len(threads) <= N_THREAD_SLOTS, f"{len(threads)} threads for 40 calls"
    assert all(t.daemon and t is not threading.main_thread() for t in threads)


def test_the_quickstart_reward_is_scored_in_place(monkeypatch):
    """exact_match (a string compare) ran on a thread a completion, which cost the quickstart's rollout more than the
    compares themselves; it is called on the rollout loop's own thread."""
    from areal_hpc.rollout.rewards import RewardScorer, exact_match

    seen = []
    spy = lambda *a, **kw: seen.append(threading.current_thread()) or exact_match(*a, **kw)  # noqa: E731
    spy.__module__ = exact_match.__module__  # the built-in one, watched (a user's own runs on a thread)
    monkeypatch.setitem(REWARDS, "exact_match", spy)
    assert asyncio.run(RewardScorer("exact_match").score("q", ["7", " 7 ", "8"], "7")) == [1.0, 1.0, 0.0]
    assert seen == [threading.main_thread()] * 3


def test_an_async_reward_is_awaited(tok):
    """An ``async def`` reward (an LLM judge over HTTP) ran on a thread, which returned its coroutine unawaited:
    float(coroutine) failed every episode. It is awaited on the loop, within the group's time."""
    @register_reward("test-async")
    async def judge(prompt, completion, answer, **_):
        await asyncio.sleep(10 if completion == "slow" else 0.01)
        return float(completion == answer)

    try:
        wf = RLVRWorkflow(tok, GenerationConfig(), reward_fn="test-async", n_samples=3, reward_timeout_s=1)
        group = asyncio.run(wf.arun_episode(Client(tok, ["7", "8", "slow"]), {"prompt": "3+4=", "answer": "7"}))
        assert [t.reward for t in group.trajectories] == [1.0, 0.0, 0.0]
    finally:
        REWARDS.pop("test-async")


def test_a_plugin_file_reward_named_math_is_scored(tmp_path, monkeypatch):
    """A plugin file's own reward registered as ``math`` (replacing the built-in) was sent, by name, to the spawned
    `math` workers, which cannot import a plugin file: every completion scored 0, with only a warning."""
    from areal_hpc.rollout.rewards import RewardScorer
    from areal_hpc.trainers.factory import load_plugins

    monkeypatch.setitem(REWARDS, "math", REWARDS["math"])  # put back afterwards
    plugin = tmp_path / "my_math_reward.py"
    plugin.write_text("from areal_hpc.rollout import register_reward\n\n@register_reward('math')\n"
                      "def mine(prompt, completion, answer, **row):\n    return float(completion == answer)\n")
    load_plugins([str(plugin)])
    scorer = RewardScorer("math", timeout_s=20)
    try:
        assert asyncio.run(scorer.score("q", ["7", "8"], "7")) == [1.0, 0.0]
    finally:
        scorer.close()


@pytest.mark.parametrize("value", ["yes", [1.0, 0.0]])
def test_a_reward_returning_no_number_fails_the_episode_naming_the_reward(tok, monkeypatch, value):
    """A reward returning a string or a list (a TRL-style batch reward) failed every episode with 'could not convert
    string to float' or 'float() argument must be ...', which did not say the reward returned it."""
    monkeypatch.setitem(REWARDS, "test-str", lambda prompt, completion, answer, **_: value)
    wf = RLVRWorkflow(tok, GenerationConfig(), reward_fn="test-str", n_samples=1)
    try:
        with pytest.raises(TypeError, match=r"reward 'test-str' returned .*: it should return a float"):
            asyncio.run(wf.arun_episode(Client(tok, ["7"]), {"prompt": "3+4="}))
    finally:
        wf.close()


def test_a_plugin_file_reward_named_exact_match_is_a_user_reward(tmp_path, monkeypatch, caplog):
    """A plugin file's own reward registered as ``exact_match`` ran in place on the rollout loop, by name: one that
    raised failed the episode (instead of scoring 0) and a slow one stalled the loop."""
    from areal_hpc.rollout.rewards import RewardScorer
    from areal_hpc.trainers.factory import load_plugins

    monkeypatch.setitem(REWARDS, "exact_match", REWARDS["exact_match"])  # put back afterwards
    plugin = tmp_path / "my_exact_reward.py"
    plugin.write_text("import time\nfrom areal_hpc.rollout import register_reward\n\n@register_reward('exact_match')\n"
                      "def mine(prompt, completion, answer, **row):\n    time.sleep(0.3)\n"
                      "    return float(int(completion) == int(answer))\n")
    load_plugins([str(plugin)])
    scorer = RewardScorer("exact_match", timeout_s=20)
    with caplog.at_level(logging.WARNING):
        rewards, ticks = asyncio.run(_ticking(scorer.score("q", ["7", "seven"], "7")))
    assert rewards == [1.0, 0.0] and "ValueError" in caplog.text and ticks >= 10
