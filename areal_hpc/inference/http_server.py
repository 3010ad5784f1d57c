"""SGLang's HTTP API in front of the embedded `hf` engine (aiohttp).

Same paths, fields and semantics as SGLang's for what our client and trainers use, and for a generic SGLang client where
the engine can (``text`` input with the model's tokenizer, ``stream``, ``sampling_params.n``); `http_validate` refuses
the rest. With an API key every endpoint but the probes (/health*, /ready*) needs ``Authorization: Bearer <key>``. A
bad request gets a 4xx with ``{"error": {"message": ...}}``; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import threading
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from aiohttp import web

from areal_hpc.inference.hf_engine.engine import LLMEngine
from areal_hpc.inference.hf_engine.model_runner import init_custom_process_group, torch_dtype
from areal_hpc.inference.hf_engine.sequence import SamplingParams, Sequence
from areal_hpc.inference.http_validate import (GenerateRequest, RequestError, group_name_of, json_bool, json_int,
                                               json_number, read_generate, read_json, version_of)

log = logging.getLogger(__name__)

_UNLOADED = object()


def error_response(message: str, status: int) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}, "message": message}, status=status)


def _result(ok: bool, message: str, **extra: Any) -> web.Response:
    """SGLang's answer to a control call: ``success`` and ``message``, 400 when it failed."""
    return web.json_response({"success": ok, "message": message, **extra}, status=200 if ok else 400)


