"""What the `hf` server accepts from a client, checked before anything reaches the engine.

A field SGLang accepts that this engine does not implement is refused with a 400 naming it (`FIELD_POLICIES`, and
`SUPPORTED_SAMPLING_KEYS` inside ``sampling_params``), never silently ignored;
``tests/test_inference_sglang_contract.py`` checks this against SGLang's own request structs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Awaitable, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

from aiohttp import web

from areal_hpc.config.schema import SGLANG_INPUT_MARGIN
from areal_hpc.inference.hf_engine.sequence import SamplingParams

DEFAULT_GROUP = "weight_update_group"  # SGLang's name for a weight update group given none


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
            neutral = value is None or value is False or value in ("", [], {}) or value in self.neutral.get(key, ())
            if not neutral and key not in self.honoured and key not in self.noop:
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
# sampling_params keys the hf engine implements: the engine's own, and those the HTTP layer applies itself (n samples of
# a prompt, streaming, detokenizing). Keys of _NEUTRAL_SAMPLING are accepted with that value (or None) only; "stop"
# only when empty; anything else is refused.
SUPPORTED_SAMPLING_KEYS = frozenset({f.name for f in dataclasses.fields(SamplingParams)} | {
    "n", "stream_interval", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"})
_NEUTRAL_SAMPLING = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0,
                     "min_new_tokens": 0, "logit_bias": {}, "sampling_seed": None, "custom_params": None,
                     "stop_regex": [], "regex": None, "json_schema": None, "ebnf": None, "structural_tag": None,
                     "beam_width": None}  # SGLang's frontend sends the first three empty on every request
_SP = "sampling_params."  # where a sampling key is named in a refusal
MAX_SEQUENCES = 1 << 16  # prompts times n in one /generate
_RANGES = {"max_new_tokens": (lambda v: v >= 0, ">= 0"),
           "temperature": (lambda v: 0 <= v < float("inf"), "finite and >= 0"),
           "top_p": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"), "top_k": (lambda v: v == -1 or v >= 1, "-1 or >= 1")}


async def read_json(request: web.Request) -> Dict[str, Any]:
    """The request's JSON object (``{}`` for an empty body); 400 for a field this server would otherwise ignore (see
    `FieldPolicy`)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    key = FIELD_POLICIES[request.path].refused(body) if request.path in FIELD_POLICIES else None
    if key is not None:
        raise RequestError(f"{request.path}: field {key!r} (= {json.dumps(body[key], default=str)[:80]}) is not "
                           f"supported by the hf engine; leave it out or use an SGLang server")
    return body


@dataclasses.dataclass
class GenerateRequest:
    """A checked ``/generate``: one engine sequence each (the ``n`` samples of a prompt adjacent), and how the answers
    look: a list (``many``) or one object, ``text`` for text requests, logprobs, prompt ids, ``stream_interval``."""

    prompts: List[List[int]]
    params: List[SamplingParams]
    rids: List[Optional[str]]
    many: bool
    tokenizer: Any
    logprob_tokenizer: Any
    return_logprob: bool
    prompt_ids: bool
    interval: int = 1
    skip_special: bool = True
    keep_stop: bool = False  # no_stop_trim: the text keeps the stop token that ended the generation


