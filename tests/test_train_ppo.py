"""Advantages, normalisations and the decoupled PPO loss on hand-computed cases; PPOActor smoke."""

from __future__ import annotations

import math

import pytest
import torch

from areal_hpc import toy
from areal_hpc.train.ppo_loss import compute_advantages, kl_penalty_to_go, ppo_loss
from ranks import run_ranks

VOCAB = len(toy.SPECIAL_TOKENS) + len(toy.CHARS)  # ids 3.. are ordinary characters


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=0)


# ------------------------------------------------------------------ advantages
def test_group_norm_with_std():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    # group 1: mean 0.25, unbiased std 0.5; group 2: all equal -> exactly 0
    close(compute_advantages(r, 4), [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0])


def test_group_norm_without_std():
    r = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2])
    close(compute_advantages(r, 4, std_norm=False), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_leave_one_out():
    r = torch.tensor([1.0, 0, 0, 0, 3, 3, 3, 3])
    close(compute_advantages(r, 4, std_norm=False, leave_one_out=True), [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0])
    # with std: divided by the group's unbiased std (0.5)
    close(compute_advantages(r, 4, std_norm=True, leave_one_out=True), [2, -2 / 3, -2 / 3, -2 / 3, 0, 0, 0, 0])


def test_all_equal_groups_give_exact_zeros():
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    a = compute_advantages(r, 3)
    assert torch.equal(a, torch.zeros(6))
    assert torch.equal(compute_advantages(torch.tensor([0.3, 0.3]), 1), torch.zeros(2))  # groups of one
    assert torch.equal(compute_advantages(torch.tensor([0.1, 0.1, 0.1]), 3, norm="batch"), torch.zeros(3))


def test_batch_norm_and_none():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    close(compute_advantages(r, 4, norm="batch"), (r - r.mean()) / (r.std() + 1e-6))
    close(compute_advantages(r, 4, norm="batch", std_norm=False), r - 0.625)
    close(compute_advantages(r, 4, norm="none"), r)
    with pytest.raises(ValueError):
        compute_advantages(r, 3)


def test_groups_of_any_size_travel_with_the_batch():
    """A workflow may return more or fewer samples than rollout.n_samples: each group is normalised as itself, and a
    rank's shard holds whole groups."""
    from areal_hpc.config.schema import PPOConfig
    from areal_hpc.rollout import Trajectory
    from areal_hpc.train.batching import shard_batch
    from areal_hpc.train.ppo_loss import PPOActor
    from areal_hpc.trainers.ppo_trainer import trajectories_to_batch

    def group(*rewards):
        return [Trajectory([5, 6], [7], [-0.5], [0], float(r)) for r in rewards]

    batch = trajectories_to_batch([group(1, 0, 0), group(1, 1, 0, 0, 0)])  # groups of n_samples=4 would mix them
    actor = PPOActor(PPOConfig(adv_std_norm=False), engine=None, group_size=4)
    close(actor.compute_advantages(batch)[:, -1], [2 / 3, -1 / 3, -1 / 3, 0.6, 0.6, -0.4, -0.4, -0.4])
    shards = [shard_batch(batch, r, 2, group_size=4) for r in range(2)]
    assert sorted(s["rewards"].tolist() for s in shards) == [[1, 0, 0], [1, 1, 0, 0, 0]]
    close(compute_advantages(torch.tensor([1.0, 0, 0, 1]), 2, std_norm=False, groups=torch.tensor([3, 3, 3, 8])),
          [2 / 3, -1 / 3, -1 / 3, 0])


def test_a_batch_of_empty_completions_builds():
    """Every sample of the batch generated nothing (e.g. aborted at once): the batch still builds, with nothing to
    train on."""
    from areal_hpc.rollout import Trajectory
    from areal_hpc.trainers.ppo_trainer import trajectories_to_batch

    batch = trajectories_to_batch([[Trajectory([5, 6], [], [], [], 0.0) for _ in range(2)]])
    assert batch["loss_mask"].dtype == torch.bool and not batch["loss_mask"].any()
    assert batch["attention_mask"].sum() == 4


def test_kl_penalty_to_go():
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 0]])
    # kl per token: [0, .5, -1, 0, 0]; to-go sums: [-.5, -.5, -1, 0, 0]; times -0.1, masked
    close(kl_penalty_to_go(logp, ref, mask, 0.1), [[0, 0.05, 0.1, 0, 0]])


