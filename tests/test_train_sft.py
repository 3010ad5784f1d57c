"""SFT on toy sum rows (prompt "a+b=", loss on the answer) lowers the loss steadily (2 CPU ranks)."""

from __future__ import annotations

import json

import pytest
import torch

from areal_hpc import toy
from areal_hpc.rollout.data import DatasetError
from areal_hpc.trainers.base import STOPPED_EXIT
from ranks import run_ranks

STEPS = 30
BATCH = 32


def test_tokenize_rows_masks_answer_only(tmp_path):
    from transformers import AutoTokenizer

    from areal_hpc.train.sft_loss import tokenize_rows

    tok = AutoTokenizer.from_pretrained(toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path))
    b = tokenize_rows([{"prompt": "3+4=", "answer": "7"}, {"prompt": "10+20=", "answer": "30"}], tok)
    assert tok.decode(b["input_ids"][0, :4]) == "3+4="
    assert b["loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0]  # "7" + eos, then padding
    assert b["loss_mask"][1].tolist() == [0] * 6 + [1, 1, 1]
    assert b["attention_mask"][0].tolist() == [1] * 6 + [0] * 3


def _worker(rank, path, data_file, out_file):
    from transformers import AutoTokenizer

    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig, SFTConfig
    from areal_hpc.train.batching import shard_batch
    from areal_hpc.train.sft_loss import SFTLearner, tokenize_rows

    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(data_file)]
    tok = AutoTokenizer.from_pretrained(path)
    cfg = SFTConfig(model=EngineConfig(path=path, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=3,
                                                                            lr_schedule="cosine", min_lr_ratio=0.1)),
                    mb_spec=MicroBatchSpec(max_tokens_per_mb=64), batch_size=BATCH)
    learner = SFTLearner(cfg, total_steps=STEPS)
    losses = []
    for step in range(STEPS):
        chunk = rows[(step * BATCH) % len(rows):][:BATCH]
        batch = shard_batch(tokenize_rows(chunk, tok), rank, 2)
        losses.append(learner.train_step(batch)["loss"])
    held_out = shard_batch(tokenize_rows(rows[-64:], tok), rank, 2)
    final = learner.evaluate(held_out)["loss"]
    if rank == 0:
        json.dump({"losses": losses, "eval": final}, open(out_file, "w"))


def test_sft_lowers_loss(tmp_path):
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    data = toy.resolve_dataset("toy:sum-1024", cache_dir=tmp_path)
    out = tmp_path / "out.json"
    run_ranks(_worker, 2, args=(path, data, str(out)))
    res = json.loads(out.read_text())
    losses = res["losses"]
    windows = [sum(losses[i: i + 10]) / 10 for i in range(0, STEPS, 10)]
    assert windows[0] > windows[1] > windows[2], windows  # steadily
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
    assert res["eval"] < 0.6 * losses[0]


def _sft_trainer(rank, run_dir, model, data, mode, stop_after):
    """One launch of the SFT trainer (`trainer.type=sft`) on this rank. With ``stop_after``, rank 0
    gets SIGTERM (what `areal-hpc stop` sends) once that step is done."""
    import os
    import signal
    from pathlib import Path

    from areal_hpc.config import ExperimentConfig, parse_allocation
    from areal_hpc.registry import Registry
    from areal_hpc.trainers import TrainContext, make_trainer

    cfg = ExperimentConfig()
    cfg.trainer.type, cfg.trainer.total_train_steps = "sft", 8
    cfg.trainer.sft.model.path, cfg.train_dataset.path = model, data
    cfg.trainer.sft.batch_size, cfg.trainer.sft.mb_spec.max_tokens_per_mb = 16, 64
    opt = cfg.trainer.sft.model.optimizer
    opt.lr, opt.warmup_steps, opt.lr_schedule = 3e-3, 2, "cosine"
    cfg.saver.freq_steps, cfg.recover.mode = 2, mode
    cfg.stats.tensorboard = cfg.stats.plot = False
    ctx = TrainContext(cfg, parse_allocation("hf:d1+d2"), Path(run_dir), Registry.for_run(run_dir, cfg.launcher))
    trainer = make_trainer(ctx)
    train_step = trainer.train_step

    def step_then_stop(step):
        out = train_step(step)
        if step == stop_after and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_stop
    assert trainer.run() == (STOPPED_EXIT if stop_after else 0)  # stopped short of its goal, or done


def test_sft_resumes_from_its_checkpoint(tmp_path):
    """recover.mode for SFT as for PPO: a run stopped after step 3 checkpoints there; `resume`
    continues at step 4 with the restored weights, optimizer, LR schedule and data position, so its
    losses are those of a run that never stopped; `resume` without a checkpoint is an error."""
    from areal_hpc.trainers.metrics import read_metrics

    model = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    data = toy.resolve_dataset("toy:sum-1024", cache_dir=tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_ranks(_sft_trainer, 2, args=(str(ref), model, data, "auto", 0))
    run_ranks(_sft_trainer, 2, args=(str(run), model, data, "auto", 3))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    run_ranks(_sft_trainer, 2, args=(str(run), model, data, "resume", 0))
    want, got = read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["lr"] - b["lr"]) <= 1e-9
    assert (run / "weights" / "v8" / "config.json").exists()
    with pytest.raises(Exception, match="resume asked but no checkpoint"):
        run_ranks(_sft_trainer, 1, args=(str(tmp_path / "none"), model, data, "resume", 0))
    assert not (tmp_path / "none" / "metrics.jsonl").exists()


