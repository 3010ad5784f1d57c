"""Helpers shared by the tests that drive real processes (Slurm, servers)."""

import subprocess
import time


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
