"""The rollout half of an RL trainer (rank 0): servers, client pool, controller, weight updates.

Both halves of a weight update meet here: `train` publishes weights, this tells the servers
to load them (`train` knows nothing of servers; `inference` knows nothing of training).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

from areal_hpc import toy
from areal_hpc.inference.client import ServerPool
from areal_hpc.rollout import PromptLoader, RolloutController, load_rows, make_workflow
from areal_hpc.trainers.base import TrainContext

log = logging.getLogger("areal_hpc.trainer")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.resolve_model(path))


def load_prompts(ctx: TrainContext, which: str = "train", epochs: int = 0) -> PromptLoader:
    ds = ctx.cfg.train_dataset if which == "train" else ctx.cfg.valid_dataset
    rows = load_rows(toy.resolve_dataset(ds.path, split=which), limit=ds.limit)
    return PromptLoader(rows, shuffle=ds.shuffle and which == "train", seed=ctx.cfg.seed, epochs=epochs)


def servers_required(ctx: TrainContext) -> int:
    return ctx.cfg.min_required_servers or ctx.alloc.n_servers


class RolloutSide:
    """Rank 0's view of the inference side of a run."""

    def __init__(self, ctx: TrainContext, tokenizer, loader: PromptLoader, start_version: int,
                 max_staleness: Optional[int] = None):
        cfg = ctx.cfg
        self.ctx = ctx
        n = servers_required(ctx)
        log.info("waiting for %d healthy server(s) in %s", n, ctx.registry.root)
        t0 = time.monotonic()
        ctx.registry.wait_for("servers", n, timeout_s=cfg.launcher.trainer_wait_servers_timeout_s)
        log.info("%d server(s) up after %.1fs", n, time.monotonic() - t0)
        self.pool = ServerPool(ctx.registry, ctx.registry.secret(), refresh_s=cfg.launcher.heartbeat_s,
                               request_timeout_s=cfg.rollout.request_timeout_s)
        ds = cfg.train_dataset
        self.workflow = make_workflow(cfg.rollout.workflow, tokenizer=tokenizer, gen_config=cfg.rollout.gen,
                                      reward_fn=cfg.rollout.reward_fn, n_samples=cfg.rollout.n_samples,
                                      prompt_key=ds.prompt_key, answer_key=ds.answer_key)
        self.loader = loader
        self.controller = RolloutController(
            self.workflow, self.pool, loader, batch_size=cfg.rollout.batch_size,
            max_head_offpolicyness=cfg.rollout.max_head_offpolicyness if max_staleness is None else max_staleness,
            max_concurrent=cfg.rollout.max_concurrent_rollouts, start_version=start_version)

    def start(self) -> "RolloutSide":
        self.controller.start()
        return self

    def update_weights(self, path: str, version: int) -> Dict[str, float]:
        """Servers load ``path`` as ``version``: pause submission and servers, load, continue.

        Interrupted generations are resumed by the pool with the new weights (their tokens carry
        the version that produced them). Servers that fail to load are reported; the update goes on
        with the others (a dead server's record expires and the pool drops it).
        """
        c = self.controller
        t0 = time.monotonic()
        c.pause()
        try:
            c.run(self.pool.pause_all())
            results = c.run(self.pool.update_weights_from_disk(path, version))
        finally:
            c.run(self.pool.continue_all())
            c.set_version(version)
            c.resume()
        failed = {k: v for k, v in results.items() if not getattr(v, "ok", v is True)}
        if failed:
            log.warning("weight update v%d failed on %d server(s): %s", version, len(failed), failed)
        return {"weight_update_s": time.monotonic() - t0, "servers_updated": float(len(results) - len(failed))}

    def stop(self) -> None:
        self.controller.stop()
