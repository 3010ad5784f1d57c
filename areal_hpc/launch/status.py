"""`status` and `logs`: a run's registry, checked against Slurm (or this host's process table): a dead owner shows."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional

from areal_hpc.config import ConfigError, load_resolved
from areal_hpc.launch import outcome, ray_runner, slurm
from areal_hpc.launch.external import at_once, healthy
from areal_hpc.launch.plan import Plan
from areal_hpc.registry import Registry, pid_alive, runs_here

# modes whose steps are processes of the owner's host
HOST_MODES = ("local", "torchrun")


def run_registry(rd: Path) -> Registry:
    return Registry.for_run(rd, load_resolved(rd / "config.yaml").launcher)


def slurm_jobs(reg: Registry, run: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """State, nodes and steps of a Slurm run's job and of its `add-servers --new-job` jobs, by job id."""
    if run.get("mode") != "slurm" or not run.get("job_id"):
        return {}
    return {j: {"job_id": j, **slurm.job(j), "steps": slurm.job_steps(j)}
            for j in [str(run["job_id"]), *reg.list("jobs", live_only=False)]}


def dead_here(rec: Dict[str, Any]) -> bool:
    """A record's process ran on this host (elsewhere its pid means nothing) and ended."""
    return runs_here(rec.get("node"), rec.get("host")) and not pid_alive(rec.get("pid"))


def launcher_alive(run: Dict[str, Any], reg: Registry, name: str = "run") -> bool:
    """The run's owner process (of record ``name``) lives: by its pid on this host, elsewhere by its record's TTL."""
    if not run.get("pid"):
        return False  # a Slurm job not started yet
    if run.get("host") is None or runs_here(run["host"]):
        return pid_alive(run.get("pid"))
    return reg.get("", name) is not None


def why_owned(run: Dict[str, Any], reg: Registry, job_state: Callable[[], Optional[str]]) -> Optional[str]:
    """Why the run has an owner, or one to come, or None: a Slurm job queued or running until its driver records how
    the run ended, or while queued again whatever it recorded (Slurm requeues a job that lost a node: its driver had
    recorded FAILED); an owner process until a TTL after it did (it writes its record once more on its way out)."""
    if run.get("mode") == "slurm" and run.get("job_id"):
        state = job_state()
        owned = slurm.WAITING_STATES + (() if run.get("state") in outcome.FINAL else slurm.LIVE_STATES)
        return f"job {run['job_id']} is {state}" if state in owned else None
    alive = launcher_alive(run, reg) and (run.get("state") not in outcome.FINAL or reg.get("", "run") is not None)
    return f"its owner lives (pid {run.get('pid')} on {run.get('host')})" if alive else None


def run_state(run: Dict[str, Any], job: Dict[str, Any], rd: Path, owner_alive: bool) -> Dict[str, Any]:
    """The run's state (outcome.*), why, and which log tells more: the owner's record, checked against Slurm."""
    rec_state = run.get("state")
    reason = run.get("reason")
    if run.get("stopping") and rec_state == outcome.RUNNING:
        reason = "shutting down (a trainer still running checkpoints first)"
    mine = {"state": rec_state, "reason": reason, "log": run.get("log")}
    if run.get("mode") == "slurm":
        js = slurm.state_word(job.get("state"))
        slurm_out = str(rd / "logs" / f"slurm-{run.get('job_id')}.out")
        if js in slurm.WAITING_STATES or (js == "COMPLETING" and rec_state == outcome.REQUEUED):  # requeue under way
            return {**mine, "state": outcome.REQUEUED if rec_state == outcome.REQUEUED else outcome.PENDING,
                    "reason": mine["reason"] or (f"queued: {job['reason']} (Slurm)" if job.get("reason") else None)}
        if js in slurm.LIVE_STATES:
            return mine if rec_state in outcome.FINAL else {**mine, "state": outcome.RUNNING}
        if rec_state in outcome.FINAL:
            return mine
        if not js:
            return {**mine, "state": rec_state or "UNKNOWN"}
        why = {"CANCELLED": "was cancelled (scancel)", "TIMEOUT": "hit its time limit (cluster.time)",
               "OUT_OF_MEMORY": "ran out of memory", "NODE_FAIL": "lost a node"}.get(js, f"ended {js}")
        return {"state": outcome.STOPPED if js == "CANCELLED" else outcome.FAILED, "log": slurm_out,
                "reason": f"job {run.get('job_id')} {why} before its driver recorded how the run ended"
                          + (f": {line}" if (line := batch_error(slurm_out)) else "")}
    if not run:
        return mine  # all None
    if owner_alive:
        return {**mine, "state": outcome.RUNNING}
    if rec_state in outcome.FINAL:
        return mine
    return {"state": outcome.FAILED, "log": str(rd / "logs" / "driver.log"),
            "reason": f"the launcher (pid {run.get('pid')} on {run.get('host')}) ended without recording how the "
                      "run ended (killed?)"}


