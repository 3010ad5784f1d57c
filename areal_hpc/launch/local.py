"""`mode=local`: the plan's steps as subprocesses of this machine, each in its own process group, each task with its log
in {run}/logs/. The foreground `submit` is the run's owner: it shows a progress bar, serves add-servers/stop requests;
Ctrl-C stops the run gracefully and waits for it (a second Ctrl-C kills what is left), then prints the summary.
`ProcessHandle` and `spawn` also run torchrun's agent, the Slurm driver's srun clients and Ray's tasks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from areal_hpc.config import ExperimentConfig
from areal_hpc.launch import outcome
from areal_hpc.launch.entry import LAUNCHER_PID_ENV
from areal_hpc.launch.owner import RunOwner, Runner, StepHandle
from areal_hpc.launch.plan import Plan, StepSpec
from areal_hpc.registry import free_port

log = logging.getLogger("areal_hpc.launch")


def step_exit(codes: List[Optional[int]]) -> Optional[int]:
    """A step's exit code from its tasks' (None: running): the first failure at once (one dead rank
    kills the step, as ``srun --kill-on-bad-exit`` does), else 0 once every task ended."""
    bad = next((c for c in codes if c not in (None, 0)), None)
    return bad if bad is not None or None in codes else 0


def spawn(command: List[str], env: Dict[str, str], log_path: str, cwd: str,
          preexec_fn: Optional[Callable[[], None]] = None) -> subprocess.Popen:
    """One task: its own process group (a signal reaches its children too), its output appended to its log."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True, preexec_fn=preexec_fn)


def killpg(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def host_env(*drop: str) -> Dict[str, str]:
    """This process's environment for a task it starts here, without ``drop`` and the variables of a Slurm job it may
    run in (the task is no step of it: servers must record this host, ranks not size themselves from the job)."""
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "SLURMD_"))}


