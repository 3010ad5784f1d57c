"""`areal-hpc serve` / `areal-hpc train`, what every launcher starts on a compute node: from the run's resolved
config.yaml (no user YAML, no simple-parsing there), logging to stdout (the launcher's {run}/logs/)."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from areal_hpc.config import ParallelSpec, actor_path, load_resolved, parse_allocation
from areal_hpc.launch import slurm
from areal_hpc.registry import Registry, set_parent_death_signal


def setup_logging(role: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def visible_gpus() -> List[int]:
    """The GPUs this process may use, as Slurm or the local launcher set them; named by UUID or MIG name in
    CUDA_VISIBLE_DEVICES, the numbers CUDA gives them (0, 1, ...)."""
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        names = [g.strip() for g in os.environ.get(var, "").split(",") if g.strip()]
        if names and all(g.isdigit() for g in names):
            return [int(g) for g in names]
        if names:  # "-1" or "NoDevFiles": none
            return list(range(sum(g.startswith(("GPU-", "MIG-")) for g in names)))
    return []


def slurm_placement() -> str:
    """`` node=n2 step=123.4 SLURM_STEP_GPUS=1 CUDA_VISIBLE_DEVICES=1`` under srun, else ""."""
    if "SLURM_STEP_ID" not in os.environ:
        return ""
    return (f" node={os.environ.get('SLURMD_NODENAME', '?')} step={os.environ.get('SLURM_JOB_ID', '?')}."
            f"{os.environ['SLURM_STEP_ID']} SLURM_STEP_GPUS={os.environ.get('SLURM_STEP_GPUS', '')} "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")


# NCCL's cuMem allocator breaks groups formed outside the default one (weight sync); peers set this too.
os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")

LAUNCHER_PID_ENV = "AREAL_HPC_LAUNCHER_PID"
# What a launcher sets per rank (torchrun's agent; srun, through `_master_from_slurm`): the submitting shell's must not
# reach the ranks, where they would win.
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def stop_with_launcher() -> None:
    """Get SIGTERM (the graceful stop) when the local launcher that started us dies, even by SIGKILL (under Slurm,
    which sets no launcher pid, slurmstepd cleans up)."""
    parent = os.environ.get(LAUNCHER_PID_ENV)
    if not parent or not set_parent_death_signal(signal.SIGTERM):
        return
    if os.getppid() != int(parent):  # it died before we asked: nothing to clean up yet
        os.kill(os.getpid(), signal.SIGTERM)


def manual_server_id() -> str:
    """The id of a server started by hand (`areal-hpc serve` with a run's names)."""
    return f"serve-{socket.gethostname().split('.')[0]}-{os.getpid()}"


def serve(run_dir: Path, server_id: str, backend: Optional[str] = None, external: bool = False) -> int:
    """One server of the run; ``external``: started by hand, not by the run's owner (its record says so)."""
    from areal_hpc import toy
    from areal_hpc.inference.server import serve as run_server

    stop_with_launcher()
    cfg = load_resolved(run_dir / "config.yaml")
    setup_logging(server_id)
    gen = parse_allocation(cfg.allocation_mode).gen or ParallelSpec("hf")  # a run without servers: one by hand
    backend = backend or gen.backend
    model = toy.resolve_model(cfg.server.model_path or actor_path(cfg))
    options: Dict[str, object] = {"external": True} if external else {}
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # a server across nodes (multi_node_tp): a task a node
        addr, port = step_rendezvous()
        options.update(nnodes=int(os.environ["SLURM_STEP_NUM_TASKS"]), node_rank=int(os.environ["SLURM_PROCID"]),
                    dist_init_addr=f"{addr}:{port}")
    gpus = visible_gpus()
    logging.getLogger(__name__).info("server %s on %s, gpus=%s%s", server_id, socket.gethostname(), gpus,
                                     slurm_placement())
    return run_server(run_dir=run_dir, cfg=cfg.server, model_path=model, launcher=cfg.launcher,
                      server_id=server_id, backend=backend, gpus=gpus, tp_size=gen.tp, pp_size=gen.pp, **options)


def train(run_dir: Path) -> int:
    from areal_hpc.train.dist import env_ranks
    from areal_hpc.trainers import TrainContext, make_trainer
    from areal_hpc.trainers.base import STOPPED_EXIT

    stop_with_launcher()
    cfg = load_resolved(run_dir / "config.yaml")
    if os.environ.get("AREAL_HPC_MIN_REQUIRED_SERVERS"):  # a trainer restarted by the run's owner
        cfg.min_required_servers = int(os.environ["AREAL_HPC_MIN_REQUIRED_SERVERS"])
    elif int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) and os.environ.get("AREAL_HPC_RESTART_MIN_SERVERS"):
        # restarted by torchrun's elastic agent: like a restart by the owner (wait for one server, push weights)
        cfg.min_required_servers = int(os.environ["AREAL_HPC_RESTART_MIN_SERVERS"])
    _master_from_slurm()
    rank = env_ranks()[0]
    setup_logging(f"trainer[{rank}]")
    logging.getLogger(__name__).info("trainer rank %d on %s, gpus=%s%s", rank, socket.gethostname(), visible_gpus(),
                                     slurm_placement())
    ctx = TrainContext(cfg=cfg, alloc=parse_allocation(cfg.allocation_mode), run_dir=run_dir,
                       registry=Registry.for_run(run_dir, cfg.launcher))
    try:
        rc = make_trainer(ctx).run()
        # under torchrun, a stop its owner asked for (`AgentHandle.signal`) is a success: else the agent restarts ranks
        stop_file = os.environ.get("AREAL_HPC_STOP_FILE")
        return 0 if rc == STOPPED_EXIT and stop_file and Path(stop_file).exists() else rc
    finally:
        # process groups left at interpreter exit can abort it (SIGABRT) after the work is done
        from areal_hpc.train import dist

        dist.destroy()