def batch_error(slurm_out: str) -> Optional[str]:
    """The batch script's own error in the job's log (a `cluster.setup_commands` line that failed), if any."""
    try:
        with open(slurm_out, "rb") as f:
            f.seek(max(0, os.path.getsize(slurm_out) - 65536))
            found = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.startswith("areal-hpc: ")]
    except OSError:
        return None
    return found[-1] if found else None


def server_alive(rec: Dict[str, Any], jobs: Dict[str, Dict[str, Any]]) -> bool:
    """A live record may belong to a dead process (until its TTL): check the process (on this host) or Slurm step.
    An attached server's record lives while the owner's health checks refresh it."""
    if rec.get("external") and rec.get("url"):
        return True
    if rec.get("pid") and dead_here(rec):
        return False
    job = jobs.get(str(rec.get("slurm_job_id")))
    if job is None or rec.get("slurm_step_id") is None:
        return True  # Slurm knows nothing of it: trust the heartbeat
    if slurm.state_word(job.get("state")) not in ("", *slurm.LIVE_STATES):
        return False  # its job has ended
    name = f"{job['job_id']}.{rec['slurm_step_id']}"
    return not any(s["step"] == name and slurm.state_word(s.get("state")) not in slurm.LIVE_STATES
                   for s in job.get("steps", []))


def collect_status(rd: Path) -> Dict[str, Any]:
    reg = run_registry(rd)
    key = reg.secret()
    run = reg.run_record()
    jobs = slurm_jobs(reg, run)
    # a server whose process or step has ended is not a live one, whatever its record says
    live = [(sid, rec) for sid, rec in sorted(reg.list("servers").items()) if server_alive(rec, jobs)]
    ok = at_once(lambda rec: healthy(rec.get("address", ""), rec.get("api_key") or key, timeout=2.0),
                 [rec for _, rec in live])
    srv = [{"id": sid, "address": rec.get("address"), "backend": rec.get("backend"), "state": rec.get("state"),
            "weight_version": rec.get("weight_version"), "node": rec.get("node"), "pid": rec.get("pid"),
            "gpus": rec.get("gpus"), "slurm_step": rec.get("slurm_step_id"), "external": bool(rec.get("external")),
            "url": rec.get("url"), "own_key": bool(rec.get("api_key")),  # the key itself is never printed
            "healthy": up, "age_s": round(rec.get("_age_s", 0), 1)} for (sid, rec), up in zip(live, ok)]
    trainer = reg.get("", "trainer")
    status: Dict[str, Any] = {"run_dir": str(rd), "mode": run.get("mode"), "servers": srv,
                              "api_key_file": str(reg.root / "secret"),
                              "trainer": None if trainer is None else
                              {k: v for k, v in trainer.items() if not k.startswith("_")}}
    owner_alive = False
    if run.get("mode") == "slurm" and run.get("job_id"):
        status["job"] = jobs.pop(str(run["job_id"]))
        owner_alive = slurm.state_word(status["job"].get("state")) in slurm.LIVE_STATES
        if jobs:  # the rest are server jobs, as `slurm_jobs` found them (not one submitted since)
            recs = reg.list("jobs", live_only=False)
            status["server_jobs"] = [{**job, "servers": (recs.get(j) or {}).get("servers")}
                                     for j, job in sorted(jobs.items())]
    elif run:
        owner_alive = launcher_alive(run, reg)
        status["job"] = {"launcher_pid": run.get("pid"), "host": run.get("host"),
                         "state": "RUNNING" if owner_alive else "ENDED"}
    if trainer is not None and ((run and not owner_alive) or dead_here(trainer)):  # the owner's steps end with it
        status["trainer"] = None
    if trainer is None and owner_alive and "trainer" in (run.get("steps") or {}) and run.get("trainer_rc") is None:
        status["trainer"] = {"state": "starting"}  # its step lives, not registered yet: loading, waiting for servers
    if run.get("mode") == "ray":  # its actors and placement groups, as Ray sees them
        status["ray"] = ray_runner.describe(reg)
    status.update(run_state(run, status.get("job") or {}, rd, owner_alive))
    status["trainer_restarts"] = run.get("trainer_restarts", 0)
    last = outcome.last_row(rd / "metrics.jsonl")
    if last:
        status["progress"] = {k: last.get(k) for k in ("step", "version", "reward_mean", "time_s",
                                                      "trained_tokens_per_s", "gen_tokens_per_s", "staleness_max")}
    return status


