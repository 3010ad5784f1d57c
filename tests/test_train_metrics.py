"""`MetricsWriter` and `read_metrics`: metrics.jsonl and TensorBoard events across a restart."""

from __future__ import annotations

import json

from areal_hpc.trainers.metrics import MetricsWriter, read_metrics


def test_a_line_torn_by_a_killed_trainer_does_not_stop_its_restart(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    writer = MetricsWriter(tmp_path, tensorboard=False, plot=False)
    writer.drop_after(2)  # the restart resumes from the checkpoint of step 2
    writer.write({"step": 3, "loss": 0.25})
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]


def test_a_restart_replaces_metrics_jsonl_at_once_not_in_place(tmp_path):
    """`drop_after` writes a new file and renames it over the old one: a crash while it writes leaves the old file
    whole (a rewrite in place would have truncated it first), as an open handle to the old one shows."""
    path = tmp_path / "metrics.jsonl"
    old = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4))
    path.write_text(old)
    with open(path) as before:
        MetricsWriter(tmp_path, tensorboard=False, plot=False).drop_after(2)
        assert before.read() == old
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_tensorboard_hides_the_steps_a_crashed_run_wrote_past_the_checkpoint_its_restart_resumes_from(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    crashed = MetricsWriter(tmp_path, plot=False, resume_step=0)
    for s in (1, 2, 3, 4):
        crashed.write({"step": s, "loss": float(s)})
    crashed.close()
    restarted = MetricsWriter(tmp_path, plot=False, resume_step=2)
    restarted.write({"step": 3, "loss": 30.0})
    restarted.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_a_run_without_rewards_draws_no_reward_curve(tmp_path):
    """An SFT run's rows have a loss and no reward_mean: it wrote reward.png, an empty "mean reward" plot."""
    sft, ppo = tmp_path / "sft", tmp_path / "ppo"
    for d, key in ((sft, "loss"), (ppo, "reward_mean")):
        d.mkdir()
        writer = MetricsWriter(d, tensorboard=False, plot=True)
        for step in (1, 2):
            writer.write({"step": step, key: 0.5})
        writer.close()
    assert not (sft / "reward.png").exists()
    assert (ppo / "reward.png").stat().st_size > 0