def test_tokens_counts_the_whole_batch_not_rank0s_share_times_the_ranks(monkeypatch):
    """Rank 0's shard (the longest rows first) times the world size overstated the step's tokens."""
    from areal_hpc.config import ExperimentConfig
    from areal_hpc.train import dist
    from areal_hpc.train.phases import PhaseTimer
    from areal_hpc.trainers import sft_trainer

    lengths = [8, 1, 1, 1]
    batch = {"input_ids": torch.ones(4, 8, dtype=torch.long), "loss_mask": torch.ones(4, 8, dtype=torch.long),
             "attention_mask": (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).long()}
    monkeypatch.setattr(sft_trainer, "tokenize_rows", lambda *args, **kwargs: batch)
    monkeypatch.setattr(dist, "world_size", lambda: 2)

    class Fake:
        def train_step(self, batch):
            return {"loss": 1.0}

        def set_version(self, version):
            pass

    trainer = sft_trainer.SFTTrainer.__new__(sft_trainer.SFTTrainer)
    trainer.cfg, trainer.phases, trainer.learner = ExperimentConfig(), PhaseTimer(), Fake()
    trainer.cfg.trainer.sft.batch_size, trainer.loader, trainer.engine = 4, iter([{}] * 4), Fake()
    trainer.tokenizer = trainer.prompts = None
    assert trainer.train_step(1)["tokens"] == sum(lengths)


def sft_trainer_on(tmp_path, monkeypatch, rows, epochs=0, **dataset):
    """An `SFTTrainer` set up on ``rows`` (a JSONL file, raw-text prompts, batches of 2, ``epochs``, ``dataset``
    overrides) whose learner only records the batches it gets (``t.learner.batches``)."""
    from areal_hpc.config import ExperimentConfig, parse_allocation
    from areal_hpc.registry import Registry
    from areal_hpc.train.phases import PhaseTimer
    from areal_hpc.trainers import TrainContext, sft_trainer

    class Learner:
        model_path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)

        def __init__(self, *args):
            self.engine, self.batches = self, []

        def train_step(self, batch):
            self.batches.append(batch)
            return {"loss": 1.0}

        def set_version(self, version):
            pass

    monkeypatch.setattr(sft_trainer, "SFTLearner", Learner)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ExperimentConfig()
    cfg.trainer.type, cfg.trainer.sft.batch_size, cfg.trainer.sft.model.path = "sft", 2, Learner.model_path
    cfg.trainer.total_train_epochs = epochs
    cfg.train_dataset.path, cfg.train_dataset.chat_template, cfg.train_dataset.shuffle = str(data), "none", False
    for key, value in dataset.items():
        setattr(cfg.train_dataset, key, value)
    t = sft_trainer.SFTTrainer(TrainContext(cfg, parse_allocation("hf:d1"), tmp_path, Registry.for_run(tmp_path)))
    t.engine, t.phases = t.setup(), PhaseTimer()
    return t


def test_a_prompt_longer_than_max_prompt_len_is_left_out_not_trained_on_nothing(tmp_path, monkeypatch, caplog):
    """Prompt and answer were cut together to ``max_prompt_len``: a longer prompt left its row no answer token to
    train on, silently. Such rows are now left out with one warning and a count (as PPO does); none left is an
    error."""
    def trainer(prompts):
        return sft_trainer_on(tmp_path, monkeypatch, [{"prompt": p, "answer": "7"} for p in prompts], max_prompt_len=8)

    t = trainer(["3+4=", "1+2+3+4+5+6+7+8+9=", "1+6="])
    assert "1 of 3 prompts are longer than train_dataset.max_prompt_len=8" in caplog.text
    t.train_step(1)
    (batch,) = t.learner.batches
    assert batch["loss_mask"].sum(1).tolist() == [2, 2]  # "7" and its end, on both rows
    with pytest.raises(DatasetError, match="max_prompt_len"):
        trainer(["1+2+3+4+5+6+7+8+9="])


def test_a_row_without_an_answer_is_left_out_when_loaded_not_a_keyerror_at_its_step(tmp_path, monkeypatch, caplog):
    """A row without the answer column loaded fine and was trained on the answer "None" (a JSONL row lacking a key
    has it None), or raised KeyError at the SFT step that drew it (no row has the column), hours into a run. It is
    now left out when the data is loaded, with a warning naming the column and the row's keys (as PPO leaves out a
    row without a prompt); none left is a `DatasetError`."""
    def trainer(rows):
        return sft_trainer_on(tmp_path, monkeypatch, rows)

    t = trainer([{"prompt": "3+4=", "answer": "7"}, {"prompt": "1+6=", "solution": "7"},
                 {"prompt": "1+2=", "answer": "3"}])
    assert "1 of 3 rows of train_dataset cannot be encoded as prompts: left out (first: row has no 'answer': keys " \
           "['prompt', 'solution'])" in caplog.text, caplog.text
    t.train_step(1)
    (batch,) = t.learner.batches
    assert batch["loss_mask"].sum(1).tolist() == [2, 2]  # each answer and its end
    assert "None" not in t.tokenizer.batch_decode(batch["input_ids"])[1]
    with pytest.raises(DatasetError, match="none of the 1 rows of train_dataset gives a usable prompt.*no 'answer'"):
        trainer([{"prompt": "1+6=", "solution": "7"}])


