"""The `sglang` backend's lifecycle against a stand-in ``sglang.launch_server`` (real SGLang needs
GPUs): argv and key file, subprocess start, health wait, loading published weights, registration,
weight-version tracking, the pool speaking to it, SIGTERM stopping the whole process group."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from areal_hpc.inference.client import ServerPool
from areal_hpc.registry import Registry, pid_alive
from helpers import json_http_server, serve_argv

ROOT = Path(__file__).resolve().parents[1]

FAKE_LAUNCH_SERVER = textwrap.dedent('''
    """Stand-in for sglang.launch_server: the flags we pass, SGLang's auth and endpoints."""
    import argparse, json, os, sys
    from aiohttp import web

    p = argparse.ArgumentParser()
    for flag in ("--model-path", "--host", "--port", "--config", "--weight-version", "--tp-size"):
        p.add_argument(flag)
    args, _ = p.parse_known_args()
    key = None
    for line in open(args.config):
        if line.startswith("api-key:"):
            key = json.loads(line.split(":", 1)[1])
    state = {"version": args.weight_version}
    with open(os.environ["FAKE_SGLANG_OUT"], "w") as f:
        json.dump({"argv": sys.argv[1:], "pid": os.getpid()}, f)

    @web.middleware
    async def auth(request, handler):
        if request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def health(request):
        return web.Response()

    async def model_info(request):
        return web.json_response({"model_path": args.model_path, "weight_version": state["version"]})

    async def update(request):
        body = await request.json()
        state["version"] = body.get("weight_version")
        return web.json_response({"success": True, "message": "ok", "num_paused_requests": 0})

    async def generate(request):
        body = await request.json()
        n = body["sampling_params"]["max_new_tokens"]
        return web.json_response({"output_ids": [1] * n, "meta_info": {
            "finish_reason": {"type": "length"}, "weight_version": state["version"],
            "output_token_logprobs": [[-0.5, 1, None]] * n}})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/health", health)
    app.router.add_get("/model_info", model_info)
    app.router.add_post("/update_weights_from_disk", update)
    app.router.add_post("/generate", generate)
    web.run_app(app, host=args.host, port=int(args.port), print=None, access_log=None)
