"""`status`, `logs`, `stop`, `add-servers`: talk to a live run through its registry.

The process that owns a run (the local launcher, or the driver inside a Slurm allocation) writes
``run.json`` and serves ``requests/*.json``; these commands read records and write requests, so
they work the same from a login node and from the machine running a local run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

from areal_hpc.config import ExperimentConfig, load_resolved
from areal_hpc.registry import Registry, pid_alive


def run_registry(rd: Path) -> Registry:
    cfg = load_resolved(rd / "config.yaml")
    return Registry.for_run(rd, cfg.launcher)


def serving_servers(reg: Registry) -> set:
    """Ids of live servers that serve (state ready/paused), not those still loading a model."""
    return {k for k, v in reg.list("servers").items() if v.get("state") in ("ready", "paused")}


def post_request(reg: Registry, kind: str, **fields) -> str:
    """Queue a control request for the run's owner (driver or local launcher)."""
    name = f"{time.time_ns()}-{kind}"
    reg.put("requests", name, {"kind": kind, "created": time.time(), **fields}, ttl=False)
    return name


def _health(address: str, key: str, timeout: float = 2.0) -> bool:
    from areal_hpc.launch.external import base_url

    req = urllib.request.Request(f"{base_url(address)}/health", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def _slurm_state(job_id: str) -> Dict[str, Any]:
    """Job and step states from squeue (live) or sacct (finished)."""
    out: Dict[str, Any] = {"job_id": job_id}
    try:
        q = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%M|%N"], capture_output=True, text=True,
                           timeout=10)
        if q.returncode == 0 and q.stdout.strip():
            out["state"], out["elapsed"], out["nodes"] = q.stdout.strip().split("|", 2)
        s = subprocess.run(["sacct", "-n", "-P", "-j", str(job_id), "-o", "JobID,JobName,State,NodeList"],
                           capture_output=True, text=True, timeout=10)
        steps = []
        for line in s.stdout.splitlines():
            jid, name, state, nodes = (line.split("|") + ["", "", "", ""])[:4]
            if "." in jid:
                steps.append({"step": jid, "name": name, "state": state, "nodes": nodes})
            elif "state" not in out:
                out["state"] = state
        out["steps"] = steps
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        out["error"] = f"cannot query Slurm: {e}"
    return out


def _last_metrics(rd: Path, n: int = 5) -> List[Dict[str, Any]]:
    p = rd / "metrics.jsonl"
    try:
        lines = p.read_text().splitlines()[-n:]
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in lines if x.strip()]


_SLURM_WAITING = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESIZING")
_SLURM_LIVE = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")


def _word(state: Optional[str]) -> str:
    return (state or "").split()[0] if state else ""  # "CANCELLED by 0" -> CANCELLED


# modes whose owner is the submitting process; in the first two its steps are processes of its host
_HOST_MODES = ("local", "torchrun")
_OWNER_HERE = (*_HOST_MODES, "ray")


def _owner_alive(run: Dict[str, Any], reg: Registry) -> bool:
    """mode=local (torchrun, ray): the launcher process lives (on this host by pid, elsewhere by its heartbeat)."""
    if run.get("host") in (None, socket.gethostname()):
        return pid_alive(run.get("pid"))
    return reg.get("", "run") is not None