def status(rd: Path, as_json: bool = False) -> int:
    st = collect_status(rd)
    if as_json:
        print(json.dumps(st, indent=2))
        return 0
    job = st.get("job") or {}
    print(f"run      {st['run_dir']}  (mode={st['mode'] or '?'})")
    print(f"state    {st.get('state') or 'unknown (no owner recorded)'}"
          + (f": {st['reason']}" if st.get("reason") else "")
          + (f" ({st['trainer_restarts']} trainer restart(s))" if st.get("trainer_restarts") else ""))
    if st.get("log") and st.get("state") not in ("COMPLETED", "PENDING"):  # RUNNING: a trainer failed (restarted)
        print(f"         see {st['log']}  (areal-hpc logs ...)")
    where = job.get("nodes") or (f"on {job['host']}" if job.get("host") else "")  # a local run's launcher: its host
    print(f"job      {job.get('job_id', '')} {job.get('state', 'no owner recorded')} {where}".rstrip())
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
        print(f"job      {j.get('job_id')} {j.get('state', '?')} {j.get('nodes', '')} "
              f"(servers {', '.join(j.get('servers') or [])})")
    print(f"servers  {len(st['servers'])} live; API key: the contents of {st['api_key_file']} (mode 0600), sent as "
          "`Authorization: Bearer <key>`")
    for s in st["servers"]:
        where = (f"external ({'its own key' if s['own_key'] else 'the run key'}; not stopped by `stop`)"
                 if s["url"] else f"external (serve by hand) node={s['node']} pid={s['pid']}" if s["external"]
                 else f"node={s['node']} pid={s['pid']} gpus={s['gpus']}")
        print(f"  {s['id']:<10} {s['address']:<22} {s['backend']:<6} v{s['weight_version']}  "
              f"{'healthy' if s['healthy'] else s['state'] if s['state'] == 'starting' else 'UNHEALTHY'}  {where}")
    t = st["trainer"]
    if t is None:
        print("trainer  not running")
    elif t == {"state": "starting"}:
        print("trainer  starting (loading its model or waiting for servers)")
    else:
        print(f"trainer  step {t.get('step')} version {t.get('version')} state={t.get('state')} "
              f"ranks={t.get('world_size')} host={t.get('host')}")
    p = st.get("progress")
    if p:
        reward = "" if p.get("reward_mean") is None else f" reward {p['reward_mean']:.3f}"  # none in SFT runs
        print(f"progress step {p['step']} v{p['version']}{reward}  "
              f"{p.get('trained_tokens_per_s') or 0:.0f} trained tok/s  {p.get('gen_tokens_per_s') or 0:.0f} gen tok/s")
    return 0