def step_rendezvous() -> Tuple[str, int]:
    """Under srun, an address every task of the step derives alike: the step's first node, and the first port Slurm
    reserved for it (``SLURM_STEP_RESV_PORTS``, with MpiParams=ports), else one from the job and step ids."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    hosts = slurm.hostnames(nodes)
    if not hosts and os.environ.get("SLURM_STEP_NUM_NODES", "1") != "1":  # each node would wait at its own localhost
        raise RuntimeError(f"cannot expand SLURM_STEP_NODELIST={nodes} (`scontrol show hostnames` failed here): no "
                           "rendezvous address for a multi-node step; scontrol must run on the compute nodes")
    node = (hosts or ["localhost"])[0]
    # Fake multi-node clusters share one host: resolve the node name, fall back to its NodeAddr.
    try:
        addr = socket.gethostbyname(node)
    except OSError:
        addr = slurm.node_addr(node) or "127.0.0.1"
    if reserved := re.match(r"\d+", os.environ.get("SLURM_STEP_RESV_PORTS", "")):  # "12000-12003", "12000,12002"
        return addr, int(reserved[0])
    job, stepid = int(os.environ.get("SLURM_JOB_ID", "0")), int(os.environ.get("SLURM_STEP_ID", "0"))
    # below Linux's ephemeral range (32768-60999), where any outgoing connection on the node may hold the port
    return addr, 20000 + (job * 131 + stepid * 7) % (32768 - 20000)


def _master_from_slurm() -> None:
    """Under srun, torch.distributed's rendezvous from the step (`step_rendezvous`)."""
    from areal_hpc.train.dist import env_ranks

    if "SLURM_PROCID" not in os.environ or os.environ.get("MASTER_ADDR"):
        return
    rank, world, local = env_ranks()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    if world == 1:
        return
    addr, port = step_rendezvous()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
