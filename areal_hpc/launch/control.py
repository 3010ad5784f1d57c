"""`stop`, `add-servers`, `remove-server`, a trainer restart: requests to the run's owner (`owner.RunOwner`) through
its registry, so they work alike from a login node and from a local run's machine. Slurm is asked only about jobs no
owner answers for: one still queued, server jobs, a driver that died."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from areal_hpc.config import ConfigError, ExperimentConfig, dump_yaml, load_resolved
from areal_hpc.launch import outcome, ray_runner, slurm, slurm_submit
from areal_hpc.launch.driver import end_server_jobs
from areal_hpc.launch.external import attach, detach, parse_url, probe, stop_process
from areal_hpc.launch.status import HOST_MODES, launcher_alive, why_owned, remove_dead_records, run_registry
from areal_hpc.registry import Registry, atomic_write, pid_alive, runs_here


def failed(message: str) -> int:
    """Say why a command failed, on stderr; its exit code."""
    print(message, file=sys.stderr)
    return 1


def post_request(reg: Registry, kind: str, wait_s: float = 0.0, **fields) -> str:
    """Queue a request for the run's owner, for ``wait_s`` (an owner that starts later drops it)."""
    name = f"{time.time_ns()}-{kind}"
    reg.put("requests", name, {"kind": kind, "created": time.time(), "until": time.time() + wait_s, **fields},
            ttl=False)
    return name


def take_reply(reg: Registry, req: str) -> Optional[Dict[str, Any]]:
    """The owner's answer to request ``req`` (the servers it added; why it did not serve one), removed once read;
    None before it answered, or where it has nothing to say (a trainer started)."""
    reply = reg.get("replies", req)
    if reply is not None:
        reg.delete("replies", req)
    return reply


def withdraw(reg: Registry, names: List[str], for_live_owner: bool = False) -> None:
    """Requests their poster stopped waiting for, not taken yet: deleted, so that nothing is served behind the user's
    back; ``for_live_owner`` (a ``stop`` given up): expired now, for the live owner only."""
    for name in names:
        reg.delete("replies", name)  # one nobody will read
        if for_live_owner:
            reg.update("requests", name, lambda old: old and {**old, "until": time.time()})
        else:
            reg.delete("requests", name)


