"""Semantic checks of a parsed config: everything a login node can know is wrong, before submitting.

`validate` raises `ConfigError` for the first problem (key, what is wrong, how to fix it) and
returns the parsed allocation. It also normalises a few values (``trainer.type`` null -> "null",
synchronous training -> staleness 0) so downstream code reads one spelling. Single values are
checked in `config.checks`; here the keys that depend on each other, and paths.
"""

from __future__ import annotations

import getpass
import os
import re
import tempfile
from pathlib import Path

from areal_hpc.config.allocation import AllocationMode, parse_allocation, validate_allocation
from areal_hpc.config.checks import check_choice, check_location, check_ranges, check_values, nearest_existing
from areal_hpc.config.errors import ConfigError
from areal_hpc.config.schema import TRAINER_TYPES, ExperimentConfig

DATASET_ADAPTERS = ("gsm8k",)  # the built-in adapters of rollout.adapters

_RAY_ADDRESS = re.compile(r"^[A-Za-z0-9._-]+:\d{1,5}$")
# A Hugging Face repo id (`org/name` or `name`); a path with a data-file suffix is meant as a local file.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow", ".safetensors", ".bin", ".gguf", ".yaml")
# kind: (toy spec, example toy spec, what to give instead)
_PATHS = {
    "model": (re.compile(r"^toy:(qwen3|llama|qwen2)(-h\d+)?(-l\d+)?(-i\d+)?$"), "toy:qwen3-h128-l2",
              "a local HF model directory or a hub name (org/name)"),
    "dataset": (re.compile(r"^toy:[a-z]+(-\d+)?$"), "toy:sum",
                "a local .jsonl/.json/.parquet file, a dataset directory or a hub name (org/name)"),
}


def run_dir(cfg: ExperimentConfig) -> Path:
    """``{cluster.fileroot}/{user}/{experiment_name}/{trial_name}``, absolute."""
    root = Path(os.path.expanduser(cfg.cluster.fileroot)).resolve()
    return root / getpass.getuser() / cfg.experiment_name / cfg.trial_name


def run_umask(cfg: ExperimentConfig) -> int:
    """The umask of every process of a run: private (dirs 0700, files 0600) unless
    ``cluster.group_readable`` (0750 / 0640)."""
    return 0o027 if cfg.cluster.group_readable else 0o077


def actor_path(cfg: ExperimentConfig) -> str:
    return cfg.trainer.sft.model.path if cfg.trainer.type == "sft" else cfg.trainer.ppo.actor.path


def looks_like_hub_name(path: str) -> bool:
    """True for ``Qwen/Qwen2.5-1.5B-Instruct`` or ``openai/gsm8k`` that is not a local path: `submit`
    downloads it on the login node (`launch.resolve`); compute nodes get the local snapshot."""
    return (bool(_HUB_NAME.match(path)) and not path.lower().endswith(_FILE_SUFFIXES)
            and ".." not in path and not Path(path).exists())


def _check_path(key: str, path: str, kind: str) -> None:
    """Cheap checks of a model or dataset path; `launch.resolve` downloads hub names and reads them."""
    toy_spec, example, give = _PATHS[kind]
    if not path:
        raise ConfigError(key, "is empty", f"give {give}, or {example} for a tiny test {kind}")
    if path.startswith("toy:"):
        if not toy_spec.match(path):
            raise ConfigError(key, f"bad toy {kind} spec {path!r}", f"e.g. {example}")
        return
    p = Path(os.path.expanduser(path))
    if not p.exists():
        if looks_like_hub_name(path):
            return
        raise ConfigError(key, f"{kind} path {path!r} does not exist", f"give {give} that submit downloads")
    if kind == "dataset":
        if p.is_file() and p.suffix not in (".jsonl", ".json", ".parquet"):
            raise ConfigError(key, f"unsupported dataset file type {p.suffix!r}", "use .jsonl, .json or .parquet")
    elif p.is_file():
        raise ConfigError(key, f"{path!r} is a file, not a model directory",
                          "point at the directory save_pretrained wrote: config.json, weights, tokenizer")
    elif not (p / "config.json").exists():
        raise ConfigError(key, f"{path!r} has no config.json", "point at a HF model directory (save_pretrained output)")


def _writable(d: Path) -> bool:
    """Really try (os.access says yes to root even on /proc)."""
    try:
        tempfile.TemporaryDirectory(dir=d).cleanup()
        return True
    except OSError:
        return False


