"""The rollout half of an RL trainer (rank 0): servers, client pool, controller, weight updates.

Both halves of a weight update meet here: `train` publishes weights, this tells the servers
to load them (`train` knows nothing of servers; `inference` knows nothing of training).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Dict, List, Optional

from areal_hpc import toy
from areal_hpc.inference.client import ServerPool
from areal_hpc.registry import free_port
from areal_hpc.rollout import PromptLoader, RolloutController, make_workflow
from areal_hpc.rollout.data import load_dataset_rows
from areal_hpc.rollout.adapters import apply_adapter
from areal_hpc.train.phases import PhaseTimer
from areal_hpc.trainers.base import TrainContext

log = logging.getLogger("areal_hpc.trainer")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.resolve_model(path))


def load_prompts(ctx: TrainContext, which: str = "train", epochs: int = 0) -> PromptLoader:
    ds = ctx.cfg.train_dataset if which == "train" else ctx.cfg.valid_dataset
    rows = load_dataset_rows(ds, which)
    rows = adapt_rows(rows, ds)
    return PromptLoader(rows, shuffle=ds.shuffle and which == "train", seed=ctx.cfg.seed, epochs=epochs)


def adapt_rows(rows, ds):
    """``ds.adapter`` (e.g. gsm8k) applied to loaded rows; the rows unchanged without one."""
    return apply_adapter(rows, ds.adapter, ds.prompt_key, ds.answer_key, ds.messages_key)


def dataset_prompt_kwargs(ds) -> Dict[str, Any]:
    """The workflow arguments a `DatasetConfig` sets: its keys and how prompts are rendered."""
    return {"prompt_key": ds.prompt_key, "answer_key": ds.answer_key, "messages_key": ds.messages_key,
            "chat_template": ds.chat_template, "system_prompt": ds.system_prompt}


def servers_required(ctx: TrainContext) -> int:
    return ctx.cfg.min_required_servers or ctx.alloc.n_servers


class RolloutSide:
    """Rank 0's view of the inference side of a run."""

    def __init__(self, ctx: TrainContext, tokenizer, loader: PromptLoader, start_version: int,
                 max_staleness: Optional[int] = None, should_stop=None):
        cfg = ctx.cfg
        self.ctx = ctx
        n = servers_required(ctx)
        log.info("waiting for %d healthy server(s) in %s", n, ctx.registry.root)
        t0 = time.monotonic()
        ctx.registry.wait_for("servers", n, timeout_s=cfg.launcher.trainer_wait_servers_timeout_s, stop=should_stop)
        log.info("%d server(s) up after %.1fs", n, time.monotonic() - t0)
        self.pool = ServerPool(ctx.registry, ctx.registry.secret(), refresh_s=cfg.launcher.heartbeat_s,
                               request_timeout_s=cfg.rollout.request_timeout_s)
        ds = cfg.train_dataset
        self.workflow = make_workflow(cfg.rollout.workflow, tokenizer=tokenizer, gen_config=cfg.rollout.gen,
                                      reward_fn=cfg.rollout.reward_fn, n_samples=cfg.rollout.n_samples,
                                      **dataset_prompt_kwargs(ds))
        self.loader = loader
        self.controller = RolloutController(
            self.workflow, self.pool, loader, batch_size=cfg.rollout.batch_size,
            max_head_offpolicyness=cfg.rollout.max_head_offpolicyness if max_staleness is None else max_staleness,
            max_concurrent=cfg.rollout.max_concurrent_rollouts, start_version=start_version)
        self._warned: set = set()  # external servers told about once

    def start(self) -> "RolloutSide":
        self.controller.start()
        return self

    def update_weights(self, path: str, version: int, timer: Optional[PhaseTimer] = None) -> Dict[str, float]:
        """Servers load ``path`` as ``version``: pause submission and servers, load, continue.

        Interrupted generations are resumed by the pool with the new weights (their tokens carry
        the version that produced them). Servers that fail to load are reported; the update goes on
        with the others (a dead server's record expires and the pool drops it). ``timer`` gets the
        ``weight_pause`` and ``weight_load`` phases.
        """
        c, timer = self.controller, timer or PhaseTimer()
        c.pause()
        try:
            with timer.phase("weight_pause"):
                c.run(self.pool.pause_all())
            with timer.phase("weight_load"):
                results = c.run(self.pool.update_weights_from_disk(path, version))
        finally:
            with timer.phase("weight_pause"):
                c.run(self.pool.continue_all())
                c.set_version(version)
                c.resume()
        failed = self._report_failed(results, path, version)
        return {"servers_updated": float(len(results) - len(failed))}

    def external_ids(self) -> List[str]:
        """Healthy external servers (attached by URL, or `serve` by hand) the pool knows of now."""
        return sorted(sid for sid, info in self.pool.servers.items() if info["healthy"] and info.get("external"))

    def _report_failed(self, results: Dict[str, Any], path: str, version: int) -> Dict[str, Any]:
        failed = {k: v for k, v in results.items() if not getattr(v, "ok", v is True)}
        if failed:
            log.warning("weight update v%d failed on %d server(s): %s", version, len(failed), failed)
        for sid in sorted(set(failed) - self._warned):
            if self.pool.servers.get(sid, {}).get("external"):
                self._warned.add(sid)
                log.warning("external server %s could not load %s: disk weight updates need the run's weights/ "
                            "directory readable from that server (a shared filesystem)", sid, path)
        return failed

    def update_weights_broadcast(self, sync: "BroadcastWeightSync", broadcast, version: int,
                                 timer: Optional[PhaseTimer] = None, disk_path: Optional[str] = None
                                 ) -> Dict[str, float]:
        """The collective path: pause, (re)form the group if the servers changed, broadcast, continue.
        ``broadcast(group, on_bucket)`` runs the trainer's collective broadcast (all ranks); external
        servers (outside the group) load ``disk_path``, published for them."""
        c, timer = self.controller, timer or PhaseTimer()
        c.pause()
        try:
            with timer.phase("weight_pause"):
                c.run(self.pool.pause_all())
            with timer.phase("weight_broadcast"):
                sync.ensure_group()
                broadcast(sync.group, sync.announcer(version))
            if disk_path and sync.external:
                with timer.phase("weight_load"):
                    results = c.run(self.pool.update_weights_from_disk(disk_path, version, server_ids=sync.external))
                self._report_failed(results, disk_path, version)
        finally:
            with timer.phase("weight_pause"):
                c.run(self.pool.continue_all())
                c.set_version(version)
                c.resume()
        return {"servers_updated": float(len(sync.members))}

    def stop(self) -> None:
        self.controller.stop()