def stop(rd: Path, timeout_s: float = 120.0, external: bool = False) -> int:
    """Graceful stop (the trainer checkpoints, servers stop, the job ends), waited for; a second `stop` or Ctrl-C kills
    what is left. External servers keep running (attached ones detached) unless ``external``."""
    reg = run_registry(rd)
    run = reg.run_record()
    local, slurm_run = run.get("mode") in HOST_MODES, run.get("mode") == "slurm"
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

    def ours(recs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:  # what this stop waits for
        return {k: v for k, v in recs.items() if external or not v.get("external")}

    job_state = slurm.polled_job_state(run.get("job_id", ""))

    def owner_alive() -> bool:  # a Slurm job still queued has an owner to come
        return why_owned(reg.run_record(), reg, job_state) is not None

    def kill_left(sig: int) -> Tuple[List[Tuple[str, str]], Dict[Tuple[str, str], Dict[str, Any]]]:
        """Signal our servers and the trainer where they run on this host (a server's "host" is its serving address:
        its node says); the (kind, name) of those, and the records of what runs elsewhere."""
        recs = {("servers", sid): rec for sid, rec in ours(reg.list("servers")).items()}
        recs["", "trainer"] = reg.get("", "trainer") or {}
        here = [k for k, rec in recs.items() if rec and runs_here(rec.get("node"), rec.get("host"))]
        for k in here:
            if pid_alive(recs[k].get("pid")):
                os.kill(int(recs[k]["pid"]), sig)
        return here, {k: rec for k, rec in recs.items() if rec and k not in here}

    was_live = owner_alive() or bool(ours(reg.list("servers"))) or reg.get("", "trainer") is not None
    forced = bool((reg.get("", "run") or {}).get("stopping")) and owner_alive()  # a stop under way: this one forces it
    # the trainer's time to checkpoint (its step under way ends first): what `stop` waits, less the servers' 30 s
    posted = [post_request(reg, "stop", timeout_s, force=forced, grace_s=max(timeout_s - 40.0, timeout_s / 2))]
    if forced:
        print("a stop is already under way: forcing it (what is left is killed)", flush=True)
    # the owner is gone (shutdown_server_on_exit=False), or there is none (`sbatch sbatch/allocation.sbatch` by hand,
    # no request is read): stop what it left here (the trainer checkpoints); what runs elsewhere is Slurm's to signal
    if (local or not run) and not owner_alive():
        elsewhere = kill_left(signal.SIGTERM)[1]
        if elsewhere and not run:
            withdraw(reg, posted)
            jobs = sorted({str(rec["slurm_job_id"]) for rec in elsewhere.values() if rec.get("slurm_job_id")})
            raise ConfigError("experiment_name/trial_name", f"run {rd} has no owner to stop it (an allocation "
                              "started by hand?)", "stop its steps with "
                              f"`scancel --signal=TERM {' '.join(jobs) or 'JOB'}`: the trainer checkpoints")
    # queued with no driver: nothing to checkpoint (a SUSPENDED or RESIZING job's driver checkpoints once it runs)
    state = job_state() if slurm_run and run.get("job_id") else None
    if state in set(slurm.WAITING_STATES) - {"SUSPENDED", "RESIZING"} and not slurm.scancel(run["job_id"]):
        # no driver will record how the run ended
        reg.update("", "run", lambda old: {**(old or {}), "state": outcome.STOPPED, "reason": "stop requested "
                                           f"(areal-hpc stop) while job {run['job_id']} was {state}: cancelled"})
    uncancelled = end_server_jobs(reg)  # server jobs; one not cancelled fails this stop
    for job_id, err in uncancelled.items():
        print(f"could not cancel server job {job_id}: {err}; `stop` again, or scancel {job_id}", file=sys.stderr)
    deadline, clean_at = time.monotonic() + timeout_s, 0.0
    ray_left = run.get("mode") == "ray"  # what the run may have left on its Ray cluster, once no owner will stop it
    while time.monotonic() < deadline:
        try:
            if not forced and (take_reply(reg, posted[0]) or {}).get("forced"):  # run.json was behind the owner
                forced = True
                print("a stop is already under way: forcing it (what is left is killed)", flush=True)
            if not owner_alive():
                if ray_left:
                    ray_runner.stop_leftovers(reg, external)
                    ray_left = False
                if not ours(reg.list("servers")) and reg.get("", "trainer") is None:
                    break
                if time.monotonic() >= clean_at:  # for a Slurm run this asks Slurm too
                    remove_dead_records(reg, run)
                    clean_at = time.monotonic() + (slurm.POLL_MAX_S if slurm_run else 0.0)
            time.sleep(0.5)
        except KeyboardInterrupt:
            if forced:  # given up
                withdraw(reg, posted, for_live_owner=True)
                raise
            forced = True
            print("\nforcing the stop: what is left is killed", file=sys.stderr, flush=True)
            posted.append(post_request(reg, "stop", 60.0, force=True))
            deadline = time.monotonic() + 60.0
    else:
        if slurm_run and run.get("job_id"):
            slurm.scancel(run["job_id"])
            print(f"graceful stop timed out after {timeout_s:.0f}s: scancel {run['job_id']}")
            return 1
        here, elsewhere = kill_left(signal.SIGKILL)
        for kind, name in here:
            reg.delete(kind, name)  # killed: it cannot deregister now
        print(f"graceful stop timed out after {timeout_s:.0f}s: killed "
              f"{', '.join(name for _, name in here) or 'nothing'} on this host"
              + "".join(f"; {name} (pid {rec.get('pid')} on {rec.get('node') or rec.get('host')}) is not ours to kill "
                        "from here: its record is kept, stop it where it runs" for (_, name), rec in elsewhere.items()))
        return 1
    withdraw(reg, posted)  # one no owner took (it is gone, or the job was cancelled): not for a later run's owner
    remove_dead_records(reg, run)
    end = reg.run_record()
    said = f"stopped {rd}" if was_live else f"nothing was running in {rd}"  # (a run that had ended: its end below)
    print(f"{said}\nrun {outcome.summary_line(end)}" if end.get("state") else said, flush=True)
    return 1 if uncancelled else 0


def add_servers(rd: Path, count: int, new_job: bool = False, timeout_s: Optional[float] = None) -> int:
    """Ask the run's owner for ``count`` more servers and wait until they serve; what a Slurm allocation has no room for
    goes to a job of its own (all, with ``new_job``). Given up, neither request nor job is left (`keep_or_cancel`)."""
    reg = run_registry(rd)
    run = reg.run_record()
    cfg = load_resolved(rd / "config.yaml")
    if new_job and cfg.mode != "slurm":  # sbatch, on a host that may have no Slurm
        raise ConfigError("--new-job", f"run {rd} is a mode={cfg.mode} run: only a Slurm run's servers can be a job "
                          "of their own", "leave out --new-job: a live run starts them itself")
    if not launcher_alive(run, reg) and not new_job:
        raise ConfigError("experiment_name/trial_name", f"run {rd} has no live owner to start servers",
                          "use --new-job to submit the servers as their own job" if cfg.mode == "slurm" else
                          "submit the run again (it resumes from its last checkpoint)")
    timeout = timeout_s or cfg.launcher.server_startup_timeout_s
    req = None if new_job else post_request(reg, "add_servers", timeout, count=count)
    job_id = slurm_submit.submit_server_job(cfg, rd, count) if new_job else None
    if new_job and job_id is None:
        return 1

    def job_servers() -> set:  # the server job's, named at submission: not others added meanwhile
        return set((reg.get("jobs", job_id, live_only=False) or {}).get("servers", []))
    mine = job_servers() if job_id else None  # the servers to wait for, once known (the owner's reply)
    owned: set = set()  # those the owner started: its record lists them until they exit
    job_state = slurm.polled_job_state(job_id) if job_id else None  # the server job's, once there is one
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = take_reply(reg, req) if req else None
            if req and reply is None and not launcher_alive(run, reg):
                return failed("the run's owner ended before it served the request; see `areal-hpc logs driver`")
            if reply is not None:
                req = None  # answered
                if reply.get("error"):
                    return failed(f"the run's owner could not add servers: {reply['error']} (see `areal-hpc logs "
                                  "driver`)")
                mine = set(reply.get("servers", []))
                owned = set(mine)
                if len(mine) < count and run.get("mode") != "slurm":  # no job of their own to put the rest in
                    return failed(f"the run has room for {len(mine)} of {count} server(s) (no free resources); "
                                  "see `areal-hpc logs driver`")
                if len(mine) < count:
                    print(f"the allocation has room for {len(mine)} of {count} server(s); submitting "
                          f"{count - len(mine)} as a separate job")
                    job_id = slurm_submit.submit_server_job(cfg, rd, count - len(mine))
                    if job_id is None:
                        return 1
                    mine |= job_servers()
                    job_state = slurm.polled_job_state(job_id)
            ready = {k for k, v in reg.list("servers").items() if v.get("state") in ("ready", "paused")}
            gone = owned - ready - set(reg.run_record().get("servers") or [])
            if gone:
                return failed(f"{', '.join(sorted(gone))} exited before serving; see `areal-hpc logs {min(gone)}` "
                              "(and `areal-hpc status`)")
            if mine is not None and mine <= ready:
                print(f"added {len(mine)} server(s): {', '.join(sorted(mine))}"
                      + (f" (job {job_id})" if job_id else ""))
                job_id = None  # its servers serve: the run's now
                return 0
            state = job_state() if job_state else None
            if state in slurm.FINAL_STATES:
                job_id, ended = None, job_id  # nothing left to cancel
                return failed(f"job {ended} ended {state} before its servers were ready; see {rd}/logs")
            time.sleep(0.3)
        return failed(f"timed out after {timeout:.0f}s waiting for {count} new server(s); see `areal-hpc logs "
                      "driver`" + (f" and the logs of job {job_id}" if job_id else ""))
    finally:
        withdraw(reg, [req] if req else [])
        if job_id is not None:
            print(keep_or_cancel(reg, job_id), file=sys.stderr)


def keep_or_cancel(reg: Registry, job_id: str) -> str:
    """The server job of an `add-servers` that stops waiting: kept when one of its servers joined the run, else
    cancelled (its servers must not join behind the user's back)."""
    names = (reg.get("jobs", job_id, live_only=False) or {}).get("servers", [])
    joined = sorted(set(names) & set(reg.list("servers", live_only=False)))
    if joined:
        return f"job {job_id} is kept: its server(s) {', '.join(joined)} joined the run"
    err = slurm.scancel(job_id)
    if err:  # its record stays, for `stop` to cancel it
        return f"could not cancel job {job_id}, whose servers have not joined the run: {err}"
    reg.delete("jobs", job_id)
    return f"cancelled job {job_id}: its servers had not joined the run"


def live_driver(cfg: ExperimentConfig, rd: Path) -> Optional[Dict[str, Any]]:
    """The run record of a live Slurm driver of this run (heartbeat fresh and job running), else None."""
    run = Registry.for_run(rd, cfg.launcher).get("", "run")
    if not run or run.get("mode") != "slurm" or not run.get("job_id") or not run.get("pid"):
        return None
    return run if slurm.job_state(str(run["job_id"])) == "RUNNING" else None


def restart_trainer(cfg: ExperimentConfig, rd: Path, run: Dict[str, Any], timeout_s: float = 300.0) -> int:
    """``submit ... min_required_servers=N`` on a run whose driver lives: the driver starts the trainer step inside its
    allocation. The new trainer reads config.yaml, which keeps the run's own min_required_servers (a requeue must not
    wait for N: N goes with the request) and registry settings (the live steps lock and expire by them)."""
    cfg_path = rd / "config.yaml"
    try:
        kept = load_resolved(cfg_path)
    except Exception:  # noqa: BLE001 - unreadable: the submit's config is all we have
        kept = dataclasses.replace(cfg, min_required_servers=0)
    registry_settings = {k: getattr(kept.launcher, k) for k in ("lock_kind", "ttl_s", "heartbeat_s")}
    cfg = dataclasses.replace(cfg, launcher=dataclasses.replace(cfg.launcher, **registry_settings))
    atomic_write(cfg_path, dump_yaml(dataclasses.replace(cfg, min_required_servers=kept.min_required_servers)))
    reg = Registry.for_run(rd, cfg.launcher)

    def trainer_step_id(rec: Dict[str, Any]) -> Optional[str]:
        return (rec.get("steps") or {}).get("trainer", {}).get("slurm_step_id")

    old_step, registered, job_state = trainer_step_id(run), False, slurm.polled_job_state(str(run["job_id"]))
    name = post_request(reg, "start_trainer", timeout_s, min_required_servers=cfg.min_required_servers)
    print(f"job {run['job_id']} is live: asked its driver to start a trainer (request {name})", flush=True)
    deadline = time.monotonic() + timeout_s
    try:
        while registered or time.monotonic() < deadline:  # registered (launcher.wait): until it ends
            refused = take_reply(reg, name)
            if refused is not None:
                return failed(f"the driver of job {run['job_id']} could not start a trainer: {refused.get('error')} "
                              "(see `areal-hpc logs driver`)")
            rec = reg.run_record()
            # the old trainer's record may outlive it: a record is the new one's once the driver names a new step
            new = trainer_step_id(rec) not in (None, old_step)
            if new and rec.get("trainer_rc") is not None:
                rc = int(rec["trainer_rc"])
                if not registered:
                    return failed(f"the new trainer (step {run['job_id']}.{trainer_step_id(rec)}) exited with {rc} "
                                  "before it registered; see `areal-hpc logs trainer`")
                print(f"trainer exited with {rc}", flush=True)
                return 0 if rc == 0 else 1
            if reg.get("", "run") is None or job_state() != "RUNNING":  # the driver's record or job ended
                return failed(f"the driver of job {run['job_id']} went away before the trainer "
                              + ("ended" if registered else "started"))
            trainer = reg.get("", "trainer") if new and not registered else None
            if trainer is not None:
                print(f"trainer started (pid {trainer.get('pid')} on {trainer.get('host')}); follow it with:\n"
                      f"{slurm_submit.follow_hint(cfg)}", flush=True)
                if not cfg.launcher.wait:
                    return 0
                registered = True
            time.sleep(0.3)
        return failed(f"no trainer registered within {timeout_s:.0f}s; see `areal-hpc logs driver`")
    finally:
        withdraw(reg, [name])


def attach_server(rd: Path, url: str, api_key: Optional[str] = None) -> int:
    """`add-servers url=...`: register an already-running server into a live run."""
    reg = run_registry(rd)
    base, _ = parse_url(url)
    probe(base, api_key or reg.secret())  # a server that does not answer: say so first
    run = reg.run_record()
    if not launcher_alive(run, reg) or run.get("state") not in (None, "RUNNING"):
        raise ConfigError("experiment_name/trial_name", f"run {rd} has no live owner to keep an external "
                          "server's record alive (its health checks)",
                          "attach servers to a running run (`areal-hpc status` says whether it runs)")
    sid, rec = attach(reg, url, api_key)
    print(f"attached {sid}: {rec['url']} ({rec['backend']}, weight version {rec['weight_version']}); the run's owner "
          f"checks its /health and drops it after {reg.ttl_s:.0f}s without an answer; "
          f"`areal-hpc remove-server {sid} ...` detaches it")
    return 0


def remove_server(rd: Path, ident: str) -> int:
    """`remove-server ID|URL`: detach an external server (no more rollouts to it; it keeps running)."""
    sid, rec = detach(run_registry(rd), ident)
    print(f"detached {sid} ({rec.get('url') or rec.get('address')}); the server keeps running")
    return 0