def validate(cfg: ExperimentConfig) -> AllocationMode:
    """Check a config; normalise it in place; return its allocation."""
    if cfg.trainer.type is None:
        cfg.trainer.type = "null"
    check_location(cfg)  # names, and lengths that fit the filesystem
    check_values(cfg)  # finite numbers, no control characters (none at all in what reaches a script)
    check_ranges(cfg)  # choices, ranges, Slurm names and cluster.time
    t, c, ppo = cfg.trainer.type, cfg.cluster, cfg.trainer.ppo
    if t not in TRAINER_TYPES and not cfg.trainer.plugins:
        check_choice("trainer.type", t, TRAINER_TYPES)
    plugins = []
    for p in cfg.trainer.plugins:
        if p.endswith(".py"):
            path = Path(os.path.expanduser(p)).resolve()
            if not path.is_file():
                raise ConfigError("trainer.plugins", f"plugin file {p!r} not found", "give a .py file or a module name")
            p = str(path)
        plugins.append(p)
    cfg.trainer.plugins = plugins
    for key, ds in (("train_dataset", cfg.train_dataset), ("valid_dataset", cfg.valid_dataset)):
        if ds.adapter and not cfg.trainer.plugins:  # a plugin may register more (rollout.adapters)
            check_choice(f"{key}.adapter", ds.adapter, DATASET_ADAPTERS)

    existing = nearest_existing(Path(os.path.expanduser(c.fileroot)).resolve())
    if not existing.is_dir() or not _writable(existing):
        raise ConfigError("cluster.fileroot", f"{c.fileroot!r} cannot be created (nearest parent {existing} is not a "
                          "writable directory)", "pick a writable directory shared by all nodes")
    if cfg.mode == "ray" and c.ray_address != "auto" and not _RAY_ADDRESS.match(c.ray_address):
        raise ConfigError("cluster.ray_address", f"{c.ray_address!r} is not a Ray address",
                          "give the head's GCS address host:port (6379 by default), or auto")
    la = cfg.launcher
    if la.ttl_s < 2 * la.heartbeat_s:
        raise ConfigError("launcher.ttl_s", f"{la.ttl_s} is shorter than two heartbeats ({2 * la.heartbeat_s})",
                          "raise launcher.ttl_s or lower launcher.heartbeat_s")

    alloc = parse_allocation(cfg.allocation_mode)
    validate_allocation(alloc, c.n_nodes, c.n_gpus_per_node, c.multi_node_tp)
    if alloc.gen and alloc.gen.backend == "sglang" and c.n_gpus_per_node == 0:
        raise ConfigError("allocation_mode", "sglang servers need GPUs but cluster.n_gpus_per_node=0",
                          "use the embedded engine on CPUs: hf.d1+d1")
    if t != "sft" and alloc.gen is None:
        raise ConfigError("allocation_mode", f"{cfg.allocation_mode!r} has no inference servers but trainer.type={t} "
                          "generates rollouts", "put servers first, e.g. sglang:d4+fsdp:d4 (trainer-only is for sft)")
    if t != "null" and alloc.train is None:
        what = "'+eval'" if alloc.eval_only else "no trainer part"
        raise ConfigError("allocation_mode", f"{cfg.allocation_mode!r} has {what} but trainer.type={t}",
                          "add trainer GPUs (e.g. +fsdp:d1) or set trainer.type=null for rollout/eval only")
    if t == "null" and alloc.train is not None:
        raise ConfigError("trainer.type", f"null (rollout/eval only) but allocation_mode gives the trainer "
                          f"{alloc.train.world_size} GPUs", f"drop the trainer part: {cfg.allocation_mode.split('+')[0]}+eval")
    if ppo.weight_update == "nccl" and c.n_gpus_per_node == 0:
        raise ConfigError("trainer.ppo.weight_update", "nccl needs GPUs", "use disk or gloo on CPU-only runs")
    if ppo.weight_update == "gloo" and c.n_gpus_per_node > 0:
        raise ConfigError("trainer.ppo.weight_update", "gloo broadcasts through host memory, for CPU-only runs",
                          "use nccl (or disk) with GPUs")
    if not ppo.async_training:
        cfg.rollout.max_head_offpolicyness = 0

    if t == "null":
        _check_path("server.model_path", cfg.server.model_path or ppo.actor.path, "model")
    else:  # sft, ppo, or a plugin trainer built on the PPO config
        _check_path("trainer.sft.model.path" if t == "sft" else "trainer.ppo.actor.path", actor_path(cfg), "model")
        _check_path("train_dataset.path", cfg.train_dataset.path, "dataset")
        if cfg.server.model_path and t != "sft":
            _check_path("server.model_path", cfg.server.model_path, "model")
    if cfg.valid_dataset.path or t == "null":
        _check_path("valid_dataset.path", cfg.valid_dataset.path, "dataset")
    return alloc