def run_state(run: Dict[str, Any], job: Dict[str, Any], rd: Path, owner_alive: bool) -> Dict[str, Any]:
    """The run's state (outcome.*), why, and which log tells more: the owner's record, checked
    against what Slurm (or the process table) says, so a run whose owner died says so."""
    from areal_hpc.launch import outcome

    rec_state = run.get("state")
    mine = {"state": rec_state, "reason": run.get("reason"), "log": run.get("log")}
    if run.get("mode") == "slurm":
        js = _word(job.get("state"))
        slurm_out = str(rd / "logs" / f"slurm-{run.get('job_id')}.out")
        if js in _SLURM_WAITING:
            return {**mine, "state": outcome.REQUEUED if rec_state == outcome.REQUEUED else outcome.PENDING}
        if js in _SLURM_LIVE:
            return mine if rec_state in outcome.FINAL else {**mine, "state": outcome.RUNNING}
        if rec_state in outcome.FINAL:
            return mine
        if not js:
            return {**mine, "state": rec_state or "UNKNOWN"}
        if js == "CANCELLED":
            return {"state": outcome.STOPPED, "reason": f"job {run.get('job_id')} was cancelled (scancel) before its "
                    "driver recorded how the run ended", "log": slurm_out}
        why = {"TIMEOUT": "hit its time limit (cluster.time)", "OUT_OF_MEMORY": "ran out of memory",
               "NODE_FAIL": "lost a node"}.get(js, f"ended {js}")
        return {"state": outcome.FAILED, "reason": f"job {run.get('job_id')} {why} before its driver recorded how "
                "the run ended", "log": slurm_out}
    if not run:
        return {"state": None, "reason": None, "log": None}
    if owner_alive:
        return {**mine, "state": outcome.RUNNING}
    if rec_state in outcome.FINAL:
        return mine
    return {"state": outcome.FAILED, "log": str(rd / "logs" / "driver.log"),
            "reason": f"the launcher (pid {run.get('pid')} on {run.get('host')}) ended without recording how the "
                      "run ended (killed?)"}


def _step_ended(job: Dict[str, Any], step_id: Any) -> bool:
    """Whether Slurm says step ``step_id`` of ``job`` (a `_slurm_state`) has ended (every step
    has once the job is not running)."""
    state = _word(job.get("state"))
    if state and state not in _SLURM_LIVE:
        return True
    name = f"{job.get('job_id')}.{step_id}"
    return any(s["step"] == name and _word(s.get("state")) not in _SLURM_LIVE for s in job.get("steps", []))


def _server_alive(rec: Dict[str, Any], run: Dict[str, Any], jobs: Dict[str, Dict[str, Any]]) -> bool:
    """A live record may still belong to a dead process (it lives until its TTL): check the
    process (mode=local, this host) or its Slurm step. An attached server has neither: its record
    lives while the owner's health checks refresh it."""
    if rec.get("external") and rec.get("url"):
        return True
    if run.get("mode") in _HOST_MODES and run.get("host") in (None, socket.gethostname()) and rec.get("pid"):
        return pid_alive(rec.get("pid"))
    job = jobs.get(str(rec.get("slurm_job_id")))
    if job is None or rec.get("slurm_step_id") is None:
        return True  # Slurm knows nothing of it: trust the heartbeat
    return not _step_ended(job, rec["slurm_step_id"])


