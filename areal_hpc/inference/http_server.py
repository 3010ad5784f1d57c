"""SGLang's HTTP API in front of the embedded `hf` engine (aiohttp).

Same paths, field names and semantics as SGLang's ``http_server.py`` for everything our client
and trainers use (see docs of `areal_hpc.inference`), and for a generic SGLang client where the
engine can: ``text`` input (when the model directory has a tokenizer), ``stream``, and
``sampling_params.n``. A field SGLang accepts that this engine does not implement is refused
with a 400 naming it (`FIELD_POLICIES`), never silently ignored; the contract test checks this
against SGLang's own request structs. Every endpoint requires ``Authorization: Bearer <api
key>`` when a key is set. Malformed requests get a 4xx with ``{"error": {"message": ...}}``;
nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

from aiohttp import web

from areal_hpc.inference.hf_engine.engine import LLMEngine, next_version
from areal_hpc.inference.hf_engine.model_runner import read_checkpoint
from areal_hpc.inference.hf_engine.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)

DEFAULT_GROUP = "weight_update_group"


class RequestError(Exception):
    """A client mistake: becomes a 4xx response with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error_response(message: str, status: int) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}, "message": message},
                             status=status)


async def read_json(request: web.Request) -> Dict[str, Any]:
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


def _torch_dtype(name: str):
    import torch

    n = str(name).replace("torch.", "")
    dt = getattr(torch, n, None)
    if not isinstance(dt, torch.dtype):
        raise RequestError(f"unknown dtype {name!r}")
    return dt


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout_s: float = 1800.0):
    """A process group that is not the default one, as SGLang's server builds it for weight
    updates (trainer and servers must agree: ``PrefixStore(group_name, store)``, same name)."""
    import inspect
    from datetime import timedelta

    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    params = inspect.signature(_new_process_group_helper).parameters
    opts_key = "backend_options" if "backend_options" in params else "pg_options"  # renamed in torch 2.6
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      timeout=timeout, **{opts_key: None})
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class EngineServer:
    """The aiohttp application of one engine. ``info`` goes into /get_server_info."""

    def __init__(self, engine: LLMEngine, api_key: Optional[str] = None, served_model_name: str = "",
                 info: Optional[Dict[str, Any]] = None):
        self.engine = engine
        self.runner = engine.runner
        self.api_key = api_key or None
        self.model_path = self.runner.model_path
        self.served_model_name = served_model_name or self.model_path
        self.info = dict(info or {})
        self.started = time.time()
        self.groups: Dict[str, Any] = {}
        self._update_lock: Optional[asyncio.Lock] = None
        self._tokenizer: Any = _UNLOADED

    # ------------------------------------------------------------------ app
    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        r = app.router
        r.add_post("/generate", self.generate)
        r.add_put("/generate", self.generate)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_post("/init_weights_update_group", self.init_weights_update_group)
        r.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)
        r.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        r.add_post("/update_weight_version", self.update_weight_version)
        for path in ("/flush_cache",):
            r.add_get(path, self.flush_cache)
            r.add_post(path, self.flush_cache)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        r.add_get("/ready", self.health)
        for path in ("/get_server_info", "/server_info"):
            r.add_get(path, self.get_server_info)
        for path in ("/get_model_info", "/model_info"):
            r.add_get(path, self.get_model_info)
        r.add_get("/get_weight_version", self.get_weight_version)
        r.add_get("/v1/models", self.models)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if self.api_key is not None:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
                return error_response("missing or wrong API key (Authorization: Bearer <key>)", 401)
        try:
            return await handler(request)
        except RequestError as e:
            return error_response(str(e), e.status)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(f"{e.reason}: {request.method} {request.path}", e.status)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not take the server down
            log.exception("%s %s failed", request.method, request.path)
            return error_response(f"internal error: {type(e).__name__}: {e}", 500)

    # ------------------------------------------------------------------ generation
    def _prompt(self, ids: Any) -> List[int]:
        if not isinstance(ids, list) or not ids:
            raise RequestError("input_ids must be a non-empty list of token ids")
        vocab = self.runner.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise RequestError(f"input_ids must be integers, got {t!r}")
            if not 0 <= t < vocab:
                raise RequestError(f"token id {t} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.runner.context_length:
            raise RequestError(f"the input ({len(ids)} tokens) is longer than the model's context length "
                               f"({self.runner.context_length} tokens)")
        return ids

    async def tokenizer(self):
        """The model directory's tokenizer, loaded on first use; None when it has none."""
        if self._tokenizer is _UNLOADED:
            def load():
                from transformers import AutoTokenizer

                try:
                    return AutoTokenizer.from_pretrained(self.runner.model_path)
                except Exception as e:  # no tokenizer files, or unreadable ones
                    log.warning("no tokenizer in %s (%s): text requests will be refused", self.runner.model_path, e)
                    return None

            self._tokenizer = await asyncio.to_thread(load)
        return self._tokenizer

    async def _inputs(self, body: Dict[str, Any]) -> tuple[List[List[int]], bool, Any]:
        """(prompts, batch?, tokenizer or None) from ``input_ids`` or ``text``."""
        has_ids, has_text = body.get("input_ids") is not None, body.get("text") is not None
        if has_ids and has_text:
            raise RequestError("give either text or input_ids, not both")
        if not has_ids and not has_text:
            raise RequestError("missing field: input_ids (or text)")
        tok = None
        if has_text:
            tok = await self.tokenizer()
            if tok is None:
                raise RequestError("this server's model has no tokenizer: send input_ids")
            text = body["text"]
            batch = isinstance(text, list)
            texts = text if batch else [text]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise RequestError("text must be a string or a non-empty list of strings")
            return [tok.encode(t) for t in texts], batch, tok
        ids = body["input_ids"]
        batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        return (ids if batch else [ids]), batch, tok

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """SGLang's ``/generate``: ``input_ids`` or ``text`` (one or a batch), ``sampling_params``
        (one or one per prompt, ``n`` samples of each), ``return_logprob``, ``stream``. A single
        prompt with ``n == 1`` answers one object, anything else a list (prompt-major, SGLang's
        order); ``stream`` answers server-sent events of cumulative outputs (with ``index`` when
        there are several), then ``data: [DONE]``. Text requests get ``text`` in their responses."""
        body = await read_json(request)
        prompts, batch, tok = await self._inputs(body)
        sps = body.get("sampling_params")
        rids = body.get("rid")
        if batch:
            sps = sps if isinstance(sps, list) else [sps] * len(prompts)
            rids = rids if isinstance(rids, list) else [None] * len(prompts)
            if len(sps) != len(prompts) or len(rids) != len(prompts):
                raise RequestError("sampling_params and rid lists must match the inputs in length")
        else:
            if isinstance(sps, list):
                raise RequestError("sampling_params must be an object for a single prompt")
            sps, rids = [sps], [rids]
        for rid in rids:
            if rid is not None and not isinstance(rid, str):
                raise RequestError("rid must be a string")
        return_logprob = body.get("return_logprob", False)
        if isinstance(return_logprob, list):
            return_logprob = any(return_logprob)
        params, n, interval, skip_special = [], None, 1, True
        for sp in sps:
            sp = dict(sp) if isinstance(sp, dict) else sp
            if isinstance(sp, dict):
                k = _positive_int(sp.pop("n", None), "n")
                if n is not None and k != n:
                    raise RequestError("sampling_params.n must be the same for every prompt")
                n = k
                interval = _positive_int(sp.pop("stream_interval", None), "stream_interval")
                skip_special = sp.get("skip_special_tokens", True) is not False
            try:
                params.append(SamplingParams.from_request(sp))
            except ValueError as e:
                raise RequestError(str(e)) from None
        n = n or 1
        if body.get("return_text_in_logprobs") and tok is None:
            tok = await self.tokenizer()
            if tok is None:
                raise RequestError("return_text_in_logprobs needs a tokenizer; this server's model has none")
        prompts = [self._prompt(p) for p in prompts]
        if n > 1:  # parallel samples: fresh request ids, as SGLang regenerates them
            prompts = [p for p in prompts for _ in range(n)]
            params = [sp for sp in params for _ in range(n)]
            rids = [None] * len(prompts)
        many = batch or n > 1
        shape = _Shape(tok if body.get("text") is not None else None, skip_special, bool(return_logprob),
                       tok if body.get("return_text_in_logprobs") else None,
                       bool(body.get("return_prompt_token_ids")))
        seqs = [Sequence(p, sp, rid=rid) for p, sp, rid in zip(prompts, params, rids)]
        if body.get("stream"):
            return await self._stream(request, seqs, many, shape, interval)
        loop = asyncio.get_running_loop()
        futs: List[asyncio.Future] = []
        for seq in seqs:
            fut = loop.create_future()
            seq.on_finish = lambda s, fut=fut: loop.call_soon_threadsafe(_resolve, fut, s)
            futs.append(fut)
        for seq in seqs:
            self.engine.submit(seq)
        try:
            await asyncio.gather(*futs)
        except asyncio.CancelledError:  # the client went away: stop spending compute on it
            self._abort_unfinished(seqs)
            raise
        for s in seqs:
            code = (s.finish_reason or {}).get("status_code")
            if code:
                return error_response(s.finish_reason.get("message", "error"), int(code))
        out = [shape.render(s, self.engine.weight_version) for s in seqs]
        return web.json_response(out if many else out[0])

    def _abort_unfinished(self, seqs: List[Sequence]) -> None:
        for seq in seqs:
            if not seq.finished:
                self.engine.abort(seq.rid)

    async def _stream(self, request: web.Request, seqs: List[Sequence], many: bool, shape: "_Shape",
                      interval: int) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        counts = [0] * len(seqs)  # tokens each sequence had at its last append we heard of
        sent = [-1] * len(seqs)
        done = [False] * len(seqs)

        def heard(i: int, n: int) -> None:
            counts[i] = max(counts[i], n)
            wake.set()

        for i, seq in enumerate(seqs):
            seq.on_append = lambda s, n, i=i: loop.call_soon_threadsafe(heard, i, n)
            seq.on_finish = lambda s: loop.call_soon_threadsafe(wake.set)
        for seq in seqs:
            self.engine.submit(seq)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            while not all(done):
                await wake.wait()
                wake.clear()
                for i, seq in enumerate(seqs):
                    if done[i]:
                        continue
                    if seq.finished:
                        code = (seq.finish_reason or {}).get("status_code")
                        chunk = ({"error": {"message": seq.finish_reason.get("message", "error"), "code": int(code)}}
                                 if code else shape.render(seq, self.engine.weight_version))
                        done[i] = True
                    elif counts[i] - max(sent[i], 0) >= interval or (sent[i] < 0 and counts[i] > 0):
                        chunk = shape.render(seq, self.engine.weight_version, upto=counts[i])
                        sent[i] = counts[i]
                    else:
                        continue
                    if many:
                        chunk["index"] = i
                    await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self._abort_unfinished(seqs)
            raise
        return resp

    # ------------------------------------------------------------------ control
    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        mode = body.get("mode", "abort") or "abort"
        try:
            fut = self.engine.pause(mode)
        except ValueError as e:
            raise RequestError(str(e)) from None
        n = await asyncio.wrap_future(fut)
        log.info("generation paused (mode %s): %d running request(s) %s", mode, n,
                 "aborted" if mode == "abort" else "held")
        return web.json_response({"message": "Generation paused successfully.", "status": "ok",
                                  "num_paused_requests": n})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await read_json(request)
        await asyncio.wrap_future(self.engine.resume())
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        rid = body.get("rid")
        abort_all = bool(body.get("abort_all", False))
        if not abort_all and not rid:
            raise RequestError("give rid or abort_all=true")
        n = await asyncio.wrap_future(self.engine.abort(None if abort_all else str(rid)))
        return web.json_response({"success": True, "num_aborted": n})

    async def flush_cache(self, request: web.Request) -> web.Response:
        def flush() -> bool:
            if self.engine.scheduler.running:
                return False
            self.runner.release_memory()
            return True

        ok = await asyncio.wrap_future(self.engine.call(flush))
        msg = "Cache flushed." if ok else "Cache not flushed: requests are running."
        return web.json_response({"success": ok, "message": msg}, status=200 if ok else 400)

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if "new_version" not in body:
            raise RequestError("missing field: new_version")
        new = str(body["new_version"])

        def set_version() -> None:
            if body.get("abort_all_requests"):
                self.engine._abort(None, "aborted for a weight version update")
            self.engine.weight_version = new

        await asyncio.wrap_future(self.engine.call(set_version))
        return web.json_response({"success": True, "message": f"Weight version updated to {new}",
                                  "new_version": new})

    # ------------------------------------------------------------------ weights
    def _lock(self) -> asyncio.Lock:
        if self._update_lock is None:
            self._update_lock = asyncio.Lock()
        return self._update_lock

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise RequestError("missing field: model_path")
        version = body.get("weight_version")
        async with self._lock():
            t0 = time.monotonic()
            try:
                tensors = await asyncio.to_thread(read_checkpoint, path)
            except Exception as e:
                return web.json_response({"success": False, "num_paused_requests": 0,
                                          "message": f"failed to read weights from {path}: {e}"}, status=400)
            problems = self.runner.check_weights((n, t.shape) for n, t in tensors.items())
            if problems:
                return web.json_response({"success": False, "num_paused_requests": 0,
                                          "message": f"weights in {path} do not fit the model: "
                                                     + "; ".join(problems[:5])}, status=400)
            res = await asyncio.wrap_future(self.engine.update_weights(
                list(tensors.items()), None if version is None else str(version),
                abort_all=bool(body.get("abort_all_requests", False))))
            self.model_path = path
        msg = (f"Succeeded to update model weights from {path} ({res['num_tensors']} tensors, "
               f"{time.monotonic() - t0:.2f}s). Weight version updated to {res['weight_version']}.")
        log.info(msg)
        return web.json_response({"success": True, "message": msg,
                                  "num_paused_requests": res["num_paused_requests"],
                                  "weight_version": res["weight_version"]})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        try:
            addr, port = body["master_address"], int(body["master_port"])
            rank_offset, world_size = int(body["rank_offset"]), int(body["world_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise RequestError(f"need master_address, master_port, rank_offset, world_size ({e})") from None
        group = body.get("group_name") or DEFAULT_GROUP
        backend = body.get("backend") or "nccl"
        if backend == "nccl" and self.runner.device.type != "cuda":
            raise RequestError("backend nccl needs a CUDA device; this server runs on CPU (use gloo)")
        import torch.distributed as dist

        old = self.groups.pop(group, None)
        if old is not None:  # a restarted trainer re-joins: start over instead of refusing
            try:
                dist.destroy_process_group(old)
            except Exception:
                pass
        device = self.runner.device

        def init():
            if device.type == "cuda":
                import torch

                torch.cuda.set_device(device)
            return init_custom_process_group(backend, f"tcp://{addr}:{port}", world_size, rank_offset, group,
                                             float(body.get("timeout", 1800)))

        try:
            self.groups[group] = await asyncio.to_thread(init)
        except Exception as e:
            return web.json_response({"success": False, "message": f"failed to init group {group}: {e}"},
                                     status=400)
        return web.json_response({"success": True, "message": f"Initialized weight update group {group} "
                                                              f"(rank {rank_offset} of {world_size})"})

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        group = body.get("group_name") or DEFAULT_GROUP
        pg = self.groups.pop(group, None)
        if pg is None:
            return web.json_response({"success": False, "message": f"no group {group}"}, status=400)
        import torch.distributed as dist

        await asyncio.to_thread(dist.destroy_process_group, pg)
        return web.json_response({"success": True, "message": f"destroyed {group}"})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        group = body.get("group_name") or DEFAULT_GROUP
        pg = self.groups.get(group)
        if pg is None:
            raise RequestError(f"weight update group {group!r} is not initialized (/init_weights_update_group)")
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                and len(names) == len(dtypes) == len(shapes)):
            raise RequestError("names, dtypes and shapes must be lists of equal length")
        specs = [(n, _torch_dtype(d), tuple(int(x) for x in s)) for n, d, s in zip(names, dtypes, shapes)]
        problems = [p for p in self.runner.check_weights((n, s) for n, _, s in specs) if "missing" not in p]
        if problems:
            raise RequestError("; ".join(problems[:5]))
        version = body.get("weight_version")
        engine, runner = self.engine, self.runner

        def receive() -> int:
            import torch
            import torch.distributed as dist

            with torch.inference_mode():
                for name, dtype, shape in specs:
                    param = runner.param(name)
                    direct = param.dtype == dtype and param.is_contiguous()
                    buf = param.data if direct else torch.empty(shape, dtype=dtype, device=runner.device)
                    dist.broadcast(buf, src=0, group=pg)
                    if not direct:
                        param.copy_(buf)
            if body.get("abort_all_requests"):
                engine._abort(None, "aborted for a weight update")
            engine.weight_version = str(version) if version is not None else next_version(engine.weight_version)
            return len(specs)

        try:
            n = await asyncio.wrap_future(engine.call(receive))
        except Exception as e:
            return web.json_response({"success": False, "message": f"broadcast failed: {e}"}, status=400)
        return web.json_response({"success": True, "message": f"Updated {n} tensors; weight version "
                                                              f"{engine.weight_version}"})

    # ------------------------------------------------------------------ info
    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.alive:
            return error_response("engine is not running", 503)
        return web.json_response({"status": "ok"})

    async def health_generate(self, request: web.Request) -> web.Response:
        if not self.engine.alive:
            return error_response("engine is not running", 503)
        if self.engine.paused:
            return web.json_response({"status": "ok", "paused": True})
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        seq = Sequence([0], SamplingParams(max_new_tokens=1, temperature=0.0),
                       on_finish=lambda s: loop.call_soon_threadsafe(_resolve, fut, s))
        self.engine.submit(seq)
        try:
            await asyncio.wait_for(fut, 20.0)
        except asyncio.TimeoutError:
            self.engine.abort(seq.rid)
            return error_response("health generation timed out", 503)
        return web.json_response({"status": "ok"})

    async def get_server_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            **self.info,
            "backend": "hf",
            "model_path": self.model_path,
            "context_length": self.runner.context_length,
            "max_running_requests": self.runner.max_running,
            "device": str(self.runner.device),
            "dtype": str(self.runner.dtype).replace("torch.", ""),
            "cuda_graph": self.runner.cuda_graphs,
            "decode_mode": self.runner.decode_mode,
            "weight_version": self.engine.weight_version,
            "startup_time": self.started,
            "internal_states": [self.engine.snapshot()],
            "version": "areal-hpc-hf",
        })

    async def get_model_info(self, request: web.Request) -> web.Response:
        cfg = self.runner.config
        return web.json_response({
            "model_path": self.model_path,
            "served_model_name": self.served_model_name,
            "tokenizer_path": self.runner.model_path,
            "is_generation": True,
            "weight_version": self.engine.weight_version,
            "model_type": getattr(cfg, "model_type", None),
            "architectures": getattr(cfg, "architectures", None),
            "vocab_size": self.runner.vocab_size,
            "eos_token_ids": list(self.runner.eos_token_ids),
        })

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.engine.weight_version})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": int(self.started),
            "owned_by": "areal-hpc", "root": self.served_model_name,
            "max_model_len": self.runner.context_length}]})


