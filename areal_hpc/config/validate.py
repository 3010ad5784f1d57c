"""Checks of a parsed config: everything a login node can know is wrong, before submitting.

`validate` raises `ConfigError` for the first problem, normalises a few values so downstream code reads one spelling,
and returns the parsed allocation. Single values are checked first, then the keys that depend on each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import getpass
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from areal_hpc.config.allocation import AllocationMode, nodes_needed, parse_allocation, validate_allocation
from areal_hpc.config.errors import ConfigError, did_you_mean
from areal_hpc.config.pass_through import check_pass_through
from areal_hpc.config.schema import SGLANG_INPUT_MARGIN, DatasetConfig, ExperimentConfig

# Key prefixes whose values are written into the rendered sbatch script or a shell line: a newline injects a command.
SCRIPT_KEYS = ("experiment_name", "trial_name", "cluster.")
CHAT_TEMPLATES = ("auto", "none")  # {ds}.chat_template: rollout.prompts reads it
TEMPLATE_OWN_ARGS = ("conversation", "add_generation_prompt", "tokenize")  # what rollout.prompts passes itself
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline, CR allowed (prompts)
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:+=@-]+$")  # partition (a list too), account, qos
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:&|*!\[\]()=-]+$")
# What the longest path written inside a run dir adds to it (kept under PATH_MAX): a hand-started server's record temp,
# registry/servers/.serve-{host}-{pid}.json.{host}.{pid}.{n}.tmp, two hostnames of up to 64 bytes: ~190, and slack.
_LONGEST_INSIDE = 256

# A key's first part "{eng}" stands for trainer.ppo.actor and trainer.sft.model, "{mb}" for their mb_spec sections,
# "{ds}" for train_dataset and valid_dataset. A null value (an Optional field) is not checked.
_EXPAND = {"{eng}": ("trainer.ppo.actor", "trainer.sft.model"),
           "{mb}": ("trainer.ppo.mb_spec", "trainer.sft.mb_spec"),
           "{ds}": ("train_dataset", "valid_dataset")}
CHOICES = {
    "mode": ("local", "slurm", "ray", "torchrun"),
    "launcher.lock_kind": ("flock", "soft", "lease"),
    "trainer.ppo.adv_norm": ("group", "batch", "none"),
    "trainer.ppo.weight_update": ("disk", "nccl", "gloo"),
    "{eng}.optimizer.lr_schedule": ("constant", "cosine"),
    "{eng}.dtype": ("auto", "float32", "bfloat16"),
    "{eng}.fsdp_units": ("auto", "layer", "model"),
    "server.dtype": ("auto", "float32", "bfloat16", "float16"),
    "recover.mode": ("auto", "disabled", "resume"),
    "{ds}.chat_template": CHAT_TEMPLATES,
}
# interval (math notation: "[1, inf)" is at least 1, "(0, 1]" above 0 and at most 1) -> its keys
RANGES = {
    "[1, inf)": ("cluster.n_nodes", "cluster.cpus_per_gpu", "cluster.mem_per_gpu_gb",
                 "cluster.cpus_per_task_cpu", "cluster.mem_per_task_cpu_gb", "server.context_length",
                 "server.max_running_requests", "rollout.batch_size", "rollout.n_samples",
                 "rollout.gen.max_new_tokens", "trainer.total_train_steps", "trainer.sft.batch_size",
                 "trainer.ppo.ppo_n_minibatches", "{mb}.max_tokens_per_mb", "{mb}.n_mbs",
                 "{ds}.max_prompt_len", "saver.keep_last"),
    "[0, inf)": ("cluster.n_gpus_per_node", "min_required_servers", "rollout.max_head_offpolicyness",
                 "rollout.max_concurrent_rollouts", "rollout.gen.temperature", "trainer.total_train_epochs",
                 "trainer.max_restarts", "trainer.ppo.kl_ctl", "{eng}.optimizer.warmup_steps",
                 "{eng}.optimizer.weight_decay", "{eng}.optimizer.grad_clip", "{ds}.limit",
                 "saver.freq_steps"),
    "(0, inf)": ("launcher.heartbeat_s", "launcher.server_startup_timeout_s",
                 "launcher.trainer_wait_servers_timeout_s", "rollout.request_timeout_s", "rollout.reward_timeout_s",
                 "rollout.drop_timeout_s", "rollout.stall_timeout_s", "trainer.ppo.eps_clip",
                 "{eng}.optimizer.lr", "{eng}.optimizer.eps"),
    "(0, 1]": ("server.mem_fraction_static", "rollout.gen.top_p"),
    "[0, 65535]": ("server.port",),
    "(1, inf)": ("trainer.ppo.c_clip", "trainer.ppo.behav_imp_weight_cap"),
    "[0, 1)": ("{eng}.optimizer.beta1", "{eng}.optimizer.beta2"),
    "[0, 1]": ("{eng}.optimizer.min_lr_ratio",),
}
HINTS = {
    "rollout.gen.temperature": "0 means greedy",
    "rollout.drop_timeout_s": "seconds; a real run should not go minutes without a batch",
    "rollout.stall_timeout_s": "seconds; allow for the longest generation",
    "trainer.ppo.c_clip": "dual clip; or null to disable",
    "trainer.ppo.behav_imp_weight_cap": "or null to disable",
}

DATASET_ADAPTERS = ("gsm8k",)
# Names a plugin (trainer.plugins) may add to; without one, the built-in names of the trainer and rollout registries.
BUILT_IN = {"trainer.type": ("ppo", "sft", "null"), "rollout.workflow": ("rlvr",),
            "rollout.reward_fn": ("exact_match", "math"), "{ds}.adapter": DATASET_ADAPTERS}

_RAY_ADDRESS = re.compile(r"^[A-Za-z0-9._-]+:\d{1,5}$")
# A Hugging Face repo id (`org/name` or `name`); a path with a data-file suffix is meant as a local file.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow", ".safetensors", ".bin", ".gguf", ".yaml")
# The `toy:` specs (areal_hpc.toy builds them; its TOY_DATASETS): hidden size, layers, intermediate size; rows.
_N = r"[1-9]\d*"  # a count of rows, layers...: 0 builds nothing usable
TOY_MODEL = re.compile(rf"^toy:(?P<arch>qwen3|llama|qwen2)(?:-h(?P<h>{_N}))?(?:-l(?P<l>{_N}))?(?:-i(?P<i>{_N}))?$")
TOY_DATASET = re.compile(rf"^toy:(?P<name>sum)(?:-(?P<n>{_N}))?$")
# kind: (toy spec, example toy spec, what to give instead)
_PATHS = {
    "model": (TOY_MODEL, "toy:qwen3-h128-l2", "a local HF model directory or a hub name (org/name)"),
    "dataset": (TOY_DATASET, "toy:sum",
                "a local .jsonl/.json/.parquet file, a dataset directory or a hub name (org/name)"),
}


def walk(obj: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Every leaf of a config tree as (dotted key, value); list items as ``key[i]``, dict entries as ``key.name``
    (their names are yielded as values too, under ``key.name (name)``)."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from walk(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}.{k} (name)", k
            yield from walk(v, f"{prefix}.{k}")
    else:
        yield prefix, obj


def check_values(cfg: ExperimentConfig) -> None:
    """Finite numbers everywhere; no control characters in strings (none at all in `SCRIPT_KEYS`)."""
    for key, v in walk(cfg):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(key, f"must be a finite number, got {v}", "give a plain number")
        if isinstance(v, str):
            script = key.startswith(SCRIPT_KEYS)
            if bad := (_CONTROL if script else _CONTROL_TEXT).search(v):
                raise ConfigError(key, f"contains the control character {bad.group()!r} at position {bad.start()}",
                                  "it goes into the job script: give one line of printable text" if script
                                  else "remove the control character")


def _keys(pattern: str) -> List[str]:
    mark, _, rest = pattern.partition(".")
    return [f"{section}.{rest}" for section in _EXPAND[mark]] if mark in _EXPAND else [pattern]


def get(cfg: Any, key: str) -> Any:
    """The value of a dotted key."""
    return functools.reduce(getattr, key.split("."), cfg)


def check_range(key: str, value: Any, interval: str, hint: str | None = None) -> None:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    lo_open, hi_open = interval[0] == "(", interval[-1] == ")"
    if not ((value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)):
        problem = f"must be {'>' if lo_open else '>='} {lo:g}" if hi == math.inf else f"must be in {interval}"
        raise ConfigError(key, f"{problem}, got {value}", hint)


def check_choices(cfg: ExperimentConfig, choices_of: Dict[str, Sequence[Any]]) -> None:
    """Each key's value is one of its choices (`trainers.factory.check_names`: the registries', plugins loaded)."""
    for pattern, choices in choices_of.items():
        for key, value in ((k, get(cfg, k)) for k in _keys(pattern)):
            if value not in choices and (value or pattern != "{ds}.adapter"):  # (no adapter: "")
                raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, choices))}",
                                  did_you_mean(str(value), [str(c) for c in choices]))


def check_ranges(cfg: ExperimentConfig) -> None:
    """`CHOICES`, `BUILT_IN` (without plugins), `RANGES`, and the options and names that Slurm reads."""
    check_choices(cfg, {**CHOICES, **({} if cfg.trainer.plugins else BUILT_IN)})
    for interval, patterns in RANGES.items():
        for key in (k for pattern in patterns for k in _keys(pattern)):
            if (value := get(cfg, key)) is not None:
                check_range(key, value, interval, HINTS.get(key))
    g = cfg.rollout.gen
    if g.top_k != -1 and g.top_k < 1:
        raise ConfigError("rollout.gen.top_k", f"must be -1 (off) or >= 1, got {g.top_k}")
    for i, t in enumerate(g.stop_token_ids):
        check_range(f"rollout.gen.stop_token_ids[{i}]", t, "[0, inf)")
    c = cfg.cluster
    for key in ("partition", "account", "qos"):
        if (v := getattr(c, key)) is not None and not _SLURM_NAME.match(v):
            raise ConfigError(f"cluster.{key}", f"{v!r} is not a Slurm {key} name", "letters, digits, '_', '-', '.'")
    if c.constraint is not None and not _CONSTRAINT.match(c.constraint):
        raise ConfigError("cluster.constraint", f"{c.constraint!r} is not a Slurm constraint",
                          "features joined by & | , e.g. a100&ib (no spaces or quotes)")
    check_pass_through(cfg)
    try:
        seconds = slurm_time_seconds(str(c.time))
    except ValueError as e:
        raise ConfigError("cluster.time", f"{c.time!r} is not a usable Slurm time limit: {e}",
                          "use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 04:00:00") from None
    if seconds < 180:  # USR2 comes 90 s before the limit, up to 60 s early: at the start (requeued for ever, or the
        # driver killed before it has a handler: FAILED at once, nothing in its log)
        raise ConfigError("cluster.time", f"{c.time!r} is {seconds} s: the run checkpoints and requeues 90 s before "
                          "its limit (Slurm may signal 60 s early), so it could never start",
                          "a bare number is minutes; give at least 3 minutes, e.g. 04:00:00")


def slurm_time_seconds(spec: str) -> int:
    """A Slurm time limit in seconds, read as Slurm's ``time_str2secs`` reads it, except that a field below another
    must be in range (``99:99:99`` is a typo) and no limit is refused. Raises ValueError."""
    spec = spec.strip()
    if spec.upper() in ("-1", "INFINITE", "UNLIMITED"):
        raise ValueError("no limit; areal-hpc needs one (it checkpoints 90 s before it)")
    if not (m := re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec)):
        raise ValueError("Slurm would not parse it")
    d, x, y, z = (None if g is None else int(g) for g in m.groups())
    if d is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s, ranged = x, y or 0, z or 0, ("hours", "minutes", "seconds")
    elif z is not None:  # H:M:S
        h, mi, s, ranged = x, y, z, ("minutes", "seconds")
    else:  # M or M:S
        h, mi, s, ranged = 0, x, y or 0, ("seconds",)
    for what, value, top in (("hours", h, 23), ("minutes", mi, 59), ("seconds", s, 59)):
        if what in ranged and value > top:
            raise ValueError(f"{value} {what} (at most {top} in this position)")
    seconds = (((d or 0) * 24 + h) * 60 + mi) * 60 + s
    if seconds <= 0:
        raise ValueError("a zero time limit means no limit to Slurm; areal-hpc needs one (it checkpoints "
                         "90 s before it)")
    return seconds


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):  # ENAMETOOLONG and the like: not an existing ancestor
            if p.exists():
                return p
    return Path("/")


def check_location(cfg: ExperimentConfig) -> None:
    """The names that make the run dir ``{fileroot}/{user}/{experiment_name}/{trial_name}``: valid characters, short
    enough for the filesystem (else ``File name too long`` at the first write)."""
    for key in ("experiment_name", "trial_name"):
        v = getattr(cfg, key)
        if not isinstance(v, str) or not _NAME.match(v):
            raise ConfigError(key, f"{v!r} is not a valid name", "use letters, digits, '_', '.', '-' (no '/')")
    if not (fileroot := cfg.cluster.fileroot):
        raise ConfigError("cluster.fileroot", "is empty", "a directory shared by all nodes, e.g. /scratch/$USER/areal")
    if bad := _CONTROL.search(fileroot):
        raise ConfigError("cluster.fileroot", f"contains the control character {bad.group()!r}",
                          "give a plain directory path")
    try:  # where `run_dir` puts it: a symlinked fileroot's target (its filesystem, its length) is what is measured
        root = Path(os.path.expanduser(fileroot)).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ConfigError("cluster.fileroot", f"cannot be resolved: {e}",
                          "give a directory path without a symlink loop") from None
    try:  # the limits of the filesystem that will hold the run dir
        name_max, path_max = (os.pathconf(nearest_existing(root), f"PC_{n}_MAX") for n in ("NAME", "PATH"))
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in root.parts:
        if len(part.encode()) > name_max:
            raise ConfigError("cluster.fileroot", f"has a path component of {len(part.encode())} bytes, longer than "
                              f"the filesystem allows ({name_max})", "use shorter directory names")
    for key in ("experiment_name", "trial_name"):
        if (n := len(getattr(cfg, key).encode())) > name_max:
            raise ConfigError(key, f"is {n} bytes long, longer than the filesystem allows ({name_max} bytes)",
                              "use a shorter name")
    total = len(str(run_dir(cfg)).encode()) + _LONGEST_INSIDE
    if total > path_max:
        raise ConfigError("cluster.fileroot", f"the run dir path would be too long for the filesystem "
                          f"({total} > {path_max} bytes with the files inside)",
                          "use a shorter cluster.fileroot, experiment_name or trial_name")


def run_dir(cfg: ExperimentConfig) -> Path:
    """``{cluster.fileroot}/{user}/{experiment_name}/{trial_name}``, absolute."""
    root = Path(os.path.expanduser(cfg.cluster.fileroot)).resolve()
    return root / getpass.getuser() / cfg.experiment_name / cfg.trial_name


def run_umask(cfg: ExperimentConfig) -> int:
    """The umask of all of a run's processes: dirs 0700, files 0600; ``cluster.group_readable``: 0750, 0640."""
    return 0o027 if cfg.cluster.group_readable else 0o077