def collect_status(rd: Path) -> Dict[str, Any]:
    reg = run_registry(rd)
    key = reg.secret()
    run = reg.get("", "run", live_only=False) or {}
    jobs: Dict[str, Dict[str, Any]] = {}
    if run.get("mode") == "slurm" and run.get("job_id"):
        jobs[str(run["job_id"])] = _slurm_state(run["job_id"])
        for j in reg.list("jobs", live_only=False):  # `add-servers --new-job` jobs
            jobs[str(j)] = _slurm_state(j)
    srv = []
    for sid, rec in sorted(reg.list("servers").items()):
        if not _server_alive(rec, run, jobs):
            continue  # its process or step has ended: not a live server, whatever its record says
        srv.append({"id": sid, "address": rec.get("address"), "backend": rec.get("backend"),
                    "weight_version": rec.get("weight_version"), "node": rec.get("node"), "pid": rec.get("pid"),
                    "gpus": rec.get("gpus"), "slurm_step": rec.get("slurm_step_id"),
                    "external": bool(rec.get("external")), "url": rec.get("url"),
                    "own_key": bool(rec.get("api_key")),  # the key itself is never printed
                    "healthy": _health(rec.get("address", ""), rec.get("api_key") or key),
                    "age_s": round(rec.get("_age_s", 0), 1)})
    trainer = reg.get("", "trainer")
    metrics = _last_metrics(rd)
    status: Dict[str, Any] = {"run_dir": str(rd), "mode": run.get("mode"), "servers": srv,
                              "api_key_file": str(reg.root / "secret"),
                              "trainer": None if trainer is None else
                              {k: v for k, v in trainer.items() if not k.startswith("_")}}
    owner_alive = False
    if run.get("mode") == "slurm" and run.get("job_id"):
        status["job"] = jobs.pop(str(run["job_id"]))
        owner_alive = _word(status["job"].get("state")) in _SLURM_LIVE
        extra = reg.list("jobs", live_only=False)
        if extra:
            status["server_jobs"] = [{**jobs[str(j)], "servers": rec.get("servers")}
                                     for j, rec in sorted(extra.items())]
    elif run:
        owner_alive = _owner_alive(run, reg)
        status["job"] = {"launcher_pid": run.get("pid"), "host": run.get("host"),
                         "state": "RUNNING" if owner_alive else "ENDED"}
    if status["trainer"] is not None and run and not owner_alive:
        status["trainer"] = None  # the owner's steps end with it
    elif status["trainer"] is not None and run.get("mode") in _HOST_MODES and not pid_alive(trainer.get("pid")) and \
            trainer.get("host") in (None, socket.gethostname()):
        status["trainer"] = None
    if run.get("mode") == "ray":  # its actors and placement groups, as Ray sees them
        from areal_hpc.launch import ray_runner

        status["ray"] = ray_runner.describe(reg)
    status.update(run_state(run, status.get("job") or {}, rd, owner_alive))
    status["trainer_restarts"] = run.get("trainer_restarts", 0)
    if metrics:
        last = metrics[-1]
        status["progress"] = {k: last.get(k) for k in ("step", "version", "reward_mean", "time_s",
                                                      "trained_tokens_per_s", "gen_tokens_per_s", "staleness_max")}
    return status


def status(cfg: ExperimentConfig, rd: Path, as_json: bool = False) -> int:
    st = collect_status(rd)
    if as_json:
        print(json.dumps(st, indent=2))
        return 0
    job = st.get("job") or {}
    print(f"run      {st['run_dir']}  (mode={st['mode'] or '?'})")
    print(f"state    {st.get('state') or 'unknown (no owner recorded)'}"
          + (f": {st['reason']}" if st.get("reason") else "")
          + (f" ({st['trainer_restarts']} trainer restart(s))" if st.get("trainer_restarts") else ""))
    if st.get("log") and st.get("state") not in ("COMPLETED", "RUNNING", "PENDING"):
        print(f"         see {st['log']}  (areal-hpc logs ...)")
    print(f"job      {job.get('job_id', '')} {job.get('state', 'no owner recorded')} {job.get('nodes', '')}".rstrip())
    ray = st.get("ray") or {}
    if ray:
        print(f"ray      {ray.get('address')}: " + (ray["error"] if "error" in ray else
                                                   f"{len(ray['placement_groups'])} placement group(s), "
                                                   f"{len(ray['actors'])} actor(s)"))
    for g in ray.get("placement_groups", []):
        print(f"  {g['name']:<50} {g['state']:<8} nodes {', '.join(n[:8] for n in g['nodes'])}")
    for step in job.get("steps", []):
        print(f"  step {step['step']:<12} {step['name']:<40} {step['state']:<11} {step['nodes']}")
    for j in st.get("server_jobs", []):
        print(f"job      {j.get('job_id')} {j.get('state', '?')} {j.get('nodes', '')} (servers {', '.join(j.get('servers') or [])})")
    print(f"servers  {len(st['servers'])} live; API key: the contents of {st['api_key_file']} (mode 0600), sent as "
          "`Authorization: Bearer <key>`")
    for s in st["servers"]:
        where = (f"external ({'its own key' if s['own_key'] else 'the run key'}; not stopped by `stop`)"
                 if s["url"] else f"external (serve by hand) node={s['node']} pid={s['pid']}" if s["external"]
                 else f"node={s['node']} pid={s['pid']} gpus={s['gpus']}")
        print(f"  {s['id']:<10} {s['address']:<22} {s['backend']:<6} v{s['weight_version']}  "
              f"{'healthy' if s['healthy'] else 'UNHEALTHY'}  {where}")
    t = st["trainer"]
    print("trainer  " + ("not running" if t is None else
                         f"step {t.get('step')} version {t.get('version')} state={t.get('state')} "
                         f"ranks={t.get('world_size')} host={t.get('host')}"))
    p = st.get("progress")
    if p:
        print(f"progress step {p['step']} v{p['version']} reward {p['reward_mean']:.3f}  "
              f"{p.get('trained_tokens_per_s') or 0:.0f} trained tok/s  {p.get('gen_tokens_per_s') or 0:.0f} gen tok/s")
    return 0


