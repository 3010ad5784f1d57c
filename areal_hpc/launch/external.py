"""External servers: SGLang or `hf` servers a run did not start, attached to it by URL (``add-servers url=...``).

Nobody heartbeats for an attached server: the run's owner refreshes its record while ``/health`` answers
(`watch_attached`). It keeps running when detached or at `stop`, unless asked (`stop_process`). An ``areal-hpc serve``
started by hand registers itself, marked external too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from areal_hpc.config import ConfigError
from areal_hpc.inference import sglang_api as api
from areal_hpc.launch import slurm
from areal_hpc.registry import Registry, runs_here

log = logging.getLogger("areal_hpc.launch")

PREFIX = "ext-"
KEY_HINT = "pass the server's key as api_key_file=PATH (or api_key=...)"


def parse_url(url: str) -> Tuple[str, str]:
    """``http(s)://host:port[/prefix]`` -> (base URL, registry address: ``host:port`` for a plain http URL, as
    our own servers record it, else the base URL)."""
    u = urllib.parse.urlsplit(url.strip())
    if "@" in (u.netloc or url):  # user:password@: it would be in the record and in messages
        raise ConfigError("url", "holds a user or password (not shown)", "give the key as api_key_file=...")
    try:
        port = u.port
    except ValueError:
        port = -1
    if u.scheme not in ("http", "https") or not u.hostname or port == -1 or u.query or u.fragment:
        raise ConfigError("url", f"{url!r} is not a server URL", "give http://HOST:PORT (or https://...)")
    if port is None:
        raise ConfigError("url", f"{url!r} has no port", "give http://HOST:PORT")
    base = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"
    return base, (u.netloc if u.scheme == "http" and not u.path.strip("/") else base)


def read_key_file(path: str) -> str:
    """``api_key_file=``: the key, one line (one trailing newline stripped), from a file only its owner can read (a pipe
    too: ``api_key_file=/dev/stdin``); it stays out of argv (`ps`) and shell history."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:  # (a pipe or a terminal holds no key for others)
                raise ConfigError("api_key_file", f"{path} is open to group or others (mode "
                                  f"{st.st_mode & 0o777:04o}): the key leaks to other users", f"chmod 600 {path}")
            raw = f.read(1 << 16)
    except OSError as e:
        raise ConfigError("api_key_file", f"cannot read {path} ({e.strerror})",
                          "give a file that holds the server's key, mode 0600") from None
    key = raw.decode(errors="replace").removesuffix("\n").removesuffix("\r")
    if not key:
        raise ConfigError("api_key_file", f"{path} is empty", "write the server's key into it")
    check_key(key, "api_key_file")
    return key


def check_key(key: str, name: str) -> None:
    """A key is sent as an HTTP header: one line of printable ASCII (a bad one is named, never shown)."""
    if not key:  # (`api_key=$KEY` with KEY unset): an empty key meant the run's, silently
        raise ConfigError(name, "is empty", "give the server's key, or leave api_key out to use the run's own")
    if not (key.isascii() and key.isprintable()):
        raise ConfigError(name, "holds a line break, a control or a non-ASCII character (the key is not shown)",
                          "give the server's key alone, on one line")