async def read_generate(body: Mapping[str, Any], tokenizer: Callable[[str], Awaitable[Any]], vocab: int,
                        context_length: int) -> GenerateRequest:
    """``input_ids`` or ``text`` (one prompt or a batch), ``sampling_params`` and ``rid`` (one for all, or one per
    prompt), ``n`` samples of each. ``await tokenizer(why)`` gives the model's tokenizer for text, or raises a
    `RequestError` saying why it is needed."""
    has_ids, has_text = body.get("input_ids") is not None, body.get("text") is not None
    if has_ids == has_text:
        raise RequestError("give either text or input_ids, not both" if has_ids
                           else "missing field: input_ids (or text)")
    tok = None
    if has_ids:
        prompts = body["input_ids"]
        batch = isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], list)
        prompts = prompts if batch else [prompts]
    else:
        tok = await tokenizer("this server's model has no tokenizer: send input_ids")
        text = body["text"]
        texts = text if isinstance(text, list) else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError("text must be a string or a non-empty list of strings")
        prompts, batch = [tok.encode(t) for t in texts], isinstance(text, list)
    sps, rids = body.get("sampling_params"), body.get("rid")
    if batch:
        sps = sps if isinstance(sps, list) else [sps] * len(prompts)
        if not isinstance(rids, list):  # one rid for the batch: "<rid>_<i>" each, as SGLang names them
            rids = [f"{rids}_{i}" if isinstance(rids, str) else rids for i in range(len(prompts))]
        if len(sps) != len(prompts) or len(rids) != len(prompts):
            raise RequestError("sampling_params and rid lists must match the inputs in length")
    elif isinstance(sps, list):
        raise RequestError("sampling_params must be an object for a single prompt")
    else:
        sps, rids = [sps], [rids]
    if any(rid is not None and not isinstance(rid, str) for rid in rids):
        raise RequestError("rid must be a string")
    named = [rid for rid in rids if rid is not None]
    if len(set(named)) < len(named):
        raise RequestError(f"Duplicate request IDs detected within the request: {named}"[:300])
    params = [engine_sampling_params(sp) for sp in sps]  # refuses what is neither an object nor null

    def shared(key: str, read: Callable[[Mapping[str, Any]], Any]) -> Any:
        """A key that applies to the whole request: one value for all its prompts (null: every default)."""
        values = {read(sp or {}) for sp in sps}
        if len(values) > 1:
            raise RequestError(f"sampling_params.{key} must be the same for every prompt of a batch request")
        return values.pop()

    n = shared("n", lambda sp: _positive_int(sp, "n"))
    interval = shared("stream_interval", lambda sp: _positive_int(sp, "stream_interval"))
    skip_special = shared("skip_special_tokens", lambda sp: json_bool(sp, "skip_special_tokens", _SP, default=True))
    keep_stop = shared("no_stop_trim", lambda sp: json_bool(sp, "no_stop_trim", _SP))
    logprob_tok = None
    if json_bool(body, "return_text_in_logprobs"):
        logprob_tok = tok or await tokenizer("return_text_in_logprobs needs a tokenizer; this server's model has none")
    prompts = [_check_prompt(p, vocab, context_length) for p in prompts]
    if n * len(prompts) > MAX_SEQUENCES:  # each is a Sequence built on the server's event loop
        raise RequestError(f"sampling_params.n={n} makes {n * len(prompts)} sequences, over the {MAX_SEQUENCES} one "
                           "request may ask for: lower n or split the request")
    return_logprob = body.get("return_logprob")  # one for all prompts, or one each (any of them: all)
    flags = return_logprob if isinstance(return_logprob, list) else [return_logprob]
    return_logprob = any([json_bool({"return_logprob": f}, "return_logprob") for f in flags])
    params = [_fit_context(p, sp, context_length, "max_new_tokens" in (d or {}) and d["max_new_tokens"] is None)
              for p, sp, d in zip(prompts, params, sps)]
    if n > 1:  # parallel samples: fresh request ids, as SGLang regenerates them
        prompts = [p for p in prompts for _ in range(n)]
        params = [sp for sp in params for _ in range(n)]
        rids, batch = [None] * len(prompts), True
    return GenerateRequest(prompts, params, rids, batch, tok, logprob_tok, return_logprob,
                           json_bool(body, "return_prompt_token_ids"), interval, skip_special, keep_stop)


