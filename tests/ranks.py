"""Run a function on N local CPU ranks (gloo): the train package's tests."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence

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
