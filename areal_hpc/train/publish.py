"""Trained weights published as a transformers checkpoint (``weights_root/v{N}/``, what ``from_pretrained`` and
SGLang's ``/update_weights_from_disk`` load), atomically, then named by the registry's ``weights/latest``."""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from areal_hpc import toy
from areal_hpc.registry.util import own_temp, temp_name
from areal_hpc.train import dist
from areal_hpc.train.engine import FSDPEngine

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^v(\d+)$")
# Files of a model directory that describe it but are not weights (copied into each version).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``; an existing ``final`` goes once replaced."""
    old = final.with_name(temp_name(final.name))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_hf_checkpoint(sd: Dict[str, torch.Tensor], out_dir: Path, static_dir: Path) -> None:
    """Write one ``model.safetensors`` and link in `static_dir`'s files (config.json, tokenizer): one new file a
    version (the writer runs beside training and shares its GIL: every file operation is a hand-off)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(static_dir):
        try:
            os.link(static_dir / name, out_dir / name)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(static_dir / name, out_dir / name)


_STATIC: set = set()  # (weights root, tokenizer source, dtype) written by this process


def static_files(weights_root: Path, hf_config, tokenizer_src: Optional[str], dtype: torch.dtype) -> Path:
    """``weights_root/.static``: config.json and the source's tokenizer files (copies: the run's umask, not the
    source's mode), written once by this process and linked into every version."""
    static, key = weights_root / ".static", (str(weights_root), tokenizer_src, dtype)
    if key not in _STATIC or not static.is_dir():
        shutil.rmtree(static, ignore_errors=True)  # versions linked to the old files keep them
        static.mkdir(parents=True)
        if tokenizer_src:
            for f in Path(toy.resolve_model(tokenizer_src)).iterdir():
                if f.is_file() and f.name not in _SKIP_NAMES and not f.name.endswith(_SKIP_SUFFIXES):
                    shutil.copyfile(f, static / f.name)
        cfg = copy.deepcopy(hf_config)
        cfg.dtype = dtype
        cfg.use_cache = True  # the trainer turns it off; servers generate
        cfg.save_pretrained(str(static))
        _STATIC.add(key)
    return static


def stage_weights(engine: FSDPEngine, weights_root: str | os.PathLike, version: int, tokenizer_src: str,
                  registry=None) -> Optional[Callable[[], Path]]:
    """The collective half of `publish_weights`: gather the weights to host memory. Returns rank 0's writer of
    ``weights_root/v{version}`` (None elsewhere), which may run on another thread but must finish before the next
    gather (the tensors live in the engine's staging buffer)."""
    dtype = engine.precision.param_dtype
    out = (Path(weights_root) / f"v{int(version)}").resolve()
    t0 = time.perf_counter()
    sd = engine.state_dict_for_hf(dtype)  # collective
    t_gather = time.perf_counter() - t0
    if dist.rank() != 0:
        return None

    def write() -> Path:
        t1 = time.perf_counter()
        tmp = out.with_name(temp_name(out.name))
        write_hf_checkpoint(sd, tmp, static_files(out.parent, engine.hf_config, tokenizer_src, dtype))
        replace_dir(tmp, out)  # a version published again (after a restart) replaces the old copy
        if registry is not None:
            registry.put("weights", "latest", {"version": int(version), "path": str(out)}, ttl=False)
        log.info("published weights v%d at %s (gather to CPU %.2fs, write %.2fs)", version, out, t_gather,
                 time.perf_counter() - t1)
        return out
    return write


def publish_weights(engine: FSDPEngine, weights_root: str | os.PathLike, version: int, tokenizer_src: str,
                    registry=None) -> Path:
    """Write ``weights_root/v{version}`` in the compute dtype (collective; rank 0 writes and, with a registry, records
    ``weights/latest``). Returns the directory on every rank, once it exists."""
    write = stage_weights(engine, weights_root, version, tokenizer_src, registry)
    if write is not None:
        write()
    dist.barrier()
    return (Path(weights_root) / f"v{int(version)}").resolve()


def published_versions(weights_root: str | os.PathLike) -> Dict[int, Path]:
    return {int(m.group(1)): d for d in Path(weights_root).glob("v*")
            if (m := _VERSION_DIR.match(d.name)) and d.is_dir()}


def prune_weights(weights_root: str | os.PathLike, registry=None, keep_min_version: int = 0) -> list[int]:
    """Delete the ``v{K}`` no one can still need (``K < keep_min_version``, no live server at a version ``<= K``, not
    the latest), and what crashed writers left; returns the ``K``. Trainer rank 0 only."""
    for torn in Path(weights_root).glob(".v*.tmp*"):  # a crashed trainer's unfinished write (not this process's)
        if not own_temp(torn.name, r"v\d+"):
            shutil.rmtree(torn, ignore_errors=True)
    versions = published_versions(weights_root)
    latest, floor = max(versions, default=0), int(keep_min_version)
    if registry is not None:
        rec = registry.get("weights", "latest")
        if rec and "version" in rec:
            latest = max(latest, int(rec["version"]))
            floor = min(floor, int(rec["version"]))
        for server in registry.list("servers").values():
            v = server.get("weight_version")
            if str(v).isdigit():  # not None, nor a version of its own ("default": SGLang's before any update)
                floor = min(floor, int(v))
    deleted = [k for k in sorted(versions) if k < floor and k != latest]
    for k in deleted:
        shutil.rmtree(versions[k], ignore_errors=True)
    return deleted