def _sft_epochs(rank, run_dir, model, data):
    from pathlib import Path

    from areal_hpc.config import ExperimentConfig, parse_allocation
    from areal_hpc.registry import Registry
    from areal_hpc.trainers import TrainContext, make_trainer

    cfg = ExperimentConfig()
    cfg.trainer.type, cfg.trainer.total_train_steps, cfg.trainer.total_train_epochs = "sft", 100, 2
    cfg.trainer.sft.model.path, cfg.train_dataset.path = model, data
    cfg.trainer.sft.batch_size, cfg.trainer.sft.mb_spec.max_tokens_per_mb = 16, 64
    opt = cfg.trainer.sft.model.optimizer
    opt.lr, opt.warmup_steps, opt.lr_schedule, opt.min_lr_ratio = 1e-3, 1, "cosine", 0.1
    cfg.saver.freq_steps = 0
    cfg.stats.tensorboard = cfg.stats.plot = False
    ctx = TrainContext(cfg, parse_allocation("hf:d1+d1"), Path(run_dir), Registry.for_run(run_dir, cfg.launcher))
    assert make_trainer(ctx).run() == 0


def test_an_sft_run_ended_by_its_epochs_decays_its_lr_over_the_steps_it_trains(tmp_path):
    """trainer.total_train_epochs ends SFT when the rows are used up (2 epochs of 40 rows, batches of 16: 5 steps),
    but the cosine schedule ran over trainer.total_train_steps (100): the LR never decayed (configs/sft.yaml: 3 epochs,
    2000 steps). The schedule now ends with the last full batch of the epochs."""
    from areal_hpc.config.schema import OptimizerConfig
    from areal_hpc.train.engine import lr_lambda
    from areal_hpc.trainers.metrics import read_metrics

    model = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    data = toy.resolve_dataset("toy:sum-40", cache_dir=tmp_path)
    run_ranks(_sft_epochs, 1, args=(str(tmp_path / "run"), model, data))
    got = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    f = lr_lambda(OptimizerConfig(warmup_steps=1, lr_schedule="cosine", min_lr_ratio=0.1), total_steps=5)
    assert got == pytest.approx([1e-3 * f(k) for k in range(5)], rel=1e-9), got


def test_a_conversational_completion_is_trained_as_its_reply_not_as_the_text_of_a_list(tmp_path, monkeypatch):
    """TRL's conversational prompt-completion rows (``completion: [{role: assistant, content}]``, the README's
    ``messages_key=prompt``) were trained on the Python text of the list, "[{'role': 'assistant', ...}]", silently.
    One assistant message is now its content; any other list or dict is a `DatasetError` when the data is loaded."""
    reply = [{"role": "assistant", "content": "7"}]
    t = sft_trainer_on(tmp_path, monkeypatch, [{"prompt": "3+4=", "completion": reply}] * 2, answer_key="completion")
    t.train_step(1)
    (batch,) = t.learner.batches
    assert batch["loss_mask"].sum(1).tolist() == [2, 2]  # "7" and its end
    assert t.tokenizer.decode(batch["input_ids"][0][batch["loss_mask"][0].bool()]) == "7<eos>"
    with pytest.raises(DatasetError, match="answer_key.*one assistant message"):
        sft_trainer_on(tmp_path, monkeypatch, [{"prompt": "3+4=", "completion": reply * 2}] * 2,
                       answer_key="completion")


def test_epochs_of_rows_that_fill_no_batch_are_an_error_not_a_completed_run_that_trained_nothing(tmp_path, monkeypatch):
    """1 usable row, 1 epoch, batches of 2: the first step found no full batch, so the run ended at step 0 with exit
    0 (COMPLETED) and published the untrained model as its weights, a warning its only sign."""
    from areal_hpc.config import ConfigError

    rows = [{"prompt": "3+4=", "answer": "7"}, {"prompt": "1+2+3+4+5+6+7+8+9=", "answer": "45"}]  # one over 8
    with pytest.raises(ConfigError, match=r"trainer.sft.batch_size: 1 row\(s\) x 1 epoch\(s\) fill no batch of 2"):
        sft_trainer_on(tmp_path, monkeypatch, rows, epochs=1, max_prompt_len=8)
    t = sft_trainer_on(tmp_path, monkeypatch, rows, epochs=2, max_prompt_len=8)  # 2 rows: one batch
    assert t.train_step(1) is not None and t.train_step(2) is None
