"""`areal-hpc submit`: write the run dir, then hand the plan to its launcher (local, torchrun, slurm, ray)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Dict, List, Optional

from areal_hpc.config import (AllocationMode, ConfigError, ExperimentConfig, actor_path, dump_yaml, load_resolved,
                              models_in_use, prompt_tokenizer_path, run_dir, run_umask)
from areal_hpc.launch import control, local, ray_runner, slurm, slurm_submit, torchrun
from areal_hpc.launch.outcome import latest_checkpoint_step
from areal_hpc.launch.plan import Plan, build_plan
from areal_hpc.launch.resolve import make_fileroot, resolve
from areal_hpc.launch.sbatch import render
from areal_hpc.launch.status import launcher_alive, why_owned
from areal_hpc.registry import Registry, atomic_write


def _fix_modes(cfg: ExperimentConfig, rd: Path) -> None:
    """An existing run dir written with another `cluster.group_readable` gets the modes a new one would have (the
    registry stays private)."""
    mask = run_umask(cfg)
    if rd.stat().st_mode & 0o777 == 0o777 & ~mask:
        return
    for path in [rd, *rd.rglob("*")]:
        if path.is_symlink() or (rd / "registry") in (path, *path.parents):
            continue
        mode = path.stat().st_mode
        full = 0o777 if stat.S_ISDIR(mode) or mode & 0o100 else 0o666
        os.chmod(path, full & ~mask)


def write_run_dir(cfg: ExperimentConfig, plan: Plan, rd: Path) -> None:
    """config.yaml (resolved), plan.json and the rendered sbatch script, atomically, in the run dir `submit` made."""
    files = {"config.yaml": dump_yaml(cfg), "plan.json": plan.to_json(),
             "sbatch/allocation.sbatch": render("allocation.sbatch", cfg, plan)}
    (rd / "sbatch").mkdir(exist_ok=True)
    _fix_modes(cfg, rd)
    for name, text in files.items():
        atomic_write(rd / name, text)


class RunDirSnapshot:
    """What `write_run_dir` is about to change, so that a submission Slurm rejects leaves nothing that looks as if it
    ran: a new run dir (and its new parents) is removed; an existing one gets its files back."""

    def __init__(self, rd: Path, names: List[str]):
        self.rd = rd
        self.new_dirs: List[Path] = [d for d in (rd.parent.parent, rd.parent, rd) if not d.exists()]
        self.files: Dict[str, Optional[bytes]] = {name: (rd / name).read_bytes() if (rd / name).is_file() else None
                                                  for name in names}
        self.submitit = set((rd / "submitit").rglob("*"))  # nothing when there is no such directory (yet)

    def restore(self) -> None:
        if self.rd in self.new_dirs:
            shutil.rmtree(self.rd, ignore_errors=True)
            for d in reversed(self.new_dirs[:-1]):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty: a concurrent submit may have put a run there
            return
        for name, data in self.files.items():
            if data is None:
                (self.rd / name).unlink(missing_ok=True)
            else:
                (self.rd / name).write_bytes(data)
        for path in sorted(set((self.rd / "submitit").rglob("*")) - self.submitit, reverse=True):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def summary(cfg: ExperimentConfig, plan: Plan) -> str:
    gpn = plan.gpus_per_node
    lines = [f"run       {plan.run_dir}",
             f"mode      {cfg.mode}   trainer.type={cfg.trainer.type}   allocation_mode={cfg.allocation_mode}",
             f"job       {plan.job_name}: {plan.nodes} node(s) x " + (f"{gpn} GPUs" if gpn else "CPU only")]
    for s in plan.steps:
        where = f"node {s.relative_node}" + (f"..{s.relative_node + s.nodes - 1}" if s.nodes > 1 else "")
        gpus = f"{s.gpus_per_task} GPU/task, GPUs {s.gpu_ids}" if s.gpus_per_task else "CPU"
        lines.append(f"  {s.name:<10} {s.ntasks} task(s) on {where}, {gpus}, {s.cpus_per_task} cpus/task, "
                     f"{s.mem_per_node_mb // 1024} GB/node")
    if cfg.trainer.type == "ppo":
        r = cfg.rollout
        lines.append(f"rollout   {r.batch_size} prompts x {r.n_samples} samples/step, staleness <= "
                     f"{r.max_head_offpolicyness}, {cfg.trainer.total_train_steps} steps")
    return "\n".join(lines)


def check_trainer_type(cfg: ExperimentConfig) -> None:
    """Plugins must import, and every name they may register (trainer.type, rollout.workflow, rollout.reward_fn,
    dataset adapters) and the workflow's settings (rollout.workflow_args) be known, here: not on a node after the
    queue."""
    if not cfg.trainer.plugins and not cfg.rollout.workflow_args:
        return
    from areal_hpc.trainers.factory import check_names, load_plugins, plugin_failure

    try:
        load_plugins(cfg.trainer.plugins)
    except Exception as e:  # noqa: BLE001 - any import error is the user's to fix
        raise ConfigError("trainer.plugins", f"importing {cfg.trainer.plugins} failed: {plugin_failure(e)}") from None
    check_names(cfg)


def _still_owned(reg: Registry) -> Optional[str]:
    """Why the run has an owner, or one to come (its job queued, a submit under way), before a trainer registered: a
    second submit would start a second owner on the run dir."""
    claim, run = reg.get("", "submit", live_only=False) or {}, reg.run_record()
    if launcher_alive(claim, reg, "submit"):
        return f"a submit of it runs (pid {claim['pid']} on {claim['host']})"
    return why_owned(run, reg, lambda: slurm.job_state(str(run["job_id"])))


def set_aside(rd: Path, reg: Registry) -> None:
    """recover.mode=disabled starts over: an earlier run's checkpoints and weights in this run dir would outrank the new
    run's (higher steps and versions: keep-last pruning, `weights/latest` that servers load). Moved aside, not lost."""
    old = [rd / d for d in ("checkpoints", "weights", "metrics.jsonl")  # (the new run's writer drops the old rows)
           if (rd / d).is_file() or (rd / d).is_dir() and any((rd / d).iterdir())]
    if old:
        dest = rd / time.strftime("previous-%Y%m%d-%H%M%S")
        dest.mkdir()
        for d in old:
            os.replace(d, dest / d.name)
        reg.delete("weights", "latest")
        print(f"recover.mode=disabled: moved the earlier run's {', '.join(d.name for d in old)} to {dest}")


