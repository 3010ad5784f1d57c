"""Micro-batch planning, packing round trips, chunked logprobs (single process, no model)."""

from __future__ import annotations

import logging
import random
from typing import Dict, List, Sequence

import pytest
import torch

from areal_hpc.train.batching import (Batch, MicroBatch, Sample, batch_size, collate, dummy_micro_batch, is_token_key,
                                     make_micro_batches, plan_micro_batches, shard_batch, split_batch, unpack_to_padded)
from areal_hpc.train.logprob import gather_logprobs, linear_logprobs, packed_token_logprobs


# Reference implementations: a sample at a time, what the packer does for a whole batch at once.
def unpad(batch: Batch) -> List[Sample]:
    """One dict per sample with padding dropped (any padding side; slices when each row's tokens are
    contiguous, a boolean index otherwise)."""
    mask = batch["attention_mask"].bool()
    keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
    token_keys = {k for k in keys if is_token_key(batch, k)}
    lens = mask.sum(dim=1)
    first = mask.to(torch.uint8).argmax(dim=1)
    cols = torch.arange(mask.shape[1])
    contiguous = torch.equal(mask, (cols >= first[:, None]) & (cols < (first + lens)[:, None]))
    samples = []
    for i, (s, n) in enumerate(zip(first.tolist(), lens.tolist())):
        m = slice(s, s + n) if contiguous else mask[i]
        samples.append({k: (batch[k][i][m] if k in token_keys else batch[k][i]) for k in keys})
    return samples