class BroadcastWeightSync:
    """Trainer rank 0 + every server in one process group (SGLang's /init_weights_update_group):
    NCCL on GPUs, gloo (through host memory) on CPU-only runs.

    The group has a fixed size, so it is formed again (under a new name, which servers accept,
    so a restarted trainer can always re-join) whenever the set of live servers changes. A server
    that joins late starts from the disk copy (weights/latest) and gets the full weights at the
    next broadcast. External servers are kept out of the group (its rendezvous is fixed-size: one
    member that cannot reach the trainer's port would make every member wait out the timeout); they
    load a disk copy published for them at every update instead, which is said once in the log.
    """

    def __init__(self, side: RolloutSide, backend: str = "nccl", timeout_s: float = 600.0):
        self.side = side
        self.backend = backend
        self.timeout_s = timeout_s
        self.group = None
        self.name: Optional[str] = None
        self.members: List[str] = []
        self.external: List[str] = []  # servers updated from disk instead

    def ensure_group(self) -> None:
        import socket

        from areal_hpc.train.weight_sync import destroy_weight_sync_group, init_weight_sync_group, new_group_name

        pool, c = self.side.pool, self.side.controller
        c.run(pool.refresh())
        external = self.side.external_ids()
        members = sorted(sid for sid, info in pool.servers.items() if info["healthy"] and sid not in external)
        for sid in sorted(set(external) - set(self.external)):
            log.warning("external server %s gets weights from disk (weights/), not through the %s group", sid,
                        self.backend)
        self.external = external
        if self.group is not None and members == self.members:
            return
        if self.group is not None:
            destroy_weight_sync_group(self.group)
            self.group = None
        name = new_group_name()
        port = free_port("")
        addr = socket.gethostbyname(socket.gethostname())
        world = len(members) + 1

        async def join_all():
            return await asyncio.gather(*(pool.init_weights_update_group(
                sid, addr, port, i + 1, world, name, self.backend, timeout_s=self.timeout_s)
                for i, sid in enumerate(members)))

        fut = c.submit(join_all())  # servers join while we host the rendezvous
        self.group = init_weight_sync_group(addr, port, 0, world, name, backend=self.backend, timeout_s=self.timeout_s)
        failed = [r for res in fut.result(self.timeout_s) for r in res.values() if not r.ok]
        if failed:
            raise RuntimeError(f"servers failed to join weight group {name}: {failed}")
        self.name, self.members = name, members
        log.info("weight-sync group %s formed with %d server(s)", name, len(members))

    def announcer(self, version: int):
        """``on_bucket`` for `broadcast_engine_weights`: tell every server what comes next."""
        pool, c = self.side.pool, self.side.controller

        def on_bucket(bucket):
            fut = c.submit(pool.update_weights_from_distributed(bucket.names, bucket.dtypes, bucket.shapes, self.name,
                                                                version, self.members, timeout_s=self.timeout_s))

            def wait():
                bad = [r for r in fut.result(self.timeout_s).values() if not r.ok]
                if bad:
                    raise RuntimeError(f"weight broadcast failed on {[(r.server_id, r.error) for r in bad]}")
            return wait
        return on_bucket
