"""torch.distributed for trainer processes: ranks from torchrun's variables, else Slurm's, else one process (an
in-memory store); nccl on CUDA, gloo on CPU; small collective helpers."""

from __future__ import annotations

import datetime
import gc
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else Slurm (an srun step), else (0, 1, 0)."""
    env = os.environ
    if env.get("WORLD_SIZE") and env.get("RANK"):
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK") or 0)
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")  # inside an srun step, the step's count
    if env.get("SLURM_PROCID") and world:
        return int(env["SLURM_PROCID"]), int(world), int(env.get("SLURM_LOCALID") or 0)
    return 0, 1, 0


# CPU threads of a GPU process when OMP_NUM_THREADS is unset (its host work is slower on a thread per core)
GPU_PROCESS_THREADS = 8


def limit_cpu_threads(device: torch.device) -> None:
    """At most `GPU_PROCESS_THREADS` CPU threads in a GPU process, unless ``OMP_NUM_THREADS`` is set."""
    if device.type == "cuda" and not os.environ.get("OMP_NUM_THREADS") \
            and torch.get_num_threads() > GPU_PROCESS_THREADS:
        torch.set_num_threads(GPU_PROCESS_THREADS)


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group once; later calls return the existing set-up."""
    rank, world, local = env_ranks()
    device = torch.device("cpu")
    if torch.cuda.is_available():  # cuda:LOCAL_RANK, or cuda:0 when only one GPU is visible (--gpus-per-task=1)
        n = torch.cuda.device_count()
        device = torch.device("cuda", local % n)
        torch.cuda.set_device(device)
    limit_cpu_threads(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1 and not os.environ.get("MASTER_ADDR"):
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise RuntimeError(f"world size {world} needs {' and '.join(missing)} in the environment "
                               "(set by torchrun or the Slurm launcher)")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def destroy() -> None:
    """Destroy the default group after collecting what holds it (FSDP modules sit in reference cycles): ended at
    interpreter teardown, it can abort a process that did its work."""
    if dist.is_initialized():
        gc.unfreeze()  # what `SettledGC` froze is collectable again
        gc.collect()
        dist.destroy_process_group()


class SettledGC:
    """Keeps full garbage collections short (the other ranks wait for one): after the 1st and 3rd steps (compiling
    done) collect and ``gc.freeze`` what is alive. `step` after each step, on every rank; `destroy` unfreezes."""

    AT = (1, 3)

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps in self.AT:
            gc.collect()
            gc.freeze()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def ranks_on_one_host() -> bool:
    """Whether every rank of the default group runs on this host (collective)."""
    if world_size() == 1:
        return True
    names: list = [None] * world_size()
    dist.all_gather_object(names, socket.gethostname())
    return len(set(names)) == 1


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum | max | min) over the default group; a no-op with one process."""
    if world_size() > 1:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
    return t


def collective_device() -> torch.device:
    """The device tensors must live on for collectives of the default group."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def all_reduce_scalar(x: float, op: str = "sum") -> float:
    if world_size() == 1:
        return float(x)  # no device round trip on one process
    t = torch.tensor([float(x)], dtype=torch.float64, device=collective_device())
    return float(all_reduce(t, op).item())


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (collective), gathered only across several ranks."""
    full = value.full_tensor() if isinstance(value, DTensor) and value.device_mesh.size() > 1 else value
    return full.to_local() if isinstance(full, DTensor) else full  # one rank: no redistribution