''')


def test_sglang_backend_lifecycle(tmp_path):
    fake = tmp_path / "fake"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text("")
    (fake / "sglang" / "launch_server.py").write_text(FAKE_LAUNCH_SERVER)
    run_dir = tmp_path / "run"
    reg = Registry(run_dir / "registry", ttl_s=2.0)
    reg.put("weights", "latest", {"version": 3, "path": "/published/v3"}, ttl=False)
    out = tmp_path / "fake.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]), FAKE_SGLANG_OUT=str(out),
               AREAL_HPC_LOG_LEVEL="WARNING")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["SLURM_STEP_GPUS"] = "2,3"  # this server's GPUs, as Slurm gives them to a step
    proc = subprocess.Popen(
        serve_argv(run_dir, "g0", "allocation_mode=sglang:d1t2", "server.model_path=/models/m",
                   "launcher.heartbeat_s=0.3", "launcher.ttl_s=2", "server.sglang_args.attention-backend=fa3",
                   "server.sglang_args.enable-memory-saver=true", backend="sglang"),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while (reg.get("servers", "g0") or {}).get("state") != "ready":
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "sglang-backed server never became ready"
            time.sleep(0.1)
        rec = reg.get("servers", "g0")
        assert rec["backend"] == "sglang" and rec["tp_size"] == 2 and rec["gpus"] == [2, 3]
        assert rec["weight_version"] == 3  # the run's published weights were loaded before registering
        launched = json.loads(out.read_text())
        argv = launched["argv"]
        opts = {a: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
                for i, a in enumerate(argv) if a.startswith("--")}
        assert opts["--tp-size"] == "2" and opts["--base-gpu-id"] == "2" and opts["--port"] == str(rec["port"])
        assert "--skip-tokenizer-init" in opts and opts["--skip-tokenizer-init"] is None
        assert opts["--attention-backend"] == "fa3" and opts["--enable-memory-saver"] is None
        assert "--api-key" not in opts and reg.secret() not in " ".join(argv)
        key_file = Path(opts["--config"])
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"

        async def use():
            async with ServerPool(reg, refresh_s=0.3) as pool:
                res = await pool.generate([5, 6], max_new_tokens=4)
                upd = await pool.update_weights_from_disk("/published/v4", 4)
                return res, upd

        res, upd = asyncio.run(use())
        assert res.output_ids == [1, 1, 1, 1] and res.versions == [3, 3, 3, 3] and upd["g0"].ok
        deadline = time.monotonic() + 5
        while reg.get("servers", "g0")["weight_version"] != 4:  # followed from SGLang's /model_info
            assert time.monotonic() < deadline
            time.sleep(0.1)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert reg.get("servers", "g0", live_only=False) is None
        assert not pid_alive(launched["pid"]), "the SGLang process must stop with its server"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if out.exists():
            try:
                os.kill(json.loads(out.read_text())["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_pipeline_parallel_server_starts_sglang_with_its_pp_size(tmp_path):
    """``sglang:d1p2t2`` reserves p*t=4 GPUs a server; SGLang was started with --tp-size 2 only, and half the GPUs
    sat idle. It gets --pp-size 2 too."""
    fake = tmp_path / "fake" / "sglang"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "launch_server.py").write_text(FAKE_LAUNCH_SERVER)
    out = tmp_path / "fake.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), str(ROOT)]), FAKE_SGLANG_OUT=str(out),
               SLURM_STEP_GPUS="0,1,2,3")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.Popen(serve_argv(tmp_path / "run", "g0", "allocation_mode=sglang:d1p2t2",
                                       "server.model_path=/models/m", backend="sglang"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not (out.exists() and out.read_text().endswith("}")):  # the stand-in wrote the argv it got
            assert proc.poll() is None, "the server ended before it started SGLang"
            time.sleep(0.1)
        argv = json.loads(out.read_text())["argv"]
        assert argv[argv.index("--pp-size") + 1] == "2" and argv[argv.index("--tp-size") + 1] == "2"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if out.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(json.loads(out.read_text())["pid"], signal.SIGKILL)


# fix8-D
def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_ends_the_group_of_an_exited_sglang(tmp_path):
    """SGLang's main process may exit (a crash, a port taken) and leave its schedulers behind, on the GPU: `stop`
    still ends its process group."""
    from areal_hpc.inference.sglang import SGLangProcess

    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))")
    sg = SGLangProcess([sys.executable, "-c", script], None, str(tmp_path / "sglang.log")).start()
    sg.proc.wait(30)
    child = int(pid_file.read_text())
    try:
        assert _running(child)
        sg.stop(grace_s=5)
        deadline = time.monotonic() + 5
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the exited SGLang's child must be stopped with it"
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)


HANGS_ON_LOAD = textwrap.dedent('''
    """Stand-in for sglang.launch_server that is healthy but never finishes loading weights."""
    import argparse, asyncio, json, os
    from aiohttp import web

    p = argparse.ArgumentParser()
    for flag in ("--host", "--port"):
        p.add_argument(flag)
    args, _ = p.parse_known_args()
    with open(os.environ["FAKE_SGLANG_OUT"], "w") as f:
        json.dump({"pid": os.getpid()}, f)

    async def health(request):
        return web.Response()

    async def update(request):
        open(os.environ["FAKE_SGLANG_OUT"] + ".load", "w").close()
        await asyncio.sleep(3600)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/update_weights_from_disk", update)
    web.run_app(app, host=args.host, port=int(args.port), print=None, access_log=None, shutdown_timeout=0.5)
