"""The `allocation_mode` grammar: how many servers and trainer ranks, and how each is parallel.

Letters in any order, each optional (default 1); ``m`` and ``t`` both mean tensor parallel::

    sglang.d16p1m1+d32p2m1     seed form: servers `backend.d{dp}p{pp}m{tp}`, then trainer
    sglang:d4t2+fsdp:d8        servers + trainer; sglang:d4 rollout only; sglang:d4+eval, no trainer GPUs
    fsdp:d8                    trainer only (SFT); hf.d1+d1: the embedded engine instead of SGLang
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from areal_hpc.config.errors import ConfigError

GEN_BACKENDS = ("sglang", "hf")
TRAIN_BACKENDS = ("fsdp",)
KEY = "allocation_mode"

_SPEC = re.compile(r"([a-z])(\d+)")
_DIMS = {"d": "dp", "p": "pp", "m": "tp", "t": "tp"}


@dataclass(frozen=True)
class ParallelSpec:
    backend: str
    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def gpus_per_instance(self) -> int:
        """GPUs of one server (tp*pp); for a trainer, of one model replica."""
        return self.pp * self.tp


@dataclass(frozen=True)
class AllocationMode:
    gen: Optional[ParallelSpec]
    train: Optional[ParallelSpec]
    eval_only: bool = False

    @property
    def n_servers(self) -> int:
        return self.gen.dp if self.gen else 0


def _parse_dims(spec: str, token: str) -> dict:
    if not spec:
        raise ConfigError(KEY, f"empty parallelism in {token!r}", "write e.g. d4, d2t2 or d16p1m1")
    end = re.match(r"(?:[a-z]\d+)*", spec).end()
    if end != len(spec):
        raise ConfigError(KEY, f"cannot parse {spec[end:]!r} in {token!r}",
                          "expected letters d/p/t/m each followed by a number, e.g. d4t2")
    dims = {}
    for letter, num in _SPEC.findall(spec):
        if letter not in _DIMS:
            raise ConfigError(KEY, f"unknown letter {letter!r} in {token!r}",
                              "use d (data parallel), p (pipeline), t or m (tensor parallel)")
        if _DIMS[letter] in dims:
            raise ConfigError(KEY, f"{_DIMS[letter]} given twice in {token!r}", "give each of d, p, t/m at most once")
        if int(num) < 1:
            raise ConfigError(KEY, f"{letter}{num} in {token!r} must be >= 1", "sizes start at 1")
        dims[_DIMS[letter]] = int(num)
    return dims


def _parse_part(token: str, default_backend: Optional[str]) -> ParallelSpec:
    if not (token := token.strip()):
        raise ConfigError(KEY, "empty component (stray '+'?)", "e.g. sglang:d4+fsdp:d8")
    if m := re.fullmatch(r"([a-z_]+)[.:](.*)", token):
        backend, spec = m.groups()
    elif default_backend is not None and re.fullmatch(r"[a-z0-9]+", token) and token[0] in "dpmt":
        backend, spec = default_backend, token
    else:
        raise ConfigError(KEY, f"cannot parse {token!r}",
                          "expected backend:spec or backend.spec, e.g. sglang:d4t2 or hf.d1p1m1")
    part = ParallelSpec(backend, **_parse_dims(spec, token))
    # No t or p for FSDP2 (it shards over its d ranks) nor hf (one device a server): refused here, not after the queue.
    for what, letter, size in (("pipeline", "p", part.pp), ("tensor", "t", part.tp)):
        if size > 1 and backend in ("fsdp", "hf"):
            instead = f"use {letter}1 and more data-parallel ranks (d)"
            raise ConfigError(KEY, f"{what} parallel {letter}{size} in {token!r} is not supported by {backend}",
                              instead + (", or sglang servers" if backend == "hf" else ""))
    return part


def parse_allocation(text: str) -> AllocationMode:
    """Parse an allocation string; raises ConfigError naming the offending token."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(KEY, "is empty", "e.g. hf.d1+d1 on a CPU, sglang:d4+fsdp:d4 on GPUs")
    text = text.strip()
    if "|" in text:
        raise ConfigError(KEY, f"colocation '|' in {text!r} is not supported",
                          "give servers and trainer separate GPUs with '+'")
    if text != text.lower() or " " in text:
        raise ConfigError(KEY, f"{text!r} must be lower case without spaces", "e.g. sglang:d4+fsdp:d8")
    parts = text.split("+")
    if len(parts) > 2:
        raise ConfigError(KEY, f"{len(parts)} components in {text!r}", "at most servers+trainer")
    gen = _parse_part(parts[0], None)
    if len(parts) == 1 and gen.backend in TRAIN_BACKENDS:  # trainer only (SFT): `fsdp:d8`
        return AllocationMode(gen=None, train=gen)
    if gen.backend not in GEN_BACKENDS:
        hint = "training backend first? put the servers first: sglang:d4+fsdp:d4" if gen.backend in TRAIN_BACKENDS \
            else f"generation backends: {', '.join(GEN_BACKENDS)}"
        raise ConfigError(KEY, f"unknown generation backend {gen.backend!r} in {parts[0]!r}", hint)
    if len(parts) == 1 or parts[1].strip() == "eval":
        return AllocationMode(gen=gen, train=None, eval_only=len(parts) == 2)
    train = _parse_part(parts[1], default_backend="fsdp")
    if train.backend not in TRAIN_BACKENDS:
        raise ConfigError(KEY, f"unknown training backend {train.backend!r} in {parts[1]!r}",
                          f"training backends: {', '.join(TRAIN_BACKENDS)} (or 'eval' for no trainer)")
    return AllocationMode(gen=gen, train=train)


