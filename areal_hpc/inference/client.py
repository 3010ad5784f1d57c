"""A pool of inference servers discovered from the run's registry (``servers/*`` in state ready/paused).

Each generation goes to the healthy server with the fewest requests in flight; a connection error, timeout or 5xx marks
that server down for a backoff and the request goes on elsewhere. A generation aborted by a weight update waits until
generation may go on, then re-sends ``prompt + output so far`` with the remaining budget: the caller gets one
`GenerateResult`. Fan-out calls (`pause_all`, ...) go to every server at once, one `CallResult` each, failures included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import aiohttp

from areal_hpc.inference import sglang_api as api

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
MAX_FAILURES = 8  # failed attempts of one generation before it gives up
WAIT_SERVERS_TIMEOUT_S = 600.0  # how long to wait for a healthy server


class PoolError(RuntimeError):
    """No server could complete the request."""


class RequestRejected(PoolError):
    """A server refused the request itself (4xx): retrying elsewhere would not help."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message

    def __reduce__(self):  # rebuilt from the fields: a rollout process's error reaches the trainer intact
        return type(self), (self.status, self.message)


class _Retryable(Exception):
    """A failure another server (or a later try) may not have: connection, timeout, 5xx."""


@dataclasses.dataclass
class GenerateResult:
    output_ids: List[int]
    logprobs: List[float]
    versions: List[Any]  # weight version of each output token
    finish_reason: str  # stop | length | abort
    n_requests: int = 1  # HTTP requests it took (resumptions and retries included)
    server_ids: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CallResult:
    server_id: str
    address: str
    ok: bool
    status: Optional[int] = None
    body: Any = None
    error: Optional[str] = None


@dataclasses.dataclass(eq=False)
class _Server:
    id: str
    address: str
    static: bool = False  # added by hand, not from the registry
    record: Dict[str, Any] = dataclasses.field(default_factory=dict)
    inflight: int = 0
    down_until: float = 0.0
    failures: int = 0
    pushed_version: Any = None  # the last weight version this pool pushed to it
    warned_no_version: bool = False

    def __post_init__(self):
        self.url = api.base_url(self.address)
        # an external server attached with its own key (`add-servers url=... api_key=...`); else the pool's
        key = self.record.get("api_key")
        self.headers = {"Authorization": f"Bearer {key}"} if key else None

    def known_version(self) -> Any:
        """The version we believe it serves: the last one pushed, else its registry record's, else 0."""
        return next((v for v in (self.pushed_version, self.record.get("weight_version")) if v is not None), 0)