def call(base: str, route: api.Route, key: Optional[str], payload: Optional[dict] = None,
         timeout: Optional[float] = 10.0) -> Tuple[int, Any]:
    """(HTTP status, JSON body or text) of one call; raises OSError when nothing answers, or not in HTTP."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(base + route.path, data=None if payload is None else json.dumps(payload).encode(),
                                 headers=headers, method=route.method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except http.client.HTTPException as e:  # another service on the port, an answer cut short
        raise OSError(f"no HTTP answer: {e!r}") from e
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def at_once(fn: Callable[[Any], Any], items: Iterable[Any]) -> List[Any]:
    """``[fn(x) for x in items]``, called at the same time: the timeouts of a few dead servers do not add up."""
    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(fn, items))


def call_info(base: str, route: api.Route, key: Optional[str], timeout: float) -> Tuple[int, Any]:
    """GET /model_info or /server_info; from an SGLang older than their names, the old name (`api.OLD_NAMES`)."""
    status, body = call(base, route, key, timeout=timeout)
    return call(base, api.OLD_NAMES[route], key, timeout=timeout) if status == 404 else (status, body)


def healthy(address: str, key: Optional[str], timeout: float = 5.0) -> bool:
    try:
        return call(api.base_url(address), api.HEALTH, key, timeout=timeout)[0] == 200
    except OSError:
        return False


def probe(base: str, key: Optional[str], timeout: float = 10.0) -> Dict[str, Any]:
    """What the server says of itself; a `ConfigError` unless it answers /health with this key and names its model."""
    try:
        status, body = call(base, api.HEALTH, key, timeout=timeout)
    except OSError as e:
        raise ConfigError("url", f"{base} does not answer {api.HEALTH.path} ({getattr(e, 'reason', e)})",
                          "start the server first, and check the host and port") from None
    if status in (401, 403):
        raise ConfigError("api_key", f"{base} refused the key (HTTP {status})", KEY_HINT)
    if status != 200:
        raise ConfigError("url", f"{base}{api.HEALTH.path} answered HTTP {status}: {api.error_message(body)}")
    info: Dict[str, Any] = {}
    for route in (api.SERVER_INFO, api.MODEL_INFO):  # SGLang and `hf` both have them; /model_info is required
        status, body = 0, "no answer"
        with contextlib.suppress(OSError):
            status, body = call_info(base, route, key, timeout)
            if status in (401, 403):  # SGLang answers /health without a key: these check it
                raise ConfigError("api_key", f"{base} refused the key (HTTP {status})", KEY_HINT)
            if status == 200 and isinstance(body, dict):
                info.update({k: v for k, v in body.items() if k != "internal_states"})
    model = body if status == 200 and isinstance(body, dict) else {}  # (a web server answers 200 to anything)
    if not model.get("model_path") or model.get("is_generation") is not True:
        raise ConfigError("url", f"{base} is not an SGLang or `hf` generation server: {api.MODEL_INFO.path} gave no "
                          f"model_path and is_generation (HTTP {status}: {api.error_message(body or 'nothing')})",
                          "give the URL of an inference server")
    return info


def _published(reg: Registry) -> Optional[Dict[str, Any]]:
    latest = reg.get("weights", "latest", live_only=False)
    return latest if latest and latest.get("path") else None


def load_published(base: str, key: Optional[str], reg: Registry, timeout: float = 600.0) -> Optional[Any]:
    """Have the server load the run's newest published weights (which also checks it can read them); their version
    (None: nothing published yet)."""
    latest = _published(reg)
    if latest is None:
        return None
    route = api.UPDATE_WEIGHTS_FROM_DISK
    try:
        status, body = call(base, route, key, api.update_from_disk_body(latest["path"], latest.get("version")), timeout)
    except OSError as e:
        raise ConfigError("url", f"{base} did not answer {route.path} ({getattr(e, 'reason', e)})") from None
    ok, err = api.call_outcome(status, body)
    if not ok:
        raise ConfigError("url", f"{base} could not load the run's weights {latest['path']}: {err}",
                          f"disk weight updates need {Path(latest['path']).parent} readable from the server "
                          "(a filesystem it shares with the run, and permissions: cluster.group_readable)")
    return api.parse_version(latest.get("version"))


def find(reg: Registry, ident: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(id, record) of the server named by its id or its URL/address."""
    recs = reg.list("servers", live_only=False)
    if ident in recs:
        return ident, recs[ident]
    want = {ident.rstrip("/"), api.base_url(ident.rstrip("/"))}
    return next(((sid, rec) for sid, rec in recs.items() if {rec.get("address") or "", rec.get("url"),
                                                             api.base_url(rec.get("address") or "")} & want), None)