def _may_come(rd: Path, role: str) -> bool:
    """Whether a step of the run may yet open a log ``role``: the plan's steps (a rank or node of them), servers
    added since (their records), the owner's logs."""
    plan = Plan.from_json((rd / "plan.json").read_text())
    reg = run_registry(rd)
    servers = {s.name for s in plan.servers} | set(reg.list("servers", live_only=False)) | {
        name for rec in reg.list("jobs", live_only=False).values() for name in rec.get("servers") or []}
    nodes = plan.servers[0].nodes if plan.servers else 1
    ranks = plan.trainer.ntasks if plan.trainer else 0
    return role in {"driver", "slurm", "torchrun", *(["trainer"] if ranks else []), *servers,
                    *(f"trainer-{r}" for r in range(ranks)), *(f"{s}-{n}" for s in servers for n in range(nodes))}


def _log_file(rd: Path, role: str, must: bool = True) -> Optional[Path]:
    logs = rd / "logs"
    found = {p.stem: p for p in logs.glob("*.log")}
    for stem in list(found):  # a step's rank 0 by the step's name: trainer-0 for `trainer`, server-1-0 for `server-1`
        if m := re.fullmatch(r"(trainer|server-\d+)-0", stem):
            found.setdefault(m[1], found[stem])
    # slurm: the run's job (server jobs write slurm-*.out too), or any job when none is recorded (sbatch by hand)
    if role == "slurm" or role not in found:
        job_id = run_registry(rd).run_record().get("job_id")
        outs = sorted(logs.glob(f"slurm-{job_id or '*'}.out"), key=lambda p: p.stat().st_mtime)
        if outs:
            found["slurm"] = outs[-1]
    if role not in found and must:
        raise ConfigError("ROLE", f"no log for {role!r} in {logs}",
                          f"available: {', '.join(sorted(found)) or 'none yet'}")
    return found.get(role)


def _tail(f: BinaryIO, lines: int, block: int = 1 << 16) -> List[bytes]:
    """The last ``lines`` lines of ``f``, read from its end in blocks (a log may be gigabytes); leaves ``f`` at its
    end. It reads past ``lines`` line breaks (a CRLF counts twice), so that the first line shown is whole."""
    pos = end = f.seek(0, os.SEEK_END)
    chunks, breaks = [], 0
    while pos > 0 and breaks <= 2 * lines + 1:
        start = max(0, pos - block)
        f.seek(start)
        chunks.append(f.read(pos - start))
        pos, breaks = start, breaks + chunks[-1].count(b"\n") + chunks[-1].count(b"\r")
    f.seek(end)
    return b"".join(reversed(chunks)).splitlines()[-lines:] if lines > 0 else []


def logs(rd: Path, role: str, follow: bool = False, lines: int = 50) -> int:
    try:
        path = _log_file(rd, role)
    except ConfigError:  # with -f, like `tail -F`, wait for a log its step has not opened yet
        if not follow or not _may_come(rd, role):
            raise
        print(f"no log for {role!r} in {rd / 'logs'} yet (its step has not started: job pending, servers starting?); "
              "waiting for it to appear (Ctrl-C to stop)", file=sys.stderr, flush=True)
        while (path := _log_file(rd, role, must=False)) is None:
            time.sleep(0.5)
    with open(path, "rb") as f:
        print("".join(x.decode(errors="replace") + "\n" for x in _tail(f, lines)), end="", flush=True)
        while follow:
            chunk = f.read()
            if chunk:
                print(chunk.decode(errors="replace"), end="", flush=True)
            else:
                time.sleep(0.2)
    return 0


def remove_dead_records(reg: Registry, run: Dict[str, Any]) -> None:
    """Delete the records of this run's processes known dead (this host's pids; ended Slurm steps)."""
    jobs = slurm_jobs(reg, run)
    live = reg.list("servers")
    for sid, rec in reg.list("servers", live_only=False).items():
        if sid not in live or not server_alive(rec, jobs):
            reg.delete("servers", sid)
    trainer = reg.get("", "trainer", live_only=False)
    if trainer is not None and (reg.get("", "trainer") is None or dead_here(trainer)):
        reg.delete("", "trainer")
