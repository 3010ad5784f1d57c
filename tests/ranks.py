"""Run a function on N local CPU ranks (gloo): the train package's tests."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: Sequence[Any],
           env: Dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import torch

    torch.set_num_threads(int(env.get("AREAL_HPC_THREADS", "1")))
    from areal_hpc.train import dist

    try:
        fn(rank, *args)
    finally:
        dist.destroy()


def run_ranks(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
              env: Optional[Dict[str, str]] = None) -> None:
    """Spawn ``world_size`` processes that call ``fn(rank, *args)`` with torchrun-style env vars
    set (``init_distributed`` then forms the group). Raises if any rank fails. ``fn`` must be
    importable (module level).

    As under torchrun, this process hosts the rendezvous store and the ranks join it as clients
    (``TORCHELASTIC_USE_AGENT_STORE``): its port is bound from the start, so no other process can
    take it between the choice of a free port and rank 0 binding it.
    """
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    env = dict(env or {}, TORCHELASTIC_USE_AGENT_STORE="True")
    mp.start_processes(_entry, args=(fn, world_size, store.port, tuple(args), env),
                       nprocs=world_size, join=True, start_method="spawn")


def receive_weights(group: tdist.ProcessGroup, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                    shapes: Sequence[Sequence[int]], device: torch.device | str = "cpu"
                    ) -> List[Tuple[str, torch.Tensor]]:
    """What a server does with one announced bucket of `weight_sync`: ``[(name, tensor)]`` in order."""
    out, works = [], []
    for name, dt, shape in zip(names, dtypes, shapes):
        dtype = dt if isinstance(dt, torch.dtype) else getattr(torch, str(dt).removeprefix("torch."))
        t = torch.empty(tuple(shape), dtype=dtype, device=device)
        works.append(tdist.broadcast(t, group_src=0, group=group, async_op=True))
        out.append((name, t))
    for w in works:
        w.wait()
    return out
