"""GRPO / decoupled PPO, synchronous or asynchronous (`trainer.ppo.async_training`).

A step: batch from the controller -> proximal logprobs -> advantages -> PPO update -> weight update (servers paused,
weights published or broadcast, loaded, resumed; version + 1). Rank 0 drives the rollout side; every rank trains on its
shard. A disk update keeps only the gather (``weight_publish``) in the step: the write, load and prune run beside the
next step (`RolloutSide.update_weights_later`), reported as ``bg_phase/*``."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from areal_hpc.rollout import Trajectory
from areal_hpc.train import dist
from areal_hpc.train.batching import shard_batch
from areal_hpc.train.ppo_loss import PPOActor
from areal_hpc.train.publish import publish_weights, stage_weights
from areal_hpc.train.weight_sync import broadcast_engine_weights
from areal_hpc.trainers.base import Trainer
from areal_hpc.trainers.factory import register_trainer
from areal_hpc.trainers.rollout_side import rollout_side


def trajectories_to_batch(groups: List[List[Trajectory]], pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-padded ``[B, L]`` tensors: prompt+completion ids, masks (``loss_mask``: the completions' tokens the
    trajectories' own masks keep), behaviour logprobs, versions; ``rewards [B]`` and ``group [B]``, each sample's group
    (of any size: a workflow may return more or fewer than ``n_samples``)."""
    trajs = [t for g in groups for t in g]
    lengths = torch.tensor([t.n_tokens for t in trajs])
    prompts = torch.tensor([len(t.prompt_ids) for t in trajs])
    pos = torch.arange(int(lengths.max()))
    attn = pos < lengths[:, None]
    out = attn & (pos >= prompts[:, None])  # row-major, as the flat lists below: each row's tokens, then the next's
    ids = torch.full(attn.shape, pad_id, dtype=torch.long)
    ids[attn] = torch.tensor([x for t in trajs for x in (*t.prompt_ids, *t.output_ids)], dtype=torch.long)
    logp = torch.zeros(attn.shape, dtype=torch.float32)
    logp[out] = torch.tensor([x for t in trajs for x in t.logprobs], dtype=torch.float32)
    vers = torch.full(attn.shape, -1, dtype=torch.long)
    vers[out] = torch.tensor([x for t in trajs for x in t.versions], dtype=torch.long)
    loss = torch.zeros_like(out)
    loss[out] = torch.tensor([bool(x) for t in trajs for x in t.mask], dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "logprobs": logp, "versions": vers,
            "rewards": torch.tensor([t.reward for t in trajs], dtype=torch.float32),
            "group": torch.tensor([i for i, g in enumerate(groups) for _ in g], dtype=torch.long)}


def batch_stats(trajs: List[Trajectory], version: int) -> Dict[str, float]:
    stale = [version - t.oldest_version for t in trajs if t.oldest_version >= 0]
    out_len = [len(t.output_ids) for t in trajs]
    generated = [t.trained_versions for t in trajs]  # the model's tokens, not a tool's or the environment's
    return {"reward_mean": sum(t.reward for t in trajs) / len(trajs), "staleness_max": float(max(stale, default=0)),
            "staleness_mean": sum(stale) / max(1, len(stale)), "completion_len_mean": sum(out_len) / len(trajs),
            "n_trajectories": float(len(trajs)), "gen_tokens": float(sum(len(g) for g in generated)),
            "tokens": float(sum(t.n_tokens for t in trajs)),
            "truncated_frac": sum(t.finish_reason == "length" for t in trajs) / len(trajs),
            # completions generated across a weight update (interrupted, then resumed on new weights)
            "mixed_version_frac": sum(len(set(g)) > 1 for g in generated) / len(trajs)}


@register_trainer("ppo")
class PPOTrainer(Trainer):
    side = None  # until `start` makes it
    on_disk = None  # the weight version last published to disk

    def setup(self):
        cfg = self.cfg
        self.actor = PPOActor.build(cfg.trainer.ppo, total_steps=cfg.trainer.total_train_steps,
                                    group_size=cfg.rollout.n_samples, temperature=cfg.rollout.gen.logprob_temperature)
        self.actor.phases = self.phases
        return self.actor.engine

    def start(self, state: Dict[str, Any]) -> bool:
        version = self.engine.get_version()  # the checkpoint's, or 0
        self.side = rollout_side(self.ctx, state.get("loader"), version, should_stop=lambda: bool(self.stop))
        if self.side is None:
            return False
        self.side.start()
        # The trainer owns the weights: push them before generating (the update starts generation). Servers may hold
        # another trainer's, or refuse all requests after a failed broadcast.
        self._push_weights(version, checkpoint=False)
        self.side.wait_update()
        return True

    def train_step(self, step: int):
        with self.phases.phase("wait_rollout"):
            groups = self.side.next_batch(self.engine.get_version())
        if groups is None:  # a stop request while waiting, or the prompts are used up (trainer.total_train_epochs)
            return None
        batch = shard_batch(trajectories_to_batch(groups, self.engine.pad_token_id), dist.rank(), dist.world_size())
        with self.phases.phase("train", device=True):
            stats = self.train_on(self.actor, batch)
        version = self.engine.get_version() + 1
        self.engine.set_version(version)
        freq = self.cfg.saver.freq_steps
        upd = self._push_weights(version, checkpoint=bool(freq) and step % freq == 0)
        return {**batch_stats([t for g in groups for t in g], version - 1), **stats, **upd, **self.side.stats()}

    def train_on(self, actor: PPOActor, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """One training step on this rank's shard of a rollout batch. Override to change the learning rule and keep
        everything else (rollouts, weight sync, checkpoints, metrics)."""
        return actor.train_step(batch)

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"loader": self.side.loader_state()}

    def finish(self, step: int) -> None:
        """A broadcast leaves the final weights on disk too (a disk update has written them already)."""
        version = self.engine.get_version()
        if self.cfg.trainer.ppo.weight_update != "disk" and self.on_disk != version:
            publish_weights(self.engine, self.ctx.weights_dir, version, self.engine.model_path, self.ctx.registry)

    def close(self) -> None:
        if self.side is not None:
            self.side.stop()

    def _push_weights(self, version: int, checkpoint: bool) -> Dict[str, float]:
        """Weights v``version`` to the servers: broadcast, or published to disk and loaded. A broadcast still writes a
        disk copy at ``checkpoint`` steps (servers that start later load it). Returns metrics other than phases."""
        cfg, timer, side = self.cfg, self.phases, self.side
        if cfg.trainer.ppo.weight_update in ("nccl", "gloo"):
            # external servers stay out of the group: they load a disk copy
            external = dist.broadcast_object(side.external_ids())
            path = None
            if external or checkpoint:
                with timer.phase("weight_publish"):
                    path = publish_weights(self.engine, self.ctx.weights_dir, version, self.engine.model_path,
                                           self.ctx.registry)
                    side.prune_weights(version)
                self.on_disk = version
            return side.update_weights_broadcast(lambda g, cb: broadcast_engine_weights(self.engine, g, cb),
                                                 version, timer, disk_path=str(path) if external else None)
        with timer.phase("weight_wait"):
            upd = side.wait_update()  # the previous version's: it reads the buffer the gather refills
        with timer.phase("weight_publish"):
            write = stage_weights(self.engine, self.ctx.weights_dir, version, self.engine.model_path, self.ctx.registry)
        side.update_weights_later(write, version)
        return upd
