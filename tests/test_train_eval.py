"""`trainer.type=null` (`EvalTrainer`) with a stand-in server pool: the report and the samples it writes."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import pytest

from areal_hpc.config import ExperimentConfig, parse_allocation
from areal_hpc.registry import Registry
from areal_hpc.rollout import Trajectory
from areal_hpc.rollout.workflow import Group, RolloutWorkflow, register_workflow
from areal_hpc.trainers import TrainContext, make_trainer
from areal_hpc.trainers.base import STOPPED_EXIT


@register_workflow("test-skips-odd")
class SkipsOdd(RolloutWorkflow):
    """Skips (None) the rows whose number is odd, as a workflow may; one completion per row, rewarded 1."""

    def __init__(self, **kwargs):
        pass

    async def arun_episode(self, client, row):
        if int(row["prompt"]) % 2:
            return None
        return Group([Trajectory([1], [2, 3], [0.0, 0.0], [0, 0], 1.0, info={"completion": "ok"})])


@register_workflow("test-never-ends")
class NeverEnds(RolloutWorkflow):
    def __init__(self, **kwargs):
        pass

    async def arun_episode(self, client, row):
        await asyncio.sleep(30)


class FakePool:
    async def start(self):
        pass

    async def close(self):
        pass


@pytest.fixture
def make_eval(tmp_path, monkeypatch):
    """An `EvalTrainer` over 5 rows ("0" to "4") with ``rollout.workflow=workflow`` and ``servers`` (the stand-in for
    waiting for the servers: `server_pool`)."""
    monkeypatch.setattr("areal_hpc.trainers.rollout_side.load_tokenizer", lambda path: None)
    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"prompt": str(i), "answer": "x"}) + "\n" for i in range(5)))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}

    def make(workflow, servers=lambda ctx, should_stop=None: FakePool()):
        monkeypatch.setattr("areal_hpc.trainers.rollout_side.server_pool", servers)
        cfg = ExperimentConfig()
        cfg.trainer.type, cfg.rollout.workflow, cfg.rollout.n_samples = "null", workflow, 1
        cfg.valid_dataset.path, cfg.server.model_path = str(data), "unused"
        return make_trainer(TrainContext(cfg, parse_allocation("hf:d1"), tmp_path, Registry.for_run(tmp_path)))

    yield make
    for s, h in handlers.items():
        signal.signal(s, h)


def test_rows_the_workflow_skips_are_left_out_of_the_report(tmp_path, make_eval):
    assert make_eval("test-skips-odd").run() == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_prompts"] == 3 and report["accuracy"] == 1.0
    samples = [json.loads(x) for x in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["0", "2", "4"]


@register_workflow("test-every-row")
class EveryRow(SkipsOdd):
    async def arun_episode(self, client, row):
        return Group([Trajectory([1], [2, 3], [0.0, 0.0], [0, 0], 1.0, info={"completion": "ok"})])


@register_workflow("test-empty-odd")
class EmptyOdd(SkipsOdd):
    """As `SkipsOdd`, but the odd rows get a group with no completions (a custom workflow that filtered them all)."""

    async def arun_episode(self, client, row):
        return await super().arun_episode(client, row) or Group([])


def test_a_group_with_no_completions_counts_as_a_prompt_none_passed(tmp_path, make_eval):
    """`max` over its rewards raised ValueError after the whole evaluation, with no report."""
    assert make_eval("test-empty-odd").run() == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_prompts"] == 5 and report["pass@1"] == 0.6 and report["accuracy"] == 1.0


def test_a_messages_row_of_a_mixed_dataset_is_written_with_its_messages(tmp_path, make_eval):
    """Rows of a dataset with both columns have both keys, one of them null: a messages row was written with
    ``prompt: null``, not what the model was asked."""
    chat = [{"role": "user", "content": "What is 3?"}]
    (tmp_path / "valid.jsonl").write_text(json.dumps({"prompt": "1", "messages": None, "answer": "x"}) + "\n"
                                          + json.dumps({"prompt": None, "messages": chat, "answer": "y"}) + "\n")
    assert make_eval("test-every-row").run() == 0
    samples = [json.loads(x) for x in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [(s["prompt"], s["answer"]) for s in samples] == [("1", "x"), (chat, "y")]


def test_a_stop_request_ends_the_evaluation(tmp_path, make_eval):
    """SIGTERM (`areal-hpc stop`) only sets the trainer's stop flag: the evaluation must look at it, or it runs on
    until the launcher's grace ends and it is killed."""
    trainer = make_eval("test-never-ends")
    threading.Timer(0.5, lambda: setattr(trainer.stop, "signal", signal.SIGTERM)).start()
    t0 = time.monotonic()
    assert trainer.run() == STOPPED_EXIT  # not 0: the run did not complete, and wrote no report
    assert time.monotonic() - t0 < 10 and not (tmp_path / "eval.json").exists()


def test_a_stop_request_ends_the_wait_for_servers(make_eval):
    from areal_hpc.trainers.rollout_side import server_pool

    trainer = make_eval("test-skips-odd", servers=server_pool)  # none will come
    threading.Timer(0.5, lambda: setattr(trainer.stop, "signal", signal.SIGTERM)).start()
    t0 = time.monotonic()
    assert trainer.run() == STOPPED_EXIT
    assert time.monotonic() - t0 < 10


@register_workflow("test-fails-on-3")
class FailsOn3(SkipsOdd):
    """As `SkipsOdd`, but the episode of row "3" raises (a server error, a bad row); with ``all``, every episode
    does."""

    async def arun_episode(self, client, row):
        if row["prompt"] == "3" or row.get("all"):
            raise RuntimeError(f"episode {row['prompt']} failed")
        return await super().arun_episode(client, row)


def test_a_failing_episode_is_counted_and_the_evaluation_goes_on(tmp_path, make_eval, caplog):
    """One failing episode failed the whole evaluation, with no report; training counts it as failed and goes on."""
    assert make_eval("test-fails-on-3").run() == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_prompts"] == 3 and report["n_failed"] == 1 and report["accuracy"] == 1.0
    assert "1 of 5 episodes failed" in caplog.text and "episode 3 failed" in caplog.text


def test_an_evaluation_whose_every_episode_fails_is_an_error(tmp_path, make_eval):
    from areal_hpc.rollout import RolloutError

    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"prompt": str(i), "answer": "x", "all": 1}) + "\n" for i in range(2)))
    with pytest.raises(RolloutError, match="all 2 evaluation episodes failed; first: RuntimeError"):
        make_eval("test-fails-on-3").run()
    assert not (tmp_path / "eval.json").exists()


def test_an_evaluation_whose_every_episode_not_skipped_fails_is_an_error(tmp_path, make_eval):
    """Row "1" skipped, row "3" failed: the run wrote a report of 0 prompts, pass@1 0.0, and exited 0 (COMPLETED)."""
    from areal_hpc.rollout import RolloutError

    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in "13"))
    with pytest.raises(RolloutError, match=r"all 1 evaluation episodes failed \(1 row\(s\) skipped\); first: Runtime"):
        make_eval("test-fails-on-3").run()
    assert not (tmp_path / "eval.json").exists()
