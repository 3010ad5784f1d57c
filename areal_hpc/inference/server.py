"""``areal-hpc serve``: the lifecycle of one inference server.

start the backend (the embedded `hf` engine in this process, or an SGLang subprocess) -> wait for health -> load the
run's newest published weights (``weights/latest``) -> register ``servers/<id>`` and heartbeat it -> serve until
SIGTERM/SIGINT -> deregister, abort running requests (clients resume them elsewhere), stop. Every endpoint needs the
run's key (`Registry.secret`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import aiohttp

from areal_hpc.config.schema import LauncherConfig, ServerConfig
from areal_hpc.inference import sglang_api as api
from areal_hpc.inference.sglang_api import parse_version, request_json
from areal_hpc.registry import Heartbeat, Registry, free_port

log = logging.getLogger("areal_hpc.inference.server")

BACKENDS = ("hf", "sglang")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_STOPPED = object()


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """``asyncio.to_thread`` in a daemon thread: a model load under way does not hold up a signalled server's exit
    (``asyncio.run``, and then the interpreter, wait for the default executor's threads)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def work() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:
            fut.set_exception(e)
    threading.Thread(target=work, name="hf-load", daemon=True).start()
    return await asyncio.wrap_future(fut)


def _bindable(host: str, port: int) -> bool:
    """Whether ``port`` is free on ``host`` now (as SGLang binds it: address reuse on)."""
    v6 = ":" in host
    try:
        socket.create_server((host, port), family=socket.AF_INET6 if v6 else socket.AF_INET, dualstack_ipv6=v6).close()
        return True
    except OSError:
        return False


def _host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets (``[::1]:30000``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ServerLifecycle:
    def __init__(self, run_dir: Path, cfg: ServerConfig, model_path: str, launcher: LauncherConfig,
                 server_id: str, backend: str = "hf", gpus: Optional[Sequence[int]] = None, *,
                 tp_size: Optional[int] = None, pp_size: int = 1, nnodes: int = 1, node_rank: int = 0,
                 dist_init_addr: Optional[str] = None, **extra: Any):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.run_dir = Path(run_dir)
        self.cfg, self.model_path, self.launcher = cfg, model_path or cfg.model_path, launcher
        self.server_id, self.backend = server_id, backend
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        self.gpus = [int(g) for g in gpus] if gpus else [int(x) for x in cvd if x.strip().isdigit()]
        all_gpus = max(1, len(self.gpus)) * max(1, nnodes)  # sglang: tp * pp of them, hf: one
        self.tp_size = int(tp_size or (max(1, all_gpus // pp_size) if backend == "sglang" else 1))
        self.pp_size, self.nnodes, self.node_rank, self.dist_init_addr = pp_size, nnodes, node_rank, dist_init_addr
        if backend == "hf" and (self.tp_size > 1 or pp_size > 1 or nnodes > 1):
            raise ValueError(f"the hf backend runs one device per server (asked tp={self.tp_size}, pp={pp_size}, "
                             f"nnodes={nnodes}); use backend sglang for tensor or pipeline parallelism")
        self.extra = extra  # more fields of the registry record
        self.registry = Registry.for_run(self.run_dir, launcher)
        self.api_key = self.registry.secret()
        self.bind_host = cfg.host or "0.0.0.0"
        self.advertise_host = cfg.host if cfg.host not in ("", "0.0.0.0", "::") else socket.gethostname()
        self.port, self.state = 0, "starting"
        self.weight_version: Any = 0
        self.started_at = time.time()
        self.heartbeat: Optional[Heartbeat] = None
        self._stop: Optional[asyncio.Event] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self.engine = self._app_runner = None  # hf backend: the engine and its aiohttp runner
        self._sglang = None  # sglang backend: its process

    # ------------------------------------------------------------------ record
    @property
    def address(self) -> str:
        return _host_port(self.advertise_host, self.port)

    def record(self) -> Dict[str, Any]:
        if self.engine is not None:
            self.weight_version = parse_version(self.engine.weight_version)
            if self.state in ("ready", "paused"):
                self.state = "paused" if self.engine.paused else "ready"
        return {
            "address": self.address, "host": self.advertise_host, "port": self.port,
            "backend": self.backend, "gpus": self.gpus, "tp_size": self.tp_size,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_step_id": os.environ.get("SLURM_STEP_ID"),
            "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "pid": os.getpid(),
            "weight_version": self.weight_version,
            "state": self.state, "model_path": self.model_path, "started_at": self.started_at,
            **self.extra,
        }

    # ------------------------------------------------------------------ HTTP to our own backend
    async def _request(self, method: str, path: str, payload: Optional[dict] = None,
                       timeout: Optional[float] = 10.0) -> tuple[int, Any]:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.bind_host, self.bind_host)
        return await request_json(self._session, method, f"http://{_host_port(host, self.port)}{path}", payload,
                                  timeout=aiohttp.ClientTimeout(total=timeout))

    async def _wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if not self._backend_alive():
                return False
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                if (await self._request(*api.HEALTH, timeout=5.0))[0] == 200:
                    return True
            await self._unless_stopped(asyncio.sleep(0.5))
        return False

    async def _unless_stopped(self, aw) -> Any:
        """The result of ``aw``; `_STOPPED` (``aw`` cancelled) when asked to stop first."""
        task, stop = asyncio.ensure_future(aw), asyncio.ensure_future(self._stop.wait())
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            task.cancel()
            return _STOPPED
        return task.result()

    async def _load_latest(self, only_if_newer: bool) -> bool:
        """Load ``weights/latest`` if the run has published any, within the startup timeout. False on a failed load,
        and when asked to stop meanwhile."""
        for attempt in range(3):
            await self._unless_stopped(asyncio.sleep(1.0 * attempt))  # back off between attempts (not before the first)
            latest = await asyncio.to_thread(self.registry.get, "weights", "latest", False)
            if not latest or "path" not in latest:
                return True
            version = latest.get("version")
            cur = self.weight_version
            if only_if_newer and isinstance(cur, int) and isinstance(version, int) and version <= cur:
                return True
            try:
                res = await self._unless_stopped(self._request(
                    *api.UPDATE_WEIGHTS_FROM_DISK, api.update_from_disk_body(latest["path"], version),
                    timeout=self.launcher.server_startup_timeout_s))
            except asyncio.TimeoutError:
                log.error("loading published weights v%s took over %.0fs", version,
                          self.launcher.server_startup_timeout_s)
                return False
            except aiohttp.ClientError as e:  # refused or dropped: the backend died or restarts (SGLang while loading)
                res = (0, f"{type(e).__name__}: {e}")
            if res is _STOPPED:
                return False
            ok, msg = api.call_outcome(*res)
            if ok:
                self.weight_version = parse_version(version)
                log.info("loaded published weights v%s from %s", version, latest["path"])
                return True
            log.warning("loading published weights v%s failed (%s); re-reading weights/latest", version, msg)
        return False

    # ------------------------------------------------------------------ backends
    def _backend_alive(self) -> bool:
        if self.backend == "hf":
            return self.engine is None or self.engine.alive
        return self._sglang is not None and self._sglang.returncode is None

    async def _start_hf(self) -> None:
        from aiohttp import web

        from areal_hpc.inference.hf_engine import LLMEngine, ModelRunner
        from areal_hpc.inference.http_server import EngineServer

        v6 = ":" in self.bind_host  # dual stack: "::" takes IPv4 clients too
        sock = socket.create_server((self.bind_host, self.cfg.port), family=socket.AF_INET6 if v6 else socket.AF_INET,
                                    backlog=1024, dualstack_ipv6=v6)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._register()  # visible as "starting" while the model loads
        runner = await _in_daemon_thread(lambda: ModelRunner(
            self.model_path, dtype=self.cfg.dtype, device=self._hf_device(),
            max_running=self.cfg.max_running_requests, context_length=self.cfg.context_length,
            mem_fraction_static=self.cfg.mem_fraction_static, cuda_graph=self.cfg.cuda_graph,
            seed=self.cfg.random_seed))
        self.engine = LLMEngine(runner, weight_version=str(self.weight_version)).start()
        info = {"server_id": self.server_id, **dataclasses.asdict(self.cfg),
                # where this process runs: `areal-hpc stop --external` of a run it is attached to uses it
                "pid": os.getpid(), "hostname": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        app = EngineServer(self.engine, self.api_key, info=info).build()
        # cancel a handler whose client went away (its generation is then aborted)
        self._app_runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await self._app_runner.setup()
        await web.SockSite(self._app_runner, sock).start()

    def _hf_device(self) -> str:
        """CPU without CUDA (the fake GPUs of a test cluster); else the first visible device or GPU id."""
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        if self.gpus and not os.environ.get("CUDA_VISIBLE_DEVICES") and self.gpus[0] < torch.cuda.device_count():
            return f"cuda:{self.gpus[0]}"
        return "cuda:0"

    async def _start_sglang(self) -> None:
        from areal_hpc.inference import sglang

        # SGLang binds its own port: without one configured, take a free one now (a tiny race, retried by the caller)
        self.port = self.cfg.port or free_port(self.bind_host if ":" not in self.bind_host else "0.0.0.0")
        key_file = sglang.write_key_config(self.registry.root / f"{self.server_id}.sglang.yaml", self.api_key)
        base, env = sglang.base_gpu_and_env(self.gpus)
        argv = sglang.render_argv(sglang.build_sglang_options(
            self.cfg, self.model_path, host=self.bind_host, port=self.port, config_file=key_file,
            tp_size=self.tp_size, pp_size=self.pp_size, base_gpu_id=base, nnodes=self.nnodes, node_rank=self.node_rank,
            dist_init_addr=self.dist_init_addr, weight_version=str(self.weight_version)))
        log_path = self.run_dir / "logs" / f"{self.server_id}.sglang.log"
        log.info("SGLang output goes to %s", log_path)
        self._sglang = sglang.SGLangProcess(argv, env, str(log_path), self.api_key).start()
        if self.node_rank == 0:
            self._register()

    async def _stop_backend(self) -> None:
        """Each step runs even when one before it failed (an abort that timed out must not leave SGLang running)."""
        engine, sglang = self.engine, self._sglang

        async def abort_all() -> None:
            await asyncio.to_thread(lambda: engine.abort(None).result(10))
            await asyncio.sleep(0.2)  # let the aborted responses reach their clients

        async def abort_sglang() -> None:  # its exit would drop them, their tokens lost
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                await self._request(*api.ABORT_REQUEST, api.abort_body(), timeout=5.0)
                await asyncio.sleep(0.2)

        steps = [("abort every request", abort_all if engine is not None and engine.alive else None),
                 ("abort SGLang's requests", abort_sglang if sglang and not self.node_rank else None),
                 ("stop the HTTP server", self._app_runner and self._app_runner.cleanup),
                 ("stop the engine", engine and (lambda: asyncio.to_thread(engine.stop))),
                 ("stop SGLang", sglang and (lambda: asyncio.to_thread(sglang.stop)))]
        for what, step in steps:
            try:
                if step is not None:
                    await step()
            except Exception:
                log.exception("stopping the backend: could not %s", what)

    # ------------------------------------------------------------------ registration
    def _register(self) -> None:
        if self.heartbeat is None:
            loop = asyncio.get_running_loop()
            self.heartbeat = Heartbeat(self.registry, "servers", self.server_id, self.record,
                                       interval_s=self.launcher.heartbeat_s, still_ours=self._run_still_ours,
                                       on_lost=lambda: loop.call_soon_threadsafe(self._lost_run)).start()
        else:
            self.heartbeat.beat()

    def _run_still_ours(self) -> bool:
        """Our record vanished: is the run still there (same API key), or was it wiped/replaced?"""
        try:
            return (self.registry.root / "secret").read_text().strip() == self.api_key
        except OSError:
            return False

    def _lost_run(self) -> None:
        log.error("server %s: the run's registry is gone or belongs to another run now; shutting down", self.server_id)
        self._stop.set()  # registered (and heartbeating) only from `run`, which made it

    async def _refresh_sglang_version(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
            status, body = await self._request(*api.MODEL_INFO, timeout=5.0)
            version = api.model_info_version(body) if status == 200 else None
            if version is not None:
                self.weight_version = version

    # ------------------------------------------------------------------ main
    async def run(self) -> int:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(sig, self._stop.set)
        with contextlib.suppress(ValueError):  # the time limit's USR2 (to every step of a hand-run allocation.sbatch)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # is the trainer's, to checkpoint: serve on, SGLang too
        self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            code = await self._serve()
        except Exception:
            log.exception("server %s failed", self.server_id)
            code = EXIT_FAILED
        finally:
            self.state = "stopping"
            if self.heartbeat is not None:
                self.heartbeat.stop()
            await self._stop_backend()
            await self._session.close()
        log.info("server %s exits with %d", self.server_id, code)
        return code

    def _sglang_log_tail(self) -> str:
        tail = self._sglang.log_tail() if self._sglang is not None else ""
        return tail and f"; last lines of {self._sglang.log_path}:\n" + "\n".join(tail.splitlines()[-40:])

    def _sglang_lost_port_race(self) -> bool:
        """SGLang exited because another process took the port we picked for it."""
        if self.cfg.port or self._sglang is None or self._sglang.returncode is None:
            return False
        tail = self._sglang.log_tail()
        return "already in use" in tail or "Address in use" in tail

    def _failed(self, msg: str, *args: Any) -> int:
        """EXIT_FAILED, logging why; EXIT_OK when a stop came meanwhile (what failed was cut short by it)."""
        if self._stop.is_set():
            return EXIT_OK
        log.error(msg, *args)
        return EXIT_FAILED

    async def _serve(self) -> int:
        # SGLang binds its port only once its model is loaded: until then whatever holds it would answer our checks
        fixed_port = self.backend == "sglang" and self.node_rank == 0 and self.cfg.port
        if fixed_port and not _bindable(self.bind_host, self.cfg.port):
            log.error("server %s: port %d is in use on %s (another process holds it); free it, or leave server.port "
                      "unset to take a free one", self.server_id, self.cfg.port, socket.gethostname())
            return EXIT_FAILED
        try:
            start = self._start_hf() if self.backend == "hf" else self._start_sglang()
            if await self._unless_stopped(start) is _STOPPED:
                return EXIT_OK  # signalled while the model loads
        except ValueError as e:  # a model it cannot load; server.sglang_args naming a flag the server sets
            log.error("server %s: %s", self.server_id, e)
            return EXIT_FAILED
        if self.backend == "sglang" and self.node_rank > 0:
            # a non-zero rank of a multi-node server runs SGLang's workers only; rank 0 serves HTTP
            while not self._stop.is_set() and self._backend_alive():
                await asyncio.sleep(1.0)
            return self._failed("SGLang of server %s (node rank %d) died%s", self.server_id, self.node_rank,
                                self._sglang_log_tail())
        healthy = await self._wait_healthy(self.launcher.server_startup_timeout_s)
        for _ in range(2):
            if healthy or not self._sglang_lost_port_race():
                break
            log.warning("port %d was taken before SGLang bound it; retrying on another port", self.port)
            await asyncio.to_thread(self._sglang.stop)  # the children of the one that lost may hold the GPU
            await self._start_sglang()
            healthy = await self._wait_healthy(self.launcher.server_startup_timeout_s)
        if not healthy and self._backend_alive():
            return self._failed("server %s did not become healthy within %.0fs (backend alive)%s", self.server_id,
                                self.launcher.server_startup_timeout_s, self._sglang_log_tail())
        if not healthy:  # it died starting: its last word on this line, the one a failed run's summary shows
            rc = self._sglang.returncode if self._sglang is not None else None
            last = (self._sglang.log_tail() if self._sglang is not None else "").strip().splitlines()[-1:]
            return self._failed("server %s: its backend exited%s before serving%s%s", self.server_id,
                                "" if rc is None else f" with {rc}", f": {last[0].strip()}" if last else "",
                                self._sglang_log_tail())
        loaded = await self._load_latest(only_if_newer=False)
        if loaded:
            self.state = "ready"
            self._register()
            # close the race with a trainer that published while we were registering
            loaded = await self._load_latest(only_if_newer=True)
        if not loaded:
            return self._failed("could not load the run's published weights; refusing to serve stale ones")
        self._register()
        log.info("server %s (%s) ready at %s, weight version %s", self.server_id, self.backend, self.address,
                 self.weight_version)
        print(f"AREAL_HPC_SERVER_READY {self.server_id} {self.address}", flush=True)
        while not self._stop.is_set():
            await self._unless_stopped(asyncio.sleep(self.launcher.heartbeat_s))
            if not self._backend_alive():
                log.error("backend of server %s died%s", self.server_id, self._sglang_log_tail())
                return EXIT_FAILED
            if self.backend == "sglang":
                await self._refresh_sglang_version()
        log.info("server %s: signalled, shutting down", self.server_id)
        return EXIT_OK


def serve(run_dir: Path, cfg: ServerConfig, model_path: str, launcher: LauncherConfig, server_id: str,
          backend: str = "hf", gpus: Optional[Sequence[int]] = None, **options: Any) -> int:
    """Run one server until SIGTERM/SIGINT; returns the process exit code. ``options``: `ServerLifecycle`'s
    (``tp_size``, ``pp_size``, ``nnodes``, ``node_rank``, ``dist_init_addr``; others go into the registry record)."""
    try:
        life = ServerLifecycle(Path(run_dir), cfg, model_path, launcher, server_id, backend, gpus, **options)
    except ValueError as e:
        log.error("%s", e)
        return EXIT_USAGE
    return asyncio.run(life.run())