# ------------------------------------------------------------------ loss
def test_decoupled_ppo_loss_hand_computed():
    #            in-clip  clip+   clip-   dual    capped  masked   weighted
    ratio = torch.tensor([1.1, 1.5, 0.5, 5.0, 1.0, 9.0, 1.0])
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0, 1.0, 5.0, -2.0])
    w_behav = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0, 1.0, 2.0])  # pi_prox / pi_behav
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1])
    prox = torch.log(torch.tensor([0.5, 0.4, 0.3, 0.1, 0.2, 0.05, 0.25]))
    logp = (prox + torch.log(ratio)).requires_grad_(True)
    behav = prox - torch.log(w_behav)
    loss, stats = ppo_loss(logp, prox, behav, adv, mask, eps_clip=0.2, c_clip=3.0, behav_imp_weight_cap=5.0)
    # per token pg: -2*1.1, -1*1.2 (clipped), 0.8 (clipped), min(5, 3)=3 (dual), dropped (w>cap), masked,
    # -(-2)*1.0 * w 2 = 4
    expected = (-2.2 - 1.2 + 0.8 + 3.0 + 0.0 + 4.0) / 6
    close(loss, expected)
    close(stats["clip_frac"], 2 / 6)
    close(stats["dual_clip_frac"], 1 / 6)
    close(stats["behav_capped_frac"], 1 / 6)
    close(stats["behav_imp_weight"], (1 + 1 + 1 + 1 + 2) / 5)
    loss.backward()
    # gradient d/dlogp of -A*ratio*w/6 only where unclipped: tokens 0 and 6
    close(logp.grad, [-2 * 1.1 / 6, 0, 0, 0, 0, 0, 2 * 1.0 * 2 / 6], tol=1e-6)


def test_ppo_loss_without_dual_clip_or_behaviour():
    prox = torch.zeros(3)
    logp = torch.log(torch.tensor([5.0, 1.0, 1.0]))
    adv = torch.tensor([-1.0, 1.0, 0.0])
    loss, stats = ppo_loss(logp, prox, None, adv, torch.ones(3), eps_clip=0.2, c_clip=None)
    close(loss, (5.0 - 1.0 + 0.0) / 3)  # no dual clip: the -A*ratio branch (5) wins
    assert "behav_imp_weight" not in stats
    close(stats["dual_clip_frac"], 0.0)


def test_ppo_loss_empty_mask_is_finite():
    z = torch.zeros(4)
    loss, stats = ppo_loss(z, z, z, z, torch.zeros(4), 0.2, 3.0, 5.0)
    assert loss.item() == 0.0 and all(math.isfinite(float(v)) for v in stats.values())


