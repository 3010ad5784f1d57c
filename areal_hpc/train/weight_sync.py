"""Weight updates over a collective group of trainer rank 0 and the inference servers (SGLang's
``/init_weights_update_group`` and ``/update_weights_from_distributed``): rank 0 hosts the rendezvous (keys prefixed by
a group name new at every join: a restarted trainer never meets stale keys); per bucket it announces ``names, dtypes,
shapes`` over HTTP, then broadcasts each full tensor in that order. Every trainer rank takes part in the gathers."""

from __future__ import annotations

import datetime
import math
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist

from areal_hpc.inference.hf_engine.model_runner import new_process_group
from areal_hpc.train.dist import full_tensor
from areal_hpc.train.engine import checkpoint_layout

DEFAULT_BUCKET_BYTES = 1 << 30


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


Bucket = List[TensorSpec]  # tensors announced and broadcast together (one /update_weights_from_distributed call)


def announcement(bucket: Bucket) -> Tuple[List[str], List[str], List[List[int]]]:
    """What announces a bucket: its tensors' names, dtypes and shapes."""
    return [s.name for s in bucket], [s.dtype for s in bucket], [list(s.shape) for s in bucket]


def new_group_name() -> str:
    """A group name never used before (new after every trainer restart)."""
    return f"areal-weights-{uuid.uuid4().hex[:12]}"


def init_weight_sync_group(master_addr: str, master_port: int, rank: int, world_size: int, group_name: str,
                           backend: str = "nccl", timeout_s: float = 600.0) -> tdist.ProcessGroup:
    """Join (rank 0: host) a process group outside the default one, as SGLang does; blocks until all have joined."""
    # our own TCPStore: under torchrun, torch's tcp:// rendezvous expects the agent to host it
    store = tdist.TCPStore(master_addr, int(master_port), world_size, is_master=rank == 0,
                           timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False, multi_tenant=True)
    return new_process_group(store, rank, world_size, group_name, backend, timeout_s)


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> List[Bucket]:
    """Consecutive specs, in the given (fixed) order, grouped up to ``bucket_bytes``."""
    buckets: List[Bucket] = []
    size = 0
    for spec in specs:
        if not buckets or size + spec.nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += spec.nbytes
    return buckets


def send_tensors(group: tdist.ProcessGroup, tensors: Sequence[torch.Tensor]) -> None:
    """Broadcast each tensor from group rank 0, in order."""
    works = [tdist.broadcast(t.contiguous(), group_src=0, group=group, async_op=True) for t in tensors]
    for w in works:
        w.wait()


def broadcast_engine_weights(engine, group: Optional[tdist.ProcessGroup],
                             on_bucket: Optional[Callable[[Bucket], Optional[Callable[[], None]]]] = None,
                             bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: Optional[torch.dtype] = None) -> int:
    """Broadcast the engine's full weights to the weight group (``group`` on rank 0, None on the others; every rank
    calls it). Before each bucket rank 0 calls ``on_bucket(bucket)``, which announces it and may return a function that
    waits for the receivers (called after the bucket's broadcasts). Returns the number of buckets."""
    entries = {name: (value, to_dtype) for name, value, to_dtype in engine.hf_tensors(dtype)}
    buckets = plan_buckets([TensorSpec(name, str(to_dtype).removeprefix("torch."), tuple(value.shape))
                            for name, (value, to_dtype) in entries.items()], bucket_bytes)
    is_sender = engine.info.rank == 0
    if is_sender and group is None:
        raise ValueError("trainer rank 0 needs the weight-sync group")
    for bucket in buckets:
        if not is_sender:  # a gather is collective: every rank takes part, rank 0 alone keeps (and casts) the result
            for s in bucket:
                full_tensor(entries[s.name][0])
            continue
        # under the checkpoint's names, as the disk copy: SGLang's load_weights knows those, not fused modules'
        tensors = checkpoint_layout(engine.model, {s.name: full_tensor(entries[s.name][0]).to(entries[s.name][1])
                                                   for s in bucket})
        wait = on_bucket([TensorSpec(k, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                          for k, t in tensors.items()]) if on_bucket is not None else None
        send_tensors(group, list(tensors.values()))
        if wait is not None:
            wait()
        del tensors
    return len(buckets)