''')


@contextlib.contextmanager
def _fake_server(tmp_path: Path, script: str, *words: str):
    """A server of the sglang backend (run ``tmp_path/run``, weights/latest published) whose ``sglang.launch_server``
    is ``script``; yields (server process, registry, the file the fake writes its pid to)."""
    fake = tmp_path / "fake"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text("")
    (fake / "sglang" / "launch_server.py").write_text(script)
    reg = Registry(tmp_path / "run" / "registry", ttl_s=2.0)
    reg.put("weights", "latest", {"version": 3, "path": "/published/v3"}, ttl=False)
    out = tmp_path / "fake.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]), FAKE_SGLANG_OUT=str(out),
               AREAL_HPC_LOG_LEVEL="WARNING")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    argv = serve_argv(tmp_path / "run", "g0", "server.model_path=/models/m", "launcher.heartbeat_s=0.3",
                      "launcher.ttl_s=2", *words, backend="sglang")
    with open(tmp_path / "serve.log", "wb") as log:  # what it logs
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc, reg, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(OSError, ValueError):
            os.kill(json.loads(out.read_text())["pid"], signal.SIGKILL)


def _wait_ready(proc: subprocess.Popen, reg: Registry) -> dict:
    deadline = time.monotonic() + 60
    while (reg.get("servers", "g0") or {}).get("state") != "ready":
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "sglang-backed server never became ready"
        time.sleep(0.1)
    return reg.get("servers", "g0")


def test_a_port_race_retry_stops_the_sglang_that_lost_it(tmp_path):
    """An SGLang that lost the race for its port exits, but its children may live on (on the GPU, holding memory):
    the retry on another port stops its process group first."""
    loser = tmp_path / "loser.pid"
    script = textwrap.dedent(f'''
        import os, subprocess, sys
        if not os.path.exists({str(loser)!r}):  # the first start: a child, then the port turns out taken
            open({str(loser)!r}, "w").write(str(subprocess.Popen(["sleep", "60"]).pid))
            print("OSError: [Errno 98] Address already in use", flush=True)
            sys.exit(1)
    ''') + FAKE_LAUNCH_SERVER
    with _fake_server(tmp_path, script) as (proc, reg, out):
        try:
            _wait_ready(proc, reg)
            child = int(loser.read_text())
            deadline = time.monotonic() + 5
            while _running(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _running(child), "the SGLang that lost the port race left its child running"
        finally:
            if loser.exists() and _running(int(loser.read_text())):
                os.kill(int(loser.read_text()), signal.SIGKILL)


def test_an_ipv6_host_is_registered_in_brackets(tmp_path):
    """``server.host=::1``: the registered address is ``[::1]:port``, which the pool can reach (``::1:port`` is no
    address)."""
    with _fake_server(tmp_path, FAKE_LAUNCH_SERVER, "server.host=::1") as (proc, reg, out):
        rec = _wait_ready(proc, reg)
        assert rec["address"] == f"[::1]:{rec['port']}"

        async def use():
            async with ServerPool(reg, refresh_s=0.3, request_timeout_s=20) as pool:
                return await pool.generate([5, 6], max_new_tokens=2)

        assert asyncio.run(use()).output_ids == [1, 1]


def test_a_weight_load_that_never_ends_neither_blocks_a_stop_nor_runs_forever(tmp_path):
    """Loading the run's published weights at startup: SIGTERM ends the server at once, and the load is given up after
    ``launcher.server_startup_timeout_s`` (a server that cannot load fails instead of hanging in "starting")."""
    with contextlib.ExitStack() as stack:
        stopped = stack.enter_context(_fake_server(tmp_path / "stopped", HANGS_ON_LOAD))
        bounded = stack.enter_context(_fake_server(tmp_path / "bounded", HANGS_ON_LOAD,
                                                   "launcher.server_startup_timeout_s=8"))
        proc, _, out = stopped
        deadline = time.monotonic() + 30
        while not Path(f"{out}.load").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the server never asked to load weights"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not pid_alive(json.loads(out.read_text())["pid"])
        proc, _, out = bounded
        assert proc.wait(30) == 1 and Path(f"{out}.load").exists()


def test_a_port_race_is_read_from_this_sglang_s_own_log_lines(tmp_path):
    """The SGLang log of a server id is appended to across restarts: an "Address already in use" of an earlier run must
    not make a crash of this one (out of memory) look like a lost port race, retried with two more doomed starts."""
    starts = tmp_path / "starts"
    script = textwrap.dedent(f'''
        with open({str(starts)!r}, "a") as f:
            f.write("x")
        print("torch.OutOfMemoryError: CUDA out of memory", flush=True)
        raise SystemExit(1)
    ''')
    log = tmp_path / "run" / "logs" / "g0.sglang.log"
    log.parent.mkdir(parents=True)
    log.write_text("OSError: [Errno 98] Address already in use\n")  # the run before
    with _fake_server(tmp_path, script) as (proc, reg, out):
        assert proc.wait(60) == 1
        assert starts.read_text() == "x", "a crash was taken for a port race"



def test_a_fixed_port_another_process_holds_fails_at_once_not_registered_at_its_address(tmp_path):
    """``server.port`` fixed but taken on the node (another user's server, one left over): SGLang binds its port only
    after loading the model, and meanwhile that other process answers ``/health``. The server must not register as
    ready at an address that is not its own: it fails at once, naming the port."""
    started = tmp_path / "started"
    script = textwrap.dedent(f'''
        import time
        open({str(started)!r}, "w").close()
        time.sleep(30)  # loading the model; binding the port then fails
        raise SystemExit("OSError: [Errno 98] Address already in use")
    ''')
    # SGLang answers /health without a key
    with json_http_server(lambda method, path, body: (200, {}) if path == "/health" else (401, {})) as port, \
            _fake_server(tmp_path, script, f"server.port={port}") as (proc, reg, out):
        reg.delete("weights", "latest")  # nothing published yet: no weight load to fail against it
        deadline = time.monotonic() + 25
        while proc.poll() is None and time.monotonic() < deadline:
            assert (reg.get("servers", "g0") or {}).get("state") != "ready", "registered at another process's port"
            time.sleep(0.1)
        assert proc.poll() == 1, "a server whose port is taken must fail at once"
        assert f"port {port} is in use" in (tmp_path / "serve.log").read_text()
        assert not started.exists(), "SGLang was started on a port another process holds"
        assert reg.get("servers", "g0", live_only=False) is None


def test_a_port_in_sglang_args_fails_at_once_not_after_the_startup_timeout(tmp_path):
    """``server.sglang_args.port=P``: SGLang would serve on P while the server waits for it on its own port, for
    ``launcher.server_startup_timeout_s`` (15 minutes), then say it "did not become healthy". Refused at once, naming
    the key to use."""
    from areal_hpc.registry import free_port

    with _fake_server(tmp_path, FAKE_LAUNCH_SERVER, f"server.sglang_args.port={free_port()}") as (proc, reg, out):
        try:
            assert proc.wait(30) == 1
        except subprocess.TimeoutExpired:
            raise AssertionError("the server waited for SGLang on a port it does not serve on") from None
        assert "server.port" in (tmp_path / "serve.log").read_text()
        assert not out.exists(), "SGLang was started"
        assert reg.get("servers", "g0", live_only=False) is None


ABORTS_ON_REQUEST = FAKE_LAUNCH_SERVER.replace('''async def generate(request):''', '''aborted = None

