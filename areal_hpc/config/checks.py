"""Checks every value gets whatever its key, before anything is written or submitted.

- numbers are finite (``nan``/``inf`` parse as floats, and would surface only on a compute node);
- numbers that must be positive (or in a range) are;
- strings hold no control characters; those that reach the job script or a shell line
  (`SCRIPT_KEYS`) hold none at all, not even a newline (a newline there is an injected command);
- the names that make up the run dir fit the filesystem (``File name too long``);
- ``cluster.time`` is read the way Slurm reads it (`slurm_time_seconds`).

`validate.validate` calls `check_values`, `check_ranges` and `check_location`; commands that only
locate an existing run call `check_location` alone.
"""

from __future__ import annotations

import dataclasses
import getpass
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

from areal_hpc.config.errors import ConfigError
from areal_hpc.config.schema import ExperimentConfig

# Keys whose values are written into the rendered sbatch script or a shell line (names make the
# job name and the run dir; cluster.* is #SBATCH options, setup lines, the interpreter, srun args).
SCRIPT_KEYS = ("experiment_name", "trial_name", "cluster.")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline, CR allowed (prompts)
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:+=@-]+$")  # partition (a list too), account, qos
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:&|*!\[\]()=-]+$")
# the longest name written inside a run dir (e.g. logs/add-servers-NNN.sbatch.tmp) plus slack
_LONGEST_INSIDE = 64


def walk(obj: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Every leaf value of a config tree as (dotted key, value); list items as ``key[i]``, dict
    entries as ``key.name`` (their names are yielded as values too, under ``key.name (name)``)."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from walk(getattr(obj, f.name), f"{prefix}{f.name}" if not prefix else f"{prefix}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}.{k} (name)", k
            yield from walk(v, f"{prefix}.{k}")
    else:
        yield prefix, obj


def _script_key(key: str) -> bool:
    return any(key.startswith(k) if k.endswith(".") else key == k for k in SCRIPT_KEYS)


def check_values(cfg: ExperimentConfig) -> None:
    """Finite numbers everywhere; no control characters in strings (none at all in `SCRIPT_KEYS`)."""
    for key, v in walk(cfg):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(key, f"must be a finite number, got {v}", "give a plain number")
        if isinstance(v, str):
            script = _script_key(key)
            bad = (_CONTROL if script else _CONTROL_TEXT).search(v)
            if bad:
                raise ConfigError(key, f"contains the control character {bad.group()!r} at position {bad.start()}",
                                  "it goes into the job script: give one line of printable text" if script
                                  else "remove the control character")


def _at_least(key: str, value, minimum) -> None:
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value}")


def _above(key: str, value, bound, hint: Optional[str] = None) -> None:
    if not value > bound:
        raise ConfigError(key, f"must be > {bound}, got {value}", hint)


