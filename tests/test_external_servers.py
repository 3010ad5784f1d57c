"""External servers (issue 17): a server the run did not start joins it, with real processes.

* an `hf` server started by hand outside any run (its own registry and key) is attached to a
  running local run with `add-servers url=... api_key=...`: it serves rollouts (its request count
  grows), gets every weight update (its weight version advances), `remove-server` detaches it
  (no more requests), a killed one is dropped while the run goes on, and `stop` leaves it running;
* `areal-hpc serve` by hand with a run's names joins the run (collective weight path: it gets
  weights from disk), and `stop --external` stops it;
* the same attach on the local Slurm cluster, the server being a separate Slurm job;
* bad input: one line, exit 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from helpers import MODEL_INFO, health_answered_together, json_http_server, serve_argv, wait_until

from areal_hpc.registry import Registry, free_port
from areal_hpc.trainers.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
MODEL = "toy:qwen3-h128-l2"  # the quickstart's model
TTL_S = 6
SMALL = ["rollout.batch_size=8", "rollout.n_samples=4", "saver.freq_steps=0", "launcher.heartbeat_s=1",
         f"launcher.ttl_s={TTL_S}", "stats.progress_bar=False", "trainer.total_train_steps=100000"]
NAMES = ["experiment_name=quickstart", "trial_name=run0"]


def cli(root: Path, *args: str, timeout: float = 300, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal_hpc", *args, f"cluster.fileroot={root}"],
                          capture_output=True, text=True, timeout=timeout, cwd=root, input=stdin)


def server_cmd(run_dir: Path, sid: str) -> List[str]:
    """An `hf` server of its own throw-away run dir and registry (outside any run of ours)."""
    return serve_argv(run_dir, sid, f"server.model_path={MODEL}", "launcher.heartbeat_s=1", f"launcher.ttl_s={TTL_S}")


def wait_standalone(run_dir: Path, sid: str, proc=None, timeout: float = 180) -> Tuple[str, str]:
    """(address, key) of a standalone server once it is ready."""
    reg = Registry(run_dir / "registry", ttl_s=TTL_S)

    def ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server {sid} exited {proc.returncode}: {(run_dir / 'server.log').read_text()}")
        rec = reg.get("servers", sid)
        return rec if rec and rec.get("state") == "ready" else None

    rec = wait_until(ready, timeout, f"standalone server {sid}", interval=0.3)
    return rec["address"], reg.secret()


def start_standalone(root: Path, sid: str) -> Tuple[subprocess.Popen, str, str]:
    d = root / f"standalone-{sid}"
    d.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(server_cmd(d, sid), stdout=open(d / "server.log", "wb"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, cwd=root)
    address, key = wait_standalone(d, sid, proc)
    return proc, address, key


def server_info(address: str, key: str) -> Dict:
    req = urllib.request.Request(f"http://{address}/get_server_info", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        info = json.loads(r.read())
    return {"requests": info["internal_states"][0]["finished_requests"],
            "weight_version": int(info["weight_version"])}


def answers(address: str, key: str) -> bool:
    req = urllib.request.Request(f"http://{address}/health", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), p.stderr


def kill(proc) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def start_run(root: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={root}",
                             *SMALL, *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
                            start_new_session=True)


def steps(rd: Path) -> int:
    return len(read_metrics(rd / "metrics.jsonl"))


def wait_steps(root: Path, n: int, timeout: float = 300) -> Path:
    def ready():
        rd = next(root.glob("*/quickstart/run0"), None)
        return rd if rd and steps(rd) >= n else None

    return wait_until(ready, timeout, f"{n} training steps", interval=0.5)


def stop_owner(owner) -> None:
    if owner.poll() is None:
        owner.send_signal(signal.SIGTERM)
        try:
            owner.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(owner.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- mode=local

def test_an_attached_server_serves_rollouts_gets_weights_and_survives_stop(tmp_path):
    owner = start_run(tmp_path)
    a = b = None
    try:
        a, addr_a, key_a = start_standalone(tmp_path, "a")
        rd = wait_steps(tmp_path, 2)
        reg = Registry(rd / "registry", ttl_s=TTL_S)
        assert key_a != reg.secret()  # its own key, not the run's
        before = server_info(addr_a, key_a)
        p = cli(tmp_path, "add-servers", f"url=http://{addr_a}", f"api_key={key_a}", *NAMES)
        assert p.returncode == 0 and "attached ext-0" in p.stdout, p.stdout + p.stderr
        rec = reg.get("servers", "ext-0")
        assert rec["external"] is True and rec["api_key"] == key_a and rec.get("slurm_step_id") is None
        # another server's key is no more readable than the run's own (registry/secret, 0600), whatever the umask
        assert os.stat(reg.path("servers", "ext-0")).st_mode & 0o777 == 0o600
        assert os.stat(rd / "registry").st_mode & 0o777 == os.stat(rd / "registry" / "servers").st_mode & 0o777 == 0o700
        # it serves rollouts and gets the weight updates
        wait_until(lambda: server_info(addr_a, key_a)["requests"] > before["requests"] + 8, 120,
                   "rollouts on the attached server", interval=0.5)
        v = server_info(addr_a, key_a)["weight_version"]
        wait_until(lambda: server_info(addr_a, key_a)["weight_version"] >= v + 2, 120,
                   "weight updates on the attached server", interval=0.5)
        assert server_info(addr_a, key_a)["weight_version"] >= steps(rd) - 1
        p = cli(tmp_path, "status", "--json", *NAMES)
        assert key_a not in p.stdout and key_a not in (rd / "logs" / "driver.log").read_text()
        ext = {s["id"]: s for s in json.loads(p.stdout)["servers"]}["ext-0"]
        assert ext["external"] and ext["healthy"] and ext["address"] == addr_a and ext["own_key"]
        text = cli(tmp_path, "status", *NAMES).stdout
        assert key_a not in text and reg.secret() not in text
        assert f"API key: the contents of {rd / 'registry' / 'secret'}" in text and text.count("API key") == 1
        assert re.search(r"ext-0 .*external", text), text
        assert (os.stat(rd / "registry" / "secret").st_mode & 0o777) == 0o600

        # remove-server: no more rollouts to it, record gone, the server runs on
        p = cli(tmp_path, "remove-server", "ext-0", *NAMES)
        assert p.returncode == 0 and "detached ext-0" in p.stdout, p.stdout + p.stderr
        assert reg.get("servers", "ext-0", live_only=False) is None
        n = steps(rd)
        # requests in flight at the removal have ended, and every pool has refreshed its list
        # (launcher.heartbeat_s=1: steps can be much shorter than a refresh)
        time.sleep(3)
        wait_steps(tmp_path, n + 2)
        count = server_info(addr_a, key_a)["requests"]
        time.sleep(2)
        wait_steps(tmp_path, steps(rd) + 3)
        assert server_info(addr_a, key_a)["requests"] == count and a.poll() is None
        assert reg.get("servers", "ext-0", live_only=False) is None  # the owner's checks did not bring it back

        # attached again (by URL), and a second one that gets killed: the run goes on without it
        # (the keys from a 0600 file and from a pipe: out of argv)
        (tmp_path / "key-a").write_text(key_a + "\n")
        (tmp_path / "key-a").chmod(0o600)
        p = cli(tmp_path, "add-servers", f"url=http://{addr_a}", f"api_key_file={tmp_path / 'key-a'}", *NAMES)
        assert p.returncode == 0 and reg.get("servers", "ext-0")["api_key"] == key_a, p.stdout + p.stderr
        b, addr_b, key_b = start_standalone(tmp_path, "b")
        base_b = server_info(addr_b, key_b)["requests"]
        p = cli(tmp_path, "add-servers", f"url=http://{addr_b}", "api_key_file=/dev/stdin", *NAMES, stdin=key_b)
        assert p.returncode == 0 and "attached ext-1" in p.stdout, p.stdout + p.stderr
        wait_until(lambda: server_info(addr_b, key_b)["requests"] > base_b, 120, "rollouts on ext-1", interval=0.5)
        kill(b)
        n = steps(rd)
        wait_until(lambda: reg.get("servers", "ext-1", live_only=False) is None, 60,
                   "the killed server's record to be removed", interval=0.5)
        assert "did not answer /health" in (rd / "logs" / "driver.log").read_text()
        wait_steps(tmp_path, n + 3)  # the run goes on
        ids = [s["id"] for s in json.loads(cli(tmp_path, "status", "--json", *NAMES).stdout)["servers"]]
        assert "ext-1" not in ids and "ext-0" in ids, ids

        # stop: the run's own server and trainer end; the attached one is detached and keeps running
        p = cli(tmp_path, "stop", *NAMES, "--timeout", "120")
        assert p.returncode == 0 and "detached external server ext-0" in p.stdout, p.stdout + p.stderr
        owner.wait(60)
        assert a.poll() is None and answers(addr_a, key_a)
        assert reg.list("servers", live_only=False) == {}
    finally:
        kill(a)
        kill(b)
        stop_owner(owner)


def test_serve_by_hand_joins_a_run_and_stop_external_stops_it(tmp_path):
    """`areal-hpc serve` with the run's names (no --run-dir): registers itself as an external server,
    gets rollouts and, on the collective (gloo) path, weights from disk; `stop --external` stops it."""
    owner = start_run(tmp_path, "trainer.ppo.weight_update=gloo")
    by_hand = None
    try:
        rd = wait_steps(tmp_path, 1)
        reg = Registry(rd / "registry", ttl_s=TTL_S)
        by_hand = subprocess.Popen([sys.executable, "-m", "areal_hpc", "serve", f"cluster.fileroot={tmp_path}",
                                    *NAMES], stdout=open(tmp_path / "by-hand.log", "wb"), stderr=subprocess.STDOUT,
                                   cwd=tmp_path, start_new_session=True)
        sid = f"serve-{socket.gethostname().split('.')[0]}-{by_hand.pid}"
        wait_until(lambda: (reg.get("servers", sid) or {}).get("state") in ("ready", "paused"), 180,
                   f"{sid} to register\n{(tmp_path / 'by-hand.log').read_text()}", interval=0.5)
        rec = reg.get("servers", sid)
        assert rec["external"] is True and rec["pid"] == by_hand.pid
        addr, key = rec["address"], reg.secret()
        base = server_info(addr, key)
        wait_until(lambda: server_info(addr, key)["requests"] > base["requests"], 120, "rollouts on it", interval=0.5)
        wait_until(lambda: server_info(addr, key)["weight_version"] >= base["weight_version"] + 2, 120,
                   "weight updates on it", interval=0.5)
        assert f"external server {sid} gets weights from disk" in (rd / "logs" / "trainer-0.log").read_text()
        assert re.search(rf"{sid} .*external \(serve by hand\)", cli(tmp_path, "status", *NAMES).stdout)
        st = json.loads(cli(tmp_path, "status", "--json", *NAMES).stdout)
        assert {s["id"]: s["external"] for s in st["servers"]} == {"server-0": False, sid: True}, st["servers"]
        p = cli(tmp_path, "stop", "--external", *NAMES, "--timeout", "120")
        assert p.returncode == 0 and f"external server {sid}" in p.stdout and "SIGTERM" in p.stdout, \
            p.stdout + p.stderr
        by_hand.wait(60)
        owner.wait(60)
        assert reg.list("servers", live_only=False) == {}
    finally:
        kill(by_hand)
        stop_owner(owner)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    owner = start_run(tmp_path)
    try:
        rd = wait_steps(tmp_path, 1)
        port = free_port()
        one_line_error(cli(tmp_path, "add-servers", f"url=http://127.0.0.1:{port}", *NAMES),
                       "url", f"http://127.0.0.1:{port}", "does not answer")
        one_line_error(cli(tmp_path, "add-servers", "url=127.0.0.1:8000", *NAMES), "url", "not a server URL")
        one_line_error(cli(tmp_path, "add-servers", "url=http://host", *NAMES), "url", "no port")
        one_line_error(cli(tmp_path, "remove-server", "ext-7", *NAMES), "ext-7", "no server")
        # not an inference server: a web server whose /health (404) and POST (501) answer a multi-line HTML page
        (web := tmp_path / "www").mkdir()
        httpd = subprocess.Popen([sys.executable, "-m", "http.server", str(port := free_port()), "-b", "127.0.0.1"],
                                 cwd=web, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, "http.server", interval=0.2)
            bad = cli(tmp_path, "add-servers", f"url=http://127.0.0.1:{port}", *NAMES)
            one_line_error(bad, "url", "answered HTTP 404", "Error response")
            (web / "health").write_text("ok")  # /health now 200: but /model_info names no model
            bad = cli(tmp_path, "add-servers", f"url=http://127.0.0.1:{port}", *NAMES)
            one_line_error(bad, "url", "is not an SGLang or `hf` generation server", "HTTP 404: <!DOCTYPE HTML> <html")
            (web / "model_info").write_text(json.dumps(MODEL_INFO))  # now it does: the weight load (a POST) gets 501
            bad = cli(tmp_path, "add-servers", f"url=http://127.0.0.1:{port}", *NAMES)
            one_line_error(bad, "url", "could not load the run's weights", "Error response")
            assert len(bad.stderr) < 1000, bad.stderr
        finally:
            kill(httpd)
        one_line_error(cli(tmp_path, "remove-server", "server-0", *NAMES), "server-0", "started by the run")
        # a server of the run itself, under another name: wrong key -> refused, nothing registered
        addr = Registry.for_run(rd).get("servers", "server-0")["address"]
        one_line_error(cli(tmp_path, "add-servers", f"url=http://{addr}", "api_key=wrong", *NAMES),
                       "api_key", "refused the key")
        assert sorted(Registry.for_run(rd).list("servers")) == ["server-0"]
    finally:
        stop_owner(owner)



def test_a_port_that_does_not_speak_http_is_a_server_that_does_not_answer():
    """Something else on the port (the server died and another service took it): `add-servers url=` says so on one
    line, and the owner's health check counts it as not answering instead of raising (which skipped the other
    attached servers' checks until they expired)."""
    import threading

    from areal_hpc.config import ConfigError
    from areal_hpc.launch import external

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_not_http():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the test closed the listener: done
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    threading.Thread(target=answer_not_http, daemon=True).start()
    try:
        assert external.healthy(f"127.0.0.1:{port}", None, timeout=5) is False
        with pytest.raises(ConfigError, match="does not answer"):
            external.probe(f"http://127.0.0.1:{port}", None, timeout=5)
    finally:
        listener.close()

