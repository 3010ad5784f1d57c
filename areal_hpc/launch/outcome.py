"""How a run ended, told alike by every launcher (in ``run.json``; `status` reads it): state, reason, log, exit code.
States: ``PENDING`` (no owner yet), ``RUNNING``, ``REQUEUED`` (checkpointed, waits to run again), and the final
``COMPLETED``, ``FAILED`` (the reason: the failing log's error line), ``STOPPED`` (checkpointed, resumable)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from areal_hpc.train.checkpoint_dirs import latest_checkpoint
from areal_hpc.trainers.base import STOPPED_EXIT as TRAINER_STOPPED  # noqa: F401 - the owner reads it here

COMPLETED, FAILED, STOPPED, RUNNING, PENDING, REQUEUED = \
    "COMPLETED", "FAILED", "STOPPED", "RUNNING", "PENDING", "REQUEUED"
FINAL = (COMPLETED, FAILED, STOPPED)
# exit codes of `submit` (mode=local, and mode=slurm with launcher.wait) and of the driver
EXIT_CODES = {COMPLETED: 0, FAILED: 1, STOPPED: 130}
# a traceback's last line: "KeyError: 'prompt'", "areal_hpc.config.errors.ConfigError: ..."
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Timeout|Failure|Warning))(:\s.*)?$")
_ERROR_WORD = re.compile(r"(\bERROR\b|\bCRITICAL\b|\bFATAL\b|\berror:|Traceback \(most recent call last\))")
_TAIL_BYTES = 256 * 1024  # an error line is near the end of a log


def exit_code(state: Optional[str]) -> int:
    return EXIT_CODES.get(state or "", 1)


def describe_exit(rc: int) -> str:
    """``exited with 1``, ``killed by SIGKILL`` (a negative Popen code), ``exited with 137 (SIGKILL?)`` (srun's)."""
    if 0 <= rc <= 128:
        return f"exited with {rc}"
    try:
        name = signal.Signals(-rc if rc < 0 else rc - 128).name
    except ValueError:
        return f"exited with {rc}"
    return f"killed by {name}" if rc < 0 else f"exited with {rc} ({name}?)"


def log_files(pattern: str) -> list:
    """The files of a step's log (``trainer-%t.log``: one per rank), rank 0 first."""
    if "%t" not in pattern:
        return [pattern] if os.path.exists(pattern) else []
    return sorted(glob.glob(pattern.replace("%t", "*")), key=lambda p: (len(p), p))


def log_sizes(pattern: str) -> Dict[str, int]:
    """Current sizes of a step's log files: a later `error_line` reads only what came after."""
    out = {}
    for p in log_files(pattern):
        with contextlib.suppress(OSError):
            out[p] = os.path.getsize(p)
    return out


def _error_in(path: str, offset: int) -> Optional[str]:
    """The last error line written to ``path`` after ``offset``: a traceback's exception line, else the last line
    saying ERROR/error:, else None."""
    try:
        size = os.path.getsize(path)
        start = max(offset if offset <= size else 0, size - _TAIL_BYTES)
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [re.sub(r"^\[rank\d+\]: ", "", x).rstrip() for x in text.splitlines() if x.strip()]  # torch: "[rank0]: "
    exc = [x for x in lines if _EXC_LINE.match(x.strip()) and not x.startswith((" ", "\t"))]
    found = exc or [x for x in lines if _ERROR_WORD.search(x) and "Traceback" not in x]
    return found[-1].strip() if found else None


def error_line(pattern: str, offsets: Optional[Dict[str, int]] = None) -> Tuple[Optional[str], Optional[str]]:
    """(error line, log file) of a failed step, from each rank's log past ``offsets`` (an earlier attempt's); (None,
    first log) when no log holds one (e.g. SIGKILLed)."""
    files = log_files(pattern)
    for p in files:
        line = _error_in(p, (offsets or {}).get(p, 0))
        if line:
            return (line if len(line) <= 400 else line[:397] + "..."), p
    return None, files[0] if files else None


def last_row(metrics_path: Path) -> Dict[str, Any]:
    """The last complete line of metrics.jsonl ({} if none), read from the file's tail: the file grows with the run."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(max(0, os.path.getsize(metrics_path) - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
            int(row["step"])
            return row
        except (ValueError, KeyError, TypeError):
            continue
    return {}


def last_step(metrics_path: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 if none)."""
    return int(last_row(metrics_path).get("step", 0))


def latest_checkpoint_step(checkpoint_dir: Path) -> int:
    """The step of the checkpoint a trainer resumes from (0 if none): a half-written or incomplete one is not."""
    path = latest_checkpoint(Path(checkpoint_dir))
    return int(path.name.split("_", 1)[1]) if path else 0


def summary_line(rec: Dict[str, object]) -> str:
    """``FAILED: trainer exited with 1: KeyError: 'prompt' (see /run/logs/trainer-0.log)``."""
    state, reason, where = str(rec.get("state") or "?"), rec.get("reason"), rec.get("log")
    return state + (f": {reason}" if reason else "") + (f" (see {where})" if where and state == FAILED else "")
