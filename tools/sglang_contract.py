#!/usr/bin/env python
"""Check our SGLang usage against any SGLang release, and list what changed against the pin.

    python tools/sglang_contract.py --version 0.5.24      # before moving the pin
    python tools/sglang_contract.py                       # the pinned version
    python tools/sglang_contract.py --wheel path/to/sglang-X-*.whl

Downloads the wheel (``pip download --no-deps``, cached in ``~/.cache/areal-hpc/wheels`` or
``$AREAL_HPC_CACHE/wheels``), reads it without importing SGLang, and runs:

1. the flag check: every flag our command builder emits is declared by that version;
2. the contract check: routes, request fields and types, sampling keys, response keys
   (`check_ours`);
3. for another version than the pin: what changed in routes, the request structs of the routes we
   use, sampling params, ``meta_info`` keys and finish types, and the flags we emit.

Exit status: 0 when our code fits that version, 1 when it does not (problems listed), 2 when the
wheel cannot be had. Moving the pin = this command passing, then changing ``SGLANG_VERSION`` and
setup.cfg's ``sglang==`` together.

As a library (tests/test_inference_sglang_contract.py and tests/test_inference_sglang_flags.py
load this file by path): SGLang's HTTP contract and flags read from its own source, and checks of
ours. This is a developer check, not something a run uses, so it lives outside the package.

`read_contract(wheel)` extracts, with `ast`:

* routes: every ``@app.get/post/put/delete/api_route(path, methods=...)`` in
  ``sglang/srt/entrypoints/http_server.py``, with the request struct its handler parses the
  body into (``obj: X`` or ``obj: Annotated[X, Body()]``) and the keys of the dict literals it
  (or a handler it awaits) answers with;
* structs: the annotated fields of every class in ``sglang/srt/managers/io_struct.py``
  (dataclasses and msgspec Structs, with fields of same-module bases), required or not;
* sampling params: the HTTP-facing ``SamplingParams`` of ``sglang/api/v1/api_types.py`` where it
  exists (its decoder rejects unknown keys), else ``sglang/srt/sampling/sampling_params.py``;
* response keys: the ``meta_info`` keys SGLang writes (subscript stores, dict literals,
  ``update``/``setdefault`` on a name ``meta_info`` anywhere under ``sglang/srt``), the top-level
  keys of ``/generate`` responses (dict literals that carry ``meta_info``), and the
  ``finish_reason`` types (``"type": ...`` in ``schedule_batch.py``).

`check_ours(contract, api)` checks `areal_hpc.inference.sglang_api` (or a stand-in with the same
names, which is how the tests show a mutated copy fails): every route we call exists with our
method; every field we send is a field of the struct SGLang parses it into, with a compatible
type, and no required field is missing; every sampling key we send is one SGLang accepts; every
response key our parsers read is one SGLang produces, or the parser copes without it (checked by
running the parser on an SGLang-shaped response holding only the keys SGLang produces).

`diff_contracts(old, new)` lists what changed between two versions; `declared_flags(wheel)`
every flag ``sglang.launch_server`` accepts.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from areal_hpc.inference import sglang_api as api  # noqa: E402
from areal_hpc.inference.sglang import SGLANG_VERSION  # noqa: E402

HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
API_TYPES = "sglang/api/v1/api_types.py"
SAMPLING = "sglang/srt/sampling/sampling_params.py"
SCHEDULE_BATCH = "sglang/srt/managers/schedule_batch.py"
_VERBS = {"get": "GET", "post": "POST", "put": "PUT", "delete": "DELETE", "patch": "PATCH", "head": "HEAD"}


@dataclasses.dataclass
class Field:
    annotation: str  # source text
    required: bool


@dataclasses.dataclass
class RouteInfo:
    methods: Set[str]
    handler: str
    request: Optional[str]  # io_struct class the body is parsed into, None when the handler reads JSON itself
    response_keys: Set[str]


@dataclasses.dataclass
class Contract:
    version: str
    routes: Dict[str, RouteInfo]
    structs: Dict[str, Dict[str, Field]]
    sampling: Dict[str, Field]
    meta_keys: Set[str]
    generate_keys: Set[str]
    finish_types: Set[str]
    aliases: Dict[str, str] = dataclasses.field(default_factory=dict)  # type aliases (source)
    generate_gate: Dict[str, Field] = dataclasses.field(default_factory=dict)  # api_types.GenerateRequest


# ====================================================================== the wheel
def cache_dir() -> Path:
    return Path(os.environ.get("AREAL_HPC_CACHE", Path.home() / ".cache" / "areal-hpc")) / "wheels"


def find_wheel(version: str) -> Optional[Path]:
    found = sorted(cache_dir().glob(f"sglang-{version}-*.whl"))
    return found[-1] if found else None


def download_wheel(version: str, timeout_s: float = 300.0) -> Path:
    """The cached wheel of ``sglang==version``, downloaded (``pip download --no-deps``) if absent."""
    found = find_wheel(version)
    if found:
        return found
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
           "--platform", "manylinux_2_34_x86_64", "-d", str(cache), f"sglang=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    found = find_wheel(version)
    if not found:
        raise RuntimeError(f"could not download sglang=={version}: {(r.stderr or r.stdout)[-800:]}")
    return found


# ====================================================================== reading SGLang
def read_contract(wheel: str | os.PathLike) -> Contract:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())

        def parse(name: str) -> ast.Module:
            return ast.parse(z.read(name).decode())

        version = Path(wheel).name.split("-")[1]
        io = parse(IO_STRUCT)
        structs, aliases = _structs(io)
        routes = _routes(parse(HTTP_SERVER), set(structs))
        gate: Dict[str, Field] = {}
        if API_TYPES in names:  # the JSON schema gate in front of /generate (SGLang >= 0.5.2x)
            at = parse(API_TYPES)
            sampling = _class_fields(at, "SamplingParams")
            gate = _class_fields(at, "GenerateRequest")
            for n in at.body:
                if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
                    aliases.setdefault(n.targets[0].id, ast.unparse(n.value))
                elif isinstance(n, ast.ClassDef) and n.name not in aliases:
                    doc = ast.get_docstring(n) or ""
                    aliases[n.name] = "List[Any]" if "positional array" in doc else (
                        "Dict[str, Any]" if "JSON object" in doc else "Any")
        else:
            sampling = _sampling_from_module(parse(SAMPLING))
        meta: Set[str] = set()
        gen: Set[str] = set()
        for name in sorted(names):
            if name.startswith("sglang/srt/") and name.endswith(".py"):
                raw = z.read(name)
                if b"meta_info" in raw:
                    m, g = _meta_keys(ast.parse(raw.decode()))
                    meta |= m
                    gen |= g
        finish = _finish_types(parse(SCHEDULE_BATCH)) if SCHEDULE_BATCH in names else set()
    return Contract(version, routes, structs, sampling, meta, gen, finish, aliases, gate)


def _const_str(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Call) and node.args:  # os.environ.get("X", "/default")
        last = node.args[-1]
        if isinstance(last, ast.Constant) and isinstance(last.value, str) and last.value.startswith("/"):
            return last.value
    return None


def _routes(module: ast.Module, struct_names: Set[str]) -> Dict[str, RouteInfo]:
    funcs = {n.name: n for n in ast.walk(module) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out: Dict[str, RouteInfo] = {}
    for fn in funcs.values():
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app" and dec.args):
                continue
            verb = dec.func.attr
            path = _const_str(dec.args[0])
            if path is None:
                continue
            if verb == "api_route":
                kw = next((k.value for k in dec.keywords if k.arg == "methods"), None)
                methods = {e.value.upper() for e in getattr(kw, "elts", []) if isinstance(e, ast.Constant)} or {"GET"}
            elif verb in _VERBS:
                methods = {_VERBS[verb]}
            else:
                continue
            info = out.setdefault(path, RouteInfo(set(), fn.name, _request_struct(fn, struct_names),
                                                  _response_keys(fn, funcs)))
            info.methods |= methods
    return out


def _request_struct(fn, struct_names: Set[str]) -> Optional[str]:
    for arg in fn.args.args + fn.args.kwonlyargs:
        ann = arg.annotation
        if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "Annotated":
            elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            ann = elts[0]
        if isinstance(ann, ast.Name) and ann.id in struct_names:
            return ann.id
    return None


def _response_keys(fn, funcs, seen: Optional[Set[str]] = None) -> Set[str]:
    seen = set() if seen is None else seen
    seen.add(fn.name)
    keys: Set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        if isinstance(node, ast.Await) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            callee = funcs.get(node.value.func.id)
            if callee is not None and callee.name not in seen:
                keys |= _response_keys(callee, funcs, seen)
    return keys


def _structs(module: ast.Module) -> Tuple[Dict[str, Dict[str, Field]], Dict[str, str]]:
    classes = {n.name: n for n in module.body if isinstance(n, ast.ClassDef)}
    aliases = {t.id: ast.unparse(n.value) for n in module.body if isinstance(n, ast.Assign)
               for t in n.targets if isinstance(t, ast.Name)}
    return {name: _class_fields(module, name, classes) for name in classes}, aliases


def _class_fields(module: ast.Module, name: str, classes: Optional[Dict[str, ast.ClassDef]] = None
                  ) -> Dict[str, Field]:
    classes = classes or {n.name: n for n in module.body if isinstance(n, ast.ClassDef)}
    cls = classes[name]
    fields: Dict[str, Field] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes and base.id != name:
            fields.update(_class_fields(module, base.id, classes))
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        ann = ast.unparse(stmt.annotation)
        if ann.startswith(("ClassVar", "typing.ClassVar")):
            continue
        required = stmt.value is None
        if isinstance(stmt.value, ast.Call) and getattr(stmt.value.func, "id", "") == "field":
            required = not any(k.arg in ("default", "default_factory") for k in stmt.value.keywords)
        fields[stmt.target.id] = Field(ann, required)
    return fields


def _sampling_from_module(module: ast.Module) -> Dict[str, Field]:
    """Older SGLang: ``SamplingParams.__init__`` arguments; newer: its annotated fields."""
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams")
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return _class_fields(module, "SamplingParams")
    args = init.args.args[1:] + init.args.kwonlyargs
    defaults = [None] * (len(init.args.args) - 1 - len(init.args.defaults)) + list(init.args.defaults)
    defaults += list(init.args.kw_defaults)
    return {a.arg: Field(ast.unparse(a.annotation) if a.annotation else "Any", d is None)
            for a, d in zip(args, defaults)}


def _meta_keys(module: ast.Module) -> Tuple[Set[str], Set[str]]:
    meta: Set[str] = set()
    top: Set[str] = set()

    def is_meta(node) -> bool:
        return isinstance(node, ast.Name) and node.id == "meta_info"

    def str_keys(d: ast.Dict) -> Set[str]:
        return {k.value for k in d.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}

    for node in ast.walk(module):
        if isinstance(node, ast.Subscript) and is_meta(node.value) and isinstance(node.ctx, ast.Store):
            k = _const_str(node.slice)
            if k:
                meta.add(k)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_meta(t) for t in targets):
                meta |= str_keys(node.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_meta(node.func.value):
            if node.func.attr == "update" and node.args and isinstance(node.args[0], ast.Dict):
                meta |= str_keys(node.args[0])
            elif node.func.attr == "setdefault" and node.args and _const_str(node.args[0]):
                meta.add(_const_str(node.args[0]))
        if isinstance(node, ast.Dict) and "meta_info" in str_keys(node):
            top |= str_keys(node)
    return meta, top


def _finish_types(module: ast.Module) -> Set[str]:
    out = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "type" and isinstance(v, ast.Constant):
                    out.add(v.value)
    return out


# ====================================================================== type compatibility
def accepts(annotation: str, value: Any, aliases: Mapping[str, str] = {}) -> Optional[bool]:
    """Does a JSON ``value`` fit an annotation (source text)? None when it cannot be told."""
    return _accepts(ast.parse(annotation, mode="eval").body, value, aliases, 0)


def _accepts(node: ast.expr, v: Any, aliases: Mapping[str, str], depth: int) -> Optional[bool]:
    if depth > 20:
        return None
    if isinstance(node, ast.Constant):
        if node.value is None:
            return v is None
        if isinstance(node.value, str):  # a forward reference
            return _accepts(ast.parse(node.value, mode="eval").body, v, aliases, depth + 1)
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _any_of([node.left, node.right], v, aliases, depth)
    if isinstance(node, ast.Attribute):
        node = ast.Name(node.attr)
    if isinstance(node, ast.Name):
        n = node.id
        if n in ("Any", "object"):
            return True
        if n == "str":
            return isinstance(v, str)
        if n == "bool":
            return isinstance(v, bool)
        if n == "int":
            return isinstance(v, int) and not isinstance(v, bool)
        if n == "float":
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        if n in ("dict", "Dict"):
            return isinstance(v, dict)
        if n in ("list", "List", "Set", "set", "Tuple", "tuple"):
            return isinstance(v, list)
        if n in aliases:
            return _accepts(ast.parse(aliases[n], mode="eval").body, v, aliases, depth + 1)
        return None
    if isinstance(node, ast.Subscript):
        base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Optional":
            return True if v is None else _accepts(args[0], v, aliases, depth + 1)
        if base == "Union":
            return _any_of(args, v, aliases, depth)
        if base == "Annotated":
            return _accepts(args[0], v, aliases, depth + 1)
        if base == "Literal":
            return any(isinstance(a, ast.Constant) and a.value == v and type(a.value) is type(v) for a in args)
        if base in ("List", "list", "Set", "set", "Sequence"):
            if not isinstance(v, list):
                return False
            results = [_accepts(args[0], x, aliases, depth + 1) for x in v]
            return False if False in results else (None if None in results else True)
        if base in ("Tuple", "tuple"):
            return isinstance(v, list) or False
        if base in ("Dict", "dict", "Mapping"):
            if not isinstance(v, dict):
                return False
            results = [_accepts(args[1], x, aliases, depth + 1) for x in v.values()] if len(args) > 1 else []
            return False if False in results else (None if None in results else True)
    return None


def _any_of(options, v, aliases, depth) -> Optional[bool]:
    results = [_accepts(o, v, aliases, depth + 1) for o in options]
    return True if True in results else (None if None in results else False)


# ====================================================================== our side
class KeyRecorder(dict):
    """A dict that records which keys were looked up (``get``, ``[]``, ``in``); nested dicts too."""

    def __init__(self, data: Mapping[str, Any], log: Set[str], prefix: str = ""):
        super().__init__({k: KeyRecorder(v, log, f"{prefix}{k}.") if isinstance(v, dict) else v
                          for k, v in data.items()})
        self._log, self._prefix = log, prefix

    def __getitem__(self, k):
        self._log.add(self._prefix + str(k))
        return super().__getitem__(k)

    def get(self, k, default=None):
        self._log.add(self._prefix + str(k))
        return super().get(k, default)

    def __contains__(self, k):
        self._log.add(self._prefix + str(k))
        return super().__contains__(k)


# An SGLang-shaped /generate response (SGLang >= 0.5.2x with return_logprob): `check_ours` keeps only
# the keys the contract says SGLang produces, so a key SGLang dropped is absent when our parser runs.
SAMPLE_META = {"id": "r", "finish_reason": {"type": "length", "length": 3}, "prompt_tokens": 2,
               "completion_tokens": 3, "cached_tokens": 0, "e2e_latency": 0.1,
               "weight_version": "5", "weight_versions": [{"version": "4", "start": 0, "end": 1},
                                                          {"version": "5", "start": 1, "end": 3}],
               "output_token_logprobs": [[-0.5, 7, None], [-0.25, 8, None], [-1.0, 9, None]]}
SAMPLE_EXPECTED_VERSIONS = {("weight_versions",): [4, 5, 5], ("weight_version",): [5, 5, 5], (): [-7, -7, -7]}


def our_requests(api) -> List[Tuple[Any, Dict[str, Any]]]:
    """(route, body) pairs of every request builder in ``api`` (a `sglang_api` look-alike)."""
    from areal_hpc.config.schema import GenerationConfig

    gen = api.sampling_params(asdict(GenerationConfig(stop_token_ids=[2, 3], top_k=5, ignore_eos=True)))
    return [
        (api.GENERATE, api.generate_body([1, 2, 3], gen, rid="rid-1")),
        (api.GENERATE, api.generate_body([1, 2], api.sampling_params(GenerationConfig(), max_new_tokens=3))),
        (api.PAUSE_GENERATION, api.pause_body("abort")),
        (api.CONTINUE_GENERATION, api.continue_body()),
        (api.ABORT_REQUEST, api.abort_body()),
        (api.ABORT_REQUEST, api.abort_body("rid-1")),
        (api.UPDATE_WEIGHTS_FROM_DISK, api.update_from_disk_body("/w/v3", 3)),
        (api.UPDATE_WEIGHTS_FROM_DISK, api.update_from_disk_body("/w/v4", "4", abort_all_requests=True)),
        (api.INIT_WEIGHTS_UPDATE_GROUP, api.init_group_body("10.0.0.1", 29500, 1, 3, "g-1", "nccl")),
        (api.UPDATE_WEIGHTS_FROM_DISTRIBUTED, api.update_from_distributed_body(
            ["model.embed_tokens.weight", "lm_head.weight"], ["bfloat16", "float32"], [[10, 4], (10, 4)], "g-1", 3)),
    ]


def check_ours(contract: Contract, api) -> List[str]:
    """What in ``api`` SGLang ``contract.version`` would not accept or does not produce (empty: all good)."""
    problems: List[str] = []
    v = contract.version
    requests = our_requests(api)
    sent_routes = {r for r, _ in requests}
    for route in list(api.ROUTES) + list(api.DOCUMENTED_ROUTES):
        info = contract.routes.get(route.path)
        if info is None:
            problems.append(f"route {route.path}: not served by sglang {v}")
        elif route.method not in info.methods:
            problems.append(f"route {route.path}: sglang {v} serves {sorted(info.methods)}, we use {route.method}")
    for route in api.ROUTES:
        if route.method != "GET" and route not in sent_routes:
            problems.append(f"route {route.path}: no body builder of ours was exercised for it")
    for route, body in requests:
        info = contract.routes.get(route.path)
        if info is None or route not in api.ROUTES:
            if route not in api.ROUTES:
                problems.append(f"route {route.path}: a body is built for it but it is not in ROUTES")
            continue
        if info.request is None:
            problems.append(f"route {route.path}: sglang {v} parses no request struct (cannot check our fields)")
            continue
        fields = contract.structs[info.request]
        for key, value in body.items():
            f = fields.get(key)
            if f is None:
                problems.append(f"{route.path}: field {key!r} is not a field of sglang {v} {info.request}")
                continue
            ok = accepts(f.annotation, value, contract.aliases)
            if ok is False:
                problems.append(f"{route.path}: field {key!r} = {value!r} does not fit {info.request}.{key}: "
                                f"{f.annotation}")
            elif ok is None:
                problems.append(f"{route.path}: cannot check {key!r} against {info.request}.{key}: {f.annotation}")
        for key, f in fields.items():
            if f.required and key not in body:
                problems.append(f"{route.path}: required field {info.request}.{key} is not sent")
        if route.path == api.GENERATE.path:
            for key, value in body.items():  # the schema gate ignores unknown keys but checks known ones
                f = contract.generate_gate.get(key)
                if f is not None and accepts(f.annotation, value, contract.aliases) is False:
                    problems.append(f"/generate: field {key!r} = {value!r} fails sglang {v}'s schema: {f.annotation}")
            for key, value in (body.get("sampling_params") or {}).items():
                f = contract.sampling.get(key)
                if f is None:
                    problems.append(f"/generate: sampling_params key {key!r} is not accepted by sglang {v}")
                    continue
                ok = accepts(f.annotation, value, contract.aliases)
                if ok is not True:
                    problems.append(f"/generate: sampling_params.{key} = {value!r} "
                                    f"{'does not fit' if ok is False else 'cannot be checked against'} {f.annotation}")
    problems += _check_reads(contract, api)
    return problems


def _check_reads(contract: Contract, api) -> List[str]:
    problems, _ = _reads(contract, api)
    return problems


def reads_with_fallback(contract: Contract, api) -> List[str]:
    """Response keys our parsers read that ``contract``'s SGLang does not produce (each one was
    absent while the parsers were checked, so their fallback is what ran)."""
    return _reads(contract, api)[1]


def _reads(contract: Contract, api) -> Tuple[List[str], List[str]]:
    problems: List[str] = []
    notes: List[str] = []
    v = contract.version
    meta = {k: val for k, val in SAMPLE_META.items() if k in contract.meta_keys}
    body = {k: val for k, val in {"output_ids": [7, 8, 9], "meta_info": meta, "text": "abc"}.items()
            if k in contract.generate_keys}
    seen: Set[str] = set()
    try:
        out = api.parse_generate(KeyRecorder(body, seen), -7)
    except Exception as e:
        return [f"parse_generate fails on an sglang {v} /generate response: {type(e).__name__}: {e}"], notes
    # what we must get from any SGLang response, whatever it calls things
    if list(out.output_ids) != [7, 8, 9]:
        problems.append(f"parse_generate: output_ids {out.output_ids} from an sglang {v} response "
                        f"(keys {sorted(body)})")
    if out.logprobs != [-0.5, -0.25, -1.0]:
        problems.append(f"parse_generate: logprobs {out.logprobs} from an sglang {v} response "
                        f"(meta_info keys {sorted(meta)})")
    if out.finish_reason != "length":
        problems.append(f"parse_generate: finish reason {out.finish_reason!r}, expected 'length'")
    want = next(vals for keys, vals in SAMPLE_EXPECTED_VERSIONS.items() if all(k in meta for k in keys))
    if out.versions != want:
        problems.append(f"parse_generate: versions {out.versions} != {want} (sglang {v} meta_info has "
                        f"{sorted(set(meta) & {'weight_version', 'weight_versions'})})")
    for ours in getattr(api, "FINISH_TYPES", ()):
        if contract.finish_types and ours not in contract.finish_types:
            problems.append(f"finish_reason type {ours!r} is not one sglang {v} produces")
    produced = {f"meta_info.{k}" for k in contract.meta_keys} | set(contract.generate_keys)
    produced |= {"meta_info.finish_reason.type"}
    notes += [f"/generate {k}" for k in sorted(seen - produced)]
    # control responses: keys read by call_outcome / model_info_version
    for route, reader in ((api.UPDATE_WEIGHTS_FROM_DISK, lambda b: api.call_outcome(200, b)),
                          (api.UPDATE_WEIGHTS_FROM_DISTRIBUTED, lambda b: api.call_outcome(200, b)),
                          (api.PAUSE_GENERATION, lambda b: api.call_outcome(200, b)),
                          (api.MODEL_INFO, api.model_info_version)):
        info = contract.routes.get(route.path)
        if info is None:
            continue  # reported with the routes
        sample = {k: {"success": True, "message": "m", "weight_version": "3", "status": "ok"}.get(k, 0)
                  for k in info.response_keys}
        read: Set[str] = set()
        try:
            got = reader(KeyRecorder(sample, read))
            reader({})  # what an answer without any of those keys gives: must not fail either
        except Exception as e:
            problems.append(f"reading a {route.path} response of sglang {v} fails: {type(e).__name__}: {e}")
            continue
        notes += [f"{route.path} {k}" for k in sorted(read - info.response_keys)]
        if route == api.MODEL_INFO:
            if "weight_version" in info.response_keys and got != 3:
                problems.append(f"{route.path}: the weight version of an sglang {v} answer reads as {got!r}")
        elif got != (True, None):
            problems.append(f"{route.path}: a successful sglang {v} answer reads as {got!r}")
    return problems, notes


def route_literals(paths: Iterable[str], known: Set[str]) -> List[Tuple[str, int, str]]:
    """(file, line, literal) of string constants in ``paths`` that name a route in ``known``:
    calls must go through `sglang_api`, not literals the contract test cannot see."""
    out = []
    for p in paths:
        tree = ast.parse(Path(p).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
                out.append((str(p), node.lineno, node.value))
    return out


# ====================================================================== versions
def diff_contracts(old: Contract, new: Contract, used_structs: Optional[Iterable[str]] = None) -> List[str]:
    """What changed from ``old`` to ``new``: routes, the request structs of ``used_structs`` (default:
    those of every route in both), sampling params, meta_info keys, finish types."""
    lines: List[str] = []
    for p in sorted(set(old.routes) - set(new.routes)):
        lines.append(f"- route {p} {sorted(old.routes[p].methods)}")
    for p in sorted(set(new.routes) - set(old.routes)):
        lines.append(f"+ route {p} {sorted(new.routes[p].methods)}")
    for p in sorted(set(old.routes) & set(new.routes)):
        a, b = old.routes[p], new.routes[p]
        if a.methods != b.methods:
            lines.append(f"~ route {p}: methods {sorted(a.methods)} -> {sorted(b.methods)}")
        if a.request != b.request:
            lines.append(f"~ route {p}: request struct {a.request} -> {b.request}")
    structs = set(used_structs) if used_structs is not None else {
        r.request for p, r in new.routes.items() if r.request and p in old.routes}
    for s in sorted(x for x in structs if x):
        lines += _diff_fields(f"{s}.", old.structs.get(s, {}), new.structs.get(s, {}))
    lines += _diff_fields("sampling_params.", old.sampling, new.sampling)
    for label, a, b in (("meta_info key", old.meta_keys, new.meta_keys),
                        ("/generate response key", old.generate_keys, new.generate_keys),
                        ("finish_reason type", old.finish_types, new.finish_types)):
        lines += [f"- {label} {k}" for k in sorted(a - b)] + [f"+ {label} {k}" for k in sorted(b - a)]
    return lines


def _diff_fields(prefix: str, a: Dict[str, Field], b: Dict[str, Field]) -> List[str]:
    out = [f"- {prefix}{k}: {a[k].annotation}" for k in sorted(set(a) - set(b))]
    out += [f"+ {prefix}{k}: {b[k].annotation}{' (required)' if b[k].required else ''}"
            for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        if (a[k].annotation, a[k].required) != (b[k].annotation, b[k].required):
            out.append(f"~ {prefix}{k}: {a[k].annotation}{' (required)' if a[k].required else ''} -> "
                       f"{b[k].annotation}{' (required)' if b[k].required else ''}")
    return out


def flag_problems(flags: Mapping[str, Optional[bool]]) -> List[str]:
    """Flags our command builder emits that ``flags`` (`declared_flags`) lacks or types differently."""
    import tempfile

    from areal_hpc.config.schema import ServerConfig
    from areal_hpc.inference.sglang import build_sglang_options, render_argv, write_key_config

    cfg = ServerConfig(dtype="auto", context_length=8192, max_running_requests=128, random_seed=7)
    with tempfile.TemporaryDirectory() as d:
        key = write_key_config(Path(d) / "k.yaml", "k")
        variants = [build_sglang_options(cfg, "/m", host="0.0.0.0", port=1, api_key="k", tp_size=2, base_gpu_id=4),
                    build_sglang_options(cfg, "/m", host="0.0.0.0", port=1, config_file=key),
                    build_sglang_options(cfg, "/m", host="0.0.0.0", port=1, api_key="k", tp_size=16, nnodes=2,
                                         node_rank=1, dist_init_addr="node0:5000")]
    problems = []
    for opts in variants:
        argv = render_argv(opts, python="python")[3:]
        for i, a in enumerate(argv):
            if not a.startswith("--"):
                continue
            bare = i + 1 >= len(argv) or argv[i + 1].startswith("--")
            if a not in flags:
                problems.append(f"flag {a} is not accepted")
            elif flags[a] is not None and flags[a] != bare:
                problems.append(f"flag {a}: SGLang {'takes no' if flags[a] else 'needs a'} value")
    return sorted(set(problems))


# ====================================================================== flags SGLang declares
def declared_flags(wheel: str | os.PathLike) -> Dict[str, Optional[bool]]:
    """Every ``--flag`` ``sglang.launch_server`` accepts, read from an SGLang wheel without
    importing it: ``{flag: True}`` for bare boolean flags, ``False`` for flags taking a value,
    ``None`` where a custom argparse action decides.

    Sources: literal ``parser.add_argument("--...")`` calls in ``sglang/srt/server_args.py``, and
    (SGLang >= 0.5.2x) the annotated fields of the namespace classes that ``ServerArgs`` collects
    (``_INPUT_NAMESPACES``), which ``add_cli_args_from_dataclass`` turns into flags: the field
    name with dashes (or ``Arg(cli_name=...)``), plus ``Arg(aliases=[...])``; ``bool`` fields are
    ``store_true``; ``Arg(no_cli=True)`` fields have no flag.
    """
    out: Dict[str, Optional[bool]] = {}
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())

        def parse(name: str) -> ast.Module:
            return ast.parse(z.read(name).decode())

        sa = parse("sglang/srt/server_args.py")
        for node in ast.walk(sa):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                action = next((k.value for k in node.keywords if k.arg == "action"), None)
                if isinstance(action, ast.Constant):
                    kind = action.value in ("store_true", "store_false")
                elif action is None:
                    kind = False
                else:
                    kind = "StoreTrue" in ast.unparse(action) or None
                for n in names:
                    if n.startswith("--"):
                        out[n] = kind
        # namespace classes ServerArgs is assembled from, and the modules that define them
        namespaces: List[str] = []
        modules: Dict[str, str] = {}
        for node in sa.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_INPUT_NAMESPACES" for t in node.targets):
                namespaces = [e.id for e in node.value.elts if isinstance(e, ast.Name)]
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang.srt.arg_groups"):
                for alias in node.names:
                    modules[alias.asname or alias.name] = node.module.replace(".", "/") + ".py"
        for cls_name in namespaces:
            path = modules.get(cls_name)
            if path is None or path not in files:
                raise ValueError(f"cannot find the module of SGLang namespace {cls_name} ({path})")
            _fields_to_flags(parse(path), cls_name, out)
    return out


def _fields_to_flags(module, cls_name: str, out: Dict[str, Optional[bool]]) -> None:
    classes = {n.name: n for n in module.body if isinstance(n, ast.ClassDef)}
    cls = classes[cls_name]
    for base in cls.bases:  # fields inherited from a class of the same module
        if isinstance(base, ast.Name) and base.id in classes:
            _fields_to_flags(module, base.id, out)
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        ann = stmt.annotation
        if not (isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") in ("A", "Annotated")):
            continue
        parts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        typ, meta = parts[0], parts[1:]
        arg = next((m for m in meta if isinstance(m, ast.Call) and getattr(m.func, "id", "") == "Arg"), None)
        if arg is None and not any(isinstance(m, ast.Constant) and isinstance(m.value, str) for m in meta):
            continue  # no CLI metadata: not registered automatically
        kw = {k.arg: k.value for k in (arg.keywords if arg is not None else [])}
        if isinstance(kw.get("no_cli"), ast.Constant) and kw["no_cli"].value is True:
            continue
        src = ast.unparse(typ).replace(" ", "")
        is_bool = src in ("bool", "Optional[bool]", "bool|None", "Union[bool,None]")
        kind: Optional[bool] = None if "action" in kw else is_bool
        names = []
        cli = kw.get("cli_name")
        names.append(cli.value if isinstance(cli, ast.Constant) else "--" + stmt.target.id.replace("_", "-"))
        aliases = kw.get("aliases")
        if isinstance(aliases, (ast.List, ast.Tuple)):
            names += [e.value for e in aliases.elts if isinstance(e, ast.Constant)]
        for n in names:
            out[n] = kind


# ====================================================================== the command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/sglang_contract.py", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--version", default=None, help=f"SGLang version to check (default: the pin, {SGLANG_VERSION})")
    g.add_argument("--wheel", default=None, help="an SGLang wheel file instead of a download")
    p.add_argument("--no-diff", action="store_true", help="do not compare with the pinned version")
    a = p.parse_args(argv)
    try:
        wheel = Path(a.wheel) if a.wheel else download_wheel(a.version or SGLANG_VERSION)
        pin_wheel = None if a.no_diff else download_wheel(SGLANG_VERSION)
    except Exception as e:
        print(f"sglang_contract: error: {e}", file=sys.stderr)
        return 2
    contract = read_contract(wheel)
    v = contract.version
    print(f"SGLang {v} ({wheel})")

    flags = declared_flags(wheel)
    bad_flags = flag_problems(flags)
    problems = check_ours(contract, api)
    print(f"\nflags: {len(flags)} declared; {'OK' if not bad_flags else f'{len(bad_flags)} problem(s)'}")
    for x in bad_flags:
        print(f"  ! {x}")
    print(f"contract: {len(contract.routes)} routes, {len(contract.meta_keys)} meta_info keys; "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    for x in problems:
        print(f"  ! {x}")
    for x in reads_with_fallback(contract, api):
        print(f"  read only when present (fallback tested): {x}")

    if pin_wheel is not None and Path(pin_wheel).resolve() != Path(wheel).resolve():
        pinned = read_contract(pin_wheel)
        used = {pinned.routes[r.path].request for r in api.ROUTES if r.path in pinned.routes}
        used |= {contract.routes[r.path].request for r in api.ROUTES if r.path in contract.routes}
        diff = diff_contracts(pinned, contract, used_structs=used - {None})
        old_flags = declared_flags(pin_wheel)
        added, removed = sorted(set(flags) - set(old_flags)), sorted(set(old_flags) - set(flags))
        kinds = sorted(f for f in set(flags) & set(old_flags) if flags[f] != old_flags[f])
        print(f"\nchanges from the pin {SGLANG_VERSION} to {v}:")
        for line in diff:
            print(f"  {line}")
        print(f"  flags: {len(added)} added, {len(removed)} removed, {len(kinds)} changed kind")
        for f in removed:
            print(f"  - flag {f}")
        for f in kinds:
            print(f"  ~ flag {f}: {'bare' if old_flags[f] else 'value'} -> {'bare' if flags[f] else 'value'}")
        if not diff and not added and not removed and not kinds:
            print("  (none that we can see)")
    return 1 if problems or bad_flags else 0


if __name__ == "__main__":
    sys.exit(main())
