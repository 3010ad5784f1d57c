"""Helpers shared by the tests that drive real processes (Slurm, servers)."""

import subprocess
import sys
import time
from pathlib import Path
from typing import List


def run(*cmd: str, timeout: float = 120) -> str:
    """Run a command; fail the test with its output unless it exits 0."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def serve_argv(run_dir: Path, sid: str, *words: str, backend: str = "hf") -> List[str]:
    """``areal-hpc serve`` for one server of a stand-alone run dir whose config.yaml holds ``words``
    (``server.model_path=...``, ``launcher.ttl_s=...``); written by a rename, so a server started
    earlier never reads half a file."""
    from areal_hpc.config import dump_yaml, load_config
    from areal_hpc.registry import atomic_write

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", dump_yaml(load_config(None, list(words))))
    return [sys.executable, "-m", "areal_hpc", "serve", "--run-dir", str(run_dir), "--server-id", sid,
            "--backend", backend]