def _within(key: str, value, lo, hi, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ConfigError(key, f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {value}")


def check_ranges(cfg: ExperimentConfig) -> None:
    """Positive where positive, ranges where a number means a fraction or a port."""
    la, s, r, g = cfg.launcher, cfg.server, cfg.rollout, cfg.rollout.gen
    _above("launcher.server_startup_timeout_s", la.server_startup_timeout_s, 0)
    _above("launcher.trainer_wait_servers_timeout_s", la.trainer_wait_servers_timeout_s, 0)
    _at_least("server.context_length", s.context_length, 1)
    _at_least("server.max_running_requests", s.max_running_requests, 1)
    _within("server.mem_fraction_static", s.mem_fraction_static, 0, 1, lo_open=True)
    _within("server.port", s.port, 0, 65535)
    if g.top_k != -1 and g.top_k < 1:
        raise ConfigError("rollout.gen.top_k", f"must be -1 (off) or >= 1, got {g.top_k}")
    for i, t in enumerate(g.stop_token_ids):
        _at_least(f"rollout.gen.stop_token_ids[{i}]", t, 0)
    _above("rollout.request_timeout_s", r.request_timeout_s, 0)
    _above("rollout.drop_timeout_s", r.drop_timeout_s, 0, "seconds; a real run should not go minutes without a batch")
    _above("rollout.stall_timeout_s", r.stall_timeout_s, 0, "seconds; allow for the longest generation")
    _at_least("trainer.total_train_epochs", cfg.trainer.total_train_epochs, 0)
    _at_least("trainer.sft.batch_size", cfg.trainer.sft.batch_size, 1)
    ppo = cfg.trainer.ppo
    if ppo.behav_imp_weight_cap is not None:
        _above("trainer.ppo.behav_imp_weight_cap", ppo.behav_imp_weight_cap, 1, "or null to disable")
    _at_least("trainer.ppo.kl_ctl", ppo.kl_ctl, 0)
    for prefix, eng, mb in (("trainer.ppo.actor", ppo.actor, ppo.mb_spec),
                            ("trainer.sft.model", cfg.trainer.sft.model, cfg.trainer.sft.mb_spec)):
        o = eng.optimizer
        _at_least(f"{prefix}.optimizer.weight_decay", o.weight_decay, 0)
        _within(f"{prefix}.optimizer.beta1", o.beta1, 0, 1, hi_open=True)
        _within(f"{prefix}.optimizer.beta2", o.beta2, 0, 1, hi_open=True)
        _above(f"{prefix}.optimizer.eps", o.eps, 0)
        _within(f"{prefix}.optimizer.min_lr_ratio", o.min_lr_ratio, 0, 1)
        _at_least(f"{prefix}.optimizer.grad_clip", o.grad_clip, 0)
        section = prefix.rsplit(".", 1)[0]
        _at_least(f"{section}.mb_spec.n_mbs", mb.n_mbs, 1)
    for key in ("train_dataset", "valid_dataset"):
        ds = getattr(cfg, key)
        _at_least(f"{key}.max_prompt_len", ds.max_prompt_len, 1)
        _at_least(f"{key}.limit", ds.limit, 0)
    c = cfg.cluster
    for key in ("partition", "account", "qos"):
        v = getattr(c, key)
        if v is not None and not _SLURM_NAME.match(v):
            raise ConfigError(f"cluster.{key}", f"{v!r} is not a Slurm {key} name", "letters, digits, '_', '-', '.'")
    if c.constraint is not None and not _CONSTRAINT.match(c.constraint):
        raise ConfigError("cluster.constraint", f"{c.constraint!r} is not a Slurm constraint",
                          "features joined by & | , e.g. a100&ib (no spaces or quotes)")
    for key, dash in (("sbatch_args", "--"), ("srun_args", "-")):  # submitit takes long sbatch options only
        args = getattr(c, key)
        for i, a in enumerate(args):
            prev = str(args[i - 1]).removeprefix("#SBATCH").strip() if i else ""
            is_value = prev.startswith("-") and "=" not in prev and not str(a).startswith("-")
            if not str(a).removeprefix("#SBATCH").strip().startswith(dash) and not is_value:
                raise ConfigError(f"cluster.{key}[{i}]", f"{a!r} is not a{' long' if dash == '--' else 'n'} option",
                                  "give options like --exclusive or --reservation=NAME")
    try:
        if slurm_time_seconds(str(c.time)) <= 0:
            raise ValueError("a zero time limit means no limit to Slurm; areal-hpc needs one (it checkpoints "
                             "90 s before it)")
    except ValueError as e:
        raise ConfigError("cluster.time", f"{c.time!r} is not a usable Slurm time limit: {e}",
                          "use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 04:00:00") from None


def slurm_time_seconds(spec: str) -> int:
    """A Slurm time limit in seconds, read as Slurm's ``time_str2secs`` reads it (``M``, ``M:S``,
    ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``), with two additions: a field below another must be
    in range (``99:99:99`` is a typo, not 100:40:39) and ``UNLIMITED``/``INFINITE``/``-1`` are
    refused (areal-hpc requeues before the limit, so it needs one). Raises ValueError."""
    spec = spec.strip()
    if spec.upper() in ("-1", "INFINITE", "UNLIMITED"):
        raise ValueError("no limit; areal-hpc needs one (it checkpoints 90 s before it)")
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec)
    if not m:
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
    return (((d or 0) * 24 + h) * 60 + mi) * 60 + s


def _name_max(path: Path) -> Tuple[int, int]:
    """(NAME_MAX, PATH_MAX) of the filesystem holding ``path``'s nearest existing ancestor."""
    def exists(p: Path) -> bool:
        try:
            return p.exists()
        except OSError:  # ENAMETOOLONG and the like: not an existing ancestor
            return False

    existing = next((p for p in [path, *path.parents] if exists(p)), Path("/"))
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def check_location(cfg: ExperimentConfig) -> None:
    """The names that make the run dir ``{fileroot}/{user}/{experiment_name}/{trial_name}``: valid
    characters, and short enough for the filesystem (else ``File name too long`` at the first write)."""
    for key in ("experiment_name", "trial_name"):
        v = getattr(cfg, key)
        if not isinstance(v, str) or not _NAME.match(v):
            raise ConfigError(key, f"{v!r} is not a valid name", "use letters, digits, '_', '.', '-' (no '/')")
    fileroot = cfg.cluster.fileroot
    if not fileroot:
        raise ConfigError("cluster.fileroot", "is empty", "a directory shared by all nodes, e.g. /scratch/$USER/areal")
    bad = _CONTROL.search(fileroot)
    if bad:
        raise ConfigError("cluster.fileroot", f"contains the control character {bad.group()!r}",
                          "give a plain directory path")
    root = Path(os.path.expanduser(fileroot)).absolute()
    name_max, path_max = _name_max(root)
    for part in root.parts:
        if len(part.encode()) > name_max:
            raise ConfigError("cluster.fileroot", f"has a path component of {len(part.encode())} bytes, longer than "
                              f"the filesystem allows ({name_max})", "use shorter directory names")
    for key in ("experiment_name", "trial_name"):
        n = len(getattr(cfg, key).encode())
        if n > name_max:
            raise ConfigError(key, f"is {n} characters long, longer than the filesystem allows ({name_max})",
                              "use a shorter name")
    total = len(str(root / getpass.getuser() / cfg.experiment_name / cfg.trial_name).encode()) + _LONGEST_INSIDE
    if total > path_max:
        raise ConfigError("cluster.fileroot", f"the run dir path would be too long for the filesystem "
                          f"({total} > {path_max} bytes with the files inside)",
                          "use a shorter cluster.fileroot, experiment_name or trial_name")
