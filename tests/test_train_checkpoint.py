"""DCP checkpoint at step 2, resumed in a fresh process group, continues bit-for-bit (2 CPU ranks)."""

from __future__ import annotations

import random

import torch

from areal_hpc import toy
from ranks import run_ranks

VOCAB = len(toy.SPECIAL_TOKENS) + len(toy.CHARS)  # ids 3.. are ordinary characters

STEPS = 5
SAVE_AT = 2


def _batch(step, rank):
    """Data that depends on the step and on the RNG (so RNG restore matters)."""
    from areal_hpc.train.batching import collate

    g = torch.Generator().manual_seed(100 * step + rank)
    samples = []
    for _ in range(3):
        n = int(torch.randint(4, 20, (1,)).item())  # global torch RNG
        n += random.randint(0, 3)  # python RNG
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        samples.append({"input_ids": ids, "loss_mask": (torch.arange(n) >= 2).long()})
    return collate(samples)


def _loss(out, mb):
    m = mb["loss_mask"].float()
    return -(out["logprobs"] * m).sum() / m.sum().clamp(min=1), {}


def _worker(rank, path, ckpt_dir, out_file, resume):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
    from areal_hpc.train.checkpoint import Checkpointer
    from areal_hpc.train.engine import FSDPEngine

    torch.manual_seed(rank)
    random.seed(rank)
    opt = OptimizerConfig(lr=1e-2, warmup_steps=2, lr_schedule="cosine", weight_decay=0.01)
    eng = FSDPEngine(EngineConfig(path=path, optimizer=opt), MicroBatchSpec(max_tokens_per_mb=24), STEPS)
    ck = Checkpointer(eng, keep_last=1)
    start = 0
    if resume:
        extra = ck.load_latest(ckpt_dir)
        assert extra is not None and extra["global_step"] == SAVE_AT and extra["loader"] == {"pos": 6 * SAVE_AT}
        assert extra["weight_version"] == SAVE_AT and eng.get_version() == SAVE_AT
        start = extra["global_step"]
    else:
        assert ck.load_latest(ckpt_dir) is None
    losses = []
    for step in range(start + 1, STEPS + 1):
        stats = eng.train_batch(_batch(step, rank), _loss)
        eng.step_lr_scheduler()
        eng.set_version(step)
        losses.append((step, stats["loss"], stats["lr"]))
        if not resume and step in (1, SAVE_AT):
            ck.save(ckpt_dir, step, {"loader": {"pos": 6 * step}})
    params = {n: p.full_tensor().clone() for n, p in eng.model.named_parameters()}
    if rank == 0:
        torch.save({"losses": losses, "params": params}, out_file)


def test_resume_is_bit_for_bit(tmp_path):
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    ckpt = tmp_path / "ckpt"
    run_ranks(_worker, 2, args=(path, str(ckpt), str(tmp_path / "a.pt"), False))
    # a crash mid-save of a later step leaves the last good checkpoint current
    (ckpt / "step_00000009.tmp").mkdir()
    (ckpt / "step_00000009.tmp" / "rank0.pt").write_bytes(b"partial")
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002", "step_00000009.tmp"]
    run_ranks(_worker, 2, args=(path, str(ckpt), str(tmp_path / "b.pt"), True))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["losses"][SAVE_AT:] == b["losses"]  # exact floats: losses and learning rates
    for n, p in a["params"].items():
        assert torch.equal(p, b["params"][n]), n


def test_keep_last_and_incomplete_marker(tmp_path):
    from areal_hpc.train.checkpoint import complete_checkpoints, latest_checkpoint

    for s in (1, 2, 3):
        d = tmp_path / f"step_{s:08d}"
        d.mkdir()
        (d / "meta.json").write_text("{}")
    (tmp_path / "latest").write_text("step_00000007")  # names something that is not there
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000001", "step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path / "nothing") is None