class EngineServer:
    """The aiohttp application of one engine. ``info`` goes into /server_info."""

    def __init__(self, engine: LLMEngine, api_key: Optional[str] = None, info: Optional[Dict[str, Any]] = None):
        self.engine, self.runner, self.api_key = engine, engine.runner, api_key or None
        self.model_path = self.served_model_name = self.runner.model_path
        self.info, self.started = dict(info or {}), time.time()
        self.groups: Dict[str, Any] = {}
        self._update_lock = asyncio.Lock()  # one update from disk at a time
        self._rids: set = set()  # the rids clients named of the requests running or waiting
        self._tokenizer: Any = _UNLOADED

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        routes = {
            ("POST", "PUT"): {"/generate": self.generate},
            ("POST",): {"/pause_generation": self.pause_generation,
                        "/continue_generation": self.continue_generation,
                        "/abort_request": self.abort_request,
                        "/update_weight_version": self.update_weight_version,
                        "/update_weights_from_disk": self.update_weights_from_disk,
                        "/init_weights_update_group": self.init_weights_update_group,
                        "/destroy_weights_update_group": self.destroy_weights_update_group,
                        "/update_weights_from_distributed": self.update_weights_from_distributed},
            ("GET", "POST"): {"/flush_cache": self.flush_cache},
            ("GET",): {"/health": self.health, "/ready": self.health, "/health_generate": self.health_generate,
                       "/get_server_info": self.get_server_info, "/server_info": self.get_server_info,
                       "/get_model_info": self.get_model_info, "/model_info": self.get_model_info,
                       "/get_weight_version": self.get_weight_version, "/v1/models": self.models},
        }
        for methods, table in routes.items():
            for path, handler in table.items():
                for method in methods:  # add_get also answers HEAD
                    getattr(app.router, f"add_{method.lower()}")(path, handler)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if self.api_key is not None and not request.path.startswith(("/health", "/ready", "/metrics")):  # as SGLang
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
        except Exception as e:  # a bug must not take the server down (a cancellation is no Exception)
            if request.writer.output_size:  # a stream under way: only aiohttp can break it off (and log it)
                raise
            log.exception("%s %s failed", request.method, request.path)
            return error_response(f"internal error: {type(e).__name__}: {e}", 500)

    # ------------------------------------------------------------------ generation
    async def tokenizer(self, why: str = "") -> Any:
        """The model directory's tokenizer, loaded on first use. When it has none: None, or (``why`` given) a 400
        saying why a tokenizer is needed."""
        if self._tokenizer is _UNLOADED:
            def load():
                from transformers import AutoTokenizer

                try:
                    return AutoTokenizer.from_pretrained(self.runner.model_path)
                except Exception as e:  # no tokenizer files, or unreadable ones
                    log.warning("no tokenizer in %s (%s): text requests will be refused", self.runner.model_path, e)
                    return None

            self._tokenizer = await asyncio.to_thread(load)
        if self._tokenizer is None and why:
            raise RequestError(why)
        return self._tokenizer

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """SGLang's ``/generate`` (what it accepts: `read_generate`). A single prompt with ``n == 1`` answers one
        object, anything else a list (prompt-major, SGLang's order); ``stream`` answers server-sent events of
        cumulative outputs (with ``index`` when there are several), then ``data: [DONE]``."""
        body = await read_json(request)
        req = await read_generate(body, self.tokenizer, self.runner.vocab_size, self.runner.context_length)
        seqs = [Sequence(p, sp, rid=rid) for p, sp, rid in zip(req.prompts, req.params, req.rids)]
        named = {rid for rid in req.rids if rid is not None}  # as SGLang's: one rid a request at a time
        if named & self._rids:  # (else an abort by rid, or one client going away, would end the other's too)
            raise RequestError(f"Duplicate request ID detected: {min(named & self._rids)}")
        self._rids |= named
        try:
            if json_bool(body, "stream"):
                return await self._stream(request, seqs, req)
            await self._complete(seqs)
        finally:
            self._rids -= named
        failed = next((s.finish_reason for s in seqs if (s.finish_reason or {}).get("status_code")), None)
        if failed:  # the engine refused it (not running, input too long) or a step failed
            return error_response(failed.get("message", "error"), int(failed["status_code"]))
        out = [self._render(req, s) for s in seqs]
        return web.json_response(out if req.many else out[0])

    def _render(self, req: GenerateRequest, seq: Sequence, upto: Optional[int] = None) -> Dict[str, Any]:
        out = seq.to_response(self.engine.weight_version, req.return_logprob, upto=upto)
        if req.logprob_tokenizer is not None and req.return_logprob:
            for entry in out["meta_info"]["output_token_logprobs"]:
                entry[2] = req.logprob_tokenizer.decode([entry[1]])
        if req.tokenizer is not None:
            ids = out["output_ids"]
            # as SGLang's text: without the stop token of a "stop" finish (output_ids keep it), in a chunk streamed
            # between its sampling and the end of its step too (a stop token is always the last: it ends the sequence)
            ends = ids and self.engine.ends(seq.params, ids[-1], len(ids), len(seq.prompt_ids) + len(ids))
            if not req.keep_stop and ends and ends["type"] == "stop":
                ids = ids[:-1]
            out = {"text": req.tokenizer.decode(ids, skip_special_tokens=req.skip_special), **out}
        if req.prompt_ids:
            out["prompt_token_ids"] = list(seq.prompt_ids)
        return out

    async def _complete(self, seqs: List[Sequence], timeout: Optional[float] = None) -> None:
        """Run ``seqs`` to their end; abort them when the client goes away (the handler is cancelled) or time runs
        out."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        finished = itertools.count(1)  # next() is atomic: finishes may come from more than one thread

        def on_finish(_seq: Sequence) -> None:  # one wake-up of the loop per request, not per sequence
            if next(finished) == len(seqs):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
        for seq in seqs:
            seq.on_finish = on_finish
            self.engine.submit(seq)
        try:
            await asyncio.wait_for(done, timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            self._abort_unfinished(seqs)
            raise

    def _abort_unfinished(self, seqs: List[Sequence]) -> None:
        for seq in seqs:
            if not seq.finished:
                self.engine.abort(seq.rid)

    async def _stream(self, request: web.Request, seqs: List[Sequence], req: GenerateRequest) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        counts = [0] * len(seqs)  # tokens each sequence had at its last append we heard of
        sent = [0] * len(seqs)  # tokens in its last chunk (0: none sent yet)
        pending = set(range(len(seqs)))

        def heard(i: int, n: int) -> None:
            counts[i] = max(counts[i], n)
            wake.set()

        for i, seq in enumerate(seqs):
            seq.on_append = lambda s, n, i=i: loop.call_soon_threadsafe(heard, i, n)
            seq.on_finish = lambda s: loop.call_soon_threadsafe(wake.set)
            self.engine.submit(seq)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            while pending:
                await wake.wait()
                wake.clear()
                for i in sorted(pending):
                    seq = seqs[i]
                    if seq.finished:
                        code = (seq.finish_reason or {}).get("status_code")
                        chunk = ({"error": {"message": seq.finish_reason.get("message", "error"), "code": int(code)}}
                                 if code else self._render(req, seq))
                        pending.discard(i)
                    elif counts[i] > sent[i] and (sent[i] == 0 or counts[i] - sent[i] >= req.interval):
                        chunk = self._render(req, seq, upto=counts[i])
                        sent[i] = counts[i]
                    else:
                        continue
                    if req.many:
                        chunk["index"] = i
                    await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except BaseException:  # the client went away, or a chunk failed to render: stop generating for nobody
            self._abort_unfinished(seqs)
            raise
        return resp

    # ------------------------------------------------------------------ control
    async def _on_loop(self, fn) -> Any:
        """Run ``fn`` on the engine thread between two steps."""
        return await asyncio.wrap_future(self.engine.call(fn))

    async def pause_generation(self, request: web.Request) -> web.Response:
        mode = (await read_json(request)).get("mode", "abort") or "abort"
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
        rid, abort_all = body.get("rid"), json_bool(body, "abort_all")
        if not abort_all and not (rid and isinstance(rid, str)):
            raise RequestError(f"give rid (a request's id, a string) or abort_all=true, got rid={json.dumps(rid)[:80]}")
        n = await asyncio.wrap_future(self.engine.abort(None if abort_all else rid))
        return web.json_response({"success": True, "num_aborted": n})

    async def flush_cache(self, request: web.Request) -> web.Response:
        def flush() -> bool:
            if self.engine.scheduler.running:
                return False
            self.runner.release_memory()
            return True

        ok = await self._on_loop(flush)
        return _result(ok, "Cache flushed." if ok else "Cache not flushed: requests are running.")

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        new, abort = version_of(body, "new_version"), json_bool(body, "abort_all_requests")
        if new is None:
            raise RequestError("missing field: new_version")
        await self._on_loop(lambda: self.engine.set_version(new, abort))
        return _result(True, f"Weight version updated to {new}", new_version=new)

    # ------------------------------------------------------------------ weights
    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise RequestError("missing field: model_path")
        version, abort = version_of(body, "weight_version"), json_bool(body, "abort_all_requests")
        async with self._update_lock:
            t0 = time.monotonic()
            try:
                tensors = list((await asyncio.to_thread(self.runner.read_weights, path)).items())
                problems = self.runner.check_weights((n, t.shape) for n, t in tensors)
                if problems:
                    raise ValueError("they do not fit the model: " + "; ".join(problems[:5]))
                res = await asyncio.wrap_future(self.engine.update_weights(tensors, version, abort_all=abort))
            except Exception as e:  # unreadable, not this model's, or a copy that failed part way (`LLMEngine.tear`)
                return _result(False, f"failed to load weights from {path}: {e}", num_paused_requests=0)
            self.model_path = path
        msg = (f"Succeeded to update model weights from {path} ({res['num_tensors']} tensors, "
               f"{time.monotonic() - t0:.2f}s). Weight version {res['weight_version']}.")
        log.info(msg)
        return _result(True, msg, num_paused_requests=res["num_paused_requests"], weight_version=res["weight_version"])

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        port = json_int(body.get("master_port"), "master_port", 1, 65535)
        addr, world_size = body.get("master_address"), json_int(body.get("world_size"), "world_size", 2)
        rank_offset = json_int(body.get("rank_offset"), "rank_offset", 1, world_size - 1)  # rank 0 is the trainer's
        timeout = json_number(body, "timeout", 1800.0, where="")  # seconds; null is the default, as absent
        if not isinstance(addr, str) or not addr or not 0 < timeout < 1e9:
            raise RequestError(f"need a master_address and a timeout in (0, 1e9) seconds, got {addr!r} and {timeout}")
        group = group_name_of(body)
        backend = body.get("backend") or "nccl"
        device = self.runner.device
        if backend == "nccl" and device.type != "cuda":
            raise RequestError("backend nccl needs a CUDA device; this server runs on CPU (use gloo)")
        # A server takes weights from its run's one trainer, which forms its group anew (under a new name) when it
        # restarts or its servers change: the groups before are dead, and with NCCL each keeps its communicator's memory
        stale, self.groups = list(self.groups.values()), {}

        def init() -> None:  # the group is kept here, not by the handler: a cancelled handler would leak it
            if device.type == "cuda":
                torch.cuda.set_device(device)
            self.groups[group] = init_custom_process_group(backend, f"tcp://{addr}:{port}", world_size, rank_offset,
                                                           group, timeout)

        async def replace() -> None:
            for old in stale:
                with contextlib.suppress(Exception):
                    await self._destroy(old)
            await asyncio.to_thread(init)

        try:  # shielded: a client gone mid-way must not leave old groups undestroyed (leaked), nor the new one unjoined
            await asyncio.shield(replace())
        except Exception as e:
            return _result(False, f"failed to init group {group}: {e}")
        return _result(True, f"Initialized weight update group {group} (rank {rank_offset} of {world_size})")

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        group = group_name_of(await read_json(request))
        pg = self.groups.pop(group, None)
        if pg is None:
            return _result(False, f"no group {group}")
        await self._destroy(pg)
        return _result(True, f"destroyed {group}")

    async def _destroy(self, pg: Any) -> None:
        """On the engine thread, after the broadcasts queued there (destroyed under one, an NCCL group aborts it part
        way and tears the model), as SGLang's scheduler runs these requests in order."""
        await self._on_loop(lambda: dist.destroy_process_group(pg))

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        group = group_name_of(body)
        pg = self.groups.get(group)
        if pg is None:
            raise RequestError(f"weight update group {group!r} is not initialized (/init_weights_update_group)")
        names, dtypes, shapes = lists = [body.get(k) for k in ("names", "dtypes", "shapes")]
        if not (all(isinstance(x, list) for x in lists) and len(names) == len(dtypes) == len(shapes)
                and all(isinstance(n, str) for n in names) and all(isinstance(s, list) for s in shapes)):
            raise RequestError("names (strings), dtypes and shapes (lists of integers) must be lists of equal length")
        try:
            specs = [(n, torch_dtype(d), tuple(json_int(x, "shapes") for x in s))
                     for n, d, s in zip(names, dtypes, shapes)]
        except ValueError as e:  # an unknown dtype
            raise RequestError(str(e)) from None
        version, abort = version_of(body, "weight_version"), json_bool(body, "abort_all_requests")
        # Tensors the model has not (in that shape) are received all the same, into scratch memory, then refused (SGLang
        # too receives before it loads): kept out of the broadcast, the server left the trainer in it until its timeout
        problems = self.runner.check_weights(((n, s) for n, _, s in specs), whole=False)
        gone = threading.Event()  # the trainer's request was cancelled (it went away): no more data will come

        def receive() -> None:
            try:
                self.runner.load_broadcast(specs, pg, gone.is_set, discard=bool(problems))
            except Exception as e:  # its communicator is broken: later updates need a new group
                self.groups.pop(group, None)
                with contextlib.suppress(Exception):
                    dist.distributed_c10d._abort_process_group(pg)
                why = f"a weight broadcast in group {group} failed: {e}"
                log.error("%s; group %s is dropped", why if problems else self.engine.tear(why), group)
                raise
            if not problems:
                self.engine.renew((name, shape) for name, _, shape in specs)
                self.engine.set_version(version, abort)

        try:
            await self._on_loop(receive)
        except asyncio.CancelledError:
            gone.set()
            raise
        except Exception as e:
            return _result(False, f"broadcast failed: {e}")
        if problems:
            return _result(False, f"received and dropped {len(specs)} tensors that do not fit the model: "
                                  f"{'; '.join(problems[:5])}")
        return _result(True, f"Updated {len(specs)} tensors; weight version {self.engine.weight_version}")

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
        probe = Sequence([0], SamplingParams(max_new_tokens=1, temperature=0.0))
        steps = self.engine.stats["decode_steps"]
        waiter = asyncio.ensure_future(self._complete([probe], 20.0))
        while not waiter.done():  # as SGLang's: others' steps while the probe waits for a batch slot are health (busy)
            await asyncio.wait([waiter], timeout=0.02)
            if probe.slot < 0 and not probe.finished and self.engine.stats["decode_steps"] > steps:
                waiter.cancel()  # aborts the probe
                await asyncio.gather(waiter, return_exceptions=True)
                return web.json_response({"status": "ok"})
        if isinstance(waiter.exception(), asyncio.TimeoutError):
            return error_response("health generation timed out", 503)
        if probe.finish_reason.get("status_code"):  # the step failed (an abort by a pause is no failure)
            return error_response(f"health generation failed: {probe.finish_reason.get('message')}", 503)
        return web.json_response({"status": "ok"})

    async def get_server_info(self, request: web.Request) -> web.Response:
        r = self.runner
        return web.json_response({
            **self.info, "backend": "hf", "model_path": self.model_path, "context_length": r.context_length,
            "max_running_requests": r.max_running, "device": str(r.device),
            "dtype": str(r.dtype).replace("torch.", ""), "cuda_graph": r.cuda_graphs,
            "decode_mode": r.decode_mode, "weight_version": self.engine.weight_version,
            "startup_time": self.started, "internal_states": [self.engine.snapshot()], "version": "areal-hpc-hf"})

    async def get_model_info(self, request: web.Request) -> web.Response:
        r = self.runner
        return web.json_response({
            "model_path": self.model_path, "served_model_name": self.served_model_name,
            "tokenizer_path": r.model_path, "is_generation": True,
            "weight_version": self.engine.weight_version,
            "model_type": getattr(r.config, "model_type", None),
            "architectures": getattr(r.config, "architectures", None), "vocab_size": r.vocab_size,
            "eos_token_ids": list(r.eos_token_ids)})

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.engine.weight_version})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": int(self.started),
            "owned_by": "areal-hpc", "root": self.served_model_name,
            "max_model_len": self.runner.context_length}]})

