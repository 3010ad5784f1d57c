"""`trainer.type=sft`: supervised fine-tuning on prompt/answer rows (loss on the answer only); no servers.

Every rank reads the same rows in the same order and trains on its shard of each batch. The final weights are published
to ``weights/v{step}``."""

from __future__ import annotations

from typing import Any, Dict

from areal_hpc.config import ConfigError
from areal_hpc.rollout.data import DatasetError
from areal_hpc.rollout.prompts import PromptEncoder, PromptFormat
from areal_hpc.train import dist
from areal_hpc.train.batching import shard_batch
from areal_hpc.train.publish import publish_weights
from areal_hpc.train.sft_loss import SFTLearner, answer_text, tokenize_rows
from areal_hpc.trainers.base import Trainer
from areal_hpc.trainers.factory import register_trainer
from areal_hpc.trainers.rollout_side import load_prompts, load_tokenizer


@register_trainer("sft")
class SFTTrainer(Trainer):
    def setup(self):
        cfg, sft, epochs = self.cfg, self.cfg.trainer.sft, self.cfg.trainer.total_train_epochs
        self.tokenizer = load_tokenizer(sft.model.path)
        self.prompts = PromptEncoder(self.tokenizer, PromptFormat.from_dataset(cfg.train_dataset))
        # rows without an answer or over max_prompt_len are left out with a warning
        self.loader = load_prompts(self.ctx, "train", epochs=epochs, tokenizer=self.tokenizer, answers=True)
        try:  # now, not at the step that draws a bad one
            for row in self.loader.rows:
                answer_text(row[cfg.train_dataset.answer_key])
        except ValueError as e:
            raise DatasetError("train_dataset.answer_key", str(e)) from None
        # the LR schedule ends where training does: the last full batch of the epochs, if that comes first
        steps, n = cfg.trainer.total_train_steps, len(self.loader.rows)
        if epochs and epochs * n < sft.batch_size:  # else step 1 found no batch: exit 0, the untrained model published
            raise ConfigError("trainer.sft.batch_size", f"{n} row(s) x {epochs} epoch(s) fill no batch of "
                              f"{sft.batch_size}", "lower it, or raise trainer.total_train_epochs")
        if epochs:
            steps = min(steps, epochs * n // sft.batch_size)
        self.learner = SFTLearner(sft, steps)
        return self.learner.engine

    def start(self, state: Dict[str, Any]) -> bool:
        self.loader.load_state_dict(state.get("loader"))
        return True

    def train_step(self, step: int):
        ds = self.cfg.train_dataset
        with self.phases.phase("data"):
            try:
                rows = [next(self.loader) for _ in range(self.cfg.trainer.sft.batch_size)]
            except StopIteration:
                return None
            batch = tokenize_rows(rows, self.tokenizer, ds.prompt_key, ds.answer_key,
                                  prompts=self.prompts)  # the same rows on every rank
            shard = shard_batch(batch, dist.rank(), dist.world_size())
        with self.phases.phase("train", device=True):
            stats = self.learner.train_step(shard)
        self.engine.set_version(step)
        return {**stats, "tokens": float(batch["attention_mask"].sum())}

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def finish(self, step: int) -> None:
        publish_weights(self.engine, self.ctx.weights_dir, step, self.engine.model_path, self.ctx.registry)