def engine_sampling_params(d: Any) -> SamplingParams:
    """The engine's `SamplingParams` from a request's ``sampling_params`` (``n`` and ``stream_interval`` aside).
    Every field of `SamplingParams` must be read here (a test checks it): a supported key is never ignored."""
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise RequestError("sampling_params must be an object")
    for k, v in d.items():
        if k in SUPPORTED_SAMPLING_KEYS or k == "stop":
            continue
        if k not in _NEUTRAL_SAMPLING:
            raise RequestError(f"unknown sampling_params key {k!r}; supported: {sorted(SUPPORTED_SAMPLING_KEYS)}")
        if v is not None and v != _NEUTRAL_SAMPLING[k]:
            raise RequestError(f"sampling_params.{k}={v!r} is not supported by the hf engine "
                               f"(only {_NEUTRAL_SAMPLING[k]!r})")
    if d.get("stop"):
        raise RequestError("sampling_params.stop (stop strings) is not supported by the hf engine; use stop_token_ids")
    numbers = {}
    for key, (valid, what) in _RANGES.items():
        numbers[key] = v = json_number(d, key, getattr(SamplingParams, key))
        if not valid(v):
            raise RequestError(f"sampling_params.{key} must be {what}, got {v}")
    stop = d.get("stop_token_ids")
    ids = stop if isinstance(stop, list) else [] if stop is None else [stop]  # a list of token ids, or one
    return SamplingParams(stop_token_ids=tuple(json_int(t, _SP + "stop_token_ids") for t in ids),
                          ignore_eos=json_bool(d, "ignore_eos", _SP), **numbers)


def version_of(body: Dict[str, Any], key: str) -> Optional[str]:
    """``body[key]``, a weight version: a string (SGLang's type) or an integer; None when absent or null. Anything else
    would become every token's version (``"None"``), which no trainer can compare."""
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))):
        raise RequestError(f"{key} must be a string, got {json.dumps(v)[:80]}")
    return None if v is None else str(v)


def group_name_of(body: Dict[str, Any]) -> str:
    """``body["group_name"]``, a weight update group's name: a string; absent or empty is SGLang's default."""
    name = body.get("group_name") or DEFAULT_GROUP
    if not isinstance(name, str):
        raise RequestError(f"group_name must be a string, got {json.dumps(name)[:80]}")
    return name


def json_bool(body: Mapping[str, Any], key: str, where: str = "", default: bool = False) -> bool:
    """``body[key]``, a JSON boolean (``default`` when absent or null): a string such as "false" is refused."""
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise RequestError(f"{where}{key} must be true or false, got {json.dumps(v)[:80]}")
    return default if v is None else v


def json_int(v: Any, what: str, low: int = 0, high: float = float("inf")) -> int:
    """``v``, a JSON integer (a whole float too) in [low, high]: int() took "29500", true or 29500.7 for a port."""
    whole = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
    if not whole or not low <= v <= high:
        raise RequestError(f"{what} must be an integer in [{low}, {high}], got {json.dumps(v)[:80]}")
    return int(v)


def _check_prompt(ids: Any, vocab: int, context_length: int) -> List[int]:
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
    longest = context_length - SGLANG_INPUT_MARGIN
    if len(ids) >= longest:
        raise RequestError(f"Input length ({len(ids)} tokens) exceeds the maximum allowed length ({longest} tokens). "
                           "Use a shorter input.")
    return ids


def _fit_context(prompt: List[int], sp: SamplingParams, context_length: int, unlimited: bool) -> SamplingParams:
    """SGLang's budget: a prompt plus max_new_tokens over the context length is refused (without
    --allow-auto-truncate); max_new_tokens (null: no limit) is capped at the context length minus the prompt minus 2."""
    if not unlimited and len(prompt) + sp.max_new_tokens > context_length:
        raise RequestError(f"Requested token count exceeds the model's maximum context length of {context_length} "
                           f"tokens: {len(prompt)} input tokens + max_new_tokens {sp.max_new_tokens}")
    cap = max(0, context_length - len(prompt) - 2)
    return dataclasses.replace(sp, max_new_tokens=cap if unlimited else min(sp.max_new_tokens, cap))


def json_number(d: Mapping[str, Any], key: str, default: Any, where: str = _SP) -> Any:
    """``d[key]`` as the type of ``default`` (int: whole floats too)."""
    v = d.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok and isinstance(default, int) and isinstance(v, float):
        ok = v.is_integer()
    elif ok and isinstance(default, float) and isinstance(v, int):
        ok = abs(v) < 2 ** 1023  # float() of a bigger int overflows: a 500, not this 400
    if not ok:
        raise RequestError(f"{where}{key} must be {'an integer' if isinstance(default, int) else 'a number'}, "
                           f"got {v!r}")
    return type(default)(v)


def _positive_int(d: Mapping[str, Any], key: str) -> int:
    return json_int(1 if d.get(key) is None else d[key], _SP + key, 1)
