"""Dataset row -> prompt token ids, through the tokenizer's chat template when it has one.

A row gives chat messages (``row[messages_key]``, ``[{role, content}]``) or a prompt string (``row[prompt_key]``, one
user message). With ``chat_template="auto"`` and a tokenizer that has a template, the messages (after the
``system_prompt``, unless the row has a system message) are rendered, with ``chat_template_kwargs`` as the template's
variables (Qwen3's ``enable_thinking``); otherwise the prompt string is raw text, and a
row with only messages is an error (roles cannot be flattened faithfully without a template)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from areal_hpc.config.validate import CHAT_TEMPLATES as CHAT_TEMPLATE_MODES, raw_text_refusal

# An assistant reply the template renders verbatim: what follows it is the end-of-turn text.
_PROBE = "areal-hpc-end-of-turn-probe"


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The special token that closes an assistant turn in the tokenizer's chat template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1="},
                                              {"role": "assistant", "content": _PROBE}], tokenize=False)
    except Exception:  # a template that refuses this conversation tells us nothing
        return None
    if not isinstance(text, str) or _PROBE not in text:
        return None
    tail = text.split(_PROBE, 1)[1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return int(ids[0]) if ids and ids[0] in special else None


def stop_token_ids(tokenizer, chat_template: str = "auto") -> List[int]:
    """Every token that ends a completion: the tokenizer's EOS, generation_config.json's ``eos_token_id`` (an int or a
    list) and, when the chat template is in use, its end-of-turn token."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer) if chat_template != "none" else None}
    model_dir = getattr(tokenizer, "name_or_path", None) or None  # ("": built in memory, not the working directory)
    with contextlib.suppress(TypeError, OSError, ValueError, KeyError):  # no directory, file or key, null: none
        eos = json.loads((Path(model_dir) / "generation_config.json").read_text())["eos_token_id"]
        ids.update(int(e) for e in ([eos] if isinstance(eos, int) else eos))
    return sorted(int(i) for i in ids - {None})


@dataclass
class PromptFormat:
    """How rows become prompts (module docstring)."""

    prompt_key: str = "prompt"
    messages_key: str = "messages"
    chat_template: str = "auto"  # auto | none
    system_prompt: str = ""
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)  # the template's variables: enable_thinking

    @classmethod
    def from_dataset(cls, ds) -> "PromptFormat":  # a DatasetConfig
        return cls(ds.prompt_key, ds.messages_key, ds.chat_template, ds.system_prompt, ds.chat_template_kwargs)


class PromptEncoder:
    def __init__(self, tokenizer, fmt: Optional[PromptFormat] = None):
        self.tokenizer, self.fmt = tokenizer, fmt or PromptFormat()
        if self.fmt.chat_template not in CHAT_TEMPLATE_MODES:
            raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, "
                             f"got {self.fmt.chat_template!r}")
        self.uses_template = self.fmt.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        why = "chat_template=none" if self.fmt.chat_template == "none" else "the tokenizer has no chat template"
        self.raw = None if self.uses_template else why  # why prompts are raw text
        for name, drop in (("system_prompt", "drop it, put the instruction in the prompts,"),
                           ("chat_template_kwargs", "drop them,")):
            if self.raw and getattr(self.fmt, name):  # raw text has no place for it: it was dropped, silently
                raise ValueError(f"{name} {raw_text_refusal(name, self.raw)} "
                                 f"({drop} or use a model with a chat template)")

    def prompt(self, row: Dict[str, Any]) -> Optional[str]:
        """The row's prompt string, or None (a list is messages: TRL's conversational `prompt` column)."""
        p = row.get(self.fmt.prompt_key)
        return None if p is None or isinstance(p, list) else str(p)

    def messages(self, row: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The row's messages, or its prompt as one user message; the system prompt first unless it has one."""
        f = self.fmt
        msgs = row.get(f.messages_key)
        if msgs is not None and not (isinstance(msgs, list) and all(isinstance(m, Mapping) and "role" in m
                                                                    and "content" in m for m in msgs)):
            raise ValueError(f"row[{f.messages_key!r}] must be a list of {{role, content}} dicts, got {msgs!r:.200}")
        if msgs and msgs[-1]["role"] == "assistant":  # a finished conversation (a solution), not a prompt
            if self.prompt(row) is None:
                raise ValueError(f"row[{f.messages_key!r}] ends with the assistant's reply: a prompt ends where the "
                                 f"reply begins (drop the reply, or give the prompt as {f.prompt_key!r})")
            msgs = None
        if msgs is None:
            if self.prompt(row) is None:
                raise ValueError(f"row has neither {f.prompt_key!r} nor {f.messages_key!r}: keys {sorted(row)}")
            msgs = [{"role": "user", "content": self.prompt(row)}]
        else:
            msgs = [dict(m) for m in msgs]
        if f.system_prompt and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": f.system_prompt}] + msgs
        return msgs

    def prompt_text(self, row: Dict[str, Any]) -> str:
        """A reward's ``prompt``: the prompt string, or the last user message's content."""
        if self.prompt(row) is not None:
            return self.prompt(row)
        users = [m for m in self.messages(row) if m["role"] == "user"]
        return str(users[-1]["content"]) if users else ""

    def encode(self, row: Dict[str, Any]) -> List[int]:
        """Prompt token ids, ending where the model's reply begins."""
        f = self.fmt
        if self.uses_template:  # rendered, then tokenized: tokenize=True's return type differs by version
            msgs = self.messages(row)
            try:
                text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                                          **f.chat_template_kwargs)
            except Exception as e:  # jinja2's TemplateError (e.g. "System role not supported"), and the like
                raise ValueError(f"the tokenizer's chat template rejected {[m['role'] for m in msgs]}: {e} "
                                 f"(chat_template=none sends raw text)") from e
        elif self.prompt(row) is None:
            raise ValueError(f"row has {f.messages_key!r} but no {f.prompt_key!r}: {self.raw}, so the prompt must be a "
                             f"raw-text {f.prompt_key!r} string (or use a model whose tokenizer has a chat template)")
        else:
            text = self.prompt(row)
        # raw text gets the tokenizer's BOS (as SGLang's text path does); a rendered template holds its own
        return self.tokenizer(text, add_special_tokens=not self.uses_template)["input_ids"]

    def end_of_turn_ids(self) -> List[int]:
        """What closes a trained reply (SFT): the template's end-of-turn token, else the EOS, else nothing."""
        eot = end_of_turn_id(self.tokenizer) if self.uses_template else None
        last = self.tokenizer.eos_token_id if eot is None else eot
        return [] if last is None else [last]
