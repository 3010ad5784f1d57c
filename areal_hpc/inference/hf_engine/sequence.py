"""A request's state: its prompt, what it has generated, how to sample, and why it ended."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from areal_hpc.inference.sglang_api import new_rid


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


def _number(d: Dict[str, Any], key: str, default: Any) -> Any:
    """``d[key]`` as the type of ``default`` (int: whole floats too); ValueError otherwise."""
    v = d.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok and isinstance(default, int) and isinstance(v, float):
        ok = v.is_integer()  # (float(v) of a huge int would overflow: a 500, not this 400)
    if not ok:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"sampling_params.{key} must be {kind}, got {v!r}")
    return type(default)(v)


# Accepted for compatibility with SGLang clients as long as they ask for the neutral value
# (None always counts as neutral).
_NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
            "min_p": 0.0, "n": 1, "min_new_tokens": 0, "logit_bias": {}, "sampling_seed": None,
            "custom_params": None}
# Keys that only shape the text of a response (the HTTP server applies them when it detokenizes).
_IGNORED = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stop"}


@dataclass(frozen=True)
class SamplingParams:
    """SGLang's sampling parameters (the subset the embedded engine implements)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @classmethod
    def from_request(cls, d: Optional[Dict[str, Any]]) -> "SamplingParams":
        """Validate a request's ``sampling_params``; ValueError says what is wrong."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError("sampling_params must be an object")
        known = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos"}
        for k, v in d.items():
            if k in known or k in _IGNORED:
                continue
            if k in _NEUTRAL:
                if v is not None and v != _NEUTRAL[k]:
                    raise ValueError(f"sampling_params.{k}={v!r} is not supported by the hf engine "
                                     f"(only {_NEUTRAL[k]!r})")
                continue
            raise ValueError(f"unknown sampling_params key {k!r}; supported: {sorted(known)}")
        if d.get("stop"):
            raise ValueError("sampling_params.stop (strings) needs a tokenizer; use stop_token_ids")
        max_new = _number(d, "max_new_tokens", 128)
        if max_new < 0:
            raise ValueError(f"sampling_params.max_new_tokens must be >= 0, got {max_new}")
        temp = _number(d, "temperature", 1.0)
        if temp < 0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {temp}")
        top_p = _number(d, "top_p", 1.0)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {top_p}")
        top_k = _number(d, "top_k", -1)
        if top_k == 0 or top_k < -1:
            raise ValueError(f"sampling_params.top_k must be -1 or >= 1, got {top_k}")
        stop = d.get("stop_token_ids") or []
        if isinstance(stop, int) and not isinstance(stop, bool):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop):
            raise ValueError("sampling_params.stop_token_ids must be a list of integers")
        ignore_eos = d.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ValueError("sampling_params.ignore_eos must be true or false")
        return cls(max_new, temp, top_p, top_k, tuple(stop), ignore_eos)


class Sequence:
    """One request inside the engine. ``slot`` is its row in the KV cache while it runs."""

    def __init__(self, prompt_ids: List[int], params: SamplingParams, rid: Optional[str] = None,
                 on_finish: Optional[Callable[["Sequence"], None]] = None):
        self.rid = rid if rid else new_rid()
        self.prompt_ids = list(prompt_ids)
        self.output_ids: List[int] = []
        self.logprobs: List[float] = []
        self.version_spans: List[list] = []  # [[version, start, end], ...] over output_ids
        self.params, self.status = params, SequenceStatus.WAITING
        self.finish_reason: Optional[Dict[str, Any]] = None
        self.slot, self.on_finish = -1, on_finish
        self.on_append: Optional[Callable[["Sequence", int], None]] = None  # (seq, tokens so far), loop thread
        self.arrival = time.monotonic()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token: int, logprob: float, version: str) -> None:
        n = len(self.output_ids)
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        spans = self.version_spans
        if spans and spans[-1][0] == version:
            spans[-1][2] = n + 1
        else:
            spans.append([version, n, n + 1])
        if self.on_append is not None:
            self.on_append(self, n + 1)

    def finish(self, reason: Dict[str, Any]) -> None:
        if self.status is SequenceStatus.FINISHED:
            return
        self.status, self.finish_reason = SequenceStatus.FINISHED, reason
        if self.on_finish is not None:
            self.on_finish(self)

    def to_response(self, weight_version: str, return_logprob: bool = True, upto: Optional[int] = None
                    ) -> Dict[str, Any]:
        """The body SGLang's ``/generate`` returns for this request. ``upto``: only the first
        ``upto`` output tokens (a consistent prefix while the engine thread still appends)."""
        n = len(self.output_ids) if upto is None else upto
        ids = self.output_ids[:n]
        spans = [(v, s, min(e, n)) for v, s, e in list(self.version_spans) if s < n]
        meta: Dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason if upto is None else None,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": n,
            "cached_tokens": 0,
            "weight_version": spans[-1][0] if spans else weight_version,
            "weight_versions": [{"version": v, "start": s, "end": e} for v, s, e in spans],
            "e2e_latency": time.monotonic() - self.arrival,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(self.logprobs[:n], ids)]
        return {"output_ids": ids, "meta_info": meta}
