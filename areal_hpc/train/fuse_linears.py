"""A ``torch.compile`` pre-grad pass: linear layers that read the same input (query/key/value,
gate/up) become one wide matmul on concatenated weights, split after (narrow grouped-query K/V
projections run far below the matmul rate alone). Inductor's own pass takes 2-D inputs only."""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

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


def _meta(node: torch.fx.Node):
    return node.meta.get("example_value")


def fuse_sibling_linears(graph: torch.fx.Graph) -> int:
    """Rewrite ``linear(x, w_i, b_i)`` for i = 1..n (same ``x``, all with or all without bias) into
    one ``linear(x, cat(w), cat(b))`` split along the last dimension. Returns the groups fused."""
    groups: Dict[Tuple[torch.fx.Node, bool], List[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        args = _linear_args(node)
        if args is not None and isinstance(args[0], torch.fx.Node):
            groups[(args[0], args[2] is None)].append(node)
    fused = 0
    for (x, no_bias), nodes in groups.items():
        weights = [n.args[1] for n in nodes]
        metas = [_meta(w) for w in weights]
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
    """`fuse_sibling_linears` as inductor's ``pre_grad_custom_pass``; its ``uuid`` (this file's
    hash) keeps inductor's compiled-graph cache usable. ``fused`` counts the groups fused so far."""

    def __init__(self) -> None:
        self.fused = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.fused += fuse_sibling_linears(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