async def _all(coros: Iterable[Any]) -> List[Any]:
    """`asyncio.gather`, but one that fails cancels the rest (a failed group's samples do not generate on, unseen)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


class ServerPool:
    disk_load_timeout_s = 900.0  # a weight load's bound (launcher.server_startup_timeout_s bounds a server's first)

    def __init__(self, registry=None, api_key: Optional[str] = None, refresh_s: float = 2.0, *,
                 request_timeout_s: Optional[float] = 3600.0):
        self.registry = registry
        self.api_key = registry.secret() if api_key is None and registry is not None else api_key
        self.refresh_s, self.request_timeout_s = refresh_s, request_timeout_s
        self._servers: Dict[str, _Server] = {}  # in the order they were added
        self._rr = 0
        self._session: Optional[aiohttp.ClientSession] = None
        self._refresher: Optional[asyncio.Task] = None
        self._running: Optional[asyncio.Event] = None  # set = generation may proceed
        self._changed: Optional[asyncio.Event] = None
        self._paused: Dict[str, _Server] = {}  # those `pause_all` paused, until `continue_all`
        self._left: Dict[str, str] = {}  # id -> address of those left paused while out of the pool (lapsed record)
        self._pauses = 0  # `pause_all` calls so far: an abort that spans one was ours
        self.stats = {"requests": 0, "retries": 0, "resumes": 0}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> "ServerPool":
        if self._session is None:
            self._running = asyncio.Event()
            self._running.set()
            self._changed = asyncio.Event()
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300), headers=headers,
                timeout=aiohttp.ClientTimeout(total=None))
            if self.registry is not None:
                await self.refresh()
                self._refresher = asyncio.create_task(self._refresh_loop())
        return self

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "ServerPool":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ membership
    def add_server(self, server_id: str, address: str) -> None:
        """A server that is not in the registry (a refresh never drops it)."""
        self._servers[server_id] = _Server(server_id, address, static=True)
        self._notify_changed()

    def _notify_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    @property
    def servers(self) -> Dict[str, Dict[str, Any]]:
        now = time.monotonic()
        return {s.id: {"address": s.address, "inflight": s.inflight, "healthy": s.down_until <= now,
                       "failures": s.failures, "weight_version": s.known_version(),
                       **{k: s.record.get(k) for k in ("state", "external")}}
                for s in self._servers.values()}

    async def refresh(self) -> None:
        """Re-read the registry: add new servers, drop expired ones, follow address changes."""
        if self.registry is None:
            return
        recs = await asyncio.to_thread(self.registry.list, "servers")
        live = {sid: r for sid, r in recs.items()
                if r.get("address") and r.get("state", "ready") in ("ready", "paused")}
        changed = False
        for sid, rec in live.items():
            cur = self._servers.get(sid)
            if cur is None or cur.address != rec["address"] or cur.record.get("api_key") != rec.get("api_key"):
                self._servers[sid] = _Server(sid, rec["address"], record=rec)
                changed = True
                if self._left.pop(sid, None) == rec["address"]:  # back, still paused: no generations until a continue
                    self._paused[sid] = self._servers[sid]
            else:
                cur.record = rec
        for sid in [s for s, srv in self._servers.items() if s not in live and not srv.static]:
            del self._servers[sid]
            changed = True
        if changed:
            self._notify_changed()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # a flaky shared filesystem must not kill discovery
                log.exception("refreshing the server list failed")

    async def _wait_changed(self, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def wait_for_servers(self, n: int = 1, timeout_s: float = WAIT_SERVERS_TIMEOUT_S) -> None:
        await self.start()
        deadline = time.monotonic() + timeout_s
        while len(self._servers) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolError(f"waited for {n} inference servers, found {len(self._servers)}")
            await self.refresh()
            await self._wait_changed(min(left, self.refresh_s))

    @property
    def paused(self) -> bool:
        return self._running is not None and not self._running.is_set()

    # ------------------------------------------------------------------ routing
    async def _choose(self, avoid: Set[str]) -> _Server:
        """The healthy server with the fewest requests in flight, one in ``avoid`` only when no other is healthy; waits
        (up to ``WAIT_SERVERS_TIMEOUT_S``) while none is."""
        deadline = time.monotonic() + WAIT_SERVERS_TIMEOUT_S
        while True:
            now = time.monotonic()
            order = list(self._servers.values())
            n = len(order)
            self._rr = (self._rr + 1) % max(n, 1)  # rotate the starting point so that ties spread over the servers
            usable = [s for s in order[self._rr:] + order[:self._rr] if self._paused.get(s.id) is not s]
            healthy = [s for s in usable if s.down_until <= now]
            if healthy:
                return min([s for s in healthy if s.id not in avoid] or healthy, key=lambda s: s.inflight)
            if now >= deadline:
                raise PoolError(f"no healthy inference server for {WAIT_SERVERS_TIMEOUT_S:.0f}s "
                                f"({n} known, all failing or left paused)")
            wake = min([s.down_until for s in usable if s.down_until > now] or [now + self.refresh_s]) - now
            await self._wait_changed(max(0.01, min(wake, self.refresh_s)))
            if not order and self.registry is not None:
                await self.refresh()

    def _mark_failed(self, s: _Server, why: str) -> None:
        s.failures += 1
        s.down_until = time.monotonic() + min(10.0, 0.25 * 2 ** min(s.failures, 6))
        self.stats["retries"] += 1
        log.warning("server %s (%s) failed: %s", s.id, s.address, why)

    async def _request(self, s: _Server, method: str, path: str, payload: Optional[dict],
                       timeout_s: Optional[float]) -> Tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=CONNECT_TIMEOUT_S)
        return await api.request_json(self._session, method, s.url + path, payload, s.headers, timeout)

    # ------------------------------------------------------------------ generation
    async def _post_generate(self, server: _Server, payload: Dict[str, Any], samples: int = 1) -> Any:
        """One ``/generate`` round trip (``samples`` answers): the response body. `_Retryable` when another server (or a
        later try) may do better, `RequestRejected` on a 4xx."""
        self.stats["requests"] += 1
        server.inflight += samples
        try:
            status, body = await self._request(server, *api.GENERATE, payload, self.request_timeout_s)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        finally:
            server.inflight -= samples
        if status >= 500 or status in (408, 429) or isinstance(body, str):  # str: not JSON
            raise _Retryable(f"HTTP {status}: {api.error_message(body)}")
        if status >= 400:
            raise RequestRejected(status, api.error_message(body))
        if samples > 1 and not (isinstance(body, list) and len(body) == samples):
            raise _Retryable(f"expected a list of {samples} samples, got {type(body).__name__}")
        server.failures, server.down_until = 0, 0.0
        return body

    async def generate(self, input_ids: Sequence[int], params: Any = None, *, rid: Optional[str] = None,
                       **overrides: Any) -> GenerateResult:
        """One complete generation (resumed across aborts, retried across server failures). ``params``: a
        GenerationConfig, a dict of SGLang sampling params, or None; keyword overrides win. Raises `RequestRejected` on
        a 4xx, `PoolError` when no server could serve it."""
        await self.start()
        res = GenerateResult([], [], [], "length", n_requests=0)
        return await self._continue(list(input_ids), api.sampling_params(params, **overrides), res, set(), rid)

    async def _continue(self, prompt: List[int], sp: Dict[str, Any], res: GenerateResult, avoid: Set[str],
                        rid: Optional[str] = None) -> GenerateResult:
        """Generate until ``res`` (what ``prompt`` has generated so far) is complete: resume after aborts, retry on
        other servers after failures (and after an abort not ours: ``avoid``, the servers to send it elsewhere than)."""
        budget = int(sp["max_new_tokens"])
        failures = empty_aborts = 0
        base_rid = rid or api.new_rid()
        while True:
            remaining = budget - len(res.output_ids)
            if remaining <= 0 and res.n_requests:
                return res
            await self._running.wait()
            server = await self._choose(avoid)
            payload = api.generate_body(prompt + res.output_ids, {**sp, "max_new_tokens": remaining},
                                        rid=f"{base_rid}-{res.n_requests}" if res.n_requests else base_rid)
            res.n_requests += 1
            pauses = self._pauses
            try:
                body = await self._post_generate(server, payload)
                got = api.parse_generate(body, server.known_version())
            except _Retryable as e:
                failures += 1
                self._mark_failed(server, str(e))
                avoid.add(server.id)
                if failures >= MAX_FAILURES:
                    raise PoolError(f"generation failed on {failures} attempts; last: {e}") from e
                continue
            if not got.version_reported and got.output_ids and not server.warned_no_version:
                server.warned_no_version = True
                log.warning("server %s (%s) reports no weight version with its tokens (an older SGLang?); "
                            "using the version last pushed to it (%s)", server.id, server.address,
                            server.known_version())
            if self._absorb(res, got, server) or len(res.output_ids) >= budget:
                return res
            ours = not self._running.is_set() or self._pauses != pauses
            empty_aborts = 0 if got.output_ids or ours else empty_aborts + 1
            if not ours:  # someone else paused the server, it is shutting down, or an older SGLang's request error:
                # back off, to another server if there is one; the same with nothing generated, again and again, fails
                avoid.add(server.id)
                if empty_aborts >= MAX_FAILURES:
                    why = ((body.get("meta_info") or {}).get("finish_reason") or {}).get("message")
                    raise PoolError(f"generation aborted {empty_aborts} times in a row with nothing generated, not by "
                                    f"this pool's pause; last: {why or 'no message'}")
                await asyncio.sleep(min(1.0, 0.02 * 2 ** min(empty_aborts, 6)))

    def _absorb(self, res: GenerateResult, got: api.GenerateOutput, server: _Server) -> bool:
        """Add one response to ``res``; True when it ended the generation (anything but an abort)."""
        res.output_ids += got.output_ids
        res.logprobs += got.logprobs
        res.versions += got.versions
        if got.output_ids:
            res.server_ids.append(server.id)
        if got.finish_reason != "abort":
            res.finish_reason = got.finish_reason
            return True
        self.stats["resumes"] += 1
        return False

    async def generate_group(self, input_ids: Sequence[int], n: int, params: Any = None,
                             **overrides: Any) -> List[GenerateResult]:
        """``n`` samples of one prompt in one request (SGLang's ``sampling_params.n``). A sample cut short by an abort
        is resumed alone, as `generate` resumes; when the request itself fails, every sample goes through `generate`
        (retries, other servers)."""
        if n <= 1:
            return [await self.generate(input_ids, params, **overrides)]
        await self.start()
        sp = api.sampling_params(params, **overrides)
        prompt = list(input_ids)
        await self._running.wait()
        server, pauses = await self._choose(set()), self._pauses
        try:
            body = await self._post_generate(server, api.generate_body(prompt, {**sp, "n": n}), samples=n)
        except _Retryable as e:
            self._mark_failed(server, str(e))
            return await _all(self.generate(prompt, sp) for _ in range(n))

        async def finish(item) -> GenerateResult:
            res = GenerateResult([], [], [], "length")
            done = self._absorb(res, api.parse_generate(item, server.known_version()), server)
            ours = not self._running.is_set() or self._pauses != pauses  # else: resumed elsewhere if it can be
            return res if done else await self._continue(prompt, sp, res, set() if ours else {server.id})

        return await _all(finish(item) for item in body)

    # ------------------------------------------------------------------ fan-out
    async def _call(self, s: _Server, method: str, path: str, payload: Optional[dict],
                    timeout_s: Optional[float]) -> CallResult:
        try:
            status, body = await self._request(s, method, path, payload, timeout_s)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return CallResult(s.id, s.address, False, None, None, f"{type(e).__name__}: {e}")
        ok, err = api.call_outcome(status, body)
        if ok and isinstance(payload, dict) and payload.get("weight_version") is not None and path in (
                api.UPDATE_WEIGHTS_FROM_DISK.path, api.UPDATE_WEIGHTS_FROM_DISTRIBUTED.path):
            s.pushed_version = api.parse_version(payload["weight_version"])
        return CallResult(s.id, s.address, ok, status, body, err)

    async def call_all(self, method: str, path: str, payload: Optional[dict] = None,
                       timeout_s: Optional[float] = 60.0, server_ids: Optional[Iterable[str]] = None
                       ) -> Dict[str, CallResult]:
        """``method path`` on every server, or on ``server_ids`` only (an id the pool does not know gets a failed
        result). Until `continue_all`, also on those `pause_all` paused whose record lapsed since (a late heartbeat):
        they must still be told to continue."""
        await self.start()
        known = {**self._paused, **self._servers}
        wanted = known if server_ids is None else dict.fromkeys(server_ids)
        targets = [known[sid] for sid in wanted if sid in known]
        unknown = [CallResult(sid, "", False, error="not in the pool (its registry record is gone)")
                   for sid in wanted if sid not in known]
        results = await asyncio.gather(*(self._call(s, method, path, payload, timeout_s) for s in targets)) + unknown
        bad = [r for r in results if not r.ok]
        if bad:
            log.warning("%s %s failed on %d of %d servers: %s", method, path, len(bad), len(results),
                        "; ".join(f"{r.server_id}: {r.error}" for r in bad[:4]))
        return {r.server_id: r for r in results}

    async def pause_all(self, mode: str = "abort") -> Dict[str, CallResult]:
        """Hold this pool's new and interrupted generations, then ``/pause_generation`` everywhere (running requests
        come back aborted and wait here for `continue_all`)."""
        await self.start()
        self._running.clear()
        self._pauses += 1
        self._paused.update(self._servers)
        return await self.call_all(*api.PAUSE_GENERATION, api.pause_body(mode))

    async def continue_all(self, tries: int = 3) -> Dict[str, CallResult]:
        """``/continue_generation`` everywhere. A server where it failed (timeout, reset) is asked again, up to
        ``tries`` times: left paused, it would hold every generation routed to it, so it gets none until a later
        `continue_all` reaches it."""
        res = await self.call_all(*api.CONTINUE_GENERATION, api.continue_body())
        for _ in range(tries - 1):
            if again := [sid for sid, r in res.items() if not r.ok]:
                res.update(await self.call_all(*api.CONTINUE_GENERATION, api.continue_body(), server_ids=again))
        failed = {sid: s for sid, s in {**self._paused, **self._servers}.items() if sid in res and not res[sid].ok}
        self._paused = {sid: s for sid, s in failed.items() if sid in self._servers}
        self._left = {**{sid: a for sid, a in self._left.items() if sid not in res},  # (not asked: still unknown)
                      **{sid: s.address for sid, s in failed.items() if sid not in self._servers}}
        if self._paused:
            log.error("/continue_generation failed %d times on %s: left paused, no generations go there until the "
                      "next weight update's continue reaches it", tries, ", ".join(sorted(self._paused)))
        self._running.set()
        self._notify_changed()
        return res

    async def update_weights_from_disk(self, path: str, version: Any, abort_all_requests: bool = False,
                                       timeout_s: Optional[float] = None, server_ids: Optional[Iterable[str]] = None
                                       ) -> Dict[str, CallResult]:
        """``timeout_s`` None: `disk_load_timeout_s`, or ``request_timeout_s`` when shorter (a server on a node that
        froze never answers)."""
        body = api.update_from_disk_body(path, version, abort_all_requests)
        bound = timeout_s or min(self.disk_load_timeout_s, self.request_timeout_s or self.disk_load_timeout_s)
        return await self.call_all(*api.UPDATE_WEIGHTS_FROM_DISK, body, timeout_s=bound, server_ids=server_ids)

    async def init_weights_update_group(self, server_id: str, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int, group_name: str, backend: str = "nccl",
                                        timeout_s: Optional[float] = 600.0) -> Dict[str, CallResult]:
        """One server joins the trainer's weight-update group as rank ``rank_offset`` (hf: for ``timeout_s``)."""
        hf = getattr(self._servers.get(server_id), "record", {}).get("backend") == "hf"
        body = api.init_group_body(master_address, master_port, rank_offset, world_size, group_name, backend,
                                   timeout_s if hf else None)
        return await self.call_all(*api.INIT_WEIGHTS_UPDATE_GROUP, body, timeout_s=timeout_s, server_ids=[server_id])

    async def update_weights_from_distributed(self, names: List[str], dtypes: List[str], shapes: List[List[int]],
                                              group_name: str, version: Any, server_ids: Iterable[str],
                                              timeout_s: Optional[float] = 600.0) -> Dict[str, CallResult]:
        """Announce one bucket of tensors that the trainer is about to broadcast in this order."""
        body = api.update_from_distributed_body(names, dtypes, shapes, group_name, version)
        return await self.call_all(*api.UPDATE_WEIGHTS_FROM_DISTRIBUTED, body, timeout_s=timeout_s,
                                   server_ids=server_ids)