def task_env(step: StepSpec, rank: int, gpus: List, master: Tuple[str, int]) -> Dict[str, str]:
    """What srun gives task ``rank`` of ``step`` (and the step's env): its rank, the step's size and rendezvous
    (``master``, for a step of several tasks), its GPUs."""
    env = dict(step.env, PYTHONUNBUFFERED="1", RANK=str(rank), WORLD_SIZE=str(step.ntasks),
               LOCAL_RANK=str(rank % step.ntasks_per_node), LOCAL_WORLD_SIZE=str(step.ntasks_per_node),
               GROUP_RANK=str(rank // step.ntasks_per_node), CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))
    if step.ntasks > 1:
        env.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
    return env


class ProcessHandle(StepHandle):
    """A step whose processes run on this host (local tasks, torchrun's agent, an ``srun`` client)."""

    def __init__(self, step: StepSpec, procs: List[subprocess.Popen], gpus: List[int]):
        self.step, self.procs, self.gpus = step, procs, gpus

    def poll(self) -> Optional[int]:
        codes = [p.poll() for p in self.procs]
        rc = step_exit(codes)
        if rc is not None and None in codes:
            self.signal(signal.SIGKILL)
        return rc

    def signal(self, sig: int) -> None:
        for p in self.procs:
            killpg(p, sig)

    def info(self) -> Dict[str, object]:
        return {"pids": [p.pid for p in self.procs], "gpus": self.gpus}


class ProcessRunner(Runner):
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def _free_gpus(self, running: List[StepHandle]) -> List[int]:
        used = {g for h in running if h.poll() is None for g in getattr(h, "gpus", [])}
        return [g for g in range(self.cfg.cluster.n_gpus_per_node) if g not in used]

    def can_start(self, step: StepSpec, running: List[StepHandle]) -> bool:
        need = step.gpus_per_task * step.ntasks
        return need == 0 or step.gpu_ids or len(self._free_gpus(running)) >= need

    def gpus_for(self, step: StepSpec, running: List[StepHandle]) -> List[int]:
        """The GPUs of this machine ``step`` gets: the plan's, or (added servers) free ones."""
        return list(step.gpu_ids) or self._free_gpus(running)[: step.gpus_per_task * step.ntasks]

    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        gpus = self.gpus_for(step, running)
        env, master = host_env(), ("127.0.0.1", free_port() if step.ntasks > 1 else 0)
        if step.role != "server" or self.cfg.shutdown_server_on_exit:  # else servers are meant to outlive us
            env[LAUNCHER_PID_ENV] = str(os.getpid())  # if we die, even by SIGKILL, the kernel stops the task
        procs: List[subprocess.Popen] = []
        try:
            for rank in range(step.ntasks):
                procs.append(spawn(step.command, dict(env, **task_env(step, rank, gpus, master)),
                                   step.log.replace("%t", str(rank)), str(Path(step.log).parent.parent)))
        except BaseException:  # rank k did not start: ranks 0..k-1 must not run on, waiting for it
            for p in procs:
                killpg(p, signal.SIGKILL)
                p.wait()
            raise
        return ProcessHandle(step, procs, gpus)


class Progress:
    """A progress bar fed by the last row of {run}/metrics.jsonl (a restarted trainer that rewrote it moves it back)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        self.path, self.total = run_dir / "metrics.jsonl", cfg.trainer.total_train_steps
        self.enabled, self._bar = cfg.stats.progress_bar and cfg.trainer.type != "null", None
        self._last = outcome.last_row(self.path)  # an earlier run's row: no progress of this one

    def tick(self) -> None:
        m = outcome.last_row(self.path) if self.enabled else {}
        if not m or m == self._last:
            return
        self._last = m
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=m["step"] - 1, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=0.5)
        self._bar.update(m["step"] - self._bar.n)
        value = m.get("reward_mean", m.get("loss"))  # an SFT run has a loss, no reward; None: not finite
        post = {"reward" if "reward_mean" in m else "loss": "nan" if value is None else f"{value:.3f}",
                "v": m.get("version")}
        if m.get("staleness_max") is not None:
            post["stale"] = int(m["staleness_max"])
        self._bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.tick()
        if self._bar is not None:
            self._bar.close()


def stop_on_signals(owner: RunOwner, forced_by: Tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Dict[int, object]:
    """Ctrl-C (SIGINT) or SIGTERM stops the run gracefully (checkpoint, servers down), a second one of ``forced_by``
    kills what is left (others are ignored then); returns the handlers replaced."""
    def on_signal(signum, frame) -> None:
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if owner.stopping and signum in forced_by:
            owner.request_force(f"forced stop ({what} twice)")
            print(f"\n{what} again: killing the trainer and the servers", file=sys.stderr, flush=True)
        elif not owner.stopping:
            owner.request_stop(f"interrupted ({what})")
            print(f"\n{what}: stopping (the trainer checkpoints, servers shut down)"
                  + (f"; {what} again to force" if signum in forced_by else ""), file=sys.stderr, flush=True)
    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


@contextlib.contextmanager
def owner_log(run_dir: Path) -> Iterator[None]:
    """While the owner runs (the local launcher, the driver): its log on stderr and in {run}/logs/driver.log."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    lg = logging.getLogger("areal_hpc.launch")
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(run_dir / "logs" / "driver.log")]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        lg.addHandler(h)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        yield
    finally:
        for h in handlers:
            lg.removeHandler(h)
            h.close()
        lg.propagate = True


def run(cfg: ExperimentConfig, plan: Plan, run_dir: Path, runner: Optional[Runner] = None) -> int:
    """Own the run from this process (mode=local; also torchrun and ray, with their ``runner``) until it ends."""
    progress = Progress(cfg, run_dir)
    owner = RunOwner(cfg, plan, run_dir, runner or ProcessRunner(cfg), mode=cfg.mode)
    old = stop_on_signals(owner)
    print(f"logs: areal-hpc logs -f experiment_name={cfg.experiment_name} trial_name={cfg.trial_name} "
          f"cluster.fileroot={cfg.cluster.fileroot}  ({run_dir}/logs)", file=sys.stderr)
    try:
        with owner_log(run_dir):
            rc = owner.run(on_tick=progress.tick)
    finally:
        progress.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    summarize(cfg, run_dir, owner.record())
    return rc


def summarize(cfg: ExperimentConfig, run_dir: Path, rec: Dict[str, object]) -> None:
    """What the run did (steps, reward or loss) and how it ended (`outcome.summary_line`), on stdout."""
    from areal_hpc.trainers.metrics import read_metrics

    state = rec.get("state")
    rows = read_metrics(run_dir / "metrics.jsonl")
    if cfg.trainer.type == "null" and (run_dir / "eval.json").exists():
        print(f"eval: {(run_dir / 'eval.json').read_text().strip()}")
    elif rows:
        # the reward of an RL run, the loss of an SFT run (no reward; the curve is of rewards)
        key = next((k for k in ("reward_mean", "loss") if any(isinstance(r.get(k), (int, float)) for r in rows)), "")
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        trend = (f", {key.split('_')[0]} {vals[0]:.3f} -> {vals[-1]:.3f} (mean of the last {len(vals[-10:])} steps "
                 f"{sum(vals[-10:]) / len(vals[-10:]):.3f})") if vals else ""
        took = f" (run {rec['ended'] - rec['started']:.0f}s)" if rec.get("ended") and rec.get("started") else ""
        print(f"{'done' if state == outcome.COMPLETED else str(state).lower()}: step {rows[-1]['step']}{trend} in "
              f"{rows[-1].get('time_s', 0):.1f}s of training{took}; metrics {run_dir / 'metrics.jsonl'}"
              + (f", curve {run_dir / 'reward.png'}" if key == "reward_mean" else ""))
    resume = "\n    resume: the same `areal-hpc submit` command" if state == outcome.STOPPED else ""
    if resume and cfg.recover.mode == "disabled":  # submitted again as it was, it sets the checkpoints aside
        resume += " without recover.mode=disabled (that starts over)"
    print(f"run {outcome.summary_line(rec)}{resume}", file=sys.stderr if state == outcome.FAILED else sys.stdout,
          flush=True)