def pack_samples(samples: Sequence[Sample], sample_idx: Sequence[int], pad_to: int = 0,
                 pad_token_id: int = 0) -> MicroBatch:
    """Concatenate samples into one packed micro-batch; with ``pad_to``, a padding document
    (``pad_token_id``, every other per-token key zero, so no loss sees it) fills it up to that many
    tokens."""
    lens = [int(s["input_ids"].shape[0]) for s in samples]
    pad = max(0, pad_to - sum(lens))
    docs = lens + [pad] if pad else lens
    data: Dict[str, torch.Tensor] = {}
    for k, v0 in samples[0].items():
        if k == "attention_mask":
            continue
        if v0.dim() == 0:
            data[k] = torch.stack([s[k] for s in samples])
            continue
        parts = [s[k] for s in samples]
        if pad:
            parts.append(torch.full((pad, *v0.shape[1:]), pad_token_id if k == "input_ids" else 0, dtype=v0.dtype))
        data[k] = torch.cat(parts)
    data["position_ids"] = torch.cat([torch.arange(n, dtype=torch.long) for n in docs])
    cu = torch.zeros(len(docs) + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(torch.tensor(docs, dtype=torch.long), 0)
    return MicroBatch(data, cu, list(sample_idx))


def test_plan_respects_budget_and_covers_every_sample():
    rng = random.Random(0)
    for _ in range(50):
        lens = [rng.randint(1, 60) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(60, 200)
        n_mbs = rng.randint(1, 8)
        plan = plan_micro_batches(lens, budget, n_mbs)
        flat = sorted(i for mb in plan for i in mb)
        assert flat == list(range(len(lens)))
        assert all(sum(lens[i] for i in mb) <= budget for mb in plan)
        assert len(plan) >= min(n_mbs, len(lens))
        assert plan == plan_micro_batches(lens, budget, n_mbs)  # deterministic


def test_plan_first_fit_decreasing_and_oversize():
    assert plan_micro_batches([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert plan_micro_batches([30, 4, 4], 10) == [[0], [1, 2]]  # too long: alone
    assert plan_micro_batches([3, 3, 3, 3], 100, min_mbs=3) == [[0], [1, 3], [2]]
    assert len(plan_micro_batches([3, 3], 100, min_mbs=5)) == 2  # at most one per sample


def test_plan_spreads_a_first_fit_remainder_over_fewer_micro_batches():
    # 31,784 tokens under a 16k budget: first-fit-decreasing leaves 1,648 over for a third
    # micro-batch (15,102 + 15,034 + 1,648); dealt to the least-loaded of two, one ends 96 tokens
    # over, and one swap (2,166 <-> 1,883) brings it within the budget
    lens = [2871, 3801, 1648, 3657, 2021, 290, 4006, 3348, 2166, 1883, 3291, 2802]
    plan = plan_micro_batches(lens, 16384)
    assert len(plan) == 2
    assert sorted(i for mb in plan for i in mb) == list(range(len(lens)))
    assert all(sum(lens[i] for i in mb) <= 16384 for mb in plan)
    # a plain first-fit-decreasing case is left as it was
    assert plan_micro_batches([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    rng = random.Random(1)
    for _ in range(300):  # never more micro-batches than first-fit-decreasing, never over budget
        budget = rng.choice([100, 1000])
        lens = [rng.randint(1, budget) for _ in range(rng.randint(1, 40))]
        plan = plan_micro_batches(lens, budget)
        assert sorted(i for mb in plan for i in mb) == list(range(len(lens)))
        assert all(sum(lens[i] for i in mb) <= budget for mb in plan)
        assert len(plan) <= len(_ffd(lens, budget))


def _ffd(lens, budget):
    bins = []
    for n in sorted(lens, reverse=True):
        for b in bins:
            if sum(b) + n <= budget:
                b.append(n)
                break
        else:
            bins.append([n])
    return bins


def _samples():
    out = []
    for n in (4, 1, 6):
        out.append({"input_ids": torch.arange(n) + 10, "loss_mask": (torch.arange(n) >= 1).long(),
                    "logprobs": torch.randn(n), "rewards": torch.tensor(float(n))})
    return out


def test_samples_over_the_budget_warn_once_a_batch(caplog):
    with caplog.at_level(logging.WARNING, logger="areal_hpc.train.batching"):
        assert plan_micro_batches([50, 5, 70, 60], 40) == [[0], [1], [2], [3]]
    assert len(caplog.records) == 1 and "3 sample(s)" in caplog.text and "70 tokens" in caplog.text


def test_collate_unpad_and_pack():
    batch = collate(_samples())
    assert batch["input_ids"].shape == (3, 6) and batch["rewards"].shape == (3,)
    back = unpad(batch)
    assert [int(s["input_ids"].shape[0]) for s in back] == [4, 1, 6]
    mb = pack_samples(back, [0, 1, 2])
    assert mb.data["position_ids"].tolist() == [0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5]
    assert mb.cu_seqlens.tolist() == [0, 4, 5, 11]
    assert mb.doc_starts().nonzero().flatten().tolist() == [0, 4, 5]
    assert mb.data["rewards"].tolist() == [4.0, 1.0, 6.0]
    out = unpack_to_padded([mb.data["logprobs"]], [mb], batch)
    torch.testing.assert_close(out, batch["logprobs"] * batch["attention_mask"])


def test_left_padding_is_handled():
    batch = collate(_samples())
    left = {k: (torch.stack([torch.roll(v[i], int((batch["attention_mask"][i] == 0).sum())) for i in range(3)])
                if v.dim() == 2 else v) for k, v in batch.items()}
    for a, b in zip(unpad(left), unpad(batch)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_unpad_with_holes_in_the_mask():
    batch = collate(_samples())
    batch["attention_mask"][2, 1] = 0  # not left or right padding: picked by the mask, not sliced
    got = unpad(batch)[2]
    assert got["input_ids"].tolist() == [10, 12, 13, 14, 15]
    assert unpad(collate(_samples()))[2]["input_ids"].tolist() == [10, 11, 12, 13, 14, 15]


def test_make_micro_batches_and_dummy():
    batch = collate(_samples())
    mbs = make_micro_batches(batch, max_tokens=6, min_mbs=1)
    assert sorted(i for mb in mbs for i in mb.sample_idx) == [0, 1, 2]
    d = dummy_micro_batch(batch, pad_token_id=0)
    assert d.is_dummy and d.n_tokens == 2 and set(d.data) == set(mbs[0].data)
    assert d.data["loss_mask"].sum() == 0 and d.data["rewards"].shape == (1,)


def test_padded_micro_batches_have_one_length():
    batch = collate(_samples())
    mbs = make_micro_batches(batch, max_tokens=8, min_mbs=3, pad_token_id=7, pad=True)
    assert [mb.n_tokens for mb in mbs] == [8, 8, 8]
    for mb in mbs:
        n_real = sum(int(batch["attention_mask"][i].sum()) for i in mb.sample_idx)
        assert mb.cu_seqlens.tolist()[-2:] == [n_real, 8]  # one padding document at the end
        assert (mb.data["input_ids"][n_real:] == 7).all() and (mb.data["loss_mask"][n_real:] == 0).all()
        assert mb.data["position_ids"][n_real:].tolist() == list(range(8 - n_real))
        assert mb.data["rewards"].shape == (len(mb.sample_idx),)  # per-sample keys: no padding entry
    out = unpack_to_padded([mb.data["logprobs"] for mb in mbs], mbs, batch)
    torch.testing.assert_close(out, batch["logprobs"] * batch["attention_mask"])
    full = make_micro_batches(collate([_samples()[2]]), max_tokens=6, pad=True)[0]
    assert full.cu_seqlens.tolist() == [0, 6]  # already full: no empty padding document
    assert dummy_micro_batch(batch, 0, 8).n_tokens == 8


@pytest.mark.parametrize("padding", ["right", "left", "holes"])
def test_packing_rows_equals_packing_samples(padding):
    """`make_micro_batches` packs straight from the batch's tensors: the same micro-batches as
    packing its unpadded samples one by one, for right, left and non-contiguous padding; and
    `unpack_to_padded` puts every token back."""
    g = torch.Generator().manual_seed(3)
    B, L = 9, 7
    lens = torch.randint(1, L + 1, (B,), generator=g)
    cols = torch.arange(L)
    if padding == "right":
        mask = cols[None] < lens[:, None]
    elif padding == "left":
        mask = cols[None] >= (L - lens)[:, None]
    else:
        mask = torch.rand(B, L, generator=g) < 0.6
        mask[:, 0] = True
    batch = {"input_ids": torch.randint(3, 50, (B, L), generator=g), "attention_mask": mask.long(),
             "loss_mask": (torch.rand(B, L, generator=g) < 0.5) & mask, "logprobs": torch.randn(B, L, generator=g),
             "rewards": torch.randn(B, generator=g)}
    samples = unpad(batch)
    for pad in (False, True):
        mbs = make_micro_batches(batch, max_tokens=12, min_mbs=2, pad_token_id=5, pad=pad)
        assert sorted(i for mb in mbs for i in mb.sample_idx) == list(range(B))
        for mb in mbs:
            want = pack_samples([samples[i] for i in mb.sample_idx], mb.sample_idx, 12 if pad else 0, 5)
            assert torch.equal(mb.cu_seqlens, want.cu_seqlens) and set(mb.data) == set(want.data)
            for k in want.data:
                assert torch.equal(mb.data[k], want.data[k]), k
        out = unpack_to_padded([mb.data["logprobs"] for mb in mbs], mbs, batch, fill=-1.0)
        torch.testing.assert_close(out, torch.where(mask, batch["logprobs"], torch.tensor(-1.0)))


def test_split_and_shard_keep_groups():
    batch = collate([{"input_ids": torch.arange(3) + i} for i in range(8)])
    parts = split_batch(batch, 2, group_size=4)
    assert [p["input_ids"][:, 0].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_shard_balances_tokens_over_ranks_and_keeps_groups():
    # groups of 2 rows; group g has rows of length lens[g]: contiguous halves would give one rank
    # 2*(9+8+7) = 48 tokens and the other 2*(3+2+1) = 12; the best split of 3 groups each is 28 / 32
    lens = [9, 8, 7, 3, 2, 1]
    batch = collate([{"input_ids": torch.arange(n) + 100 * g} for g, n in enumerate(lens) for _ in range(2)])
    shards = [shard_batch(batch, r, 2, group_size=2) for r in range(2)]
    groups = [(s["input_ids"][:, 0] // 100).tolist() for s in shards]
    assert sorted(g for gs in groups for g in gs) == sorted(g for g in range(6) for _ in range(2))
    assert all(gs[0::2] == gs[1::2] for gs in groups)  # whole groups, in batch order
    assert all(gs == sorted(gs) for gs in groups)
    assert [len(gs) for gs in groups] == [6, 6]
    tokens = [int(s["attention_mask"].sum()) for s in shards]
    assert tokens == [28, 32]  # {9, 3, 2} and {8, 7, 1}, twice each
    assert groups[0] == [0, 0, 3, 3, 4, 4]
    three = [shard_batch(batch, r, 4, group_size=2) for r in range(4)]  # 6 groups over 4 ranks: 2, 2, 1, 1
    assert sorted(batch_size(s) for s in three) == [2, 2, 4, 4]


def test_chunked_logprobs_match_direct_with_grad():
    torch.manual_seed(0)
    logits = torch.randn(37, 11, requires_grad=True)
    labels = torch.randint(0, 11, (37,))
    lp, ent = gather_logprobs(logits, labels, temperature=0.7, with_entropy=True, chunk=8)
    x = logits / 0.7
    ref_lp = torch.log_softmax(x, -1).gather(-1, labels[:, None]).squeeze(-1)
    ref_ent = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=2e-6)  # a few fp32 ulps of H ~ 2
    (g1,) = torch.autograd.grad((lp * 2 + ent).sum(), logits)
    (g2,) = torch.autograd.grad((ref_lp * 2 + ref_ent).sum(), logits)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use", ["logprob", "entropy", "both"])
def test_linear_logprobs_match_logits_path(temperature, use):
    """Values and gradients (hidden and head weight) of the chunked hidden-state path equal
    log_softmax of the full logits, whichever outputs the loss uses."""
    torch.manual_seed(1)
    hidden = torch.randn(37, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (37,))
    lp, ent = linear_logprobs(hidden, weight, labels, temperature, with_entropy=True, chunk=8)
    x = hidden @ weight.t() / temperature
    ref_lp = torch.log_softmax(x, -1).gather(-1, labels[:, None]).squeeze(-1)
    ref_ent = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    torch.testing.assert_close(lp, ref_lp, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-12, rtol=0)
    w = torch.linspace(-1, 2, 37, dtype=torch.float64)
    pick = {"logprob": lambda a, b: (a * w).sum(), "entropy": lambda a, b: (b * w).sum(),
            "both": lambda a, b: (a * w).sum() - 0.3 * (b * w.flip(0)).sum()}[use]
    got = torch.autograd.grad(pick(lp, ent), (hidden, weight))
    ref = torch.autograd.grad(pick(ref_lp, ref_ent), (hidden, weight))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=0)
    lp2, ent2 = linear_logprobs(hidden, weight, labels, temperature, with_entropy=False, chunk=64)
    assert ent2 is None and torch.allclose(lp2, ref_lp, atol=1e-12)


def test_packed_alignment():
    # logits that put all mass on a known next token: logprob ~0 where the label matches
    ids = torch.tensor([5, 6, 7, 1, 2])
    starts = torch.tensor([True, False, False, True, False])
    logits = torch.full((5, 10), -1e4)
    for t in range(4):
        logits[t, ids[t + 1]] = 0.0
    lp, _ = packed_token_logprobs(logits, ids, starts)
    assert lp.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]
    logits[0, 6], logits[0, 0] = -1e4, 0.0  # token 1 (id 6) now impossible under logits of token 0
    lp, _ = packed_token_logprobs(logits, ids, starts)
    assert lp[1] < -1e3 and lp[3] == 0.0  # document start: no prediction across the boundary


def test_lr_schedule_and_precision():
    import pytest

    from areal_hpc.config import ConfigError, ExperimentConfig
    from areal_hpc.config.schema import OptimizerConfig
    from areal_hpc.config.validate import check_ranges
    from areal_hpc.train.engine import lr_lambda
    from areal_hpc.train.parallel import resolve_precision

    f = lr_lambda(OptimizerConfig(warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1), total_steps=10)
    vals = [f(s) for s in range(12)]
    assert vals[:3] == [1 / 3, 2 / 3, 1.0] and abs(vals[10] - 0.1) < 1e-12 and vals[11] == vals[10]
    assert all(a >= b for a, b in zip(vals[2:], vals[3:]))  # non-increasing after warm-up
    assert lr_lambda(OptimizerConfig(), 10)(7) == 1.0
    assert resolve_precision("auto", torch.device("cpu")).param_dtype == torch.float32
    assert resolve_precision("auto", torch.device("cuda")).param_dtype == torch.bfloat16
    assert resolve_precision("bfloat16", torch.device("cpu")).policy() is not None
    cfg = ExperimentConfig()
    cfg.trainer.sft.model.optimizer.lr_schedule = "linear"  # the config refuses what these would misread
    with pytest.raises(ConfigError, match="trainer.sft.model.optimizer.lr_schedule"):
        check_ranges(cfg)
    cfg = ExperimentConfig()
    cfg.trainer.ppo.actor.dtype = "float16"
    with pytest.raises(ConfigError, match="trainer.ppo.actor.dtype"):
        check_ranges(cfg)


def test_linear_logprobs_keeping_logits_changes_nothing():
    """``keep_logits`` (no recompute in backward) gives the same values and gradients, bit for bit."""
    torch.manual_seed(2)
    hidden = torch.randn(37, 6, requires_grad=True)
    weight = torch.randn(13, 6, requires_grad=True)
    labels = torch.randint(0, 13, (37,))
    w = torch.linspace(-1, 2, 37)
    out = {}
    for keep in (False, True):
        lp, ent = linear_logprobs(hidden, weight, labels, 0.7, with_entropy=True, chunk=8, keep_logits=keep)
        out[keep] = (lp, ent, *torch.autograd.grad((lp * w + ent).sum(), (hidden, weight)))
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)


def test_share_stems_maps_every_position_to_its_stem():
    from areal_hpc.train.batching import share_stems

    docs = [[1, 2, 3], [1, 2, 4], [5], [5], [1, 2, 3], [1, 9, 3]]
    ids = torch.tensor([t for d in docs for t in d])
    cu = torch.tensor([0, 3, 6, 7, 8, 11, 14])
    stems = share_stems(ids, cu)
    assert stems.input_ids.tolist() == [1, 2, 5, 1, 9]
    assert stems.cu_seqlens.tolist() == [0, 2, 3, 5]
    assert stems.position_ids.tolist() == [0, 1, 0, 0, 1]
    # a document's last position has no prediction: it borrows its stem's last one
    assert stems.src.tolist() == [0, 1, 1, 0, 1, 1, 2, 2, 0, 1, 1, 3, 4, 4]
    assert share_stems(torch.tensor([1, 2, 3, 1]), torch.tensor([0, 1, 2, 4])) is None
