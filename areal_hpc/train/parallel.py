"""How a transformers causal LM is parallelised (FSDP2, compile), composed by `engine.FSDPEngine`; and
`FuseSiblingLinears`, the compile pass of ``engine.fuse_linears``."""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass(frozen=True)
class Precision:
    """Master weights and gradient reduction are always fp32; ``param_dtype`` is what forward/backward compute in."""

    param_dtype: torch.dtype

    def policy(self) -> Optional[MixedPrecisionPolicy]:
        fp32 = self.param_dtype == torch.float32
        return None if fp32 else MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """``auto``: bf16 compute with fp32 reduction on GPU, fp32 on CPU; else the named dtype."""
    return Precision(getattr(torch, ("bfloat16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype))


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated transformer blocks, found through transformers' ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    if isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList):
        return list(model.model.layers)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def compile_layers(model: nn.Module, dynamic: Optional[bool] = True,
                   fuse_linears: bool = False) -> Optional[FuseSiblingLinears]:
    """``torch.compile`` the forward of every decoder layer (FSDP2's hooks and checkpointing stay outside).
    ``dynamic=None``: torch's automatic dynamic shapes (padded micro-batches). ``fuse_linears``: see
    `FuseSiblingLinears` (returned). The layers share one code object, hence the larger dynamo cache."""
    import torch._dynamo

    layers = decoder_layers(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(layers))
    fuse = FuseSiblingLinears() if fuse_linears else None
    options = {"pre_grad_custom_pass": fuse} if fuse is not None else None
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=dynamic, options=options)
    return fuse


def resolve_fsdp_units(choice: str, world: int, n_params: int, device_bytes: int, one_host: Callable[[], bool]) -> str:
    """``layer`` or ``model`` for ``engine.fsdp_units=choice``. ``auto``: one unit on one host when the gathered
    weights and gradients (6 bytes a parameter) take at most an eighth of a device (one gather and reduce-scatter a
    step); per layer across hosts, to overlap the network with compute. ``one_host`` is a collective."""
    if choice != "auto":
        return choice
    if world == 1 or (one_host() and 6 * n_params <= device_bytes // 8):
        return "model"
    return "layer"


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, precision: Precision,
               reshard_after_forward: bool = True, per_layer: bool = True) -> None:
    """``fully_shard`` every decoder layer (``per_layer``; not the last after forward: backward needs it at once),
    then the root."""
    mp = precision.policy()
    kwargs = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    layers = decoder_layers(model) if per_layer else []
    for i, layer in enumerate(layers):
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)


# A ``torch.compile`` pre-grad pass: linear layers that read the same input (query/key/value, gate/up) become one wide
# matmul on concatenated weights, split after (narrow grouped-query K/V projections run far below the matmul rate
# alone). Inductor's own pass takes 2-D inputs only.
_LINEAR = (torch._C._nn.linear, F.linear)


def _linear_args(node: torch.fx.Node):
    """``(input, weight, bias)`` of a ``linear`` call whose weight and bias are graph inputs, else None."""
    if node.op != "call_function" or node.target not in _LINEAR or node.kwargs or not 2 <= len(node.args) <= 3:
        return None
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) == 3 else None
    if not all(isinstance(t, torch.fx.Node) and t.op == "placeholder" for t in ([w] + ([b] if b is not None else []))):
        return None
    return x, w, b


def fuse_sibling_linears(graph: torch.fx.Graph) -> int:
    """Rewrite ``linear(x, w_i, b_i)`` for i = 1..n (same ``x``, all with or all without bias) into one
    ``linear(x, cat(w), cat(b))`` split along the last dimension. Returns the groups fused."""
    groups: Dict[Tuple[torch.fx.Node, bool], List[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        args = _linear_args(node)
        if args is not None and isinstance(args[0], torch.fx.Node):
            groups[(args[0], args[2] is None)].append(node)
    fused = 0
    for (x, no_bias), nodes in groups.items():
        weights = [n.args[1] for n in nodes]
        metas = [w.meta.get("example_value") for w in weights]
        if len(nodes) < 2 or any(m is None for m in metas) or len({(m.dtype, m.shape[1:]) for m in metas}) != 1:
            continue
        with graph.inserting_before(nodes[0]):
            w = graph.call_function(torch.cat, (weights,), {"dim": 0})
            b = None if no_bias else graph.call_function(torch.cat, ([n.args[2] for n in nodes],), {"dim": 0})
            y = graph.call_function(torch._C._nn.linear, (x, w, b))
            parts = graph.call_function(torch.split, (y, [m.shape[0] for m in metas]), {"dim": -1})
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        for node, out in zip(nodes, outs):
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        fused += 1
    if fused:
        graph.lint()
    return fused


class FuseSiblingLinears(CustomGraphPass):
    """`fuse_sibling_linears` as inductor's ``pre_grad_custom_pass`` (its ``uuid`` keeps inductor's cache usable);
    ``fused`` counts the groups fused so far."""

    def __init__(self) -> None:
        self.fused = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.fused += fuse_sibling_linears(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
