"""SFT on toy sum rows (prompt "a+b=", loss on the answer) lowers the loss steadily (2 CPU ranks)."""

from __future__ import annotations

import json

import torch

from areal_hpc import toy
from ranks import run_ranks

STEPS = 30
BATCH = 32


def test_tokenize_rows_masks_answer_only(tmp_path):
    from transformers import AutoTokenizer

    from areal_hpc.train.sft import tokenize_rows

    tok = AutoTokenizer.from_pretrained(toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path))
    b = tokenize_rows([{"prompt": "3+4=", "answer": "7"}, {"prompt": "10+20=", "answer": "30"}], tok)
    assert tok.decode(b["input_ids"][0, :4]) == "3+4="
    assert b["loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0]  # "7" + eos, then padding
    assert b["loss_mask"][1].tolist() == [0] * 6 + [1, 1, 1]
    assert b["attention_mask"][0].tolist() == [1] * 6 + [0] * 3


def _worker(rank, path, data_file, out_file):
    from transformers import AutoTokenizer

    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig, SFTConfig
    from areal_hpc.train.batch import shard_batch
    from areal_hpc.train.sft import SFTLearner, tokenize_rows

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
