"""`trainer.type=null` (`EvalTrainer`) with a stand-in server pool: the report and the samples it writes."""

from __future__ import annotations

import json
import signal

from areal_hpc.config import ExperimentConfig, parse_allocation
from areal_hpc.registry import Registry
from areal_hpc.rollout import Trajectory
from areal_hpc.rollout.workflow import Group, RolloutWorkflow, register_workflow
from areal_hpc.trainers import TrainContext, make_trainer


@register_workflow("test-skips-odd")
class SkipsOdd(RolloutWorkflow):
    """Skips (None) the rows whose number is odd, as a workflow may; one completion per row, rewarded 1."""

    def __init__(self, **kwargs):
        pass

    async def arun_episode(self, client, row):
        if int(row["prompt"]) % 2:
            return None
        return Group([Trajectory([1], [2, 3], [0.0, 0.0], [0, 0], 1.0, info={"completion": "ok"})])


class FakePool:
    async def start(self):
        pass

    async def close(self):
        pass


def test_rows_the_workflow_skips_are_left_out_of_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr("areal_hpc.trainers.rollout_side.server_pool", lambda ctx: FakePool())
    monkeypatch.setattr("areal_hpc.trainers.rollout_side.load_tokenizer", lambda path: None)
    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"prompt": str(i), "answer": "x"}) + "\n" for i in range(5)))
    cfg = ExperimentConfig()
    cfg.trainer.type, cfg.rollout.workflow, cfg.rollout.n_samples = "null", "test-skips-odd", 1
    cfg.valid_dataset.path, cfg.server.model_path = str(data), "unused"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    try:
        trainer = make_trainer(TrainContext(cfg, parse_allocation("hf:d1"), tmp_path, Registry.for_run(tmp_path)))
        assert trainer.run() == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_prompts"] == 3 and report["accuracy"] == 1.0
    samples = [json.loads(x) for x in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["0", "2", "4"]
