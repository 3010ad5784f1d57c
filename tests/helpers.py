"""Helpers shared by the tests that drive real processes (Slurm, servers)."""

import contextlib
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, List, Tuple


# trainers that misbehave on purpose, registered through trainer.plugins (a file holding this text)
TRAINER_PLUGINS = '''
import signal
import time

from areal_hpc.trainers import register_trainer
from areal_hpc.trainers.base import Trainer


@register_trainer("boom")
class Boom(Trainer):
    """Fails at start, every time."""

    def run(self) -> int:
        raise RuntimeError("boom: this trainer fails on purpose")


@register_trainer("stubborn")
class Stubborn(Trainer):
    """Ignores the graceful stop (SIGTERM): only a forced stop ends it."""

    def run(self) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.publish_state(step=0, state="training")
        while True:
            time.sleep(0.2)
'''


def run(*cmd: str, timeout: float = 120) -> str:
    """Run a command; fail the test with its output unless it exits 0."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def serve_argv(run_dir: Path, sid: str, *words: str, backend: str = "hf") -> List[str]:
    """``areal-hpc serve`` for one server of a stand-alone run dir whose config.yaml holds ``words``
    (``server.model_path=...``, ``launcher.ttl_s=...``); written by a rename, so a server started
    earlier never reads half a file."""
    from areal_hpc.config import dump_yaml, load_config
    from areal_hpc.registry import atomic_write

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", dump_yaml(load_config(None, list(words))))
    return [sys.executable, "-m", "areal_hpc", "serve", "--run-dir", str(run_dir), "--server-id", sid,
            "--backend", backend]


# what an SGLang server's /model_info says, in part (`add-servers url=` wants a model: a web server answers 200 too)
MODEL_INFO = {"model_path": "/m", "tokenizer_path": "/m", "is_generation": True, "weight_version": "default"}


@contextlib.contextmanager
def json_http_server(respond: Callable[[str, str, bytes], Tuple[int, Any]]) -> Iterator[int]:
    """A real HTTP server on 127.0.0.1 (yields its port) that answers every request with JSON:
    ``respond(method, path, request body) -> (status, body)``, called on the request's thread."""
    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            status, body = respond(self.command, self.path, self.rfile.read(int(self.headers["Content-Length"] or 0)))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_port
    finally:
        httpd.shutdown()


@contextlib.contextmanager
def health_answered_together(parties: int, weight_version: int = 0) -> Iterator[int]:
    """A real HTTP server on 127.0.0.1 (yields its port) whose /health answers only once ``parties`` health checks
    are in flight at the same time: checks made one after another time out on it. /model_info gives
    ``weight_version`` (and a model, as SGLang does); any other path ``{}``."""
    all_asked = threading.Barrier(parties)

    def respond(method, path, body):
        if path == "/health":
            all_asked.wait(timeout=10)
        return 200, {**MODEL_INFO, "weight_version": weight_version} if path == "/model_info" else {}

    with json_http_server(respond) as port:
        yield port


@contextlib.asynccontextmanager
async def engine_app(server) -> AsyncIterator[str]:
    """``server`` (an `EngineServer`) on 127.0.0.1, handlers cancelled when their client goes away (as `serve` runs
    it); yields its base URL."""
    from aiohttp import web

    runner = web.AppRunner(server.build(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()
