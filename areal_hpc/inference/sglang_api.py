"""Our side of SGLang's HTTP API: every route we call, every body we send, every response we read.

The client pool, the server lifecycle and the trainer talk to inference servers only through these routes, body builders
and parsers, so ``tools/sglang_contract.py`` can check all of it against SGLang's own source: routes and methods, body
fields and types against SGLang's request structs, and the keys read here against what SGLang puts in responses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import uuid
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import aiohttp


# request ids (``rid``): a random prefix per process, then a counter (a uuid4 each costs a getrandom call)
_RID_PREFIX = uuid.uuid4().hex[:16]
_RID_COUNTER = itertools.count()


def _new_rid_prefix() -> None:  # a forked child numbers its requests apart from its parent
    global _RID_PREFIX, _RID_COUNTER
    _RID_PREFIX, _RID_COUNTER = uuid.uuid4().hex[:16], itertools.count()


os.register_at_fork(after_in_child=_new_rid_prefix)


def new_rid() -> str:
    return f"{_RID_PREFIX}{next(_RID_COUNTER):016x}"


def base_url(address: str) -> str:
    """``host:port`` (or a URL already) -> the server's base URL."""
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


async def request_json(session: aiohttp.ClientSession, method: str, url: str, payload: Optional[dict] = None,
                       headers: Optional[dict] = None, timeout: Optional[aiohttp.ClientTimeout] = None
                       ) -> Tuple[int, Any]:
    """One round trip: (status, the JSON body, or its text when it is not JSON)."""
    async with session.request(method, url, json=payload, headers=headers, timeout=timeout) as resp:
        try:
            return resp.status, await resp.json(content_type=None)
        except ValueError:
            return resp.status, await resp.text()


def parse_version(v: Any) -> Any:
    """SGLang reports versions as strings; ours are ints where they look like ints."""
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            return int(v)
    return v


class Route(NamedTuple):
    """(method, path): unpacks into `ServerPool.call_all`."""

    method: str
    path: str


GENERATE = Route("POST", "/generate")
PAUSE_GENERATION = Route("POST", "/pause_generation")
CONTINUE_GENERATION = Route("POST", "/continue_generation")
ABORT_REQUEST = Route("POST", "/abort_request")
UPDATE_WEIGHTS_FROM_DISK = Route("POST", "/update_weights_from_disk")
INIT_WEIGHTS_UPDATE_GROUP = Route("POST", "/init_weights_update_group")
UPDATE_WEIGHTS_FROM_DISTRIBUTED = Route("POST", "/update_weights_from_distributed")
HEALTH = Route("GET", "/health")
MODEL_INFO = Route("GET", "/model_info")
SERVER_INFO = Route("GET", "/server_info")  # read when an external server is attached
# Their names in SGLang before the rename, the only ones an older server has (a newer one logs a deprecation warning
# for each call): asked only on a 404 from the new name.
OLD_NAMES = {MODEL_INFO: Route("GET", "/get_model_info"), SERVER_INFO: Route("GET", "/get_server_info")}

# Routes our code calls or (abort_request) our hf server serves; the contract test checks each is in SGLang ...
ROUTES: Tuple[Route, ...] = (GENERATE, PAUSE_GENERATION, CONTINUE_GENERATION, ABORT_REQUEST,
                             UPDATE_WEIGHTS_FROM_DISK, INIT_WEIGHTS_UPDATE_GROUP,
                             UPDATE_WEIGHTS_FROM_DISTRIBUTED, HEALTH, MODEL_INFO, SERVER_INFO)
# ... and routes our docs point users and third-party clients at, or we fall back to (checked the same way).
DOCUMENTED_ROUTES: Tuple[Route, ...] = (Route("GET", "/health_generate"), *OLD_NAMES.values(),
                                        Route("POST", "/flush_cache"), Route("GET", "/v1/models"))

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos")
FINISH_TYPES = ("stop", "length", "abort")


# ---------------------------------------------------------------------- request bodies
def sampling_params(params: Any = None, **overrides: Any) -> Dict[str, Any]:
    """SGLang ``sampling_params`` from a GenerationConfig-like object or dict, plus overrides."""
    if params is None or isinstance(params, dict):
        out = dict(params or {})
    else:
        out = {k: getattr(params, k) for k in SAMPLING_KEYS if hasattr(params, k)}
    out.update({k: v for k, v in overrides.items() if v is not None})
    if "stop_token_ids" in out:
        out["stop_token_ids"] = list(out["stop_token_ids"] or [])
    out.setdefault("max_new_tokens", 128)
    return out


