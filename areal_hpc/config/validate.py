"""Semantic checks of a parsed config: everything a login node can know is wrong, before submitting.

`validate` raises `ConfigError` for the first problem (key, what is wrong, how to fix it) and
returns the parsed allocation. It also normalises a few values (``trainer.type`` null ->
"null", synchronous training -> staleness 0) so downstream code reads one spelling.
"""

from __future__ import annotations

import getpass
import os
import re
import tempfile
from pathlib import Path

from areal_hpc.config.allocation import AllocationMode, parse_allocation, validate_allocation
from areal_hpc.config.checks import check_location, check_ranges, check_values
from areal_hpc.config.errors import ConfigError, did_you_mean
from areal_hpc.config.schema import LOCK_KINDS, MODES, SUPPORTED_MODES, TRAINER_TYPES, ExperimentConfig

CHAT_TEMPLATES = ("auto", "none")  # rollout.prompts.CHAT_TEMPLATE_MODES
DATASET_ADAPTERS = ("gsm8k",)  # the built-in adapters of rollout.adapters

_TOY_MODEL = re.compile(r"^toy:(qwen3|llama|qwen2)(-h\d+)?(-l\d+)?(-i\d+)?$")
_TOY_DATA = re.compile(r"^toy:[a-z]+(-\d+)?$")
_RAY_ADDRESS = re.compile(r"^[A-Za-z0-9._-]+:\d{1,5}$")


def run_dir(cfg: ExperimentConfig) -> Path:
    """``{cluster.fileroot}/{user}/{experiment_name}/{trial_name}``, absolute."""
    root = Path(os.path.expanduser(cfg.cluster.fileroot)).resolve()
    return root / getpass.getuser() / cfg.experiment_name / cfg.trial_name


def run_umask(cfg: ExperimentConfig) -> int:
    """The umask of every process of a run: private (dirs 0700, files 0600) unless
    ``cluster.group_readable`` (0750 / 0640). Others never read a run's logs, weights or config."""
    return 0o027 if cfg.cluster.group_readable else 0o077


def _writable(d: Path) -> bool:
    """Really try (os.access says yes to root even on /proc)."""
    try:
        tempfile.TemporaryDirectory(dir=d).cleanup()
        return True
    except OSError:
        return False


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, choices))}",
                          did_you_mean(str(value), [str(c) for c in choices]))


def _positive(key: str, value, minimum=1) -> None:
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value}")


# A Hugging Face repo id (`org/name` or `name`); a path with a data-file suffix is meant as a local file.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow", ".safetensors", ".bin", ".gguf", ".yaml")


def looks_like_hub_name(path: str) -> bool:
    """True for ``Qwen/Qwen2.5-1.5B-Instruct`` or ``openai/gsm8k`` that is not a local path: `submit`
    downloads it on the login node (`launch.resolve`); compute nodes get the local snapshot."""
    return (bool(_HUB_NAME.match(path)) and not path.lower().endswith(_FILE_SUFFIXES)
            and ".." not in path and not Path(path).exists())


def _check_model_path(key: str, path: str) -> None:
    """Cheap checks only; `launch.resolve` downloads hub names and loads config and tokenizer."""
    if not path:
        raise ConfigError(key, "is empty", "give a HF model directory or hub name (or toy:qwen3-h128-l2 for a tiny "
                          "test model)")
    if path.startswith("toy:"):
        if not _TOY_MODEL.match(path):
            raise ConfigError(key, f"bad toy model spec {path!r}", "e.g. toy:qwen3-h128-l2")
        return
    p = Path(os.path.expanduser(path))
    if not p.exists():
        if looks_like_hub_name(path):
            return
        raise ConfigError(key, f"model path {path!r} does not exist",
                          "give a local HF model directory, or a hub name (org/name) that submit downloads")
    if p.is_file():
        raise ConfigError(key, f"{path!r} is a file, not a model directory",
                          "point at the directory save_pretrained wrote: config.json, weights, tokenizer")
    if not (p / "config.json").exists():
        raise ConfigError(key, f"{path!r} has no config.json", "point at a HF model directory (save_pretrained output)")


