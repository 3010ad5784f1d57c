"""A request's state: its prompt, what it has generated, how to sample, and why it ended."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from areal_hpc.config.schema import GREEDY_BELOW
from areal_hpc.inference.sglang_api import new_rid


@dataclass(frozen=True)
class SamplingParams:
    """SGLang's sampling parameters (the subset the embedded engine implements; `http_validate` checks them)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # < GREEDY_BELOW: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


class Sequence:
    """One request inside the engine. ``slot`` is its row in the KV cache while it runs."""

    def __init__(self, prompt_ids: List[int], params: SamplingParams, rid: Optional[str] = None,
                 on_finish: Optional[Callable[["Sequence"], None]] = None):
        self.rid = rid or new_rid()
        self.prompt_ids = list(prompt_ids)
        self.output_ids: List[int] = []
        self.logprobs: List[float] = []
        self.version_spans: List[list] = []  # [[version, start, end], ...] over output_ids
        self.params, self.finished = params, False
        self.finish_reason: Optional[Dict[str, Any]] = None
        self.slot, self.on_finish = -1, on_finish  # on_finish: set by the HTTP layer or the caller, loop thread
        self.on_append: Optional[Callable[["Sequence", int], None]] = None  # (seq, tokens so far), loop thread
        self.arrival = time.monotonic()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

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
        if not self.finished:
            self.finished, self.finish_reason = True, reason
            if self.on_finish is not None:
                self.on_finish(self)

    def to_response(self, weight_version: str, return_logprob: bool = True, upto: Optional[int] = None
                    ) -> Dict[str, Any]:
        """The body SGLang's ``/generate`` returns for this request. ``upto``: only the first ``upto`` output tokens
        (a consistent prefix while the engine thread still appends)."""
        n = len(self.output_ids) if upto is None else upto
        ids = self.output_ids[:n]
        spans = [(v, s, min(e, n)) for v, s, e in list(self.version_spans) if s < n]
        meta: Dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason if upto is None else None,
            "prompt_tokens": len(self.prompt_ids), "completion_tokens": n, "cached_tokens": 0,
            "weight_version": spans[-1][0] if spans else weight_version,
            "weight_versions": [{"version": v, "start": s, "end": e} for v, s, e in spans],
            "e2e_latency": time.monotonic() - self.arrival,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(self.logprobs[:n], ids)]
        return {"output_ids": ids, "meta_info": meta}
