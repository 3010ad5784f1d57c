"""How a transformers causal LM is parallelised: FSDP2 per decoder layer, activation checkpointing.

Small separate functions in the torchtitan manner; `engine.FSDPEngine` composes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from areal_hpc.train.fuse_linears import FuseSiblingLinears

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


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
    if dtype == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    else:
        name = dtype
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
    """Recompute each decoder layer in backward (transformers' own per-layer checkpointing,
    non-reentrant; parameter names stay unchanged, which keeps state dicts HF-compatible)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_layers(model: nn.Module, dynamic: Optional[bool] = True,
                   fuse_linears: bool = False) -> Optional[FuseSiblingLinears]:
    """``torch.compile`` the forward of every decoder layer (torchtitan's per-block compile).

    Only ``forward`` is compiled, so FSDP2's hooks (in ``__call__``) and transformers' activation
    checkpointing stay outside the compiled code. ``dynamic=True``: sequence lengths are symbolic
    from the start (micro-batches of any length); ``None``: torch's automatic dynamic shapes,
    static kernels for sizes that never change (padded micro-batches: the token count), symbolic
    ones for those seen to change (the number of documents). ``fuse_linears``: projections of one
    input (query/key/value, gate/up) run as one matmul (`fuse_linears.FuseSiblingLinears`,
    returned: its ``fused`` counts the groups fused). The layers share one code object, hence
    the larger dynamo cache (entries per layer: train and no-grad, static and recompiled).
    """
    import torch._dynamo

    layers = decoder_layers(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(layers))
    fuse = FuseSiblingLinears() if fuse_linears else None
    options = {"pre_grad_custom_pass": fuse} if fuse is not None else None
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=dynamic, options=options)
    return fuse


def resolve_fsdp_units(choice: str, world: int, n_params: int, device_bytes: int,
                       one_host: Callable[[], bool]) -> str:
    """``layer`` or ``model`` for ``engine.fsdp_units=choice``.

    ``auto`` picks one unit for the whole model on one rank (nothing to shard), and on several
    ranks of one host when the gathered bf16 weights and unsharded fp32 gradients (6 bytes per
    parameter, held through a step) take at most an eighth of a device's memory: one gather and one
    reduce-scatter per step instead of one per layer and micro-batch, and fewer hooks (2x H200:
    +11% tokens/s at 0.5B, +4% at 1.5B). Across hosts, per-layer units overlap the slower
    network with compute. ``one_host`` (a collective) is asked only for ``auto`` on several
    ranks, where every rank asks it.
    """
    if choice != "auto":
        return choice
    if world == 1 or (one_host() and 6 * n_params <= device_bytes // 8):
        return "model"
    return "layer"


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, precision: Precision,
               reshard_after_forward: bool = True, per_layer: bool = True) -> None:
    """``fully_shard`` every decoder layer (``per_layer``), then the root (embeddings, final norm,
    LM head, and the layers if not wrapped on their own).

    The last layer is not resharded after forward: backward needs it immediately. One unit for the
    whole model suits one rank, or a small model on the ranks of one host (`resolve_fsdp_units`):
    FSDP's per-unit hooks (forward, backward, gradient casts and accumulation) cost host time on
    every layer of every micro-batch, and there is little or nothing to overlap with communication.
    """
    mp = precision.policy()
    kwargs = {"mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    layers = decoder_layers(model) if per_layer else []
    for i, layer in enumerate(layers):
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
