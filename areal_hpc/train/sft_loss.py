"""Supervised fine-tuning: next-token NLL on response tokens (``loss_mask``), same engine and packing."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch

from areal_hpc.config.schema import SFTConfig
from areal_hpc.train.batching import Batch, collate
from areal_hpc.train.engine import FSDPEngine, loss_token_count, masked_mean


def sft_loss(out: Dict[str, torch.Tensor], mb: Dict[str, torch.Tensor]):
    """Mean negative logprob of the ``loss_mask`` tokens (0 for an empty mask)."""
    mask = mb["loss_mask"].float()
    return -masked_mean(out["logprobs"], mask), {"entropy": masked_mean(out["entropy"], mask).detach()}


def answer_text(answer: Any) -> str:
    """A row's answer as text: a string (or number), or TRL's conversational completion, one assistant message."""
    if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], Mapping) \
            and answer[0].get("role") == "assistant":
        return str(answer[0].get("content") or "")
    if isinstance(answer, (list, Mapping)):
        raise ValueError(f"an SFT answer is a string or one assistant message ([{{role, content}}]), "
                         f"got {answer!r:.200}")
    return str(answer)


def tokenize_rows(rows: Sequence[Dict[str, Any]], tokenizer, prompt_key: str = "prompt", answer_key: str = "answer",
                  prompts: Any = None) -> Batch:
    """Prompt + answer ids, right-padded, ``loss_mask`` on the answer and its end (tokenised apart: the boundary is
    exact). ``prompts`` (a rollout `PromptEncoder`) encodes the prompt as the rollout does and ends the answer with the
    end-of-turn token; without it the prompt is raw text and the answer ends with EOS."""
    samples: List[Dict[str, torch.Tensor]] = []
    if prompts is not None:
        encode, end = prompts.encode, prompts.end_of_turn_ids()
    else:
        def encode(row):
            return tokenizer(str(row[prompt_key]), add_special_tokens=False)["input_ids"]
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        p = encode(row)
        a = tokenizer(answer_text(row[answer_key]), add_special_tokens=False)["input_ids"] + end
        samples.append({"input_ids": torch.tensor(p + a, dtype=torch.long),
                        "loss_mask": torch.tensor([0] * len(p) + [1] * len(a), dtype=torch.long)})
    return collate(samples, pad_values={"input_ids": tokenizer.pad_token_id or 0})


class SFTLearner:
    """One `FSDPEngine` trained on NLL. ``train_step`` = one optimizer step + one LR step."""

    def __init__(self, config: SFTConfig, total_steps: int):
        self.config = config
        self.engine = FSDPEngine(config.model, config.mb_spec, total_steps)

    def train_step(self, batch: Batch) -> Dict[str, float]:
        stats = self.engine.train_batch(batch, sft_loss, loss_token_count)
        self.engine.step_lr_scheduler()
        return stats

    def evaluate(self, batch: Batch) -> Dict[str, float]:
        return self.engine.eval_batch(batch, sft_loss, loss_token_count)