def _log_file(rd: Path, role: str) -> Path:
    logs = rd / "logs"
    if role == "slurm":
        outs = sorted(logs.glob("slurm-*.out"), key=lambda p: p.stat().st_mtime)
        if outs:
            return outs[-1]
    candidates = {"trainer": ["trainer-0.log"], "driver": ["driver.log"]}.get(role, [f"{role}.log"])
    for c in candidates:
        if (logs / c).exists():
            return logs / c
    have = sorted(p.name.rsplit(".", 1)[0] for p in logs.glob("*.log"))
    from areal_hpc.config import ConfigError

    raise ConfigError("ROLE", f"no log for {role!r} in {logs}", f"available: {', '.join(have) or 'none yet'}")


def logs(rd: Path, role: str, follow: bool = False, lines: int = 50) -> int:
    path = _log_file(rd, role)
    with open(path, "rb") as f:
        tail = f.read().splitlines()[-lines:] if lines > 0 else []
        sys.stdout.write("".join(x.decode(errors="replace") + "\n" for x in tail))
        sys.stdout.flush()
        while follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0


def _remove_dead_records(reg: Registry, run: Dict[str, Any]) -> None:
    """Records of this run's processes that are known dead (this host's pids; ended Slurm steps)."""
    jobs = {}
    if run.get("mode") == "slurm" and run.get("job_id"):
        jobs[str(run["job_id"])] = _slurm_state(run["job_id"])
    live = reg.list("servers")
    for sid, rec in reg.list("servers", live_only=False).items():
        if sid not in live or not _server_alive(rec, run, jobs):
            reg.delete("servers", sid)
    trainer = reg.get("", "trainer", live_only=False)
    if trainer is not None and (reg.get("", "trainer") is None or (
            trainer.get("host") == socket.gethostname() and not pid_alive(trainer.get("pid")))):
        reg.delete("", "trainer")