def validate_allocation(alloc: AllocationMode, n_nodes: int, gpus_per_node: int, multi_node_tp: bool = False) -> None:
    """Check an allocation fits the cluster. ``gpus_per_node == 0`` means CPU-only (no GPU checks)."""
    if gpus_per_node == 0:
        return
    gen = alloc.gen
    if gen and gen.gpus_per_instance > gpus_per_node and not multi_node_tp:
        raise ConfigError(KEY, f"one {gen.backend} server needs tp*pp={gen.gpus_per_instance} GPUs but a node has "
                          f"{gpus_per_node}", "lower t/p, or set cluster.multi_node_tp=True for multi-node servers")
    if gen and gen.gpus_per_instance > gpus_per_node and gen.gpus_per_instance % gpus_per_node:
        raise ConfigError(KEY, f"a multi-node server needs whole nodes: tp*pp={gen.gpus_per_instance} is not a "
                          f"multiple of {gpus_per_node} GPUs per node",
                          "make t*p a multiple of cluster.n_gpus_per_node")
    need = nodes_needed(alloc, gpus_per_node)
    total = (gen.world_size if gen else 0) + (alloc.train.world_size if alloc.train else 0)
    if need > n_nodes:
        raise ConfigError(KEY, f"needs {need} nodes ({total} GPUs: servers and trainer on separate nodes once they "
                          f"exceed one node) but cluster.n_nodes={n_nodes} x {gpus_per_node} GPUs",
                          "lower d, or raise cluster.n_nodes / cluster.n_gpus_per_node")
    train = alloc.train
    if train and train.world_size > gpus_per_node and train.world_size % gpus_per_node:
        raise ConfigError(KEY, f"trainer d{train.dp}: {train.world_size} ranks span nodes but are not a multiple of "
                          f"{gpus_per_node} GPUs per node", "use a multiple of cluster.n_gpus_per_node, or fewer ranks")


def nodes_needed(alloc: AllocationMode, gpus_per_node: int) -> int:
    """One node when everything fits, else disjoint whole nodes for servers and trainer (an SPMD trainer step wants
    the same ranks per node)."""
    if gpus_per_node == 0:
        return 1
    gen_gpus = alloc.gen.world_size if alloc.gen else 0
    train_gpus = alloc.train.world_size if alloc.train else 0
    if gen_gpus + train_gpus <= gpus_per_node:
        return 1
    return server_nodes(alloc, gpus_per_node) + -(-train_gpus // gpus_per_node)


def server_nodes(alloc: AllocationMode, gpus_per_node: int) -> int:
    """Nodes the servers occupy when servers and trainer do not share a node."""
    if not alloc.gen or gpus_per_node == 0:
        return 0
    per = alloc.gen.gpus_per_instance
    if per >= gpus_per_node:  # multi-node (or whole-node) servers
        return alloc.gen.dp * -(-per // gpus_per_node)
    return -(-alloc.gen.dp // (gpus_per_node // per))