def _check_dataset_path(key: str, path: str) -> None:
    """Cheap checks only; `launch.resolve` downloads hub names and reads the data."""
    if not path:
        raise ConfigError(key, "is empty", "give a local .jsonl/.json/.parquet file, a dataset directory, a hub "
                          "name like openai/gsm8k (or toy:sum)")
    if path.startswith("toy:"):
        if not _TOY_DATA.match(path):
            raise ConfigError(key, f"bad toy dataset spec {path!r}", "e.g. toy:sum or toy:sum-4096")
        return
    p = Path(os.path.expanduser(path))
    if not p.exists():
        if looks_like_hub_name(path):
            return
        raise ConfigError(key, f"dataset path {path!r} does not exist",
                          "give a local file or dataset directory, or a hub name (org/name) that submit downloads")
    if p.is_file() and p.suffix not in (".jsonl", ".json", ".parquet"):
        raise ConfigError(key, f"unsupported dataset file type {p.suffix!r}", "use .jsonl, .json or .parquet")


def actor_path(cfg: ExperimentConfig) -> str:
    return cfg.trainer.sft.model.path if cfg.trainer.type == "sft" else cfg.trainer.ppo.actor.path


def validate(cfg: ExperimentConfig) -> AllocationMode:
    """Check a config; normalise it in place; return its allocation."""
    if cfg.trainer.type is None:
        cfg.trainer.type = "null"
    _choice("mode", cfg.mode, MODES)
    if cfg.mode not in SUPPORTED_MODES:
        raise ConfigError("mode", f"{cfg.mode!r} is not supported yet", f"use one of {', '.join(SUPPORTED_MODES)}")
    check_location(cfg)  # names, and lengths that fit the filesystem
    check_values(cfg)  # finite numbers, no control characters (none at all in what reaches a script)
    if cfg.trainer.type not in TRAINER_TYPES and not cfg.trainer.plugins:
        _choice("trainer.type", cfg.trainer.type, TRAINER_TYPES)
    plugins = []
    for p in cfg.trainer.plugins:
        if p.endswith(".py"):
            path = Path(os.path.expanduser(p)).resolve()
            if not path.is_file():
                raise ConfigError("trainer.plugins", f"plugin file {p!r} not found", "give a .py file or a module name")
            p = str(path)
        plugins.append(p)
    cfg.trainer.plugins = plugins

    c = cfg.cluster
    _positive("cluster.n_nodes", c.n_nodes)
    _positive("cluster.n_gpus_per_node", c.n_gpus_per_node, 0)
    _positive("cluster.cpus_per_gpu", c.cpus_per_gpu)
    _positive("cluster.mem_per_gpu_gb", c.mem_per_gpu_gb)
    _positive("cluster.cpus_per_task_cpu", c.cpus_per_task_cpu)
    _positive("cluster.mem_per_task_cpu_gb", c.mem_per_task_cpu_gb)
    if not c.fileroot:
        raise ConfigError("cluster.fileroot", "is empty", "a directory shared by all nodes, e.g. /scratch/$USER/areal")
    root = Path(os.path.expanduser(c.fileroot)).resolve()
    existing = next((p for p in [root, *root.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not _writable(existing):
        raise ConfigError("cluster.fileroot", f"{c.fileroot!r} cannot be created (nearest parent {existing} is not a "
                          "writable directory)", "pick a writable directory shared by all nodes")
    if cfg.mode == "ray" and c.ray_address != "auto" and not _RAY_ADDRESS.match(c.ray_address):
        raise ConfigError("cluster.ray_address", f"{c.ray_address!r} is not a Ray address",
                          "give the head's GCS address host:port (6379 by default), or auto")

    la = cfg.launcher
    _choice("launcher.lock_kind", la.lock_kind, LOCK_KINDS)
    if la.heartbeat_s <= 0:
        raise ConfigError("launcher.heartbeat_s", f"must be > 0, got {la.heartbeat_s}")
    if la.ttl_s < 2 * la.heartbeat_s:
        raise ConfigError("launcher.ttl_s", f"{la.ttl_s} is shorter than two heartbeats ({2 * la.heartbeat_s})",
                          "raise launcher.ttl_s or lower launcher.heartbeat_s")

    alloc = parse_allocation(cfg.allocation_mode)
    validate_allocation(alloc, c.n_nodes, c.n_gpus_per_node, c.multi_node_tp)
    if alloc.gen and alloc.gen.backend == "sglang" and c.n_gpus_per_node == 0:
        raise ConfigError("allocation_mode", "sglang servers need GPUs but cluster.n_gpus_per_node=0",
                          "use the embedded engine on CPUs: hf.d1+d1")

    t = cfg.trainer.type
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
    _positive("min_required_servers", cfg.min_required_servers, 0)

    r = cfg.rollout
    _positive("rollout.batch_size", r.batch_size)
    _positive("rollout.n_samples", r.n_samples)
    _positive("rollout.max_head_offpolicyness", r.max_head_offpolicyness, 0)
    _positive("rollout.max_concurrent_rollouts", r.max_concurrent_rollouts, 0)
    _positive("rollout.gen.max_new_tokens", r.gen.max_new_tokens)
    if r.gen.temperature < 0:
        raise ConfigError("rollout.gen.temperature", f"must be >= 0, got {r.gen.temperature}", "0 means greedy")
    if not 0 < r.gen.top_p <= 1:
        raise ConfigError("rollout.gen.top_p", f"must be in (0, 1], got {r.gen.top_p}")
    _positive("trainer.total_train_steps", cfg.trainer.total_train_steps)
    _positive("trainer.max_restarts", cfg.trainer.max_restarts, 0)

    ppo = cfg.trainer.ppo
    _choice("trainer.ppo.adv_norm", ppo.adv_norm, ("group", "batch", "none"))
    _choice("trainer.ppo.weight_update", ppo.weight_update, ("disk", "nccl", "gloo"))
    if ppo.weight_update == "nccl" and c.n_gpus_per_node == 0:
        raise ConfigError("trainer.ppo.weight_update", "nccl needs GPUs", "use disk or gloo on CPU-only runs")
    if ppo.weight_update == "gloo" and c.n_gpus_per_node > 0:
        raise ConfigError("trainer.ppo.weight_update", "gloo broadcasts through host memory, for CPU-only runs",
                          "use nccl (or disk) with GPUs")
    if ppo.eps_clip <= 0:
        raise ConfigError("trainer.ppo.eps_clip", f"must be > 0, got {ppo.eps_clip}")
    if ppo.c_clip is not None and ppo.c_clip <= 1:
        raise ConfigError("trainer.ppo.c_clip", f"dual clip must be > 1, got {ppo.c_clip}", "or null to disable")
    _positive("trainer.ppo.ppo_n_minibatches", ppo.ppo_n_minibatches)
    for section, eng, mb in (("trainer.ppo", ppo.actor, ppo.mb_spec), ("trainer.sft", cfg.trainer.sft.model,
                                                                       cfg.trainer.sft.mb_spec)):
        prefix = f"{section}.actor" if section == "trainer.ppo" else f"{section}.model"
        o = eng.optimizer
        _choice(f"{prefix}.optimizer.lr_schedule", o.lr_schedule, ("constant", "cosine"))
        _choice(f"{prefix}.dtype", eng.dtype, ("auto", "float32", "bfloat16"))
        _choice(f"{prefix}.fsdp_units", eng.fsdp_units, ("auto", "layer", "model"))
        if o.lr <= 0:
            raise ConfigError(f"{prefix}.optimizer.lr", f"must be > 0, got {o.lr}")
        _positive(f"{prefix}.optimizer.warmup_steps", o.warmup_steps, 0)
        _positive(f"{section}.mb_spec.max_tokens_per_mb", mb.max_tokens_per_mb)
    _choice("server.dtype", cfg.server.dtype, ("auto", "float32", "bfloat16", "float16"))
    _choice("recover.mode", cfg.recover.mode, ("auto", "disabled", "resume"))
    for key, ds in (("train_dataset", cfg.train_dataset), ("valid_dataset", cfg.valid_dataset)):
        _choice(f"{key}.chat_template", ds.chat_template, CHAT_TEMPLATES)
        if ds.adapter and not cfg.trainer.plugins:  # a plugin may register more (rollout.adapters)
            _choice(f"{key}.adapter", ds.adapter, DATASET_ADAPTERS)
    _positive("saver.freq_steps", cfg.saver.freq_steps, 0)
    _positive("saver.keep_last", cfg.saver.keep_last)
    check_ranges(cfg)  # the other numbers, Slurm names and cluster.time

    if not ppo.async_training:
        r.max_head_offpolicyness = 0

    if t == "sft":
        _check_model_path("trainer.sft.model.path", cfg.trainer.sft.model.path)
        _check_dataset_path("train_dataset.path", cfg.train_dataset.path)
    elif t != "null":  # ppo, or a plugin trainer built on the PPO config
        _check_model_path("trainer.ppo.actor.path", ppo.actor.path)
        _check_dataset_path("train_dataset.path", cfg.train_dataset.path)
        if cfg.server.model_path:
            _check_model_path("server.model_path", cfg.server.model_path)
    else:
        _check_model_path("server.model_path", cfg.server.model_path or ppo.actor.path)
        _check_dataset_path("valid_dataset.path", cfg.valid_dataset.path)
    if cfg.valid_dataset.path and t != "null":
        _check_dataset_path("valid_dataset.path", cfg.valid_dataset.path)
    return alloc