_UNLOADED = object()


class _Shape:
    """How one request's responses look: text (for text requests), logprobs, prompt ids."""

    def __init__(self, tokenizer, skip_special: bool, return_logprob: bool, logprob_tokenizer, prompt_ids: bool):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.return_logprob, self.logprob_tokenizer, self.prompt_ids = return_logprob, logprob_tokenizer, prompt_ids

    def render(self, seq: Sequence, version: str, upto: Optional[int] = None) -> Dict[str, Any]:
        out = seq.to_response(version, self.return_logprob, upto=upto)
        if self.logprob_tokenizer is not None and self.return_logprob:
            for entry in out["meta_info"]["output_token_logprobs"]:
                entry[2] = self.logprob_tokenizer.decode([entry[1]])
        if self.tokenizer is not None:
            out = {"text": self.tokenizer.decode(out["output_ids"], skip_special_tokens=self.skip_special), **out}
        if self.prompt_ids:
            out["prompt_token_ids"] = list(seq.prompt_ids)
        return out


def _positive_int(v: Any, key: str) -> int:
    if v is None:
        return 1
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RequestError(f"sampling_params.{key} must be an integer >= 1, got {v!r}")
    return v


# ---------------------------------------------------------------------- request fields
@dataclasses.dataclass(frozen=True)
class FieldPolicy:
    """What the hf engine does with the JSON fields SGLang accepts on one route.

    ``honoured``: implemented. ``noop``: accepted because they cannot change what this server
    returns (metadata, CUDA-cache hints). Any other field with a value other than a neutral one
    (None, false, "", [], {} or a value listed in ``neutral``) is refused with a 400 naming it:
    a 200 without what was asked for is worse than a clear refusal."""

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


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