def actor_path(cfg: ExperimentConfig) -> str:
    return cfg.trainer.sft.model.path if cfg.trainer.type == "sft" else cfg.trainer.ppo.actor.path


def prompt_tokenizer_path(cfg: ExperimentConfig) -> str:
    """The model whose tokenizer encodes the prompts: a null trainer's servers' (``server.model_path``), else the
    actor's."""
    return cfg.server.model_path if cfg.trainer.type == "null" and cfg.server.model_path else actor_path(cfg)


def models_in_use(cfg: ExperimentConfig) -> List[Tuple[str, Any, str]]:
    """``(key, owner, attribute)`` of every model path the run loads (a null trainer's servers load the actor's
    unless ``server.model_path`` is set)."""
    if cfg.trainer.type == "sft":
        return [("trainer.sft.model.path", cfg.trainer.sft.model, "path")]
    out = []
    if cfg.trainer.type != "null" or not cfg.server.model_path:
        out.append(("trainer.ppo.actor.path", cfg.trainer.ppo.actor, "path"))
    if cfg.server.model_path:
        out.append(("server.model_path", cfg.server, "model_path"))
    return out


def datasets_in_use(cfg: ExperimentConfig) -> List[Tuple[str, DatasetConfig, str]]:
    """``(key, dataset config, "train" | "valid")`` of every dataset the run reads."""
    out = []
    if cfg.trainer.type != "null":
        out.append(("train_dataset", cfg.train_dataset, "train"))
    if cfg.valid_dataset.path or cfg.trainer.type == "null":
        out.append(("valid_dataset", cfg.valid_dataset, "valid"))
    return out


