"""Trained weights published as a transformers checkpoint (``weights_root/v{N}/``: safetensors,
``config.json``, the source's tokenizer files; what ``from_pretrained`` and SGLang's
``/update_weights_from_disk`` load), atomically, then named by the registry's ``weights/latest``;
old versions pruned."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from areal_hpc import toy
from areal_hpc.train import dist
from areal_hpc.train.engine import FSDPEngine

log = logging.getLogger(__name__)

SHARD_BYTES = 5 * 1024**3
_VERSION_DIR = re.compile(r"^v(\d+)$")
# Files of a model directory that describe it but are not weights (copied into each version).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``; an existing ``final`` goes once replaced."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def version_dir(weights_root: Path, version: int) -> Path:
    return Path(weights_root) / f"v{int(version)}"


def _shards(sd: Dict[str, torch.Tensor], max_bytes: int) -> list[Dict[str, torch.Tensor]]:
    shards: list[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def write_hf_checkpoint(sd: Dict[str, torch.Tensor], hf_config, out_dir: Path, tokenizer_src: Optional[str],
                        dtype: torch.dtype, shard_bytes: int = SHARD_BYTES) -> None:
    """Write safetensors (+ index when sharded), config.json and the source dir's tokenizer files."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _shards(sd, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_src:
        src = Path(toy.resolve_model(tokenizer_src))
        for f in src.iterdir():
            if f.is_file() and f.name not in _SKIP_NAMES and not f.name.endswith(_SKIP_SUFFIXES):
                shutil.copyfile(f, out_dir / f.name)  # the run's umask, not the source's mode
    cfg = copy.deepcopy(hf_config)
    cfg.dtype = dtype
    cfg.use_cache = True  # the trainer turns it off; servers generate
    cfg.save_pretrained(str(out_dir))


def publish_weights(engine: FSDPEngine, weights_root: str | os.PathLike, version: int, tokenizer_src: str,
                    registry=None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``weights_root/v{version}`` from the engine's weights (collective; rank 0 writes and,
    with a registry, records ``weights/latest``). ``dtype``: the compute dtype by default. Returns
    the directory on every rank, once it exists."""
    dtype = dtype or engine.precision.param_dtype
    out = version_dir(Path(weights_root), version).resolve()
    t0 = time.perf_counter()
    sd = engine.state_dict_for_hf(dtype)  # collective
    t_gather = time.perf_counter() - t0
    if dist.rank() == 0:
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_hf_checkpoint(sd, engine.hf_config, tmp, tokenizer_src, dtype)
        replace_dir(tmp, out)  # a version published again (after a restart) replaces the old copy
        if registry is not None:
            registry.put("weights", "latest", {"version": int(version), "path": str(out)}, ttl=False)
        log.info("published weights v%d at %s (gather to CPU %.2fs, write %.2fs)", version, out, t_gather,
                 time.perf_counter() - t0 - t_gather)
    del sd
    dist.barrier()
    return out


def published_versions(weights_root: str | os.PathLike) -> Dict[int, Path]:
    root = Path(weights_root)
    if not root.is_dir():
        return {}
    out = {}
    for p in root.iterdir():
        m = _VERSION_DIR.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def prune_weights(weights_root: str | os.PathLike, registry=None, keep_min_version: int = 0) -> list[int]:
    """Delete the ``v{K}`` no one can still need (``K < keep_min_version``, no live server at a
    version ``<= K``, not the latest); returns them. One process (trainer rank 0) calls it."""
    versions = published_versions(weights_root)
    if not versions:
        return []
    latest = max(versions)
    floor = int(keep_min_version)
    if registry is not None:
        rec = registry.get("weights", "latest")
        if rec and "version" in rec:
            latest = max(latest, int(rec["version"]))
            floor = min(floor, int(rec["version"]))
        for server in registry.list("servers").values():
            v = server.get("weight_version")
            if v is not None and int(v) >= 0:
                floor = min(floor, int(v))
    deleted = []
    for k, path in sorted(versions.items()):
        if k < floor and k != latest:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(k)
    return deleted