# ------------------------------------------------------------------ actor
def _actor_worker(rank, path, kl_ctl):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig, PPOConfig
    from areal_hpc.train.batching import collate
    from areal_hpc.train.ppo_loss import PPOActor

    torch.manual_seed(0)
    cfg = PPOConfig(actor=EngineConfig(path=path, optimizer=OptimizerConfig(lr=5e-3)),
                    mb_spec=MicroBatchSpec(max_tokens_per_mb=24), ppo_n_minibatches=2, kl_ctl=kl_ctl)
    actor = PPOActor.build(cfg, total_steps=10, group_size=4, temperature=1.0)
    # 2 prompts x 4 samples: prompt of 4 tokens, response of 2 tokens
    g = torch.Generator().manual_seed(1)
    samples, rewards = [], []
    for p in range(2):
        prompt = torch.randint(3, VOCAB, (4,), generator=g)
        for k in range(4):
            ids = torch.cat([prompt, torch.randint(3, VOCAB, (2,), generator=g)])
            samples.append({"input_ids": ids, "loss_mask": torch.tensor([0, 0, 0, 0, 1, 1])})
            rewards.append(1.0 if k == p else 0.0)
    batch = collate(samples)
    batch["rewards"] = torch.tensor(rewards)
    batch["logprobs"] = actor.compute_logp(batch)  # behaviour = current policy
    mask = batch["loss_mask"].bool()
    good = torch.tensor(rewards).bool()

    def mean_logp(sel):
        lp = actor.compute_logp(batch)
        return float(lp[sel][mask[sel]].mean())

    before_good, before_bad = mean_logp(good), mean_logp(~good)
    for _ in range(4):
        stats = actor.train_step(dict(batch))
        for k in ("loss", "pg_loss", "clip_frac", "dual_clip_frac", "behav_imp_weight", "entropy", "grad_norm", "lr"):
            assert k in stats and math.isfinite(stats[k]), (k, stats)
        assert stats["skipped_step"] == 0.0
    assert mean_logp(good) > before_good + 0.1
    assert mean_logp(~good) < before_bad - 0.1
    assert actor.engine.lr_scheduler.last_epoch == 4  # one LR step per train step, not per minibatch


@pytest.mark.parametrize("kl_ctl", [0.0, 0.05])
def test_ppo_actor_raises_rewarded_logprobs(tmp_path, kl_ctl):
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_actor_worker, 1, args=(path, kl_ctl))


def _prox_worker(rank, path):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig, PPOConfig
    from areal_hpc.train.batching import collate
    from areal_hpc.train.ppo_loss import PPOActor

    cfg = PPOConfig(actor=EngineConfig(path=path, optimizer=OptimizerConfig(lr=5e-3)),
                    mb_spec=MicroBatchSpec(max_tokens_per_mb=20))
    fused, separate = (PPOActor.build(cfg, total_steps=10, group_size=4) for _ in range(2))
    assert fused.prox_in_update()
    g = torch.Generator().manual_seed(2)
    samples = [{"input_ids": torch.randint(3, VOCAB, (6,), generator=g), "loss_mask": torch.tensor([0, 0, 0, 1, 1, 1])}
               for _ in range(8)]
    batch = collate(samples)
    batch["rewards"] = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0])
    # stale behaviour: importance weights away from 1, some above the cap
    batch["logprobs"] = (fused.compute_logp(batch) - 0.5 * torch.rand(batch["input_ids"].shape, generator=g)
                         - 2.0 * (torch.arange(8) == 3).float()[:, None]) * batch["loss_mask"]
    for _ in range(3):  # several micro-batches each; weights move between steps
        a = fused.train_step(dict(batch))
        b = dict(batch)
        b["prox_logp"] = separate.compute_logp(b)  # what the update would do with a second forward pass
        separate.compute_advantages(b)
        s = separate.ppo_update(b)
        assert a["n_mbs"] > 1 and a["behav_capped_frac"] > 0
        for k in ("loss", "behav_imp_weight", "behav_capped_frac", "approx_kl", "grad_norm"):
            close(a[k], s[k], 1e-5)
    for (n, p), q in zip(fused.engine.model.named_parameters(), separate.engine.model.parameters()):
        close(p.full_tensor(), q.full_tensor(), 1e-5)