def submit(cfg: ExperimentConfig, alloc: AllocationMode, dry_run: bool = False) -> int:
    check_trainer_type(cfg)
    if cfg.mode == "ray":
        ray_runner.require_ray()
    rd = run_dir(cfg)
    reg = Registry.for_run(rd, cfg.launcher)
    restart = cfg.min_required_servers > 0
    live_servers, trainer = reg.list("servers"), reg.get("", "trainer")  # none where no registry is yet
    owned = "a live trainer" if trainer is not None else _still_owned(reg)
    if dry_run and owned:  # the queued job, a requeue or a trainer restart would run what the preview wrote
        raise ConfigError("experiment_name/trial_name", f"run {rd} is live ({owned}): a dry run would rewrite the "
                          "config.yaml and plan.json it runs from", "pick another trial_name to preview a run")
    if trainer is not None and not dry_run:
        raise ConfigError("experiment_name/trial_name", f"run {rd} already has a live trainer (pid "
                          f"{trainer.get('pid')} on {trainer.get('host')})",
                          "stop it first (`areal-hpc stop ...`) or pick another trial_name")
    if restart and not dry_run and not live_servers and not (rd / "config.yaml").exists():
        raise ConfigError("min_required_servers",
                          f"{cfg.min_required_servers} servers required but no run exists at {rd}",
                          "min_required_servers restarts the trainer of an existing run; drop it to start a new run")
    if restart and cfg.recover.mode == "disabled":  # the earlier run's checkpoints and weights stay (servers use them)
        raise ConfigError("recover.mode", "disabled starts the run over, but min_required_servers restarts only the "
                          "trainer of the run whose servers are live (its checkpoints and weights outrank a new start)",
                          "recover.mode=auto resumes the trainer; to start over, stop the run first")
    if cfg.recover.mode == "resume" and cfg.trainer.type != "null" and not latest_checkpoint_step(rd / "checkpoints"):
        raise ConfigError("recover.mode", f"resume asked but no checkpoint in {rd / 'checkpoints'}",
                          "use recover.mode=auto to start fresh when there is none")
    if live_servers and not restart and not dry_run:
        raise ConfigError("experiment_name/trial_name", f"run {rd} has {len(live_servers)} live server(s)",
                          f"restart only the trainer with min_required_servers={len(live_servers)}, "
                          "stop the run, or pick another trial_name")
    resolve(cfg)  # on the login node: hub names -> local snapshots; models and datasets checked
    for key, owner, attr in models_in_use(cfg):  # what recover.mode=disabled moves aside, pruning deletes, servers skip
        model = Path(os.path.realpath(getattr(owner, attr)))
        if any(model.is_relative_to(os.path.realpath(rd / d)) for d in ("weights", "checkpoints")):
            raise ConfigError(key, f"{getattr(owner, attr)} is in this trial's own weights/checkpoints, which its run "
                              "moves aside (recover.mode=disabled) or prunes", "start from it under another trial_name")
    latest = cfg.trainer.type == "null" and cfg.recover.mode != "disabled" and reg.get("weights", "latest", False)
    if latest and prompt_tokenizer_path(cfg) != actor_path(load_resolved(rd / "config.yaml")):  # servers load latest
        raise ConfigError(models_in_use(cfg)[0][0], f"this trial's servers would evaluate its published weights "
                          f"v{latest.get('version')}, not {prompt_tokenizer_path(cfg)}", "pick another trial_name")
    if restart and not dry_run and cfg.mode == "slurm":
        run = control.live_driver(cfg, rd)
        if run is not None:  # start the trainer inside the live allocation, not as a new job
            return control.restart_trainer(cfg, rd, run)
    plan = build_plan(cfg, alloc, rd, with_servers=not restart)
    if cfg.mode in ("slurm", "ray") and Path(os.path.expanduser(cfg.cluster.fileroot)).resolve().parts[1:2] == ("tmp",):
        print("warning: cluster.fileroot is under /tmp; on a real cluster that is node-local and servers, trainer\n"
              "         and driver will not find each other. Use a shared filesystem (home, /scratch, Lustre...).")
    ray_nodes = ray_runner.prepare(cfg, plan) if cfg.mode == "ray" and not dry_run else []  # before writing
    snapshot = RunDirSnapshot(rd, ["config.yaml", "plan.json", "sbatch/allocation.sbatch"])
    make_fileroot(cfg)  # and the run dir, with the run's umask, before the registry's lock makes it private
    os.umask(run_umask(cfg))
    (rd / "logs").mkdir(parents=True, exist_ok=True)
    with reg.locked("submit"):  # check and claim: two submits of one trial at once both found it free
        owned = _still_owned(reg)
        if owned:
            raise ConfigError("experiment_name/trial_name", f"run {rd} is submitted already: {owned}",
                              "wait for it (`areal-hpc status ...`), stop it (`areal-hpc stop ...`) or pick another "
                              "trial_name")
        reg.put("", "submit", {"pid": os.getpid(), "host": os.uname().nodename})  # while this process launches
    try:
        write_run_dir(cfg, plan, rd)
        print(summary(cfg, plan))
        step = latest_checkpoint_step(rd / "checkpoints") if cfg.recover.mode != "disabled" else 0
        if step and cfg.trainer.type != "null":
            print(f"resume    from step_{step:08d} of this trial (recover.mode={cfg.recover.mode}; a new trial_name "
                  "or recover.mode=disabled starts over)")
        if latest:
            print(f"evaluate  this trial's published weights v{latest.get('version')} ({latest.get('path')})")
        if dry_run:
            print(f"dry run: wrote {rd}/config.yaml, plan.json and sbatch/allocation.sbatch; nothing submitted")
            if cfg.recover.mode == "disabled" and latest_checkpoint_step(rd / "checkpoints"):  # submit sets them aside
                print(f"note      recover.mode=disabled: a by-hand sbatch of it resumes from the checkpoints in {rd}"
                      f"/checkpoints (submit moves them aside); move them, {rd}/weights and metrics.jsonl away first")
            return 0
        if cfg.recover.mode == "disabled" and not restart:
            set_aside(rd, reg)
        if cfg.mode == "local":
            return local.run(cfg, plan, rd)
        if cfg.mode == "torchrun":
            return local.run(cfg, plan, rd, torchrun.TorchrunRunner(cfg))
        if cfg.mode == "ray":
            return ray_runner.run(cfg, plan, rd, ray_nodes)
        try:
            return slurm_submit.submit(cfg, plan, rd)
        except ConfigError:  # Slurm rejected the allocation (or its options): nothing was queued
            snapshot.restore()
            raise
    finally:
        reg.delete("", "submit")