def stop(cfg: ExperimentConfig, rd: Path, timeout_s: float = 120.0, external: bool = False) -> int:
    """Graceful stop: the owner checkpoints the trainer, stops servers, ends the job; waits for all
    of it and prints how the run ended. A second `stop` (or Ctrl-C while this one waits) forces it:
    what is left is killed. External servers (attached by URL, or `serve` by hand) keep running:
    attached ones are detached; with ``external`` they are stopped too, where we can tell how."""
    from areal_hpc.launch import outcome
    from areal_hpc.launch.external import stop_process

    reg = run_registry(rd)
    run = reg.get("", "run", live_only=False) or {}
    local, slurm, on_ray = run.get("mode") in _HOST_MODES, run.get("mode") == "slurm", run.get("mode") == "ray"
    for sid, rec in sorted(reg.list("servers", live_only=False).items()):
        if not rec.get("external"):
            continue
        name = rec.get("url") or rec.get("address")
        if external:
            print(f"external server {sid} ({name}): {stop_process(rec, run.get('job_id'))}", flush=True)
        if rec.get("url"):
            reg.delete("servers", sid)
            print(f"detached external server {sid} ({name})" + ("" if external else ": it keeps running"), flush=True)
        elif not external:
            print(f"external server {sid} ({name}, `serve` by hand) keeps running: `stop --external` stops it",
                  flush=True)

    def ours(recs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
        """The servers this stop waits for (and kills if it must)."""
        return {k: v for k, v in recs.items() if external or not v.get("external")}

    def owner_alive() -> bool:
        if local or on_ray:
            return _owner_alive(run, reg)
        return slurm and _slurm_state(run.get("job_id", "")).get("state") in _SLURM_LIVE + _SLURM_WAITING

    live = reg.get("", "run") or {}
    forced = bool(live.get("stopping")) and owner_alive()  # a stop is under way: this one forces it
    post_request(reg, "stop", force=forced)
    if forced:
        print("a stop is already under way: forcing it (what is left is killed)", flush=True)
    if local and not owner_alive():  # the owner is gone (shutdown_server_on_exit=False): stop what it left
        host = socket.gethostname()
        for rec in list(ours(reg.list("servers")).values()) + [reg.get("", "trainer") or {}]:
            if rec.get("pid") and rec.get("host", host) == host and pid_alive(rec["pid"]):
                os.kill(int(rec["pid"]), signal.SIGTERM)
    if slurm and run.get("job_id") and _slurm_state(run["job_id"]).get("state") in ("PENDING", "REQUEUED"):
        subprocess.run(["scancel", str(run["job_id"])], check=False)  # not started: nothing to checkpoint
    for job_id in reg.list("jobs", live_only=False):  # server jobs of `add-servers --new-job`
        # scancel sends SIGTERM to their steps first: the servers deregister
        subprocess.run(["scancel", str(job_id)], check=False, capture_output=True)
        reg.delete("jobs", job_id)
    deadline = time.monotonic() + timeout_s
    ray_left = on_ray  # what the run may have left on its Ray cluster, once no owner will stop it
    while time.monotonic() < deadline:
        try:
            if ray_left and not owner_alive():
                from areal_hpc.config import ConfigError
                from areal_hpc.launch import ray_runner

                try:
                    gone = ray_runner.stop_leftovers(reg)
                except ConfigError as e:  # the cluster is gone: so is what the run had on it
                    gone = []
                    print(f"Ray: {e.one_line()}", flush=True)
                if gone:
                    print(f"removed {len(gone)} Ray actor(s) and placement group(s) the run had left", flush=True)
                for sid in ours(reg.list("servers", live_only=False)):  # killed by now, deregistered or not
                    reg.delete("servers", sid)
                ray_left = False
            if not owner_alive() and not ours(reg.list("servers")) and reg.get("", "trainer") is None:
                break
            if not owner_alive():
                _remove_dead_records(reg, run)
            time.sleep(0.5)
        except KeyboardInterrupt:
            if forced:
                raise
            forced = True
            print("\nforcing the stop: what is left is killed", file=sys.stderr, flush=True)
            post_request(reg, "stop", force=True)
            deadline = time.monotonic() + 60.0
    else:
        if slurm and run.get("job_id"):
            subprocess.run(["scancel", str(run["job_id"])], check=False)
            print(f"graceful stop timed out after {timeout_s:.0f}s: scancel {run['job_id']}")
            return 1
        for sid, rec in ours(reg.list("servers")).items():
            if pid_alive(rec.get("pid")):
                os.kill(int(rec["pid"]), signal.SIGKILL)
            reg.delete("servers", sid)
        print(f"graceful stop timed out after {timeout_s:.0f}s: killed what was left")
        return 1
    _remove_dead_records(reg, run)
    end = reg.get("", "run", live_only=False) or {}
    print(f"stopped {rd}\nrun {outcome.summary_line(end)}" if end.get("state") else f"stopped {rd}", flush=True)
    return 0


def add_servers(cfg: ExperimentConfig, rd: Path, count: int, new_job: bool = False,
                timeout_s: Optional[float] = None) -> int:
    """Ask the run's owner for ``count`` more servers and wait until they have registered."""
    reg = run_registry(rd)
    run = reg.get("", "run", live_only=False) or {}
    # a Slurm driver is alive while its run record heartbeats
    owner_alive = _owner_alive(run, reg) if run.get("mode") in _OWNER_HERE else \
        run.get("mode") == "slurm" and bool(run.get("pid")) and reg.get("", "run") is not None
    if not owner_alive and not new_job:
        from areal_hpc.config import ConfigError

        raise ConfigError("experiment_name/trial_name", f"run {rd} has no live owner to start servers",
                          "use --new-job to submit the servers as their own job")
    before = set(reg.list("servers"))
    if new_job:
        from areal_hpc.launch import slurm

        return slurm.submit_server_job(load_resolved(rd / "config.yaml"), rd, count, timeout_s=timeout_s)
    req = post_request(reg, "add_servers", count=count)
    timeout = timeout_s or load_resolved(rd / "config.yaml").launcher.server_startup_timeout_s
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = serving_servers(reg) - before
        if len(new) >= count:
            print(f"added {len(new)} server(s): {', '.join(sorted(new))}")
            return 0
        unserved = reg.get("replies", f"{req}-unserved")
        if unserved is not None and run.get("mode") == "slurm":
            # the allocation is full: the rest as a separate job whose servers join the run
            reg.delete("replies", f"{req}-unserved")
            missing = count - int(unserved.get("started", 0))
            print(f"the allocation has room for {unserved.get('started', 0)} of {count} server(s); submitting "
                  f"{missing} as a separate job")
            from areal_hpc.launch import slurm

            rc = slurm.submit_server_job(load_resolved(rd / "config.yaml"), rd, missing,
                                         timeout_s=max(1.0, deadline - time.monotonic()))
            if rc != 0 or not int(unserved.get("started", 0)):
                return rc
            count -= missing
            before |= set(reg.list("servers"))  # wait on for the ones the driver started
        time.sleep(0.3)
    print(f"timed out after {timeout:.0f}s waiting for {count} new server(s); see `areal-hpc logs driver`", file=sys.stderr)
    return 1


def _require_owner(reg: Registry, rd: Path, what: str) -> None:
    run = reg.get("", "run", live_only=False) or {}
    alive = pid_alive(run.get("pid")) if run.get("mode") in _OWNER_HERE and run.get("host") in (
        None, socket.gethostname()) else reg.get("", "run") is not None
    if not alive or run.get("state") not in (None, "RUNNING"):
        from areal_hpc.config import ConfigError

        raise ConfigError("experiment_name/trial_name", f"run {rd} has no live owner to {what}",
                          "attach servers to a running run (`areal-hpc status` says whether it runs)")


def attach_server(cfg: ExperimentConfig, rd: Path, url: str, api_key: Optional[str] = None) -> int:
    """`add-servers url=...`: register an already-running server into a live run."""
    from areal_hpc.launch import external

    reg = run_registry(rd)
    base, _ = external.parse_url(url)
    external.probe(base, api_key or reg.secret())  # a server that does not answer: say so first
    _require_owner(reg, rd, "keep an external server's record alive (its health checks)")
    sid, rec = external.attach(reg, url, api_key)
    print(f"attached {sid}: {rec['url']} ({rec['backend']}, weight version {rec['weight_version']}); the run's owner "
          f"checks its /health and drops it after {reg.ttl_s:.0f}s without an answer; "
          f"`areal-hpc remove-server {sid} ...` detaches it")
    return 0


def remove_server(cfg: ExperimentConfig, rd: Path, ident: str) -> int:
    """`remove-server ID|URL`: detach an external server (no more rollouts to it; it keeps running)."""
    from areal_hpc.launch import external

    sid, rec = external.detach(run_registry(rd), ident)
    print(f"detached {sid} ({rec.get('url') or rec.get('address')}); the server keeps running")
    return 0
