"""The SGLang backend: ``python -m sglang.launch_server`` argv from a `ServerConfig`, and the process.

`SGLANG_VERSION` is the one pinned version (setup.cfg's ``sglang`` extra pins the same);
``tests/test_inference_sglang_flags.py`` checks every flag this module can emit against those that version declares.

The API key is not put on the command line (other users of a node can read argv with ``ps``): it goes into a 0600 YAML
file in the registry passed with ``--config`` (SGLang merges it like CLI flags), and is masked in SGLang's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from areal_hpc.config.schema import ServerConfig
from areal_hpc.config.pass_through import SGLANG_OWNED
from areal_hpc.registry.util import atomic_write

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"

Value = Union[None, str, List[str]]  # None = bare boolean flag


def build_sglang_options(cfg: ServerConfig, model_path: str, *, host: str, port: int,
                         api_key: Optional[str] = None, config_file: Optional[str] = None,
                         tp_size: int = 1, pp_size: int = 1, base_gpu_id: int = 0, nnodes: int = 1,
                         node_rank: int = 0, dist_init_addr: Optional[str] = None, weight_version: Optional[str] = "0"
                         ) -> Dict[str, Value]:
    """Ordered ``{flag: value}``; ``cfg.sglang_args`` override or extend ours: true, "true", "" or null is a bare flag,
    false or "false" drops it."""
    if nnodes > 1 and not dist_init_addr:
        raise ValueError("multi-node tensor parallelism (nnodes > 1) needs dist_init_addr host:port")
    opts: Dict[str, Value] = {
        "--model-path": model_path, "--host": host, "--port": str(port),
        "--tp-size": str(tp_size), "--pp-size": str(pp_size), "--base-gpu-id": str(base_gpu_id),
        "--random-seed": str(cfg.random_seed), "--mem-fraction-static": str(cfg.mem_fraction_static),
        # our auto means bf16 on GPUs (SGLang's own auto picks fp16 for fp32 checkpoints)
        "--dtype": "bfloat16" if cfg.dtype in ("", "auto", None) else cfg.dtype,
        "--skip-tokenizer-init": None,
    }
    if cfg.context_length and cfg.context_length > 0:
        opts["--context-length"] = str(cfg.context_length)
    if cfg.max_running_requests and cfg.max_running_requests > 0:
        opts["--max-running-requests"] = str(cfg.max_running_requests)
    if weight_version is not None:
        opts["--weight-version"] = str(weight_version)
    if config_file:
        opts["--config"] = str(config_file)
    elif api_key:
        opts["--api-key"] = api_key
    if nnodes > 1:
        opts.update({"--nnodes": str(nnodes), "--node-rank": str(node_rank), "--dist-init-addr": str(dist_init_addr)})
    for key, value in (cfg.sglang_args or {}).items():
        key = key.strip()
        flag = key if key.startswith("--") else "--" + key.lstrip("-").replace("_", "-")
        if flag[2:] in SGLANG_OWNED:  # (submit refuses them too; a hand-run `serve` may not have been checked)
            raise ValueError(f"server.sglang_args.{key}: {flag} is set by areal-hpc itself; "
                             f"use {SGLANG_OWNED[flag[2:]]}")
        word = value.strip().lower() if isinstance(value, str) else None
        if value is False or word == "false":
            opts.pop(flag, None)
        elif value is None or value is True or word in ("", "true"):
            opts[flag] = None
        elif isinstance(value, (list, tuple)):
            opts[flag] = [str(x) for x in value]
        else:
            opts[flag] = json.dumps(value) if isinstance(value, dict) else str(value)
    return opts


def render_argv(opts: Mapping[str, Value], python: str = sys.executable) -> List[str]:
    argv = [python, "-m", "sglang.launch_server"]
    for flag, value in opts.items():
        argv.append(flag)
        if value is not None:
            argv.extend(value if isinstance(value, list) else [value])
    return argv


def write_key_config(path: str | os.PathLike, api_key: str) -> str:
    """A 0600 YAML file holding ``api-key`` (SGLang reads it with ``--config``), in a private dir (the registry)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return atomic_write(path, f"api-key: {json.dumps(api_key)}\n", mode=0o600)


def base_gpu_and_env(gpus: Sequence[int], env: Optional[Mapping[str, str]] = None) -> tuple[int, Dict[str, str]]:
    """``--base-gpu-id`` and extra environment for a server on ``gpus``: base 0 where ``CUDA_VISIBLE_DEVICES`` is set
    (Slurm's ``--gpus-per-task``) or scattered ids are made visible; else the first of contiguous ids."""
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES") or not gpus:
        return 0, {}
    ids = sorted(int(g) for g in gpus)
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return ids[0], {}
    return 0, {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in ids)}


class SGLangProcess:
    """One ``sglang.launch_server`` subprocess in its own process group."""

    def __init__(self, argv: List[str], env: Optional[Dict[str, str]], log_path: str, secret: str = ""):
        self.argv, self.env, self.log_path = argv, dict(os.environ, **(env or {})), log_path
        self.proc: Optional[subprocess.Popen] = None
        self._log_start = 0  # the log is appended to: what an earlier run of the server wrote ends here
        self._secret = secret.encode()  # masked in the log
        self._copier: Optional[threading.Thread] = None

    def start(self) -> "SGLangProcess":
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        log.info("starting: %s", " ".join(self.argv))
        out = open(self.log_path, "ab", buffering=0)
        self._log_start = out.tell()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)

        def copy(src=self.proc.stdout, key=self._secret) -> None:  # SGLang logs its ServerArgs, the key among them
            with src, out:  # and the log may be group-readable: masked
                for line in src:
                    out.write(line.replace(key, b"<api-key>") if key else line)
        self._copier = threading.Thread(target=copy, name="sglang-log", daemon=True)
        self._copier.start()
        return self

    def log_tail(self, n_bytes: int = 20000) -> str:
        """The end of what it wrote to its log (all it wrote, once it exited)."""
        if self._copier is not None and self.returncode is not None:
            self._copier.join(5.0)
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(self._log_start, f.tell() - n_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = 30.0) -> Optional[int]:
        """SIGTERM the process group, SIGKILL what is left of it after ``grace_s``. The group, not just SGLang's main
        process: a child that did not ask to die with it (a wrapper's, a compile worker), or one that ignores SIGTERM,
        would otherwise outlive it."""
        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait
            while self._group_runs() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self._group_runs():
                break
        return self.returncode

    def _group_runs(self) -> bool:
        """Whether a process of its group still runs (zombies do not count: an orphan's may never be reaped)."""
        self.proc.poll()  # reap the main process
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError):
                state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
                if pgrp == str(self.proc.pid) and state != "Z":
                    return True
        return False