def test_a_wrong_key_is_refused_by_a_server_whose_health_needs_no_key():
    """SGLang answers /health (and /ready, /metrics) without a key (sglang/srt/utils/auth.py, decide_request_auth);
    its other routes want it. `add-servers url=... api_key=WRONG` must say so, not attach a server whose every
    generation then fails with HTTP 401."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from areal_hpc.config import ConfigError
    from areal_hpc.launch import external

    class SGLangAuth(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/health"):
                status, body = 200, None
            elif self.headers.get("Authorization") != "Bearer right":
                status, body = 401, {"error": "Unauthorized"}
            else:
                status, body = 200, MODEL_INFO
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SGLangAuth)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    try:
        assert external.probe(base, "right", timeout=5)["model_path"] == "/m"
        for key in ("wrong", None):
            with pytest.raises(ConfigError, match="refused the key"):
                external.probe(base, key, timeout=5)
    finally:
        httpd.shutdown()


def test_a_web_server_that_answers_200_to_everything_is_not_attached(tmp_path):
    """A web server that answers 200 to every route (/health, the weight load) was recorded as ext-N, and rollouts to it
    were retried forever: an inference server must name its model in /model_info (SGLang's fields), else a
    `ConfigError` naming url and what answered (one line, exit 2: test_bad_input_is_one_line_and_exit_2); nothing
    recorded."""
    from areal_hpc.config import ConfigError
    from areal_hpc.launch import external

    assert cli(tmp_path, "submit", QUICKSTART, "--dry-run").returncode == 0
    reg = Registry.for_run(next(tmp_path.glob("*/quickstart/run0")))
    reg.put("weights", "latest", {"version": 1, "path": str(tmp_path / "v1")}, ttl=False)  # its weight load: 200 too
    app = ("import sys\nfrom aiohttp import web\nasync def page(request):\n"
           "    return web.Response(text='<html>\\n<body>It works!</body>\\n</html>', content_type='text/html')\n"
           "app = web.Application()\napp.router.add_route('*', '/{tail:.*}', page)\n"
           "web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None)")
    www = subprocess.Popen([sys.executable, "-c", app, str(port := free_port())], start_new_session=True)
    try:
        wait_until(lambda: answers(f"127.0.0.1:{port}", ""), 30, "the web server", interval=0.2)
        with pytest.raises(ConfigError, match=f"url: http://127.0.0.1:{port} is not an SGLang or `hf` generation "
                           "server: .*HTTP 200: <html> <body>It works!</body> </html>"):
            external.attach(reg, f"http://127.0.0.1:{port}")
    finally:
        kill(www)
    for answer in (None, {}, {"model_path": "/m", "is_generation": False}, ["/m"]):  # an embedding model: no generation
        with json_http_server(lambda method, path, body: (200, answer)) as port:
            with pytest.raises(ConfigError, match="not an SGLang or `hf` generation server"):
                external.attach(reg, f"http://127.0.0.1:{port}")
    assert reg.list("servers", live_only=False) == {}


# ----------------------------------------------------------------------------- mode=slurm

SLURM = ["mode=slurm", "cluster.n_nodes=1", "cluster.n_gpus_per_node=4", "cluster.cpus_per_gpu=1",
         "cluster.mem_per_gpu_gb=1", "cluster.partition=debug", "cluster.time=00:30:00"]


@pytest.mark.slurm
def test_an_external_slurm_job_server_joins_a_slurm_run(slurm_cluster):
    import shutil
    import tempfile

    from areal_hpc.launch import external

    root = Path(tempfile.mkdtemp(prefix="areal-ext-", dir="/tmp"))  # "shared" by the fake nodes
    root.chmod(0o755)
    names = [f"cluster.fileroot={root}", "experiment_name=ext", "trial_name=t0"]
    ext_dir = root / "standalone"
    ext_dir.mkdir()
    ext_job = run_job = None

    def run(*args, timeout=600):
        return subprocess.run([sys.executable, "-m", "areal_hpc", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=root)

    try:
        cmd = " ".join(server_cmd(ext_dir, "x"))
        out = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-N1", "-n1", "-c1", "--mem=1G", "-J",
                              "external-hf", "-o", str(ext_dir / "server.log"), "--wrap", cmd],
                             capture_output=True, text=True, timeout=60, check=True)
        ext_job = out.stdout.strip().split(";")[0]
        p = run("submit", QUICKSTART, *SLURM, *SMALL, *names)
        assert p.returncode == 0, p.stdout + p.stderr
        rd = next(root.glob("*/ext/t0"))
        reg = Registry(rd / "registry", ttl_s=TTL_S)
        run_job = str(reg.get("", "run", live_only=False)["job_id"])
        addr, key = wait_standalone(ext_dir, "x")
        wait_until(lambda: steps(rd) >= 2, 300, "2 steps of the Slurm run", interval=0.5)
        base = server_info(addr, key)
        p = run("add-servers", f"url=http://{addr}", f"api_key={key}", *names)
        assert p.returncode == 0 and "attached ext-0" in p.stdout, p.stdout + p.stderr
        wait_until(lambda: server_info(addr, key)["requests"] > base["requests"] + 8, 180,
                   "rollouts on the external job's server", interval=0.5)
        v = server_info(addr, key)["weight_version"]
        wait_until(lambda: server_info(addr, key)["weight_version"] >= v + 2, 180, "weight updates", interval=0.5)
        st = json.loads(run("status", "--json", *names, timeout=120).stdout)
        assert {s["id"]: s["external"] for s in st["servers"]} == {"server-0": False, "ext-0": True}
        rec = reg.get("servers", "ext-0")
        assert rec["process"]["slurm_job_id"] == ext_job, rec  # what `stop --external` cancels
        p = run("stop", *names, "--timeout", "180")
        assert p.returncode == 0 and "detached external server ext-0" in p.stdout, p.stdout + p.stderr
        wait_until(lambda: "RUNNING" not in subprocess.run(["squeue", "-h", "-j", run_job, "-o", "%T"],
                                                           capture_output=True, text=True).stdout,
                   120, "the run's job to end", interval=1.0)
        state = subprocess.run(["squeue", "-h", "-j", ext_job, "-o", "%T"], capture_output=True, text=True).stdout
        assert state.strip() == "RUNNING" and answers(addr, key)  # the external job outlived the run
        assert reg.list("servers", live_only=False) == {}
        assert external.stop_process(rec, run_job) == f"cancelled its Slurm job {ext_job}"  # as `stop --external`
        wait_until(lambda: subprocess.run(["squeue", "-h", "-j", ext_job, "-o", "%T"], capture_output=True,
                                          text=True).stdout.strip() in ("", "COMPLETING"), 60, "the server's job")
    finally:
        for job in (ext_job, run_job):
            if job:
                subprocess.run(["scancel", job], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# fix8-A

def test_two_attaches_of_the_same_server_at_once_register_it_once(tmp_path):
    """Two `add-servers url=...` of one server at the same time: one attaches it, the other says it is already in
    the run. Both passed the duplicate check (made outside the registry lock) and both registered it."""
    import threading

    from areal_hpc.config import ConfigError
    from areal_hpc.launch import external

    reg = Registry(tmp_path / "registry", ttl_s=60)
    results = []
    # /health answers once both attaches are past their duplicate check
    with health_answered_together(2) as port:
        def attach():
            try:
                results.append(external.attach(reg, f"http://127.0.0.1:{port}")[0])
            except ConfigError as e:
                results.append(e.one_line())
        threads = [threading.Thread(target=attach) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert list(reg.list("servers")) == ["ext-0"]
    assert sorted(results)[0] == "ext-0" and "is already in this run as ext-0" in sorted(results)[1], results
    assert "`areal-hpc remove-server ext-0 ...` first" in sorted(results)[1]  # attached by URL: detach it first


def test_the_owner_checks_attached_servers_at_once(tmp_path):
    """The owner's health checks of attached servers run at the same time: one after another (5 s each), a few dead
    servers delayed the refresh of the live ones past their records' TTL, and live servers were dropped from the run.
    The servers here answer only once all three checks are in flight."""
    from areal_hpc.launch.external import check_attached

    reg = Registry(tmp_path / "registry", ttl_s=60)
    with health_answered_together(3, weight_version=7) as port:
        url = f"http://127.0.0.1:{port}"
        for i in range(3):
            reg.put("servers", f"ext-{i}", {"url": url, "address": url, "external": True, "weight_version": 0})
        check_attached(reg, timeout_s=2)
    assert {sid: rec["weight_version"] for sid, rec in reg.list("servers").items()} == {
        "ext-0": 7, "ext-1": 7, "ext-2": 7}


# fix14-P

def test_an_attach_whose_second_weight_load_fails_leaves_no_record(tmp_path):
    """A trainer publishes while the server loads the run's weights; the server cannot load the newer ones:
    `add-servers` fails (exit 2), and the server is not left in the run with stale weights (it stayed registered)."""
    from areal_hpc.config import ConfigError
    from areal_hpc.launch import external

    reg = Registry(tmp_path / "registry", ttl_s=60)
    reg.put("weights", "latest", {"version": 1, "path": str(tmp_path / "v1")}, ttl=False)

    def respond(method, path, body):  # /update_weights_from_disk: v1 loads (and v2 is published meanwhile), v2 not
        if method == "GET":
            return 200, MODEL_INFO
        if reg.get("weights", "latest", live_only=False)["version"] == 1:
            reg.put("weights", "latest", {"version": 2, "path": str(tmp_path / "v2")}, ttl=False)
            return 200, {"success": True}
        return 400, {"error": "permission denied"}

    with json_http_server(respond) as port:
        with pytest.raises(ConfigError, match="could not load the run's weights .*v2: permission denied"):
            external.attach(reg, f"http://127.0.0.1:{port}")
    assert reg.list("servers", live_only=False) == {}


def test_remove_server_takes_the_id_or_the_url(tmp_path):
    """`remove-server ext-0 ...  # or the URL` (README): the URL as given to add-servers, with a trailing slash, or
    host:port; the server keeps running."""
    from areal_hpc.launch import external

    assert cli(tmp_path, "submit", QUICKSTART, "--dry-run").returncode == 0
    reg = Registry.for_run(next(tmp_path.glob("*/quickstart/run0")))
    with json_http_server(lambda method, path, body: (200, MODEL_INFO)) as port:
        for ident in ("ext-0", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/", f"127.0.0.1:{port}"):
            assert external.attach(reg, f"http://127.0.0.1:{port}")[0] == "ext-0"
            p = cli(tmp_path, "remove-server", ident, *NAMES)
            assert p.returncode == 0 and "detached ext-0" in p.stdout, (ident, p.stdout, p.stderr)
            assert reg.list("servers", live_only=False) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="runs another user's process (needs root)")
def test_stop_external_leaves_another_users_process_that_took_the_pid(tmp_path):
    """The recorded pid of a server started by hand now belongs to another user's process: `stop --external` says it
    is not ours and goes on (the PermissionError of os.kill was a traceback)."""
    from areal_hpc.launch.external import stop_process

    other = subprocess.Popen(["sleep", "60"], user=65534)
    os.seteuid(65533)  # neither root nor that process's user
    try:
        said = stop_process({"pid": other.pid, "host": socket.gethostname(), "address": "h:1"}, None)
    finally:
        os.seteuid(0)
    try:
        assert other.poll() is None and f"pid {other.pid}" in said and "another user's" in said, said
    finally:
        other.kill()
        other.wait()


def test_attaching_a_server_already_in_the_run_under_another_address_is_refused(tmp_path):
    """`add-servers url=http://127.0.0.1:PORT` of a server the run already has (registered as ``host:PORT``, e.g. an
    `areal-hpc serve` by hand): the same server twice would get every rollout and weight update twice. The `hf` server
    says which it is (its id and pid), whatever the URL's spelling. The hint said to `remove-server g0` first, which
    refuses a server not attached by URL: it is in the run already, nothing to do."""
    from areal_hpc.config import ConfigError
    from areal_hpc.launch import external

    proc, address, _ = start_standalone(tmp_path, "g0")
    try:
        reg = Registry(tmp_path / "standalone-g0" / "registry", ttl_s=TTL_S)
        port = address.rsplit(":", 1)[1]
        with pytest.raises(ConfigError, match="already in this run as g0") as e:
            external.attach(reg, f"http://127.0.0.1:{port}")
        assert "remove-server" not in e.value.one_line() and "nothing to attach" in e.value.one_line()
        assert sorted(reg.list("servers", live_only=False)) == ["g0"]
    finally:
        kill(proc)


def test_a_key_that_is_no_header_value_is_refused_without_showing_it(tmp_path):
    """`add-servers api_key=...` with a line break in the key: urllib's ValueError traceback printed the key; an empty
    one: one line too."""
    assert cli(tmp_path, "submit", QUICKSTART, "--dry-run").returncode == 0  # a run dir to attach to
    for key in ("abc\nSEKRIT", "abc\rSEKRIT", "SEKRIT\u2019"):
        p = cli(tmp_path, "add-servers", f"url=http://127.0.0.1:{free_port()}", f"api_key={key}", *NAMES)
        one_line_error(p, "api_key", "line break", "not shown")
        assert "SEKRIT" not in p.stdout + p.stderr
    # an empty key (an unset shell variable: api_key=$KEY) fell back to the run's own, silently
    for empty in (["api_key="], ["--api-key", ""]):
        p = cli(tmp_path, "add-servers", f"url=http://127.0.0.1:{free_port()}", *empty, *NAMES)
        one_line_error(p, "api_key", "is empty", "leave api_key out")


def test_credentials_in_the_url_are_refused_without_showing_them(tmp_path):
    """`url=http://user:secret@host:port` was stored in the record and printed by `status` and messages as given."""
    for url in (f"http://user:SEKRIT@127.0.0.1:{free_port()}", "https://:SEKRIT@h:1/p", "http://SEKRIT@h",
                "u:SEKRIT@h:1"):  # (the last two are no server URLs either: still not shown)
        p = cli(tmp_path, "add-servers", f"url={url}", *NAMES)
        one_line_error(p, "url", "holds a user or password (not shown)", "api_key_file=")
        assert "SEKRIT" not in p.stdout + p.stderr


def test_a_key_file_keeps_the_key_out_of_argv_and_must_be_private(tmp_path):
    """`api_key=KEY` is in every user's `ps` and in shell history; `api_key_file=PATH` (or a pipe) reads it instead. A
    file others can read, a missing or empty one, or both ways at once: one line naming api_key_file, exit 2."""
    assert cli(tmp_path, "submit", QUICKSTART, "--dry-run").returncode == 0
    url = f"url=http://127.0.0.1:{free_port()}"  # nothing answers: a key that was read gets that far
    key = tmp_path / "key"
    key.write_text("SEKRIT\n")
    key.chmod(0o644)  # as umask 022 makes it
    p = cli(tmp_path, "add-servers", url, f"api_key_file={key}", *NAMES)
    one_line_error(p, "api_key_file", "open to group or others (mode 0644)", f"chmod 600 {key}")
    key.chmod(0o600)
    one_line_error(cli(tmp_path, "add-servers", url, f"--api-key-file={key}", *NAMES), "url", "does not answer")
    for k, words in (((tmp_path / "nope"), ("cannot read", "No such file")), (tmp_path, ("cannot read",))):
        one_line_error(cli(tmp_path, "add-servers", url, f"api_key_file={k}", *NAMES), "api_key_file", *words)
    one_line_error(cli(tmp_path, "add-servers", url, "api_key_file=/dev/stdin", *NAMES, stdin="SEKRIT\n"),
                   "url", "does not answer")  # a pipe
    (tmp_path / "empty").write_text("")
    (tmp_path / "empty").chmod(0o600)
    one_line_error(cli(tmp_path, "add-servers", url, f"api_key_file={tmp_path / 'empty'}", *NAMES), "is empty")
    (tmp_path / "two").write_text("SEKRIT\nline2\n")
    (tmp_path / "two").chmod(0o600)
    p = cli(tmp_path, "add-servers", url, f"api_key_file={tmp_path / 'two'}", *NAMES)
    one_line_error(p, "api_key_file", "line break")
    assert "SEKRIT" not in p.stderr
    one_line_error(cli(tmp_path, "add-servers", url, f"api_key_file={key}", "api_key=x", *NAMES), "both given")
    one_line_error(cli(tmp_path, "add-servers", f"api_key_file={key}", *NAMES), "api_key_file", "url=")


def test_an_sglang_older_than_the_info_renames_is_attached_by_the_old_names(tmp_path):
    """SGLang renamed /get_model_info and /get_server_info to /model_info and /server_info; the pinned one logs a
    deprecation warning at each call of an old name, an older one has only those. `add-servers url=` asks the new name,
    and the old one only after a 404; the old one's model and server info are read as the new ones."""
    from areal_hpc.launch import external

    reg = Registry(tmp_path / "registry", ttl_s=60)
    for new in (True, False):
        asked = []

        def respond(method, path, body):
            asked.append(path)
            served = {"/health": {}, "/model_info" if new else "/get_model_info": MODEL_INFO,
                      "/server_info" if new else "/get_server_info": {"pid": 4242 if new else 4343}}
            return (200, served[path]) if path in served else (404, {"detail": "Not Found"})

        with json_http_server(respond) as port:
            sid, rec = external.attach(reg, f"http://127.0.0.1:{port}")
            external.check_attached(reg, timeout_s=5)
        assert rec["model_path"] == "/m" and rec["process"] == {"pid": 4242 if new else 4343}, rec
        old = ["/get_server_info", "/get_model_info"]
        assert [p for p in asked if p.startswith("/get_")] == ([] if new else old + ["/get_model_info"]), asked
        reg.delete("servers", sid)
