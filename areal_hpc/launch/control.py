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
from areal_hpc.registry import Registry


def run_registry(rd: Path) -> Registry:
    cfg = load_resolved(rd / "config.yaml")
    return Registry(rd / "registry", lock_kind=cfg.launcher.lock_kind, ttl_s=cfg.launcher.ttl_s)


def serving_servers(reg: Registry) -> set:
    """Ids of live servers that serve (state ready/paused), not those still loading a model."""
    return {k for k, v in reg.list("servers").items() if v.get("state") in ("ready", "paused")}


def post_request(reg: Registry, kind: str, **fields) -> str:
    """Queue a control request for the run's owner (driver or local launcher)."""
    name = f"{time.time_ns()}-{kind}"
    reg.put("requests", name, {"kind": kind, "created": time.time(), **fields}, ttl=False)
    return name


def _pid_alive(pid: Optional[int]) -> bool:
    """A live (not zombie) process on this host."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    try:  # an exited child its parent has not reaped yet still answers kill(0)
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _health(address: str, key: str, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(f"http://{address}/health", headers={"Authorization": f"Bearer {key}"})
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


def collect_status(rd: Path) -> Dict[str, Any]:
    reg = run_registry(rd)
    key = reg.secret()
    run = reg.get("", "run", live_only=False) or {}
    servers = reg.list("servers")
    srv = []
    for sid, rec in sorted(servers.items()):
        srv.append({"id": sid, "address": rec.get("address"), "backend": rec.get("backend"),
                    "weight_version": rec.get("weight_version"), "node": rec.get("node"), "pid": rec.get("pid"),
                    "gpus": rec.get("gpus"), "slurm_step": rec.get("slurm_step_id"),
                    "healthy": _health(rec.get("address", ""), key), "age_s": round(rec.get("_age_s", 0), 1)})
    trainer = reg.get("", "trainer")
    metrics = _last_metrics(rd)
    status: Dict[str, Any] = {"run_dir": str(rd), "mode": run.get("mode"), "servers": srv,
                              "trainer": None if trainer is None else
                              {k: v for k, v in trainer.items() if not k.startswith("_")}}
    if run.get("mode") == "slurm" and run.get("job_id"):
        status["job"] = _slurm_state(run["job_id"])
        extra = reg.list("jobs", live_only=False)  # `add-servers --new-job` jobs
        if extra:
            status["server_jobs"] = [{**_slurm_state(j), "servers": rec.get("servers")} for j, rec in sorted(extra.items())]
    elif run:
        status["job"] = {"launcher_pid": run.get("pid"), "host": run.get("host"),
                         "state": "RUNNING" if _pid_alive(run.get("pid")) else "ENDED"}
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
    print(f"job      {job.get('job_id', '')} {job.get('state', 'no owner recorded')} {job.get('nodes', '')}".rstrip())
    for step in job.get("steps", []):
        print(f"  step {step['step']:<12} {step['name']:<40} {step['state']:<11} {step['nodes']}")
    for j in st.get("server_jobs", []):
        print(f"job      {j.get('job_id')} {j.get('state', '?')} {j.get('nodes', '')} (servers {', '.join(j.get('servers') or [])})")
    print(f"servers  {len(st['servers'])} live")
    for s in st["servers"]:
        print(f"  {s['id']:<10} {s['address']:<22} {s['backend']:<6} v{s['weight_version']}  "
              f"{'healthy' if s['healthy'] else 'UNHEALTHY'}  node={s['node']} pid={s['pid']} gpus={s['gpus']}")
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


def stop(cfg: ExperimentConfig, rd: Path, timeout_s: float = 120.0) -> int:
    """Graceful stop: the owner checkpoints the trainer, stops servers, ends the job."""
    reg = run_registry(rd)
    run = reg.get("", "run", live_only=False) or {}
    post_request(reg, "stop")
    deadline = time.monotonic() + timeout_s
    if run.get("mode") == "local" and _pid_alive(run.get("pid")):
        os.kill(int(run["pid"]), signal.SIGTERM)
    elif run.get("mode") == "local":  # the owner is gone (shutdown_server_on_exit=False): stop what it left
        host = socket.gethostname()
        for rec in list(reg.list("servers").values()) + [reg.get("", "trainer") or {}]:
            if rec.get("pid") and rec.get("host", host) == host and _pid_alive(rec["pid"]):
                os.kill(int(rec["pid"]), signal.SIGTERM)
    if run.get("mode") == "slurm" and run.get("job_id") and \
            _slurm_state(run["job_id"]).get("state") in ("PENDING", "REQUEUED"):
        subprocess.run(["scancel", str(run["job_id"])], check=False)  # not started: nothing to checkpoint
    for job_id in reg.list("jobs", live_only=False):  # server jobs of `add-servers --new-job`
        # scancel sends SIGTERM to their steps first: the servers deregister
        subprocess.run(["scancel", str(job_id)], check=False, capture_output=True)
        reg.delete("jobs", job_id)
    while time.monotonic() < deadline:
        owner_alive = _pid_alive(run.get("pid")) if run.get("mode") == "local" else \
            _slurm_state(run.get("job_id", "")).get("state") in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED")
        if not owner_alive and not reg.list("servers") and reg.get("", "trainer") is None:
            print(f"stopped {rd}")
            return 0
        time.sleep(0.5)
    if run.get("mode") == "slurm" and run.get("job_id"):
        subprocess.run(["scancel", str(run["job_id"])], check=False)
        print(f"graceful stop timed out after {timeout_s:.0f}s: scancel {run['job_id']}")
        return 1
    for sid, rec in reg.list("servers").items():
        if _pid_alive(rec.get("pid")):
            os.kill(int(rec["pid"]), signal.SIGKILL)
    print(f"graceful stop timed out after {timeout_s:.0f}s: killed what was left")
    return 1


def add_servers(cfg: ExperimentConfig, rd: Path, count: int, new_job: bool = False,
                timeout_s: Optional[float] = None) -> int:
    """Ask the run's owner for ``count`` more servers and wait until they have registered."""
    reg = run_registry(rd)
    run = reg.get("", "run", live_only=False) or {}
    # a Slurm driver is alive while its run record heartbeats
    owner_alive = _pid_alive(run.get("pid")) if run.get("mode") == "local" else \
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
