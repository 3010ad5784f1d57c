"""The rollout half of an RL trainer: servers, client pool, controller, and the servers' half of weight updates.

Rank 0 holds the `RolloutSide` (or a `RolloutProcess` running one); the other ranks a `FollowerSide` with the same
methods, which receives what rank 0 shares and joins the collectives: the trainer never asks which rank it is."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.distributed as tdist

from areal_hpc import toy
from areal_hpc.config import ConfigError, actor_path
from areal_hpc.inference.client import ServerPool
from areal_hpc.registry import RegistryTimeout, address_towards, free_port
from areal_hpc.rollout import PromptLoader, RolloutController, Trajectory, make_workflow
from areal_hpc.rollout.adapters import apply_adapter
from areal_hpc.rollout.data import DatasetError, load_dataset_rows, one_line
from areal_hpc.rollout.prompts import PromptEncoder, PromptFormat
from areal_hpc.train import dist
from areal_hpc.train.phases import BG_PREFIX, PREFIX, PhaseTimer
from areal_hpc.train.weight_sync import announcement, init_weight_sync_group, new_group_name
from areal_hpc.trainers.base import TrainContext
from areal_hpc.trainers.rollout_process import BackgroundUpdates, RolloutProcess, share

log = logging.getLogger("areal_hpc.trainer")
GROUP_TIMEOUT_S = 600.0  # to form the weight broadcast's group, and for the servers to take one bucket


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.resolve_model(path))


def load_prompts(ctx: TrainContext, which: str = "train", epochs: int = 0, tokenizer=None,
                 answers: bool = False) -> PromptLoader:
    """The dataset's rows through its adapter; with ``tokenizer``, less those the prompt encoder rejects (an episode
    or SFT step would fail on them), those without an answer if ``answers``, and those over ``max_prompt_len``."""
    ds = ctx.cfg.train_dataset if which == "train" else ctx.cfg.valid_dataset
    rows = apply_adapter(load_dataset_rows(ds, which), ds.adapter, ds.prompt_key, ds.answer_key, ds.messages_key)
    if tokenizer is not None:
        encode, kept, rejected = PromptEncoder(tokenizer, PromptFormat.from_dataset(ds)).encode, [], []
        for row in rows:
            try:
                if answers and row.get(ds.answer_key) is None:  # a row of a JSONL file lacking the key has it None
                    keys = sorted(k for k, v in row.items() if v is not None)
                    raise ValueError(f"row has no {ds.answer_key!r}: keys {keys}")
                if len(encode(row)) <= ds.max_prompt_len:
                    kept.append(row)
            except ValueError as e:
                rejected.append(e)
        if rejected:
            log.warning("%d of %d rows of %s_dataset cannot be encoded as prompts: left out (first: %s)",
                        len(rejected), len(rows), which, one_line(rejected[0]))
        too_long = len(rows) - len(kept) - len(rejected)
        if too_long:
            log.warning("%d of %d prompts are longer than %s_dataset.max_prompt_len=%d tokens: left out",
                        too_long, len(rows), which, ds.max_prompt_len)
        if rejected and not kept:
            raise DatasetError(f"{which}_dataset.path", f"none of the {len(rows)} rows of {which}_dataset gives a "
                               f"usable prompt: {len(rejected)} cannot be encoded (first: {one_line(rejected[0])})")
        if rows and not kept:
            raise DatasetError(f"{which}_dataset.max_prompt_len", f"all {len(rows)} prompts are longer than "
                               f"{which}_dataset.max_prompt_len={ds.max_prompt_len} tokens",
                               "raise it, or shorten the prompts")
        rows = kept
    return PromptLoader(rows, shuffle=ds.shuffle and which == "train", seed=ctx.cfg.seed, epochs=epochs)


def make_rollout_workflow(cfg, tokenizer, ds):
    """``rollout.workflow`` for the rows of dataset ``ds`` (its keys, how prompts are rendered)."""
    workflow = make_workflow(cfg.rollout.workflow, tokenizer=tokenizer, gen_config=cfg.rollout.gen,
                             reward_fn=cfg.rollout.reward_fn, n_samples=cfg.rollout.n_samples, prompt_key=ds.prompt_key,
                             answer_key=ds.answer_key, messages_key=ds.messages_key, chat_template=ds.chat_template,
                             system_prompt=ds.system_prompt, chat_template_kwargs=ds.chat_template_kwargs,
                             reward_timeout_s=cfg.rollout.reward_timeout_s)
    workflow.context_length = cfg.server.context_length  # set, not passed: an __init__ naming its settings refuses it
    vars(workflow).update(cfg.rollout.workflow_args)  # its own settings, over its class attributes (`check_names`)
    return workflow


def server_pool(ctx: TrainContext, should_stop: Optional[Callable[[], bool]] = None) -> Optional[ServerPool]:
    """A client pool (not started) once as many servers as the run needs are healthy; None if a stop came meanwhile."""
    cfg = ctx.cfg
    n = cfg.min_required_servers or ctx.alloc.n_servers
    log.info("waiting for %d healthy server(s) in %s", n, ctx.registry.root)
    t0 = time.monotonic()
    try:
        ctx.registry.wait_for("servers", n, timeout_s=cfg.launcher.trainer_wait_servers_timeout_s, stop=should_stop)
    except RegistryTimeout:
        if not (should_stop and should_stop()):
            raise
        log.warning("stopped while waiting for servers")
        return None
    log.info("%d server(s) up after %.1fs", n, time.monotonic() - t0)
    return ServerPool(ctx.registry, ctx.registry.secret(), refresh_s=cfg.launcher.heartbeat_s,
                      request_timeout_s=cfg.rollout.request_timeout_s)


def rollout_side(ctx: TrainContext, loader_state: Optional[dict], version: int,
                 should_stop: Callable[[], bool]) -> "RolloutSide | RolloutProcess | FollowerSide | None":
    """Rank 0's `RolloutSide` once the servers are up (a `RolloutProcess` with ``rollout.client_process`` and disk
    updates), a `FollowerSide` on the other ranks; None on all if a stop came meanwhile."""
    def make() -> "RolloutSide | RolloutProcess | None":
        tokenizer = load_tokenizer(actor_path(ctx.cfg))
        epochs, size = ctx.cfg.trainer.total_train_epochs, ctx.cfg.rollout.batch_size
        loader = load_prompts(ctx, "train", epochs=epochs, tokenizer=tokenizer)
        if epochs and epochs * len(loader.rows) < size:  # else step 1 finds no batch: exit 0, untrained
            raise ConfigError("rollout.batch_size", f"{len(loader.rows)} usable prompt(s) x {epochs} epoch(s) fill "
                              f"no batch of {size}", "lower it, or raise trainer.total_train_epochs")
        loader.load_state_dict(loader_state)
        skip = (loader_state or {}).get("skip", ())  # rows done after the oldest one in flight (`rows_state`)
        pool = server_pool(ctx, should_stop)  # waited for here; a child process starts it
        if pool is None:
            return None
        make_side = functools.partial(RolloutSide, ctx, tokenizer, loader, pool, version, skip=skip)
        in_child = ctx.cfg.rollout.client_process and ctx.cfg.trainer.ppo.weight_update == "disk"
        return RolloutProcess(make_side, should_stop) if in_child else make_side(should_stop)

    side = share(make, sent=lambda side: side is not None)  # the other ranks: whether rank 0 has one
    if dist.rank() == 0:
        return side
    return FollowerSide() if side else None


class RolloutSide(BackgroundUpdates):
    """Rank 0's view of the inference side of a run."""

    def __init__(self, ctx: TrainContext, tokenizer, loader: PromptLoader, pool: ServerPool, start_version: int,
                 should_stop: Callable[[], bool], skip: Sequence[int] = ()):
        cfg = ctx.cfg
        self.ctx, self.should_stop, self.pool = ctx, should_stop, pool
        self.controller = RolloutController(
            make_rollout_workflow(cfg, tokenizer, cfg.train_dataset), self.pool, loader,
            batch_size=cfg.rollout.batch_size, max_head_offpolicyness=cfg.rollout.max_head_offpolicyness,
            max_concurrent=cfg.rollout.max_concurrent_rollouts, start_version=start_version, skip=skip)
        self.group, self.group_name = None, None  # the broadcast's, formed on the first one (`_ensure_group`)
        self.members: List[str] = []
        self.external: List[str] = []  # servers updated from disk instead
        self._warned: set = set()  # external servers told about once
        self._unpaused: set = set()  # servers the last pause did not reach (dead, their record not yet expired)
        super().__init__()

    def start(self) -> None:
        """Run the rollout loop, paused until the first weight update resumes it."""
        self.controller.pause()
        self.controller.start()

    def stop_rest(self) -> None:
        self.controller.stop()

    def next_trajectories(self, version: int) -> Optional[List[List[Trajectory]]]:
        """`next_batch` on this rank alone, each group's trajectories; None once the prompts of
        ``trainer.total_train_epochs`` are used up."""
        r = self.ctx.cfg.rollout
        self.controller.set_trainer_version(version)
        groups = self.controller.next_batch(should_stop=self.should_stop, drop_timeout_s=r.drop_timeout_s,
                                            stall_timeout_s=r.stall_timeout_s)
        return None if groups is None else [g.trajectories for g in groups]

    def stats(self) -> Dict[str, float]:
        return {"dropped_stale": self.controller.stats["dropped_stale"]}

    def loader_state(self) -> Dict[str, Any]:
        """The prompt loader's position; rows in flight are generated again after a restart."""
        return self.controller.rows_state()

    def prune_weights(self, version: int) -> None:
        from areal_hpc.train.publish import prune_weights

        prune_weights(self.ctx.weights_dir, self.ctx.registry, keep_min_version=version)

    def external_ids(self) -> List[str]:
        """Healthy external servers (attached by URL, or `serve` by hand) the pool knows of now."""
        return sorted(sid for sid, info in self.pool.servers.items() if info["healthy"] and info.get("external"))

    def apply_update(self, write: Callable[[], Path], version: int) -> Dict[str, float]:
        """A disk update now (`update_weights_later` runs it on a thread); phases as ``bg_phase/*``."""
        timer = PhaseTimer()
        timer.begin()
        with timer.phase("weight_publish"):
            path = write()
        with self._paused(version, timer):
            out = self._load_from_disk(str(path), version, timer)
        with timer.phase("weight_publish"):
            self.prune_weights(version)
        split = timer.split()
        return {**out, **{BG_PREFIX + k[len(PREFIX):]: v for k, v in split.items() if k.startswith(PREFIX)},
                "bg_time_s": split["step_time_s"]}

    def _load_from_disk(self, path: str, version: int, timer: PhaseTimer,
                        server_ids: Optional[List[str]] = None) -> Dict[str, float]:
        """The servers (or ``server_ids``) load ``path``; those that fail are reported, the others go on (a dead
        server's record expires)."""
        with timer.phase("weight_load"):
            results = self.controller.run(self.pool.update_weights_from_disk(path, version, server_ids=server_ids))
        failed = {k: v for k, v in results.items() if not v.ok}
        if failed:
            log.warning("weight update v%d failed on %d server(s): %s", version, len(failed), failed)
        for sid in sorted(set(failed) - self._warned):
            if self.pool.servers.get(sid, {}).get("external"):
                self._warned.add(sid)
                log.warning("external server %s could not load %s: disk weight updates need the run's weights/ "
                            "directory readable from that server (a shared filesystem)", sid, path)
        return {"servers_updated": float(len(results) - len(failed))}

    def update_weights_broadcast(self, broadcast: Callable, version: int, timer: PhaseTimer,
                                 disk_path: Optional[str] = None) -> Dict[str, float]:
        """Pause, (re)form the group if the servers changed, ``broadcast(group, on_bucket)``, continue. External servers
        load ``disk_path`` instead."""
        with self._paused(version, timer):
            with timer.phase("weight_broadcast"):
                self._ensure_group()
                try:
                    broadcast(self.group, self._announcer(version))
                except BaseException as e:  # servers still waiting in it fail now, not at our exit: they can continue
                    traceback.clear_frames(e.__traceback__)  # their locals hold the group: it would stay connected
                    self._drop_group()
                    raise
            if disk_path and self.external:
                self._load_from_disk(disk_path, version, timer, server_ids=self.external)
        return {"servers_updated": float(len(self.members))}

    @contextlib.contextmanager
    def _paused(self, version: int, timer: PhaseTimer):
        """Submission and servers paused around a weight update, then the new version. Interrupted generations resume
        on the new weights (each token carries its version)."""
        c = self.controller
        c.pause()
        try:
            with timer.phase("weight_pause"):
                self._unpaused = {sid for sid, r in c.run(self.pool.pause_all()).items() if r.status is None}
            yield
        finally:
            with timer.phase("weight_pause"):
                c.run(self.pool.continue_all())
                c.set_version(version)
                c.resume()

    def _ensure_group(self) -> None:
        """Trainer rank 0 + every server in one process group (SGLang's /init_weights_update_group), formed again under
        a new name whenever the live servers change (its size is fixed). External servers stay out: one that cannot
        reach the trainer's port would make all wait out the timeout."""
        pool, c, backend = self.pool, self.controller, self.ctx.cfg.trainer.ppo.weight_update
        c.run(pool.refresh())
        external = self.external_ids()
        members = sorted(sid for sid, info in pool.servers.items()
                         if info["healthy"] and sid not in external and sid not in self._unpaused)
        for sid in sorted(set(external) - set(self.external)):
            log.warning("external server %s gets weights from disk (weights/), not through the %s group", sid, backend)
        self.external = external
        if self.group is not None and members == self.members:
            return
        self._drop_group()
        name, port = new_group_name(), free_port("")
        addr = address_towards(pool.servers[members[0]]["address"] if members else "")
        world = len(members) + 1

        async def join_all():
            return await asyncio.gather(*(pool.init_weights_update_group(
                sid, addr, port, i + 1, world, name, backend, timeout_s=GROUP_TIMEOUT_S)
                for i, sid in enumerate(members)))

        fut = c.submit(join_all())  # servers join while we host the rendezvous
        self.group = init_weight_sync_group(addr, port, 0, world, name, backend=backend, timeout_s=GROUP_TIMEOUT_S)
        failed = [r for res in fut.result(GROUP_TIMEOUT_S) for r in res.values() if not r.ok]
        if failed:
            raise RuntimeError(f"servers failed to join weight group {name}: {failed}")
        self.group_name, self.members = name, members
        log.info("weight-sync group %s formed with %d server(s)", name, len(members))

    def _drop_group(self) -> None:
        if self.group is not None:
            tdist.destroy_process_group(self.group)
        self.group, self.members = None, []

    def _announcer(self, version: int):
        """``on_bucket`` for `broadcast_engine_weights`: tell every server what comes next."""
        def on_bucket(bucket):
            fut = self.controller.submit(self.pool.update_weights_from_distributed(
                *announcement(bucket), self.group_name, version, self.members, timeout_s=GROUP_TIMEOUT_S))

            def wait():
                bad = [r for r in fut.result(GROUP_TIMEOUT_S).values() if not r.ok]
                if bad:
                    raise RuntimeError(f"weight broadcast failed on {[(r.server_id, r.error) for r in bad]}")
            return wait
        return on_bucket


class FollowerSide:
    """Trainer ranks other than 0: receive what rank 0 shares (batches, failures), join the broadcast's collectives."""

    def _nothing(self, *args: Any) -> Dict[str, float]:
        return {}  # rank 0 reports: a follower's results are not used

    start = stop = loader_state = prune_weights = update_weights_later = _nothing
    stats = wait_update = external_ids = _nothing

    next_batch = BackgroundUpdates.next_batch  # `share` receives rank 0's batch, or its failure

    def update_weights_broadcast(self, broadcast: Callable, version: int, timer: PhaseTimer,
                                 disk_path: Optional[str] = None) -> Dict[str, float]:
        with timer.phase("weight_broadcast"):
            broadcast(None, None)
        return {}