# fix8-D
def _prune_cut_short(rank, path, ckpt_dir):
    import shutil
    from pathlib import Path

    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec
    from areal_hpc.train import checkpoint
    from areal_hpc.train.engine import FSDPEngine

    eng = FSDPEngine(EngineConfig(path=path), MicroBatchSpec(max_tokens_per_mb=24), 3)
    ck = checkpoint.Checkpointer(eng, keep_last=1)
    ck.save(ckpt_dir, 1)

    real = shutil.rmtree

    def killed_midway(p, ignore_errors=False):  # the trainer is killed while it deletes step 1: some files are gone
        if not Path(p).name.startswith("step_00000001"):
            return real(p, ignore_errors=ignore_errors)
        (Path(p) / "meta.json").unlink()
        raise KeyboardInterrupt

    checkpoint.shutil.rmtree = killed_midway
    try:
        ck.save(ckpt_dir, 2)
    except KeyboardInterrupt:
        pass
    finally:
        checkpoint.shutil.rmtree = real
    ck.save(ckpt_dir, 3)  # (a restarted trainer's next save)


def test_a_prune_cut_short_leaves_nothing_behind(tmp_path):
    """Deleting an old checkpoint takes a while on a shared filesystem; a trainer preempted meanwhile must not leave
    its remains (GBs) for good."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    ckpt = tmp_path / "ckpt"
    run_ranks(_prune_cut_short, 1, args=(path, str(ckpt)))
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000003"]


def _extended(rank, path, ckpt_dir, out_file):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
    from areal_hpc.train.checkpoint import Checkpointer
    from areal_hpc.train.engine import FSDPEngine, lr_lambda

    opt = OptimizerConfig(lr=1e-2, lr_schedule="cosine")
    eng = FSDPEngine(EngineConfig(path=path, optimizer=opt), MicroBatchSpec(max_tokens_per_mb=24), 4)
    for _ in range(2):
        eng.step_lr_scheduler()
    Checkpointer(eng).save(ckpt_dir, 2)
    eng = FSDPEngine(EngineConfig(path=path, optimizer=opt), MicroBatchSpec(max_tokens_per_mb=24), 8)
    Checkpointer(eng).load_latest(ckpt_dir)
    torch.save({"got": eng.current_lr(), "want": 1e-2 * lr_lambda(opt, 8)(2)}, out_file)


def test_a_run_extended_on_resume_trains_its_next_step_at_the_new_schedules_lr(tmp_path):
    """Submitted again with a larger trainer.total_train_steps, a cosine run's first resumed step trained at the old
    schedule's LR (the optimizer's, restored from the checkpoint), the next ones at the new schedule's."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_extended, 1, args=(path, str(tmp_path / "ckpt"), str(tmp_path / "lr.pt")))
    lr = torch.load(tmp_path / "lr.pt")
    assert abs(lr["got"] - lr["want"]) <= 1e-12, lr


def _new_hyperparameters(rank, path, ckpt_dir, out_file):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
    from areal_hpc.train.checkpoint import Checkpointer
    from areal_hpc.train.engine import FSDPEngine, lr_lambda

    def engine(opt):
        return FSDPEngine(EngineConfig(path=path, optimizer=opt), MicroBatchSpec(max_tokens_per_mb=24), 8)

    eng = engine(OptimizerConfig(lr=1e-2, lr_schedule="cosine", weight_decay=0.1))
    eng.train_batch(_batch(1, rank), _loss)  # optimizer state to restore
    for _ in range(2):
        eng.step_lr_scheduler()
    Checkpointer(eng).save(ckpt_dir, 2)
    new = OptimizerConfig(lr=1e-3, lr_schedule="cosine", weight_decay=0.0)
    eng = engine(new)
    Checkpointer(eng).load_latest(ckpt_dir)
    eng.step_lr_scheduler()
    group = eng.optimizer.param_groups[0]
    torch.save({"lr": eng.current_lr(), "want": 1e-3 * lr_lambda(new, 8)(3), "wd": group["weight_decay"],
                "state": len(eng.optimizer.state)}, out_file)


def test_a_run_resumed_with_a_new_lr_trains_at_it_not_at_the_checkpoints(tmp_path):
    """Submitted again with a lower optimizer.lr (or weight_decay), e.g. after the loss spiked, the resumed run kept the
    checkpoint's: the LR scheduler's saved base LR and the optimizer's saved hyperparameters won over the config.
    The checkpoint restores the optimizer's state (moments) and the schedule's position, the config its values."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_new_hyperparameters, 1, args=(path, str(tmp_path / "ckpt"), str(tmp_path / "lr.pt")))
    got = torch.load(tmp_path / "lr.pt")
    assert abs(got["lr"] - got["want"]) <= 1e-12 and got["wd"] == 0.0 and got["state"] > 0, got
