"""FSDP2 engine on 2 CPU ranks vs a single-process transformers reference (fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from areal_hpc import toy
from ranks import run_ranks

VOCAB = len(toy.SPECIAL_TOKENS) + len(toy.CHARS)  # ids 3.. are ordinary characters

LENS = [5, 17, 9, 30, 3, 12]


def make_batch():
    from areal_hpc.train.batching import collate

    g = torch.Generator().manual_seed(0)
    samples = []
    for n in LENS:
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        lm = torch.zeros(n, dtype=torch.long)
        lm[max(1, n // 2):] = 1
        samples.append({"input_ids": ids, "loss_mask": lm})
    return samples, collate(samples)


def nll_loss(out, mb):
    m = mb["loss_mask"].float()
    n = m.sum().clamp(min=1)
    return -(out["logprobs"] * m).sum() / n, {"entropy": (out["entropy"] * m).sum() / n}


def reference(path, samples):
    """Per-sample logprobs, the global-token-mean NLL and its gradients, unpacked, one process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    total = sum(int(s["loss_mask"].sum()) for s in samples)
    logps, loss = [], 0.0
    for s in samples:
        ids = s["input_ids"]
        logits = model(input_ids=ids[None]).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, ids[1:, None]).squeeze(-1)
        logps.append(torch.cat([lp.new_zeros(1), lp]).detach())
        loss = loss - (torch.cat([lp.new_zeros(1), lp]) * s["loss_mask"]).sum() / total
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, logps, float(loss), grads


def full_grads(engine):
    return {n: p.grad.full_tensor().clone() for n, p in engine.model.named_parameters()}


def assert_close_grads(got, want, tol=1e-5):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=tol, rtol=tol, msg=n)


def _worker(rank, path):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
    from areal_hpc.train.batching import select
    from areal_hpc.train.engine import FSDPEngine

    samples, batch = make_batch()
    ref_model, ref_logps, ref_loss, ref_grads = reference(path, samples)

    cfg = EngineConfig(path=path, optimizer=OptimizerConfig(lr=1e-3, grad_clip=0.0))
    eng = FSDPEngine(cfg, MicroBatchSpec(max_tokens_per_mb=40), total_steps=10)
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight  # tie survives meta init
    assert eng.fsdp_units == "model"  # auto: a small model, both ranks on this host

    # packed (several documents per row) vs unpacked logprobs
    mine = select(batch, [0, 1, 2] if rank == 0 else [3, 4, 5])
    lp = eng.forward(mine)
    for j, i in enumerate([0, 1, 2] if rank == 0 else [3, 4, 5]):
        torch.testing.assert_close(lp[j, : LENS[i]], ref_logps[i], atol=1e-5, rtol=0)
        assert (lp[j, LENS[i]:] == 0).all()

    # loss and full gradients, for several micro-batch plans and rank splits
    splits = [([0, 1, 2], [3, 4, 5], MicroBatchSpec(max_tokens_per_mb=40)),
              ([0, 1, 2], [3, 4, 5], MicroBatchSpec(max_tokens_per_mb=10_000)),
              ([4], [0, 1, 2, 3, 5], MicroBatchSpec(max_tokens_per_mb=16, n_mbs=3))]
    for r0, r1, spec in splits:
        eng.mb_spec = spec
        stats = eng.forward_backward(select(batch, r0 if rank == 0 else r1), nll_loss)
        assert abs(stats["loss"] - ref_loss) < 1e-5, (spec, stats["loss"], ref_loss)
        assert stats["n_tokens"] == sum(int(s["loss_mask"].sum()) for s in samples)
        assert_close_grads(full_grads(eng), ref_grads)

    # one optimizer step equals AdamW on the reference, given the same gradients (they were checked
    # above; Adam's first step divides by |g| + eps, so for near-zero entries it would magnify
    # float32 round-off differences between two correct gradient computations)
    eng.mb_spec = MicroBatchSpec(max_tokens_per_mb=40)
    eng.forward_backward(select(batch, [0, 1, 2] if rank == 0 else [3, 4, 5]), nll_loss)
    grads = full_grads(eng)
    assert_close_grads(grads, ref_grads)
    for n, p in ref_model.named_parameters():
        p.grad = grads[n].clone()
    step = eng.optimizer_step()
    assert step["skipped_step"] == 0.0
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ref_opt.step()
    for n, p in eng.model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), dict(ref_model.named_parameters())[n].detach(),
                                   atol=1e-6, rtol=1e-5, msg=n)

    # a non-finite gradient norm skips the step and leaves the weights alone
    before = {n: p.full_tensor().clone() for n, p in eng.model.named_parameters()}
    stats = eng.train_batch(select(batch, [0] if rank == 0 else [1]),
                            lambda out, mb: (nll_loss(out, mb)[0] * float("nan"), {}))
    assert stats["skipped_step"] == 1.0
    for n, p in eng.model.named_parameters():
        assert torch.equal(p.full_tensor(), before[n])

    # activation checkpointing, document-aware (varlen) attention, micro-batches padded to the
    # token budget: same logprobs and gradients
    for kw in ({"gradient_checkpointing": True}, {"attn_impl": "varlen"},
               {"attn_impl": "varlen", "pad_micro_batches": True}, {"fsdp_units": "model"},
               {"fsdp_units": "layer"}):
        other = FSDPEngine(EngineConfig(path=path, **kw), MicroBatchSpec(max_tokens_per_mb=40), 10)
        lp = other.forward(mine)
        for j, i in enumerate([0, 1, 2] if rank == 0 else [3, 4, 5]):
            torch.testing.assert_close(lp[j, : LENS[i]], ref_logps[i], atol=1e-5, rtol=0)
        other.forward_backward(mine, nll_loss)
        assert_close_grads(full_grads(other), ref_grads)
        if "fsdp_units" in kw:  # a second step: the unit was resharded after the last backward, then gathered again
            other.mb_spec = MicroBatchSpec(max_tokens_per_mb=16, n_mbs=3)
            assert other.forward_backward(mine, nll_loss)["n_mbs"] >= 3
            assert_close_grads(full_grads(other), ref_grads)


