"""What the `hf` server accepts from a client, checked before anything reaches the engine.

A field SGLang accepts that this engine does not implement is refused with a 400 naming it (`FIELD_POLICIES`), never
silently ignored; ``tests/test_inference_sglang_contract.py`` checks this against SGLang's own request structs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Awaitable, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

from aiohttp import web

from areal_hpc.inference.hf_engine.sequence import SamplingParams


class RequestError(Exception):
    """A client mistake: becomes a 4xx response with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class FieldPolicy:
    """What the hf engine does with the JSON fields SGLang accepts on one route.

    ``honoured``: implemented. ``noop``: accepted because they cannot change what this server returns (metadata,
    CUDA-cache hints). Any other field with a value other than a neutral one (None, false, "", [], {} or a value listed
    in ``neutral``) is refused with a 400 naming it: a 200 without what was asked for is worse than a clear refusal."""

    honoured: FrozenSet[str]
    noop: FrozenSet[str] = frozenset()
    neutral: Mapping[str, Tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    def refused(self, body: Mapping[str, Any]) -> Optional[str]:
        for key, value in body.items():
            if key in self.honoured or key in self.noop:
                continue
            if value is None or value is False or value in ("", [], {}) or value in self.neutral.get(key, ()):
                continue
            return key
        return None


_BASE = frozenset({"rid", "http_worker_ipc"})  # SGLang's BaseReq fields: routing metadata
FIELD_POLICIES: Dict[str, FieldPolicy] = {
    "/generate": FieldPolicy(
        honoured=frozenset({"rid", "text", "input_ids", "sampling_params", "return_logprob", "stream",
                            "return_text_in_logprobs", "return_prompt_token_ids"}),
        noop=frozenset({"log_metrics", "no_logs", "custom_labels", "conversation_id", "routing_key", "session_id",
                        "priority", "extra_key", "cache_salt", "http_worker_ipc", "received_time",
                        "external_trace_header"}),
        neutral={"logprob_start_len": (-1,), "top_logprobs_num": (0,), "routed_experts_start_len": (0,)}),
    "/pause_generation": FieldPolicy(honoured=frozenset({"mode"}), noop=_BASE),
    "/continue_generation": FieldPolicy(honoured=frozenset(), noop=_BASE | {"torch_empty_cache"}),
    "/abort_request": FieldPolicy(honoured=frozenset({"rid", "abort_all"}), noop=frozenset({"http_worker_ipc"})),
    "/update_weights_from_disk": FieldPolicy(
        honoured=frozenset({"model_path", "weight_version", "abort_all_requests"}),
        noop=_BASE | {"torch_empty_cache", "flush_cache", "token_step"}, neutral={"load_format": ("auto",)}),
    "/init_weights_update_group": FieldPolicy(
        honoured=frozenset({"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend",
                            "timeout"}), noop=_BASE),
    "/destroy_weights_update_group": FieldPolicy(honoured=frozenset({"group_name"}), noop=_BASE),
    "/update_weights_from_distributed": FieldPolicy(
        honoured=frozenset({"names", "dtypes", "shapes", "group_name", "weight_version", "abort_all_requests"}),
        noop=_BASE | {"torch_empty_cache", "flush_cache"}, neutral={"selector": ("all", "target"),
                                                                    "load_format": ("auto",)}),
    "/update_weight_version": FieldPolicy(honoured=frozenset({"new_version", "abort_all_requests"}), noop=_BASE),
}
# sampling_params keys the hf engine implements (everything else is refused unless neutral)
SUPPORTED_SAMPLING_KEYS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids",
                                     "ignore_eos", "n", "stream_interval", "skip_special_tokens",
                                     "spaces_between_special_tokens", "no_stop_trim"})


def check_fields(path: str, body: Mapping[str, Any]) -> None:
    """400 for a field of ``body`` that this server would otherwise ignore (see `FieldPolicy`)."""
    policy = FIELD_POLICIES.get(path)
    key = policy.refused(body) if policy is not None else None
    if key is not None:
        raise RequestError(f"{path}: field {key!r} (= {json.dumps(body[key], default=str)[:80]}) is not supported "
                           f"by the hf engine; leave it out or use an SGLang server")


