"""How a transformers causal LM is parallelised (FSDP2, activation checkpointing, compile): small
separate functions in the torchtitan manner, composed by `engine.FSDPEngine`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from areal_hpc.train.fuse_linears import FuseSiblingLinears

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """Master weights are always fp32; ``param_dtype`` is what forward/backward compute in."""

    param_dtype: torch.dtype
    reduce_dtype: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.param_dtype != torch.float32

    def policy(self) -> Optional[MixedPrecisionPolicy]:
        if not self.mixed:
            return None
        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """``auto``: bf16 compute with fp32 reduction on GPU, fp32 on CPU; else the named dtype."""
    name = ("bfloat16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype
    if name not in _DTYPES:
        hint = " (float16 would need loss scaling, which the engine does not do)" if "16" in name else ""
        raise ValueError(f"engine dtype must be auto, float32 or bfloat16, not {dtype!r}{hint}")
    return Precision(param_dtype=_DTYPES[name], reduce_dtype=torch.float32)


def build_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated transformer blocks, found through transformers' ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (transformers' own, non-reentrant: names unchanged)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_layers(model: nn.Module, dynamic: Optional[bool] = True,
                   fuse_linears: bool = False) -> Optional[FuseSiblingLinears]:
    """``torch.compile`` the forward of every decoder layer (FSDP2's hooks and checkpointing stay outside).
    ``dynamic=True``: lengths symbolic from the start; ``None``: torch's automatic dynamic shapes (padded micro-batches
    keep static sizes). ``fuse_linears``: projections of one input run as one matmul (the returned pass counts the
    groups fused). The layers share one code object, hence the larger dynamo cache."""
    import torch._dynamo

    layers = decoder_layers(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(layers))
    fuse = FuseSiblingLinears() if fuse_linears else None
    options = {"pre_grad_custom_pass": fuse} if fuse is not None else None
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=dynamic, options=options)
    return fuse


def resolve_fsdp_units(choice: str, world: int, n_params: int, device_bytes: int, one_host: Callable[[], bool]) -> str:
    """``layer`` or ``model`` for ``engine.fsdp_units=choice``. ``auto``: one unit on one rank, and on
    the ranks of one host when the gathered weights and gradients (6 bytes per parameter) take at
    most an eighth of a device (one gather and reduce-scatter per step, fewer hooks); per layer
    across hosts, to overlap the network with compute. ``one_host`` is a collective."""
    if choice != "auto":
        return choice
    if world == 1 or (one_host() and 6 * n_params <= device_bytes // 8):
        return "model"
    return "layer"


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, precision: Precision,
               reshard_after_forward: bool = True, per_layer: bool = True) -> None:
    """``fully_shard`` every decoder layer (``per_layer``; the last is not resharded after forward,
    backward needs it at once), then the root (embeddings, norm, head, the rest)."""
    mp = precision.policy()
    kwargs = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    layers = decoder_layers(model) if per_layer else []
    for i, layer in enumerate(layers):
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