def test_fsdp_two_ranks_match_single_process(tmp_path):
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_worker, 2, args=(path,))


@pytest.mark.parametrize("fused_lm_head, fsdp_units", [(True, "auto"), (False, "auto"), (True, "layer")])
def test_single_process_engine_without_env(tmp_path, fused_lm_head, fsdp_units):
    """World size 1 needs no launcher variables; logprobs from the hidden states (fused head) or
    from the logits, with one FSDP unit (the default on one rank) or one per layer, give the
    reference's loss and gradients."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_single, 1, args=(path, fused_lm_head, fsdp_units))


def _single(rank, path, fused_lm_head, fsdp_units):
    import os

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(k, None)
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec
    from areal_hpc.train.engine import FSDPEngine

    samples, batch = make_batch()
    _, ref_logps, ref_loss, ref_grads = reference(path, samples)
    eng = FSDPEngine(EngineConfig(path=path, fused_lm_head=fused_lm_head, fsdp_units=fsdp_units),
                     MicroBatchSpec(max_tokens_per_mb=32), total_steps=1)
    assert eng.info.world_size == 1 and eng.fused_lm_head == fused_lm_head
    # several micro-batches, gradients summed unreduced until the last one; then another plan
    for spec in (MicroBatchSpec(max_tokens_per_mb=32), MicroBatchSpec(max_tokens_per_mb=16, n_mbs=5)):
        eng.mb_spec = spec
        stats = eng.forward_backward(batch, nll_loss)
        assert stats["n_mbs"] > 2 and abs(stats["loss"] - ref_loss) < 1e-5
        assert_close_grads(full_grads(eng), ref_grads)
    lp = eng.forward(batch)
    for i, n in enumerate(LENS):
        torch.testing.assert_close(lp[i, :n], ref_logps[i], atol=1e-5, rtol=0)


def test_env_ranks_torchrun_slurm_and_none(monkeypatch):
    from areal_hpc.train.dist import env_ranks

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
              "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert env_ranks() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_ranks() == (5, 16, 1)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # an srun step inside a larger allocation
    assert env_ranks() == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert env_ranks() == (3, 4, 3)  # torchrun wins


def test_fused_adamw_skips_a_non_finite_step_on_the_device(tmp_path):
    """With fused AdamW (the GPU default) a non-finite gradient norm skips the step through the
    optimizer's device-side ``found_inf`` flag: weights, moments and step count stay as they were,
    and the next finite step is the one a foreach AdamW takes."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_fused_skip, 1, args=(path,))