def looks_like_hub_name(path: str) -> bool:
    """True for ``Qwen/Qwen2.5-1.5B-Instruct`` or ``openai/gsm8k`` that is not a local path: `submit` downloads it on
    the login node (`launch.resolve`); compute nodes get the local snapshot."""
    return (bool(_HUB_NAME.match(path)) and not path.lower().endswith(_FILE_SUFFIXES)
            and ".." not in path and not Path(path).exists())


def raw_text_refusal(name: str, why: str) -> str:
    """Submit's and rollout.prompts' refusal of ``{ds}.{name}`` (it goes into the chat template) with raw text."""
    return f"{'goes into' if name == 'system_prompt' else 'go to'} the chat template, but {why}: prompts are raw text"


def _check_path(key: str, path: str, kind: str) -> None:
    """A model or dataset path is given and a `toy:` spec is well formed: words only; what a path names (on
    disk or on the hub) is `launch.resolve`'s to check, at submit on the login node."""
    toy_spec, example, give = _PATHS[kind]
    if not path:
        raise ConfigError(key, "is empty", f"give {give}, or {example} for a tiny test {kind}")
    if path.startswith("toy:") and not toy_spec.match(path):
        raise ConfigError(key, f"bad toy {kind} spec {path!r}", f"e.g. {example}")