def generate_body(input_ids: Sequence[int], sampling: Dict[str, Any], rid: Optional[str] = None) -> Dict[str, Any]:
    body = {"input_ids": list(input_ids), "sampling_params": sampling, "return_logprob": True}
    return body if rid is None else {**body, "rid": rid}


def pause_body(mode: str = "abort") -> Dict[str, Any]:
    return {"mode": mode}


def continue_body() -> Dict[str, Any]:
    return {}


def abort_body(rid: Optional[str] = None) -> Dict[str, Any]:
    """``rid`` None: abort every request."""
    return {"abort_all": True} if rid is None else {"rid": rid}


def update_from_disk_body(model_path: str, version: Any, abort_all_requests: bool = False) -> Dict[str, Any]:
    return {"model_path": str(model_path), "weight_version": str(version), "abort_all_requests": abort_all_requests}


def init_group_body(master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
                    backend: str = "nccl", timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """``timeout_s``: the group's, an extension of our hf servers (SGLang's group takes torch's default)."""
    body = {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "backend": backend, "group_name": group_name}
    return body if timeout_s is None else {**body, "timeout": float(timeout_s)}


def update_from_distributed_body(names: List[str], dtypes: List[str], shapes: List[List[int]], group_name: str,
                                 version: Any) -> Dict[str, Any]:
    return {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
            "group_name": group_name, "weight_version": str(version)}


# ---------------------------------------------------------------------- responses
@dataclasses.dataclass
class GenerateOutput:
    output_ids: List[int]
    logprobs: List[float]
    versions: List[Any]
    finish_reason: str
    version_reported: bool  # False: the server said nothing about weight versions (older SGLang)


def _token_version(v: Any) -> Any:
    """A token's weight version; SGLang launched without ``--weight-version`` calls the weights it started with
    "default": the run's version 0 (an external server attached before the first publish serves them)."""
    return 0 if v == "default" else parse_version(v)


def parse_generate(body: Dict[str, Any], fallback_version: Any) -> GenerateOutput:
    """One ``/generate`` response. Per-token versions come from ``meta_info.weight_versions`` spans (SGLang >= 0.5.2x
    and our engine), else ``meta_info.weight_version`` for every token, else ``fallback_version`` (a server that reports
    neither)."""
    meta = body.get("meta_info") or {}
    ids = list(body.get("output_ids") or [])
    got = meta.get("output_token_logprobs") or []
    lps = [float(x[0]) if x[0] is not None else float("nan") for x in got[:len(ids)]]
    lps += [float("nan")] * (len(ids) - len(lps))
    spans = meta.get("weight_versions") or []
    versions: List[Any] = []
    for sp in spans:
        versions += [_token_version(sp.get("version"))] * max(0, int(sp.get("end", 0)) - int(sp.get("start", 0)))
    reported = bool(spans)
    if len(versions) != len(ids):
        v = meta.get("weight_version")
        reported = v is not None
        versions = (versions + [_token_version(v) if v is not None else fallback_version] * len(ids))[:len(ids)]
    reason = (meta.get("finish_reason") or {}).get("type", "stop")
    return GenerateOutput(ids, lps, versions, reason, reported)


def call_outcome(status: int, body: Any) -> Tuple[bool, Optional[str]]:
    """(ok, error) of a control call: 2xx and not ``"success": false``."""
    if 200 <= status < 300 and not (isinstance(body, dict) and body.get("success") is False):
        return True, None
    return False, error_message(body) or f"HTTP {status}"


def error_message(body: Any, limit: int = 300) -> str:
    """The reason in an error body (SGLang: ``{"error"|"message": ...}``, an HTML page...): one line, <= ``limit``."""
    if isinstance(body, dict):
        msg = body.get("message") or body.get("error")
        msg = msg.get("message") if isinstance(msg, dict) else msg
        body = body if msg is None else msg
    text = " ".join(str(body).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def model_info_version(body: Any) -> Any:
    """The weight version in a ``/model_info`` response, or None when it has none."""
    if isinstance(body, dict) and body.get("weight_version") is not None:
        return parse_version(body["weight_version"])
    return None