def test_proximal_logprobs_from_the_update_forward_equal_a_recomputation(tmp_path):
    """With one minibatch the update's own forward gives the proximal logprobs (no second pass):
    same losses, statistics and weights as recomputing them first."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_prox_worker, 1, args=(path,))


def _decoupled_worker(rank, path):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig, PPOConfig
    from areal_hpc.train.batching import collate
    from areal_hpc.train.ppo_loss import PPOActor

    actors = [PPOActor.build(PPOConfig(actor=EngineConfig(path=path, optimizer=OptimizerConfig(lr=5e-3)),
                                       mb_spec=MicroBatchSpec(max_tokens_per_mb=20), recompute_logprob=recompute),
                             total_steps=10, group_size=4) for recompute in (True, False)]
    g = torch.Generator().manual_seed(3)
    batch = collate([{"input_ids": torch.randint(3, VOCAB, (6,), generator=g),
                      "loss_mask": torch.tensor([0, 0, 0, 1, 1, 1])} for _ in range(8)])
    batch["rewards"] = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0])
    batch["logprobs"] = (actors[0].compute_logp(batch) - 0.5 * torch.rand(batch["input_ids"].shape, generator=g)
                         ) * batch["loss_mask"]  # a stale behaviour policy
    a, b = (actor.train_step(dict(batch)) for actor in actors)
    assert abs(a["behav_imp_weight"] - 1.0) > 0.05
    for k in ("loss", "behav_imp_weight", "approx_kl", "grad_norm"):
        close(a[k], b[k], 1e-5)


def test_the_decoupled_loss_recomputes_the_proximal_policy_as_areal_does(tmp_path):
    """use_decoupled_loss=true with recompute_logprob=false took the behaviour logprobs as the proximal policy: an
    importance weight of exactly 1, plain PPO against the stale behaviour, silently. AReaL's use_decoupled_loss
    "implicitly enables recompute_logprob": the same losses and weights as with recompute_logprob=true."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_decoupled_worker, 1, args=(path,))


def _ranks_worker(rank, path, out):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig, PPOConfig
    from areal_hpc.rollout import Trajectory
    from areal_hpc.train import dist
    from areal_hpc.train.batching import shard_batch
    from areal_hpc.train.ppo_loss import PPOActor
    from areal_hpc.trainers.ppo_trainer import trajectories_to_batch

    cfg = PPOConfig(actor=EngineConfig(path=path, optimizer=OptimizerConfig(lr=5e-3)), adv_norm="batch",
                    mb_spec=MicroBatchSpec(max_tokens_per_mb=24), kl_ctl=0.05)
    actor = PPOActor.build(cfg, total_steps=10, group_size=4)
    g = torch.Generator().manual_seed(1)
    groups = [[Trajectory(torch.randint(3, VOCAB, (4,), generator=g).tolist(), out_ids,
                          (-2.0 * torch.rand(len(out_ids), generator=g)).tolist(), [0] * len(out_ids), float(k % 3))
               for k in range(n) for out_ids in [torch.randint(3, VOCAB, (1 + (k + p) % 5,), generator=g).tolist()]]
              for p, n in enumerate([4, 3, 5, 4])]  # groups of unequal sizes and lengths
    stats = [actor.train_step(shard_batch(trajectories_to_batch(groups), dist.rank(), dist.world_size()))
             for _ in range(2)]
    sd = actor.engine.state_dict_for_hf(torch.float32)
    if rank == 0:
        torch.save({"stats": stats, "sd": {k: v.clone() for k, v in sd.items()}}, out)


def test_two_ranks_train_a_rollout_batch_as_one_rank_does(tmp_path):
    """A batch sharded by whole groups over 2 ranks (batch-normalised advantages, KL to a reference): the same
    losses, statistics of the whole batch and weights as on one rank."""
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    for world in (1, 2):
        run_ranks(_ranks_worker, world, args=(path, str(tmp_path / f"w{world}.pt")))
    one, two = (torch.load(tmp_path / f"w{w}.pt") for w in (1, 2))
    for a, b in zip(one["stats"], two["stats"]):
        for k in set(a) - {"n_mbs"}:  # micro-batches per rank
            close(a[k], b[k], 1e-5 * max(1.0, abs(a[k])))
    for k, v in one["sd"].items():
        close(v, two["sd"][k], 1e-4)


# ------------------------------------------------------------------ multi-turn loss mask
TOOL = 3  # the environment's tokens in the completions below; the model's are other ids (< VOCAB)


def _multi_turn_groups():
    """2 groups of 3: completions of model tokens, then a tool's reply (masked out), then the model's again; two
    samples of a group differ only in their last token (`share_stems` runs their stem once)."""
    from areal_hpc.rollout import Trajectory

    def traj(prompt, out, reward):
        mask = [int(t != TOOL) for t in out]
        return Trajectory(prompt, out, [-0.5] * len(out), [0] * len(out), reward, loss_mask=mask)

    return [[traj([5, 6, 7], [8, TOOL, TOOL, 9, 10], 1.0), traj([5, 6, 7], [8, TOOL, TOOL, 9, 11], 0.0),
             traj([5, 6, 7], [12, 13], 0.0)],
            [traj([14, 15], [16, TOOL, 4], 0.0), traj([14, 15], [4], 1.0), traj([14, 15], [16, TOOL, 5], 1.0)]]


