"""`mode=torchrun`: one machine; servers as in mode=local, the trainer under torchrun's elastic agent.

The agent restarts all ranks when one dies, up to ``trainer.max_restarts`` times (so the owner does not,
`Runner.trainer_restarts_itself`); they resume from the last checkpoint. The agent's rendezvous store is not shared with
the ranks (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): restarted ranks of torch 2.5+ can read the dead ranks' addresses
from a shared one and hang in ``init_process_group`` (pytorch/pytorch#135712).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from areal_hpc.config import ExperimentConfig, parse_allocation
from areal_hpc.launch.entry import LAUNCHER_PID_ENV, RANK_VARS
from areal_hpc.launch.local import ProcessHandle, ProcessRunner, host_env, spawn
from areal_hpc.launch.outcome import TRAINER_STOPPED
from areal_hpc.launch.owner import StepHandle
from areal_hpc.launch.plan import StepSpec, has_servers
from areal_hpc.registry import free_port, set_parent_death_signal


def torchrun_argv(cfg: ExperimentConfig, step: StepSpec, rdzv_port: int) -> List[str]:
    """The agent's command line: each rank runs ``step.command``, its output appended to its rank's log."""
    head, _, tail = step.log.partition("%t")
    # torchrun --no-python runs a program as is: a shell that execs the trainer with its output in its log
    redirect = f'exec "$0" "$@" >>{shlex.quote(head)}"$RANK"{shlex.quote(tail)} 2>&1'
    return [step.command[0], "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={step.ntasks}",
            f"--max-restarts={cfg.trainer.max_restarts}", "--monitor-interval=0.5", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{rdzv_port}", f"--rdzv-id={cfg.experiment_name}-{cfg.trial_name}",
            "--no-python", "/bin/sh", "-c", redirect, *step.command]


def stop_file(step: StepSpec) -> Path:
    """Where the owner marks a stop it asked for: ranks that stop then exit 0 (`entry.train`), not restarted."""
    return Path(step.log).with_name(".torchrun-stopping")


def _ranks(agent: subprocess.Popen) -> List[int]:
    """The pids of a live agent's children, its ranks (any of its threads may have started them)."""
    if agent.poll() is not None:
        return []
    out: List[int] = []
    for children in glob.glob(f"/proc/{agent.pid}/task/*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(children).read_text().split()]
    return out


class AgentHandle(ProcessHandle):
    """The trainer step: torchrun's agent and its ranks, each in a session of its own (a signal for the agent's process
    group does not reach them)."""

    def signal(self, sig: int) -> None:
        if sig != signal.SIGKILL:  # a stop the owner asks for: the ranks exit 0, which the agent does not restart
            stop_file(self.step).touch()
        ranks = _ranks(self.procs[0])
        if sig == signal.SIGKILL or not ranks:
            super().signal(sig)
        # a graceful stop goes to the ranks only: they checkpoint and exit 0 (`stop_file`), so the agent ends with
        # success instead of treating the signal as its own failure
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

    def __init__(self, step: StepSpec, procs: List[subprocess.Popen], gpus: List[int], log_from: int):
        super().__init__(step, procs, gpus)
        self.log_from, self.rc = log_from, None  # where this agent's part of torchrun.log (appended to) begins
        self.seen: List[int] = []  # its ranks at the last poll

    def poll(self) -> Optional[int]:
        if self.rc is not None:
            return self.rc
        ranks = _ranks(self.procs[0])
        rc = super().poll()
        if rc is None:
            self.seen = ranks
            return None
        if rc < 0:  # a SIGKILLed agent stops none of its ranks (each in a session of its own): they end with it
            for pid in ranks or self.seen:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
        self.rc = rc  # read once: the agent exits 1 whatever ended its ranks; a signal it logged says more
        with contextlib.suppress(OSError), open(Path(self.step.log).with_name("torchrun.log"), "rb") as f:
            f.seek(self.log_from)
            text = f.read().decode(errors="replace")
            last = re.findall(r"failed \(exitcode: (-?\d+)\)", text)
            self.rc = int(last[-1]) if rc and last and int(last[-1]) < 0 else rc
            # the agent got a signal (kill <torchrun pid>) and passed it to the ranks: they stop as the trainer does
            if rc and (sig := re.search(r"SignalException: Process \d+ got signal: (\d+)", text)):
                self.rc = TRAINER_STOPPED if int(sig[1]) in (signal.SIGTERM, signal.SIGINT) else -int(sig[1])
        return self.rc

    def info(self) -> Dict[str, object]:
        return {"torchrun_pid": self.procs[0].pid, "pids": _ranks(self.procs[0]), "gpus": self.gpus}


class TorchrunRunner(ProcessRunner):
    trainer_restarts_itself = True

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        # servers: a restarted trainer waits for one only (as one the owner restarts) and pushes its weights to them
        self.servers = has_servers(cfg, parse_allocation(cfg.allocation_mode))

    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        if step.role != "trainer":
            return super().start(step, running)
        gpus = self.gpus_for(step, running)
        env = host_env(*RANK_VARS, LAUNCHER_PID_ENV)
        env.update(step.env, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # see the module's docstring
        if self.servers:
            env["AREAL_HPC_RESTART_MIN_SERVERS"] = "1"
        log_path = Path(step.log).with_name("torchrun.log")
        env["AREAL_HPC_STOP_FILE"] = str(stop_file(step))
        stop_file(step).unlink(missing_ok=True)  # an earlier submit's
        # the agent gets SIGTERM when the owner dies (even by SIGKILL), and then stops its ranks
        log_from = log_path.stat().st_size if log_path.exists() else 0  # an earlier submit's part
        agent = spawn(torchrun_argv(self.cfg, step, free_port()), env, str(log_path), str(log_path.parent.parent),
                      preexec_fn=functools.partial(set_parent_death_signal, signal.SIGTERM))
        return AgentHandle(step, [agent], gpus, log_from)