def attach(reg: Registry, url: str, api_key: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """Check, align and register an already-running server; returns its (id, record)."""
    base, address = parse_url(url)

    def refuse_a_duplicate(info: Dict[str, Any]) -> None:
        have = find(reg, address) or next(  # under another address: our `hf` server says its id and pid
            ((s, r) for s, r in reg.list("servers", live_only=False).items()
             if info.get("server_id") == s and info.get("pid") == r.get("pid")), None)
        if have is not None:  # only one attached by URL can be detached (remove-server refuses the others)
            raise ConfigError("url", f"{base} is already in this run as {have[0]}",
                              f"`areal-hpc remove-server {have[0]} ...` first" if have[1].get("url")
                              else "it serves the run already: nothing to attach")
    refuse_a_duplicate({})  # at once, before the checks and the weight load
    key = api_key or reg.secret()
    info = probe(base, key)
    refuse_a_duplicate(info)
    version = load_published(base, key, reg)
    if version is None:
        version = api.model_info_version(info)
        log.warning("no weights are published yet: the first disk update will tell whether %s can read the run's "
                    "weights directory", base)
    with reg.locked("external"):
        refuse_a_duplicate(info)  # again, under the lock: a concurrent attach of the same server may have won
        used = [int(s[len(PREFIX):]) for s in reg.list("servers", live_only=False)
                if s.startswith(PREFIX) and s[len(PREFIX):].isdigit()]
        sid = f"{PREFIX}{max(used, default=-1) + 1}"
        u = urllib.parse.urlsplit(base)
        rec = {"address": address, "url": base, "host": u.hostname, "port": u.port, "external": True,
               "backend": "hf" if info.get("backend") == "hf" else "sglang", "api_key": api_key, "state": "ready",
               "weight_version": version, "model_path": info.get("model_path"), "node": u.hostname, "pid": None,
               "gpus": None, "started_at": time.time(),
               # where its process runs, when it says so (our `hf` server does): `stop --external` uses it
               "process": {k: info.get(k) for k in ("pid", "hostname", "slurm_job_id") if info.get(k)}}
        reg.put("servers", sid, rec, ttl=True)
    # a trainer may have published while this one was loading: close the race (as `serve` does)
    latest = _published(reg)
    if latest is not None and api.parse_version(latest.get("version")) != version:
        try:
            version = load_published(base, key, reg)
        except ConfigError:
            reg.delete("servers", sid)  # not to stay in the run with stale weights
            raise
        rec = reg.update("servers", sid, lambda old: old and {**old, "weight_version": version}, ttl=True) or rec
    return sid, rec


def detach(reg: Registry, ident: str) -> Tuple[str, Dict[str, Any]]:
    """Remove an external server's record (the server keeps running)."""
    found = find(reg, ident)
    if found is None:
        ext = sorted(s for s, r in reg.list("servers", live_only=False).items() if r.get("external"))
        raise ConfigError("SERVER", f"no server {ident!r} in this run",
                          f"external servers: {', '.join(ext) or 'none'} (see `areal-hpc status`)")
    sid, rec = found
    if not rec.get("external"):
        raise ConfigError("SERVER", f"{sid} was started by the run, not attached",
                          "remove-server detaches external servers; `areal-hpc stop` stops the run's own")
    if not rec.get("url"):
        raise ConfigError("SERVER", f"{sid} is an `areal-hpc serve` started by hand: it registers itself again",
                          "stop that process (Ctrl-C, or `areal-hpc stop --external`)")
    reg.update("servers", sid, lambda old: None)
    return sid, rec


def stop_process(rec: Dict[str, Any], run_job_id: Optional[str]) -> str:
    """Stop an external server's process where we know it (its own Slurm job, a pid here); what was done, in words."""
    # attached: what its /server_info said; `areal-hpc serve` by hand: its own record
    where = (rec.get("process") or {}) if rec.get("url") else rec
    job, pid = where.get("slurm_job_id"), where.get("pid")
    name = rec.get("url") or rec.get("address")
    if job and str(job) != str(run_job_id or ""):
        err = slurm.scancel(job)
        return f"scancel {job} failed: {err}" if err else f"cancelled its Slurm job {job}"
    if pid and runs_here(where.get("hostname"), where.get("host"), where.get("node")):
        try:
            os.kill(int(pid), signal.SIGTERM)
            return f"sent SIGTERM to pid {pid}"
        except ProcessLookupError:
            return f"pid {pid} had already exited"
        except PermissionError:  # the pid was reused
            return f"left pid {pid} alone: another user's process has it now"
    return f"left running: not on this host and not a Slurm job of its own; stop it where it runs ({name})"


def check_attached(reg: Registry, timeout_s: float = 5.0) -> None:
    """Refresh attached servers' records (and weight version) while ``/health`` answers; remove expired ones."""
    live, attached = reg.list("servers"), []
    for sid, rec in reg.list("servers", live_only=False).items():
        if not (rec.get("external") and rec.get("url")):
            continue
        if sid in live:
            attached.append((sid, rec))
        elif reg.delete("servers", sid):
            log.warning("external server %s (%s) did not answer %s for %.0fs: removed from the run "
                        "(it is not ours to stop)", sid, rec["url"], api.HEALTH.path, reg.ttl_s)

    def refresh(sid: str, rec: Dict[str, Any]) -> None:
        key = rec.get("api_key") or reg.secret()
        if not healthy(rec["url"], key, timeout_s):
            return
        version = None  # unknown: the record keeps the one it has
        with contextlib.suppress(OSError):
            status, body = call_info(rec["url"], api.MODEL_INFO, key, timeout_s)
            version = api.model_info_version(body) if status == 200 else None
        # under the record's lock: a `remove-server` meanwhile wins (None stays None)
        reg.update("servers", sid, lambda old: old and {
            **old, "weight_version": old.get("weight_version") if version is None else version}, ttl=True)
    # at once: one after another, a few dead servers' timeouts would outlast the records of the live ones
    at_once(lambda a: refresh(*a), attached)


def watch_attached(reg: Registry, interval_s: float) -> threading.Event:
    """`check_attached` every ``interval_s`` on a daemon thread, until the returned event is set."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            try:
                check_attached(reg)
            except Exception:  # a flaky filesystem or server must not kill the owner's thread
                log.exception("checking external servers failed")
    threading.Thread(target=run, name="external-servers", daemon=True).start()
    return stop
