"""GRPO / decoupled PPO, synchronous or asynchronous (`trainer.ppo.async_training`).

One step: batch from the controller -> recompute logprobs -> advantages -> PPO update ->
weight update cycle (pause, publish, servers load, continue, version + 1) -> metrics ->
checkpoint when due. Rank 0 drives the rollout side; every rank trains on its shard.

Every step's metrics split its wall time (``step_time_s``) into phases (`train.phases`):
``phase/wait_rollout`` (for the batch, and its hand-over to every rank), ``phase/logprob``
(proximal / reference logprobs), ``phase/train``, ``phase/weight_publish`` (weights written to
disk), ``phase/weight_pause`` (pausing and resuming the servers around an update),
``phase/weight_load`` (servers loading from disk) or ``phase/weight_broadcast``,
``phase/metrics`` and ``phase/checkpoint`` (of the previous step), ``phase/other`` (the rest).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as tdist

from areal_hpc.config import ConfigError, actor_path
from areal_hpc.registry import RegistryTimeout
from areal_hpc.rollout import Group, RolloutError, Trajectory
from areal_hpc.train import dist
from areal_hpc.train.batch import shard_batch
from areal_hpc.train.checkpoint import Checkpointer
from areal_hpc.train.phases import PhaseTimer
from areal_hpc.train.ppo_loss import PPOActor
from areal_hpc.train.publish import prune_weights, publish_weights
from areal_hpc.trainers.base import Trainer
from areal_hpc.trainers.factory import register_trainer
from areal_hpc.trainers.metrics import MetricsWriter

log = logging.getLogger("areal_hpc.trainer")
STOP = "stop"  # what rank 0 sends the other ranks instead of a batch when a stop cut the wait short
FAILED = "failed"  # (FAILED, reason): rank 0's rollouts stalled or failed; every rank raises it


def trajectories_to_batch(trajs: List[Trajectory], pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-padded ``[B, L]`` tensors: prompt+completion ids, masks, behaviour logprobs, versions.
    Rows are built as Python lists and converted once per key (a tensor per row and key cost
    ~7 ms for the quickstart's 256 short rollouts)."""
    L = max(t.n_tokens for t in trajs)
    ids, attn, loss, logp, vers = [], [], [], [], []
    for t in trajs:
        p, o = len(t.prompt_ids), len(t.output_ids)
        tail = L - p - o
        ids.append(t.prompt_ids + t.output_ids + [pad_id] * tail)
        attn.append([True] * (p + o) + [False] * tail)
        loss.append([False] * p + [True] * o + [False] * tail)
        logp.append([0.0] * p + list(t.logprobs) + [0.0] * tail)
        vers.append([-1] * p + list(t.versions) + [-1] * tail)
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(attn),
            "loss_mask": torch.tensor(loss), "logprobs": torch.tensor(logp, dtype=torch.float32),
            "versions": torch.tensor(vers, dtype=torch.long),
            "rewards": torch.tensor([t.reward for t in trajs], dtype=torch.float32)}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every rank."""
    if dist.world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=dist.collective_device())
    return box[0]


def batch_stats(groups: List[Group], version: int) -> Dict[str, float]:
    trajs = [t for g in groups for t in g.trajectories]
    stale = [version - t.oldest_version for t in trajs if t.versions]
    out_len = [len(t.output_ids) for t in trajs]
    return {
        "reward_mean": sum(t.reward for t in trajs) / len(trajs),
        "staleness_max": float(max(stale, default=0)),
        "staleness_mean": sum(stale) / max(1, len(stale)),
        "completion_len_mean": sum(out_len) / len(trajs),
        "n_trajectories": float(len(trajs)),
        "gen_tokens": float(sum(out_len)),
        "tokens": float(sum(t.n_tokens for t in trajs)),
        "truncated_frac": sum(t.finish_reason == "length" for t in trajs) / len(trajs),
        # completions generated across a weight update (interrupted, then resumed on new weights)
        "mixed_version_frac": sum(len(set(t.versions)) > 1 for t in trajs) / len(trajs),
    }


@register_trainer("ppo")
class PPOTrainer(Trainer):
    _bcast = None  # BroadcastWeightSync, formed on the first broadcast update

    def run(self) -> int:
        cfg, ctx = self.cfg, self.ctx
        total = cfg.trainer.total_train_steps
        actor = PPOActor.build(cfg.trainer.ppo, total_steps=total, group_size=cfg.rollout.n_samples,
                               temperature=cfg.rollout.gen.temperature or 1.0)
        engine = actor.engine
        world, rank = dist.world_size(), dist.rank()
        if cfg.rollout.batch_size % world:
            raise ConfigError("rollout.batch_size", f"{cfg.rollout.batch_size} groups cannot be split evenly over "
                              f"{world} trainer ranks", "make it a multiple of the trainer's d")
        ckpt = Checkpointer(engine, keep_last=cfg.saver.keep_last)
        state = self._recover(ckpt)
        step = int(state.get("global_step", 0))
        version = int(state.get("weight_version", 0))
        time_offset = float(state.get("time_s", 0.0))
        engine.set_version(version)
        model_src = engine.model_path
        timer = self.phases = actor.phases = PhaseTimer(
            sync=torch.cuda.synchronize if engine.device.type == "cuda" else None)

        side = metrics = None
        if self.is_main:
            from areal_hpc.trainers.rollout_side import RolloutSide, load_prompts, load_tokenizer

            loader = load_prompts(ctx, "train")
            loader.load_state_dict(state.get("loader"))
            try:
                side = RolloutSide(ctx, load_tokenizer(actor_path(cfg)), loader, start_version=version,
                                   should_stop=lambda: bool(self.stop))
            except RegistryTimeout:
                if not self.stop:
                    raise
                log.warning("stopped while waiting for servers")
                return 0
            metrics = MetricsWriter(ctx.run_dir, cfg.stats.tensorboard, cfg.stats.plot)
            metrics.drop_after(step)
            self.publish_state(step=step, version=version, world_size=world, state="starting")
        if side is not None:  # the rollout loop must run for update_weights; nothing is generated yet
            side.controller.pause()
            side.start()
        if version > 0 or cfg.min_required_servers > 0:
            # A recovered (or restarted) trainer owns the weights: push them before generating.
            path = publish_weights(engine, ctx.weights_dir, version, model_src, ctx.registry if self.is_main else None)
            if side is not None:
                side.update_weights(str(path), version)
        if side is not None:
            side.controller.resume()
            self.publish_state(state="training")
        t_start = time.monotonic() - time_offset
        rc = 0
        settled_gc = dist.SettledGC()
        timer.begin()
        try:
            while step < total:
                if dist.all_reduce_scalar(1.0 if self.stop else 0.0, "max") > 0:
                    log.warning("stopping at step %d on request", step)
                    break
                failure = None
                with timer.phase("wait_rollout"):
                    try:
                        groups = self._wait_for_batch(side) if side is not None else None
                    except RolloutError as e:  # stalled or failing rollouts: every rank ends with the reason
                        groups, failure = None, e
                    trajs = broadcast_object(
                        None if side is None else (FAILED, str(failure)) if failure is not None else
                        STOP if groups is None else [t for g in groups for t in g.trajectories])
                if failure is not None:
                    raise failure
                if isinstance(trajs, tuple) and trajs[:1] == (FAILED,):
                    raise RolloutError(trajs[1])
                if trajs == STOP:
                    log.warning("stopping at step %d on request (while waiting for rollouts)", step)
                    break
                batch = shard_batch(trajectories_to_batch(trajs, engine.pad_token_id), rank, world,
                                    cfg.rollout.n_samples)
                with timer.phase("train", device=True):
                    stats = self.train_on(actor, batch)
                version += 1
                engine.set_version(version)
                step += 1
                settled_gc.step()
                upd = self._push_weights(engine, side, version, model_src, step)
                split = timer.split()
                if side is not None:
                    step_time = split["step_time_s"]
                    m = {"step": step, "version": version, "time_s": time.monotonic() - t_start,
                         **batch_stats(groups, version - 1), **{k: v for k, v in stats.items() if k != "reward"},
                         **upd, **split, "lr": engine.current_lr(),
                         "dropped_stale": side.controller.stats["dropped_stale"]}
                    m["gen_tokens_per_s"] = m["gen_tokens"] / step_time
                    m["trained_tokens_per_s"] = m["tokens"] / step_time
                    with timer.phase("metrics"):
                        metrics.write(m)
                        self.publish_state(step=step, version=version)
                if cfg.saver.freq_steps and step % cfg.saver.freq_steps == 0 and step < total:
                    with timer.phase("checkpoint"):
                        self._save(ckpt, step, side, t_start)
            self._save(ckpt, step, side, t_start)
        except KeyboardInterrupt:
            rc = 130
        finally:
            if side is not None:
                side.stop()
                metrics.close()
                self.publish_state(state="done" if step >= total else "stopped")
                self.close_state()
        log.info("trainer finished at step %d (version %d)", step, version)
        return rc

    def _wait_for_batch(self, side, poll_s: float = 1.0):
        """The next batch of groups, or None if a stop is requested while waiting (the servers may
        be gone for good: a stopped run must not hang here). A stall (rollout.drop_timeout_s,
        rollout.stall_timeout_s) raises `RolloutStall` with the reason, logged meanwhile."""
        r = self.cfg.rollout
        return side.controller.next_batch(should_stop=lambda: bool(self.stop), drop_timeout_s=r.drop_timeout_s,
                                          stall_timeout_s=r.stall_timeout_s, poll_s=poll_s)

    def _push_weights(self, engine, side, version: int, model_src: str, step: int) -> Dict[str, float]:
        """Weights v``version`` to the servers: broadcast (NCCL, or gloo on CPU), or published to
        disk and loaded. With a broadcast a disk copy is still written at checkpoint steps (servers
        that start later load it). Times go to ``self.phases``; returns other metrics."""
        ctx, cfg, timer = self.ctx, self.cfg, self.phases
        registry = ctx.registry if self.is_main else None
        if cfg.trainer.ppo.weight_update in ("nccl", "gloo"):
            from areal_hpc.train.weight_sync import broadcast_engine_weights
            from areal_hpc.trainers.rollout_side import BroadcastWeightSync

            if side is not None and self._bcast is None:
                self._bcast = BroadcastWeightSync(side, backend=cfg.trainer.ppo.weight_update)
            # external servers stay out of the group: they load a disk copy, published for them
            external = broadcast_object(side.external_ids() if side is not None else [])
            path = None
            if external or (cfg.saver.freq_steps and step % cfg.saver.freq_steps == 0):
                with timer.phase("weight_publish"):
                    path = publish_weights(engine, ctx.weights_dir, version, model_src, registry)
                    if side is not None:
                        prune_weights(ctx.weights_dir, ctx.registry, keep_min_version=version)
            if side is not None:
                return side.update_weights_broadcast(
                    self._bcast, lambda g, cb: broadcast_engine_weights(engine, g, cb), version, timer,
                    disk_path=str(path) if external and path is not None else None)
            with timer.phase("weight_broadcast"):
                broadcast_engine_weights(engine, None)
            return {}
        with timer.phase("weight_publish"):
            path = publish_weights(engine, ctx.weights_dir, version, model_src, registry)
        if side is None:
            return {}
        upd = side.update_weights(str(path), version, timer)
        with timer.phase("weight_publish"):
            prune_weights(ctx.weights_dir, ctx.registry, keep_min_version=version)
        return upd

    def train_on(self, actor: PPOActor, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """One training step on this rank's shard of a rollout batch. Override to change the
        learning rule and keep everything else (rollouts, weight sync, checkpoints, metrics)."""
        return actor.train_step(batch)

    def _recover(self, ckpt: Checkpointer) -> Dict[str, Any]:
        mode = self.cfg.recover.mode
        if mode == "disabled":
            return {}
        state = ckpt.load_latest(self.ctx.checkpoint_dir)
        if state is None:
            if mode == "resume":
                raise ConfigError("recover.mode", f"resume asked but no checkpoint in {self.ctx.checkpoint_dir}",
                                  "use recover.mode=auto to start fresh when there is none")
            return {}
        log.info("recovered from checkpoint: step %d, weight version %d", state["global_step"], state["weight_version"])
        return state

    def _save(self, ckpt: Checkpointer, step: int, side: Optional[Any], t_start: float) -> None:
        extra = {"time_s": time.monotonic() - t_start}
        if side is not None:  # rows in flight are generated again after a restart
            extra["loader"] = side.loader.state_dict(rewind=side.controller.in_flight())
        extra = broadcast_object(extra)
        t0 = time.monotonic()
        ckpt.save(self.ctx.checkpoint_dir, step, extra)
        log.info("checkpoint at step %d (%.2fs)", step, time.monotonic() - t0)
