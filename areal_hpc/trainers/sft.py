"""`trainer.type=sft`: supervised fine-tuning on prompt/answer rows (loss on the answer only).

Same engine, packing, checkpoints and metrics as PPO; no servers. Every rank reads the same
rows in the same order and trains on its shard of each batch. Each step's wall time
(``step_time_s``) is split into ``phase/data`` (rows read and tokenized), ``phase/train``,
``phase/metrics`` and ``phase/checkpoint`` (of the previous step) and ``phase/other``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict

import torch

from areal_hpc.config import ConfigError
from areal_hpc.rollout import PromptLoader
from areal_hpc.rollout.data import load_dataset_rows
from areal_hpc.rollout.adapters import apply_adapter
from areal_hpc.rollout.prompts import PromptEncoder, PromptFormat
from areal_hpc.train import dist
from areal_hpc.train.batch import shard_batch
from areal_hpc.train.checkpoint import Checkpointer
from areal_hpc.train.phases import PhaseTimer
from areal_hpc.train.sft import SFTLearner, tokenize_rows
from areal_hpc.trainers.base import Trainer
from areal_hpc.trainers.factory import register_trainer
from areal_hpc.trainers.metrics import MetricsWriter

log = logging.getLogger("areal_hpc.trainer")


@register_trainer("sft")
class SFTTrainer(Trainer):
    def run(self) -> int:
        from transformers import AutoTokenizer

        cfg, ctx = self.cfg, self.ctx
        sft, total = cfg.trainer.sft, cfg.trainer.total_train_steps
        world, rank = dist.world_size(), dist.rank()
        learner = SFTLearner(sft, total)
        engine = learner.engine
        if sft.batch_size % world:
            raise ConfigError("trainer.sft.batch_size", f"{sft.batch_size} rows cannot be split over {world} ranks",
                              "make it a multiple of the trainer's d")
        tokenizer = AutoTokenizer.from_pretrained(engine.model_path)
        ds = cfg.train_dataset
        prompts = PromptEncoder(tokenizer, PromptFormat.from_dataset(ds))
        data = apply_adapter(load_dataset_rows(ds), ds.adapter, ds.prompt_key,
                             ds.answer_key, ds.messages_key)
        loader = PromptLoader(data, shuffle=ds.shuffle,
                              seed=cfg.seed, epochs=cfg.trainer.total_train_epochs)
        ckpt = Checkpointer(engine, keep_last=cfg.saver.keep_last)
        state: Dict[str, Any] = {} if cfg.recover.mode == "disabled" else (ckpt.load_latest(ctx.checkpoint_dir) or {})
        step = int(state.get("global_step", 0))
        loader.load_state_dict(state.get("loader"))
        metrics = MetricsWriter(ctx.run_dir, cfg.stats.tensorboard, cfg.stats.plot) if self.is_main else None
        if metrics:
            metrics.drop_after(step)
            self.publish_state(step=step, version=step, world_size=world, state="training")
        t_start = time.monotonic() - float(state.get("time_s", 0.0))
        settled_gc = dist.SettledGC()
        timer = PhaseTimer(sync=torch.cuda.synchronize if engine.device.type == "cuda" else None)
        timer.begin()
        try:
            while step < total and not dist.all_reduce_scalar(1.0 if self.stop else 0.0, "max"):
                rows = []
                with timer.phase("data"):
                    try:
                        for _ in range(sft.batch_size):
                            rows.append(next(loader))
                    except StopIteration:
                        log.info("dataset exhausted after %d epochs", loader.epoch)
                        break
                    batch = shard_batch(tokenize_rows(rows, tokenizer, ds.prompt_key, ds.answer_key,
                                                      ds.max_prompt_len, prompts=prompts),
                                        rank, world)
                with timer.phase("train", device=True):
                    stats = learner.train_step(batch)
                step += 1
                settled_gc.step()
                engine.set_version(step)
                split = timer.split()
                if metrics:
                    dt = split["step_time_s"]
                    tokens = float(batch["attention_mask"].sum()) * world
                    with timer.phase("metrics"):
                        metrics.write({"step": step, "version": step, "time_s": time.monotonic() - t_start, **stats,
                                       **split, "trained_tokens_per_s": tokens / dt, "lr": engine.current_lr()})
                        self.publish_state(step=step, version=step)
                if cfg.saver.freq_steps and step % cfg.saver.freq_steps == 0 and step < total:
                    with timer.phase("checkpoint"):
                        ckpt.save(ctx.checkpoint_dir, step, {"loader": loader.state_dict(),
                                                             "time_s": time.monotonic() - t_start})
            ckpt.save(ctx.checkpoint_dir, step, {"loader": loader.state_dict(), "time_s": time.monotonic() - t_start})
            from areal_hpc.train.publish import publish_weights

            publish_weights(engine, ctx.weights_dir, step, engine.model_path, ctx.registry if self.is_main else None)
        finally:
            if metrics:
                metrics.close()
                self.close_state()
        return 0