def test_a_multi_turn_loss_mask_keeps_tool_tokens_out_of_the_loss():
    """A workflow that put a tool's tokens into output_ids trained on them (Trajectory had no loss mask). Its
    loss_mask reaches the batch's, stays aligned through packing and share_stems, and the PPO loss gives the masked
    tokens exactly zero gradient and leaves them out of the normaliser."""
    from areal_hpc.rollout import Trajectory
    from areal_hpc.train.batching import make_micro_batches
    from areal_hpc.trainers.ppo_trainer import trajectories_to_batch

    with pytest.raises(ValueError, match="loss_mask"):
        Trajectory([1], [2, 3], [0.0, 0.0], [0, 0], 1.0, loss_mask=[1])
    assert Trajectory([1], [2], [0.0], [0], 1.0).loss_mask is None  # default: every output token trained
    assert Trajectory([1], [2, 3], [0.0, 0.0], [0, 0], 1.0).mask == [1, 1]
    assert Trajectory([1], [2, 3], [0.0, 0.0], [0, 5], 1.0, loss_mask=[0, 1]).trained_versions == [5]
    batch = trajectories_to_batch(_multi_turn_groups())
    mask, ids = batch["loss_mask"], batch["input_ids"]
    assert not (ids[mask] == TOOL).any() and int(mask.sum()) == 13  # the model's output tokens, no other
    assert (batch["logprobs"][(ids == TOOL)] == -0.5).all()  # logprobs and versions stay on their tokens
    mbs = make_micro_batches(batch, max_tokens=20, share=True)
    assert len(mbs) > 1 and all(mb.stems is not None for mb in mbs)
    for mb in mbs:
        rows = batch["attention_mask"][mb.sample_idx]
        assert mb.data["loss_mask"].tolist() == mask[mb.sample_idx][rows].tolist()
        assert not (mb.data["input_ids"][mb.data["loss_mask"].bool()] == TOOL).any()
    # the loss: masked tokens get no gradient and no share of the normaliser
    g = torch.Generator().manual_seed(4)
    logp = (batch["logprobs"] + 0.3 * torch.randn(ids.shape, generator=g)).requires_grad_(True)
    adv = torch.randn(ids.shape, generator=g)
    loss, _ = ppo_loss(logp, batch["logprobs"], batch["logprobs"] - 0.1, adv, mask, 0.2, 3.0, 5.0)
    loss.backward()
    assert (logp.grad[~mask] == 0).all() and (logp.grad[mask] != 0).sum() > 6  # (clipped ones have none)
    kept, _ = ppo_loss(logp[mask], batch["logprobs"][mask], batch["logprobs"][mask] - 0.1, adv[mask],
                       torch.ones(13), 0.2, 3.0, 5.0)  # the trained tokens alone: 13 in the normaliser
    close(loss, kept, 1e-6)


def _masked_actor_worker(rank, path):
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, PPOConfig
    from areal_hpc.train.ppo_loss import PPOActor
    from areal_hpc.trainers.ppo_trainer import trajectories_to_batch

    actor = PPOActor.build(PPOConfig(actor=EngineConfig(path=path), mb_spec=MicroBatchSpec(max_tokens_per_mb=20)),
                           total_steps=2, group_size=3)
    assert actor.engine.config.share_stems
    stats = actor.train_step(trajectories_to_batch(_multi_turn_groups()))
    assert stats["n_tokens"] == 13 and math.isfinite(stats["loss"])  # the loss's normaliser: the model's tokens


def test_the_trainer_normalises_by_the_model_tokens_of_a_multi_turn_batch(tmp_path):
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_masked_actor_worker, 1, args=(path,))