def validate(cfg: ExperimentConfig) -> AllocationMode:
    """Check a config; normalise it in place; return its allocation."""
    if cfg.trainer.type is None:
        cfg.trainer.type = "null"
    check_location(cfg)
    check_values(cfg)
    check_ranges(cfg)
    t, c, ppo = cfg.trainer.type, cfg.cluster, cfg.trainer.ppo
    for i, p in enumerate(cfg.trainer.plugins):
        if p.endswith(".py"):
            path = Path(os.path.expanduser(p)).resolve()
            if not path.is_file():
                raise ConfigError("trainer.plugins", f"plugin file {p!r} not found", "give a .py file or a module name")
            cfg.trainer.plugins[i] = str(path)
    c.python = os.path.expanduser(c.python)  # `~/venv/bin/python` reaches the job script quoted: no shell expands it
    # absolute in {run}/config.yaml: that file given from another directory (resubmit, status) names the same run
    c.fileroot = os.path.abspath(os.path.expanduser(c.fileroot))

    existing = nearest_existing(Path(c.fileroot).resolve())
    try:  # really try: os.access says yes to root even on /proc (and a file there fails too)
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError:
        raise ConfigError("cluster.fileroot", f"{c.fileroot!r} cannot be created (nearest parent {existing} is not a "
                          "writable directory)", "pick a writable directory shared by all nodes") from None
    if cfg.mode == "ray" and c.ray_address != "auto" and not _RAY_ADDRESS.match(c.ray_address):
        raise ConfigError("cluster.ray_address", f"{c.ray_address!r} is not a Ray address",
                          "give the head's GCS address host:port (6379 by default), or auto")
    la = cfg.launcher
    if la.ttl_s < 2 * la.heartbeat_s:
        raise ConfigError("launcher.ttl_s", f"{la.ttl_s} is shorter than two heartbeats ({2 * la.heartbeat_s})",
                          "raise launcher.ttl_s or lower launcher.heartbeat_s")

    alloc = parse_allocation(cfg.allocation_mode)
    # sft starts no servers (`launch.plan.has_servers`): a servers part (the default's) is ignored, its GPUs too
    gen = None if t == "sft" else alloc.gen
    used = dataclasses.replace(alloc, gen=gen)
    validate_allocation(used, c.n_nodes, c.n_gpus_per_node, c.multi_node_tp)
    if cfg.mode in ("local", "torchrun") and (n := nodes_needed(used, c.n_gpus_per_node)) > 1:  # (ran on 1 node's GPUs)
        raise ConfigError("mode", f"{cfg.mode} runs every step on this machine, but allocation_mode needs {n} nodes "
                          f"of {c.n_gpus_per_node} GPUs", "use mode=slurm or mode=ray, or an allocation for one node")
    if gen and gen.backend == "sglang" and c.n_gpus_per_node == 0:
        raise ConfigError("allocation_mode", "sglang servers need GPUs but cluster.n_gpus_per_node=0",
                          "use the embedded engine on CPUs: hf.d1+d1")
    whole_nodes = gen and c.n_gpus_per_node and gen.gpus_per_instance >= c.n_gpus_per_node
    if cfg.server.port and gen and gen.dp > 1 and not whole_nodes:  # servers packed onto a node
        raise ConfigError("server.port", f"{cfg.server.port} is fixed, but {gen.dp} servers share a node: "
                          "only the first can listen on it", "leave it 0: each server takes a free port")
    if t != "sft" and alloc.gen is None:
        raise ConfigError("allocation_mode", f"{cfg.allocation_mode!r} has no inference servers but trainer.type={t} "
                          "generates rollouts", "put servers first, e.g. sglang:d4+fsdp:d4 (trainer-only is for sft)")
    if t != "null" and alloc.train is None:
        what = "'+eval'" if alloc.eval_only else "no trainer part"
        raise ConfigError("allocation_mode", f"{cfg.allocation_mode!r} has {what} but trainer.type={t}",
                          "add trainer GPUs (e.g. +fsdp:d1) or set trainer.type=null for rollout/eval only")
    if t == "null" and alloc.train is not None:
        raise ConfigError("trainer.type", f"null (rollout/eval only) but allocation_mode gives the trainer "
                          f"{alloc.train.world_size} GPUs",
                          f"drop the trainer part: {cfg.allocation_mode.split('+')[0]}+eval")
    key = "trainer.sft.batch_size" if t == "sft" else "rollout.batch_size"
    if t in ("ppo", "sft") and get(cfg, key) % alloc.train.world_size:  # each trainer rank takes an equal share
        raise ConfigError(key, f"{get(cfg, key)} cannot be split evenly over {alloc.train.world_size} trainer ranks",
                          "make it a multiple of the trainer's d")
    if t == "ppo" and ppo.ppo_n_minibatches > (groups := cfg.rollout.batch_size // alloc.train.world_size):
        # a minibatch is whole prompt groups: past one group each, fewer minibatches were taken, silently
        raise ConfigError("trainer.ppo.ppo_n_minibatches", f"{ppo.ppo_n_minibatches} minibatches of whole prompt "
                          f"groups, but each of the {alloc.train.world_size} trainer rank(s) gets {groups} groups "
                          f"of rollout.batch_size={cfg.rollout.batch_size}", f"at most {groups}, or a larger batch")
    if t == "ppo" and ppo.adv_norm == "group" and cfg.rollout.n_samples < 2 and cfg.rollout.workflow == "rlvr":
        raise ConfigError("rollout.n_samples", "1 sample a prompt with trainer.ppo.adv_norm=group: a group of one "
                          "is its own mean, so every advantage is 0 and nothing is learnt",
                          "2 or more (GRPO), or trainer.ppo.adv_norm=batch")
    if ppo.weight_update == "nccl" and c.n_gpus_per_node == 0:
        raise ConfigError("trainer.ppo.weight_update", "nccl needs GPUs", "use disk or gloo on CPU-only runs")
    if ppo.weight_update == "gloo" and c.n_gpus_per_node > 0:
        raise ConfigError("trainer.ppo.weight_update", "gloo broadcasts through host memory, for CPU-only runs",
                          "use nccl (or disk) with GPUs")
    if not ppo.async_training:
        cfg.rollout.max_head_offpolicyness = 0

    for key, owner, attr in models_in_use(cfg):
        _check_path(key, getattr(owner, attr), "model")
    tokenizer = prompt_tokenizer_path(cfg)
    for key, ds, _ in datasets_in_use(cfg):
        _check_path(f"{key}.path", ds.path, "dataset")
        # a sample resumed after a pause (its prompt and what it has generated) must stay below SGLang's longest input
        longest = cfg.server.context_length - SGLANG_INPUT_MARGIN
        if t != "sft" and ds.max_prompt_len + cfg.rollout.gen.max_new_tokens > longest:
            raise ConfigError("rollout.gen.max_new_tokens", f"{cfg.rollout.gen.max_new_tokens} after a prompt of up to "
                              f"{key}.max_prompt_len={ds.max_prompt_len} goes past server.context_length="
                              f"{cfg.server.context_length} minus the {SGLANG_INPUT_MARGIN} tokens SGLang keeps free",
                              "lower either")
        for name in ds.chat_template_kwargs:
            if not (isinstance(name, str) and name.isidentifier()) or name in TEMPLATE_OWN_ARGS:
                raise ConfigError(f"{key}.chat_template_kwargs", f"{name!r} is no variable of the template's: a key "
                                  f"is a name (not {', '.join(TEMPLATE_OWN_ARGS)}: set by areal-hpc)",
                                  "e.g. {enable_thinking: false}")
        raw = f"{key}.chat_template=none" if ds.chat_template == "none" else "a toy: model's tokenizer has no template"
        for name, hint in (("system_prompt", "drop one of them, or put the instruction in the prompts"),
                           ("chat_template_kwargs", "drop one of them")):  # (dropped, silently)
            if getattr(ds, name) and (ds.chat_template == "none" or tokenizer.startswith("toy:")):
                raise ConfigError(f"{key}.{name}", raw_text_refusal(name, raw), hint)
    return alloc