def _fused_skip(rank, path):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec
    from areal_hpc.train.engine import FSDPEngine

    _, batch = make_batch()
    engines = [FSDPEngine(EngineConfig(path=path), MicroBatchSpec(max_tokens_per_mb=32), total_steps=4)
               for _ in range(2)]
    fused, plain = engines
    fused.optimizer = torch.optim.AdamW(fused.model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    plain.optimizer = torch.optim.AdamW(plain.model.parameters(), lr=1e-3, weight_decay=0.0, foreach=True)
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"]
    nan_loss = lambda out, mb: (nll_loss(out, mb)[0] * float("nan"), {})  # noqa: E731
    for eng in engines:
        eng.train_batch(batch, nll_loss)
        before = {n: p.full_tensor().clone() for n, p in eng.model.named_parameters()}
        moments = [s["exp_avg"].full_tensor().clone() for s in eng.optimizer.state.values()]
        steps = [float(s["step"]) for s in eng.optimizer.state.values()]
        stats = eng.train_batch(batch, nan_loss)
        assert stats["skipped_step"] == 1.0 and not math.isfinite(stats["grad_norm"])
        for n, p in eng.model.named_parameters():
            assert torch.equal(p.full_tensor(), before[n]), n
        assert [float(s["step"]) for s in eng.optimizer.state.values()] == steps
        for m, s in zip(moments, eng.optimizer.state.values()):
            assert torch.equal(s["exp_avg"].full_tensor(), m)
        stats = eng.train_batch(batch, nll_loss)
        assert stats["skipped_step"] == 0.0 and math.isfinite(stats["grad_norm"]) and stats["loss"] > 0
    for (n, a), b in zip(fused.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a.full_tensor(), b.full_tensor(), atol=1e-6, rtol=1e-5, msg=n)


def test_fsdp_units_auto_rule():
    from areal_hpc.train.parallel import resolve_fsdp_units

    gib = 2**30
    asked = []

    def host(answer):
        def one_host():
            asked.append(answer)
            return answer
        return one_host

    assert resolve_fsdp_units("auto", 1, 70e9, 80 * gib, host(False)) == "model"  # nothing to shard on one rank
    assert resolve_fsdp_units("auto", 8, 1.5e9, 80 * gib, host(True)) == "model"  # 9 GB <= 10 GB
    assert resolve_fsdp_units("auto", 8, 3e9, 80 * gib, host(True)) == "layer"  # 18 GB > 10 GB
    assert resolve_fsdp_units("auto", 16, 0.5e9, 80 * gib, host(False)) == "layer"  # across hosts
    assert resolve_fsdp_units("layer", 1, 1e6, 80 * gib, host(True)) == "layer"
    assert resolve_fsdp_units("model", 16, 70e9, 80 * gib, host(False)) == "model"
    assert asked == [True, True, False]  # the host question (a collective): only auto on several ranks


def test_gpu_processes_use_a_few_cpu_threads_unless_told(monkeypatch):
    from areal_hpc.train.dist import GPU_PROCESS_THREADS, limit_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(GPU_PROCESS_THREADS + 8)
        limit_cpu_threads(torch.device("cpu"))  # CPU training keeps its threads
        assert torch.get_num_threads() == GPU_PROCESS_THREADS + 8
        limit_cpu_threads(torch.device("cuda", 0))
        assert torch.get_num_threads() == GPU_PROCESS_THREADS
        torch.set_num_threads(GPU_PROCESS_THREADS + 8)
        monkeypatch.setenv("OMP_NUM_THREADS", str(GPU_PROCESS_THREADS + 8))  # an explicit setting wins
        limit_cpu_threads(torch.device("cuda", 0))
        assert torch.get_num_threads() == GPU_PROCESS_THREADS + 8
    finally:
        torch.set_num_threads(before)


def test_settled_gc_freezes_what_lives_after_the_first_and_third_steps():
    import gc
    import weakref

    from areal_hpc.train.dist import SettledGC

    before = gc.get_freeze_count()
    settled = SettledGC()
    try:
        class Node:
            pass

        node = Node()
        node.me = node  # garbage in a reference cycle: collected by step 1's collection, not frozen
        gone = weakref.ref(node)
        del node
        settled.step()
        frozen = gc.get_freeze_count()
        assert frozen > before and gone() is None
        # Frozen objects freed meanwhile (by other threads too) lower the count: the checks allow for that, not for
        # an increase of the size of what a step must not freeze (they compared with "==" and were flaky).
        keep = [[] for _ in range(1000)]  # alive at steps 2 and 3: frozen at 3 only
        settled.step()
        assert gc.get_freeze_count() < frozen + len(keep)  # step 2: nothing
        settled.step()
        after3 = gc.get_freeze_count()
        assert after3 >= frozen + len(keep) // 2
        more = [[] for _ in range(1000)]  # alive at step 4, which freezes nothing
        settled.step()
        assert gc.get_freeze_count() < after3 + len(more)
    finally:
        gc.unfreeze()


def shared_stem_samples():
    """Three prompts, each with several one-token answers (one of them twice) and a longer
    completion: documents that share their stem (all tokens but the last) and ones that do not."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (4, 6, 5):
        prompt = torch.randint(3, VOCAB, (n,), generator=g)
        for tail in ([3], [4], [5], [4], [6, 7, 8]):
            ids = torch.cat([prompt, torch.tensor(tail)])
            lm = torch.zeros(len(ids), dtype=torch.long)
            lm[n:] = 1
            samples.append({"input_ids": ids, "loss_mask": lm})
    return samples


@pytest.mark.parametrize("fused_lm_head, attn_impl", [(True, "varlen"), (False, "sdpa")])
def test_documents_sharing_a_stem_run_once_with_the_same_result(tmp_path, fused_lm_head, attn_impl):
    """The model runs on each distinct stem once (12 of 15 documents share one), yet logprobs,
    loss and gradients are the unpacked reference's, from the hidden states or the logits."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_shared_stems, 1, args=(path, fused_lm_head, attn_impl))


def _shared_stems(rank, path, fused_lm_head, attn_impl):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec
    from areal_hpc.train.batching import collate
    from areal_hpc.train.engine import FSDPEngine

    samples = shared_stem_samples()
    batch = collate(samples)
    _, ref_logps, ref_loss, ref_grads = reference(path, samples)
    eng = FSDPEngine(EngineConfig(path=path, fused_lm_head=fused_lm_head, attn_impl=attn_impl),
                     MicroBatchSpec(max_tokens_per_mb=1000), total_steps=1)
    mbs = eng.micro_batches(batch)
    assert len(mbs) == 1 and mbs[0].stems is not None
    assert len(mbs[0].stems.cu_seqlens) - 1 == 3 * 2  # per prompt: the shared stem and the long one
    stats = eng.forward_backward(batch, nll_loss)
    assert abs(stats["loss"] - ref_loss) < 1e-5
    assert_close_grads(full_grads(eng), ref_grads)
    lp = eng.forward(batch)
    for i, s in enumerate(samples):
        torch.testing.assert_close(lp[i, : len(s["input_ids"])], ref_logps[i], atol=1e-5, rtol=0)


class _GroupTimeout(Exception):
    pass


def _group_timeout(rank, run_dir):
    from pathlib import Path

    from areal_hpc.config import ExperimentConfig, parse_allocation
    from areal_hpc.registry import Registry
    from areal_hpc.trainers import TrainContext
    from areal_hpc.trainers.base import Trainer

    class Probe(Trainer):
        def setup(self):  # what the engine is built in
            group = torch.distributed.distributed_c10d._get_default_group()
            raise _GroupTimeout(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())

    cfg = ExperimentConfig()
    cfg.rollout.stall_timeout_s = 7200.0
    with pytest.raises(_GroupTimeout) as e:
        Probe(TrainContext(cfg, parse_allocation("hf:d1+d2"), Path(run_dir), Registry.for_run(run_dir))).run()
    assert e.value.args[0] > 7200


def test_the_trainer_group_outlasts_the_longest_wait_of_rank_0(tmp_path):
    """While rank 0 waits for servers or a batch (up to rollout.stall_timeout_s, an hour by default) the other ranks
    wait in a collective: a process group timeout shorter than that (it was 30 minutes) killed the trainer (NCCL
    watchdog) in a run whose batches were slow but within its configured bounds."""
    run_ranks(_group_timeout, 2, args=(str(tmp_path),))


def _forward_between(rank, path, fsdp_units):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
    from areal_hpc.train.engine import FSDPEngine

    _, batch = make_batch()
    eng = FSDPEngine(EngineConfig(path=path, fsdp_units=fsdp_units, optimizer=OptimizerConfig(lr=1e-2, grad_clip=0.1)),
                     MicroBatchSpec(max_tokens_per_mb=40), total_steps=4)
    norm = math.sqrt(sum(float(g.square().sum()) for g in full_grads_of(eng, batch).values()))
    before = eng.forward(batch)  # held unsharded (one FSDP unit; the last layer with one per layer)
    stats = eng.optimizer_step()
    assert abs(stats["grad_norm"] - norm) < 1e-4 * norm, (stats["grad_norm"], norm)  # was 0: no clip, no NaN skip
    after = eng.forward(batch)
    eng.state_dict_for_hf()  # reshards: what the next forward gathers are the stepped weights
    assert torch.equal(eng.forward(batch), after) and not torch.equal(after, before)


def full_grads_of(eng, batch):
    eng.forward_backward(batch, nll_loss)
    return full_grads(eng)


@pytest.mark.parametrize("world, fsdp_units", [(1, "auto"), (2, "layer")])
def test_a_forward_between_backward_and_step_changes_nothing(tmp_path, world, fsdp_units):
    """A no-grad `forward` (a logprob for logging, in a custom trainer) between `forward_backward` and `optimizer_step`
    left FSDP's unsharded weights in the modules: the step saw no gradients (norm 0: no clipping, no non-finite skip)
    and the forwards after it ran on the weights from before it."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_forward_between, world, args=(path, fsdp_units))
