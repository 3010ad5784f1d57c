"""The SGLang HTTP contract, read from the pinned SGLang wheel (never imported), both directions.

* Ours -> SGLang: every route our client, pool, server lifecycle and trainer call exists with
  that method; every field we send is a field of the struct SGLang parses it into, with a
  compatible type; every response key we read is produced by SGLang or has a tested fallback
  (``tools/sglang_contract.py``'s `check_ours`). A mutated copy of our builders/routes fails.
* SGLang -> our `hf` server: every field SGLang accepts on those routes (and every sampling
  param) is honoured or refused with a 400 naming it.
* An older SGLang without ``weight_version`` in ``meta_info`` (a real aiohttp server standing in
  for it) does not break the pool: it falls back to the version it last pushed, and says so once.

The wheel is downloaded once into ``~/.cache/areal-hpc/wheels`` (``AREAL_HPC_CACHE``), as for
tests/test_inference_sglang_flags.py; no network afterwards. A few seconds on CPU.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from areal_hpc.inference import sglang_api as api
from areal_hpc.inference.client import ServerPool
from areal_hpc.inference.sglang import SGLANG_VERSION
from helpers import engine_app

ROOT = Path(__file__).resolve().parents[1]
# a developer tool, not part of the package: loaded by path
_spec = importlib.util.spec_from_file_location("sglang_contract", ROOT / "tools" / "sglang_contract.py")
sc = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(sc)


@pytest.fixture(scope="module")
def contract() -> sc.Contract:
    try:
        wheel = sc.download_wheel(SGLANG_VERSION)
    except Exception as e:  # no network and no cached wheel
        pytest.skip(str(e))
    c = sc.read_contract(wheel)
    assert len(c.routes) > 40 and "input_ids" in c.structs["GenerateReqInput"], "route/struct extraction failed"
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "output_token_logprobs"} <= c.meta_keys
    assert c.finish_types >= {"stop", "length", "abort"} and "max_new_tokens" in c.sampling
    return c


# ============================================================================ ours -> SGLang
def test_what_we_send_and_read_fits_pinned_sglang(contract):
    assert sc.check_ours(contract, api) == []
    # the routes our code calls are the ones SGLang parses into the structs we think
    want = {"/generate": "GenerateReqInput", "/pause_generation": "PauseGenerationReqInput",
            "/continue_generation": "ContinueGenerationReqInput", "/abort_request": "AbortReq",
            "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
            "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
            "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput"}
    assert {p: contract.routes[p].request for p in want} == want


def _copy_of_api(**changes):
    """`sglang_api` with some names replaced; its route table follows replaced routes."""
    ns = types.SimpleNamespace(**{k: getattr(api, k) for k in dir(api) if not k.startswith("__")})
    for k, v in changes.items():
        setattr(ns, k, v)
    named = {getattr(api, k): k for k in dir(api) if isinstance(getattr(api, k), api.Route)}
    ns.ROUTES = tuple(getattr(ns, named[r]) for r in api.ROUTES)
    return ns


def test_a_mutated_builder_or_route_fails_the_check(contract):
    def renamed(*a, **k):
        body = api.update_from_disk_body(*a, **k)
        body["modelpath"] = body.pop("model_path")
        return body

    cases = {
        "renamed field": (dict(update_from_disk_body=renamed),
                          ["'modelpath' is not a field", "required field UpdateWeightFromDiskReqInput.model_path"]),
        "wrong route": (dict(PAUSE_GENERATION=api.Route("POST", "/pause_generations")),
                        ["/pause_generations: not served"]),
        "wrong method": (dict(GENERATE=api.Route("GET", "/generate")), ["/generate: sglang"]),
        "wrong type": (dict(init_group_body=lambda *a, **k: {**api.init_group_body(*a, **k), "master_port": "29500"}),
                       ["'master_port' = '29500' does not fit"]),
        "wrong sampling key": (dict(sampling_params=lambda *a, **k: {**api.sampling_params(*a, **k), "max_tokens": 3}),
                               ["sampling_params key 'max_tokens'"]),
        "misread logprobs": (dict(parse_generate=_misreading_parser), ["parse_generate: logprobs"]),
    }
    for name, (changes, expected) in cases.items():
        problems = sc.check_ours(contract, _copy_of_api(**changes))
        for e in expected:
            assert any(e in p for p in problems), (name, e, problems)


def _misreading_parser(body, fallback):
    meta = dict(body.get("meta_info") or {})
    meta["output_token_logprobs"] = meta.pop("output_token_logprob", None)  # the typo a refactor could make
    return api.parse_generate({**body, "meta_info": meta}, fallback)


def test_no_route_literal_bypasses_sglang_api(contract):
    """Every HTTP call to a server goes through `sglang_api` (so the checks above see it)."""
    files = [ROOT / "areal_hpc" / "inference" / f for f in ("client.py", "server.py", "sglang.py")]
    for pkg in ("trainers", "train", "rollout", "launch", "cli"):
        files += sorted((ROOT / "areal_hpc" / pkg).glob("*.py"))
    known = set(contract.routes) - {"/"}
    # a bodiless GET of a route in our tables (checked above) may be spelled out, e.g. a health probe
    checked_gets = {r.path for r in api.ROUTES + api.DOCUMENTED_ROUTES if r.method == "GET"}
    assert [x for x in sc.route_literals(files, known) if x[2] not in checked_gets] == []
    # and the checker would see one
    assert sc.route_literals([ROOT / "areal_hpc" / "inference" / "sglang_api.py"], known)


def test_diff_between_versions_lists_changes(contract):
    import copy

    old = copy.deepcopy(contract)
    del old.routes["/pause_generation"]
    old.structs["UpdateWeightFromDiskReqInput"]["model_path"] = sc.Field("Optional[str]", False)
    old.meta_keys.discard("weight_versions")
    diff = sc.diff_contracts(old, contract)
    assert "+ route /pause_generation ['POST']" in diff
    assert any(d.startswith("~ UpdateWeightFromDiskReqInput.model_path: Optional[str] -> str (required)") for d in diff)
    assert "+ meta_info key weight_versions" in diff
    assert sc.diff_contracts(contract, contract) == []


# ============================================================================ old SGLang: no weight_version
def test_server_without_weight_version_falls_back_to_the_pushed_one(caplog):
    """A real HTTP server answering like an SGLang release whose meta_info has no weight version."""
    calls = []

    async def handle(request):
        body = await request.json()
        calls.append((request.path, body))
        if request.path == "/update_weights_from_disk":
            return web.json_response({"success": True, "message": "ok", "num_paused_requests": 0})
        n = body["sampling_params"]["max_new_tokens"]
        return web.json_response({"output_ids": [5] * n, "meta_info": {
            "id": body.get("rid", ""), "finish_reason": {"type": "length", "length": n}, "prompt_tokens": 2,
            "completion_tokens": n, "cached_tokens": 0,
            "output_token_logprobs": [[-0.1, 5, None]] * n}})

    async def main():
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with ServerPool(None, api_key="k") as pool:
                pool.add_server("old", f"127.0.0.1:{port}")
                before = await pool.generate([1, 2], {"max_new_tokens": 2})
                res = await pool.update_weights_from_disk("/w/v3", 3)
                assert res["old"].ok
                after = [await pool.generate([1, 2], {"max_new_tokens": 3}) for _ in range(2)]
            return before, after
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.WARNING, logger="areal_hpc.inference.client"):
        before, after = asyncio.run(main())
    assert before.versions == [0, 0]  # nothing pushed yet: what the (absent) record says, 0
    assert [r.versions for r in after] == [[3, 3, 3]] * 2
    assert min(after[0].versions) == 3  # what crashed the controller (min over None)
    warned = [r for r in caplog.records if "reports no weight version" in r.getMessage()]
    assert len(warned) == 1
    assert calls[0][0] == "/generate" and "model_path" in calls[1][1]


# ============================================================================ SGLang -> our hf server
@pytest.fixture(scope="module")
def hf_engine():
    from areal_hpc.inference.hf_engine import LLMEngine, ModelRunner
    from areal_hpc.toy import resolve_model

    eng = LLMEngine(ModelRunner(resolve_model("toy:qwen3-h128-l2"), max_running=16, context_length=256)).start()
    yield eng
    eng.stop()


async def _with_server(engine, fn):
    from areal_hpc.inference.http_server import EngineServer

    async with engine_app(EngineServer(engine, api_key="k")) as url:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as s:
            async def post(path, body):
                async with s.post(url + path, json=body) as r:
                    text = await r.text()
                    try:
                        return r.status, json.loads(text)
                    except ValueError:
                        return r.status, text
            return await fn(post)


def sample_value(annotation: str, aliases):
    """A JSON value of the annotated type that is not a neutral one (so an unsupported field shows)."""
    def go(node, depth=0):
        if isinstance(node, ast.BinOp):
            return go(node.left, depth + 1)
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
        if isinstance(node, ast.Subscript):
            base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            args = [a for a in args if not (isinstance(a, ast.Constant) and a.value is None)]
            if base in ("Optional", "Union", "Annotated"):
                return go(args[0], depth + 1)
            if base == "Literal":
                return args[-1].value
            if base in ("List", "list", "Set", "Sequence", "Tuple"):
                return [go(args[0], depth + 1)]
            if base in ("Dict", "dict", "Mapping"):
                return {"k": go(args[1], depth + 1) if len(args) > 1 else "x"}
        if name in aliases and depth < 10:
            return go(ast.parse(aliases[name], mode="eval").body, depth + 1)
        return {"int": 1, "float": 0.5, "bool": True, "str": "x", "dict": {"k": "x"}, "Dict": {"k": "x"},
                "list": ["x"], "List": ["x"]}.get(name, "x")

    return go(ast.parse(annotation, mode="eval").body)


BASE = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}}
VALUES = {"text": "1+2=", "input_ids": [6, 7], "sampling_params": {"max_new_tokens": 1}, "rid": "contract-rid"}


def test_hf_server_honours_or_refuses_every_generate_field(contract, hf_engine):
    from areal_hpc.inference.http_validate import FIELD_POLICIES

    policy = FIELD_POLICIES["/generate"]
    fields = contract.structs["GenerateReqInput"]
    assert (policy.honoured | policy.noop) <= set(fields), "a field name SGLang does not have"

    async def run(post):
        out = {}
        for name, f in fields.items():
            value = VALUES.get(name, sample_value(f.annotation, contract.aliases))
            body = {k: v for k, v in BASE.items() if not (name == "text" and k == "input_ids")}
            out[name] = await post("/generate", {**body, name: value})
        return out

    results = asyncio.run(_with_server(hf_engine, run))
    for name, (status, body) in results.items():
        if name in policy.honoured or name in policy.noop:
            assert status == 200, (name, status, body)
        else:
            assert status == 400 and repr(name) in body["message"], (name, status, body)
    assert sum(1 for s, _ in results.values() if s == 400) >= 30
    assert "text" in results["text"][1] and results["return_prompt_token_ids"][1]["prompt_token_ids"] == [3, 4, 5]
    assert results["rid"][1]["meta_info"]["id"] == "contract-rid"


def test_hf_server_honours_or_refuses_every_sampling_param(contract, hf_engine):
    from areal_hpc.inference.http_validate import SUPPORTED_SAMPLING_KEYS

    assert SUPPORTED_SAMPLING_KEYS <= set(contract.sampling)

    async def run(post):
        out = {}
        for name, f in contract.sampling.items():
            value = sample_value(f.annotation, contract.aliases)
            sp = {"max_new_tokens": 2, "ignore_eos": True, name: value}
            out[name] = await post("/generate", {"input_ids": [3, 4], "sampling_params": sp})
        return out

    results = asyncio.run(_with_server(hf_engine, run))
    for name, (status, body) in results.items():
        if name in SUPPORTED_SAMPLING_KEYS:
            assert status == 200, (name, body)
        else:
            assert status == 400 and name in body["message"], (name, status, body)


def test_hf_server_refuses_unsupported_fields_of_control_routes(contract, hf_engine):
    from areal_hpc.inference.http_validate import FIELD_POLICIES

    checked = 0

    async def run(post):
        nonlocal checked
        for path, policy in FIELD_POLICIES.items():
            info = contract.routes.get(path)
            if path == "/generate" or info is None or info.request is None:
                continue
            fields = contract.structs[info.request]
            extensions = (policy.honoured | policy.noop) - set(fields)
            assert extensions <= {"timeout"}, (path, extensions)
            for name, f in fields.items():
                if name in policy.honoured or name in policy.noop:
                    continue
                literals = [n.value for n in ast.walk(ast.parse(f.annotation, mode="eval"))
                            if isinstance(n, ast.Constant) and n.value is not None and "Literal" in f.annotation]
                for value in literals or [sample_value(f.annotation, contract.aliases)]:
                    if value in policy.neutral.get(name, ()):
                        continue  # e.g. selector "all": what this server does anyway
                    status, body = await post(path, {name: value})
                    assert status == 400 and repr(name) in body["message"], (path, name, value, status, body)
                    checked += 1

    asyncio.run(_with_server(hf_engine, run))
    assert checked >= 10


def test_tokens_of_the_weights_sglang_was_launched_with_are_version_0():
    """An external SGLang started without --weight-version reports "default" until its first update: the rollout
    controller compares token versions with the trainer's (ints), so "default" must read as the run's version 0."""
    body = {"output_ids": [5, 6], "meta_info": {"output_token_logprobs": [[-0.1, 5, None], [-0.2, 6, None]],
                                                "weight_versions": [{"start": 0, "end": 2, "version": "default"}]}}
    assert api.parse_generate(body, fallback_version=3).versions == [0, 0]
    del body["meta_info"]["weight_versions"]
    body["meta_info"]["weight_version"] = "default"
    assert api.parse_generate(body, fallback_version=3).versions == [0, 0]