async def read_json(request: web.Request) -> Dict[str, Any]:
    """The request's JSON object (``{}`` for an empty body), its fields checked."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    check_fields(request.path, body)
    return body


async def read_prompts(body: Mapping[str, Any], tokenizer: Callable[[str], Awaitable[Any]]
                       ) -> Tuple[List[List[int]], bool, Any]:
    """(prompts, batch?, tokenizer or None) from ``input_ids`` or ``text``; ``await tokenizer(why)``
    gives the model's tokenizer for text, or raises a `RequestError` saying why it is needed."""
    has_ids, has_text = body.get("input_ids") is not None, body.get("text") is not None
    if has_ids and has_text:
        raise RequestError("give either text or input_ids, not both")
    if not has_ids and not has_text:
        raise RequestError("missing field: input_ids (or text)")
    if has_ids:
        ids = body["input_ids"]
        batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        return (ids if batch else [ids]), batch, None
    tok = await tokenizer("this server's model has no tokenizer: send input_ids")
    text = body["text"]
    texts = text if isinstance(text, list) else [text]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError("text must be a string or a non-empty list of strings")
    return [tok.encode(t) for t in texts], isinstance(text, list), tok


def check_prompt(ids: Any, vocab: int, context_length: int) -> List[int]:
    if not isinstance(ids, list) or not ids:
        raise RequestError("input_ids must be a non-empty list of token ids")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise RequestError(f"input_ids must be integers, got {t!r}")
        if not 0 <= t < vocab:
            raise RequestError(f"token id {t} is outside the vocabulary [0, {vocab})")
    if len(ids) >= context_length:
        raise RequestError(f"the input ({len(ids)} tokens) is longer than the model's context length "
                           f"({context_length} tokens)")
    return ids


def per_prompt(body: Mapping[str, Any], n_prompts: int, batch: bool) -> Tuple[List[Any], List[Optional[str]]]:
    """``sampling_params`` and ``rid`` of each prompt (one for all, or one list entry each)."""
    sps, rids = body.get("sampling_params"), body.get("rid")
    if batch:
        sps = sps if isinstance(sps, list) else [sps] * n_prompts
        rids = rids if isinstance(rids, list) else [None] * n_prompts
        if len(sps) != n_prompts or len(rids) != n_prompts:
            raise RequestError("sampling_params and rid lists must match the inputs in length")
    elif isinstance(sps, list):
        raise RequestError("sampling_params must be an object for a single prompt")
    else:
        sps, rids = [sps], [rids]
    if any(rid is not None and not isinstance(rid, str) for rid in rids):
        raise RequestError("rid must be a string")
    return sps, rids


@dataclasses.dataclass
class Sampling:
    """The sampling requested for a batch: engine params per prompt, plus what the HTTP layer does
    itself (``n`` samples of each prompt, ``stream_interval``, ``skip_special_tokens``)."""

    params: List[SamplingParams]
    n: int = 1
    interval: int = 1
    skip_special: bool = True


def parse_sampling(sps: List[Any]) -> Sampling:
    out = Sampling([])
    n = None
    for sp in sps:
        if isinstance(sp, dict):
            sp = dict(sp)
            k = _positive_int(sp.pop("n", None), "n")
            if n is not None and k != n:
                raise RequestError("sampling_params.n must be the same for every prompt")
            n = k
            out.interval = _positive_int(sp.pop("stream_interval", None), "stream_interval")
            out.skip_special = sp.get("skip_special_tokens", True) is not False
        try:
            out.params.append(SamplingParams.from_request(sp))
        except ValueError as e:
            raise RequestError(str(e)) from None
    out.n = n or 1
    return out


def torch_dtype(name: str):
    import torch

    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise RequestError(f"unknown dtype {name!r}")
    return dt


def _positive_int(v: Any, key: str) -> int:
    if v is None:
        return 1
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RequestError(f"sampling_params.{key} must be an integer >= 1, got {v!r}")
    return v