async def abort(request):
    if (await request.json()).get("abort_all"):
        aborted.set()
    return web.Response()

async def generate(request):
    global aborted
    aborted = aborted or asyncio.Event()
    open(os.environ["FAKE_SGLANG_OUT"] + ".gen", "w").close()
    await aborted.wait()  # as SGLang's: a running request comes back with the tokens it has
    return web.json_response({"output_ids": [7, 8], "meta_info": {
        "finish_reason": {"type": "abort", "message": "Aborted"}, "weight_version": state["version"],
        "output_token_logprobs": [[-0.5, 7, None], [-0.5, 8, None]]}})

async def unused(request):''').replace('import argparse, json', 'import argparse, asyncio, json').replace(
    'app.router.add_post("/generate", generate)',
    'app.router.add_post("/generate", generate)\napp.router.add_post("/abort_request", abort)').replace(
    'access_log=None)', 'access_log=None, shutdown_timeout=0.5)')  # in-flight requests are dropped at its exit


def test_a_stopped_sglang_server_hands_running_requests_back_aborted(tmp_path):
    """SIGTERM to a server of the sglang backend: its running generations come back aborted, with the tokens they have
    (clients resume them elsewhere), as the hf backend's do; not cut off by SGLang's exit, their tokens lost."""
    import threading
    import urllib.request

    with _fake_server(tmp_path, ABORTS_ON_REQUEST) as (proc, reg, out):
        rec = _wait_ready(proc, reg)
        got = {}

        def generate():
            req = urllib.request.Request(
                f"http://{rec['address']}/generate", method="POST",
                data=json.dumps({"input_ids": [5], "sampling_params": {"max_new_tokens": 8}}).encode(),
                headers={"Authorization": f"Bearer {reg.secret()}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    got["body"] = json.loads(r.read())
            except OSError as e:
                got["error"] = repr(e)

        t = threading.Thread(target=generate)
        t.start()
        deadline = time.monotonic() + 10
        while not Path(f"{out}.gen").exists():
            assert time.monotonic() < deadline, "the generation never reached SGLang"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        t.join(30)
        assert got.get("body", {}).get("output_ids") == [7, 8], got
        assert got["body"]["meta_info"]["finish_reason"]["type"] == "abort"


def test_a_non_zero_node_rank_whose_sglang_dies_says_why(tmp_path, monkeypatch, caplog):
    """A node of a multi-node SGLang server (node rank > 0) runs SGLang's workers only: when they die (NCCL cannot
    reach node 0, out of memory), the error names SGLang's last lines, as rank 0's does; not a bare exit 1."""
    import logging

    from areal_hpc.config import load_config
    from areal_hpc.inference.server import ServerLifecycle

    fake = tmp_path / "fake"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text("")
    (fake / "sglang" / "launch_server.py").write_text(
        'print("RuntimeError: NCCL timeout reaching node 0", flush=True)\nraise SystemExit(1)\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), str(ROOT)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = load_config(None, ["server.model_path=/models/m", "launcher.heartbeat_s=0.3"])
    life = ServerLifecycle(tmp_path / "run", cfg.server, "/models/m", cfg.launcher, "g0", "sglang", [0],
                           nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:1")
    with caplog.at_level(logging.ERROR, logger="areal_hpc.inference.server"):
        assert asyncio.run(life.run()) == 1
    assert "NCCL timeout reaching node 0" in caplog.text


# real SGLang logs its ServerArgs at startup (`logger.info(f"{server_args=}")`), the API key among them
PRINTS_ITS_ARGS = FAKE_LAUNCH_SERVER.replace("state = {", "print(f'server_args=ServerArgs(api_key={key!r})', flush=True)\n"
                                             "state = {")


def _files_others_can_read_with(root: Path, secret: str) -> list:
    """Files under ``root`` that hold ``secret`` and are readable by the group or others."""
    return [str(p) for p in root.rglob("*") if p.is_file() and p.stat().st_mode & 0o044 and secret in p.read_text()]


def test_a_group_readable_run_does_not_show_the_key_in_sglang_log(tmp_path):
    """``cluster.group_readable=true``: logs are 0640, the key stays private; what SGLang prints of it is masked."""
    with _fake_server(tmp_path, PRINTS_ITS_ARGS, "cluster.group_readable=true") as (proc, reg, out):
        _wait_ready(proc, reg)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    key = reg.secret()
    assert "server_args=ServerArgs(" in (tmp_path / "run" / "logs" / "g0.sglang.log").read_text()
    assert _files_others_can_read_with(tmp_path, key) == []


def test_making_a_run_group_readable_keeps_the_sglang_key_file_private(tmp_path):
    """A trial resubmitted with ``cluster.group_readable=true`` gets its run dir re-moded; the key stays private."""
    from areal_hpc.config import load_config
    from areal_hpc.launch.submit import _fix_modes

    with _fake_server(tmp_path, FAKE_LAUNCH_SERVER) as (proc, reg, out):
        _wait_ready(proc, reg)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    _fix_modes(load_config(None, ["cluster.group_readable=true"]), tmp_path / "run")
    assert _files_others_can_read_with(tmp_path, reg.secret()) == []


def test_an_sglang_that_dies_starting_says_why_in_the_runs_error_line(tmp_path):
    """SGLang exiting at once without a traceback (here as `python -m sglang.launch_server` says it is not installed):
    the error line, the one a FAILED run shows, said "did not become healthy within 900s (backend dead); last lines of
    ...:", the reason cut off below it, and the 900 s never waited."""
    from areal_hpc.launch.outcome import error_line

    said = ("/usr/bin/python3: Error while finding module specification for 'sglang.launch_server' "
            "(ModuleNotFoundError: No module named 'sglang')")
    with _fake_server(tmp_path, f"import sys\nprint({said!r}, file=sys.stderr)\nsys.exit(1)\n") as (proc, _, _):
        assert proc.wait(60) == 1
    line, _ = error_line(str(tmp_path / "serve.log"))
    assert "exited with 1 before serving" in line and "No module named 'sglang'" in line, line
    assert "within" not in line, line
