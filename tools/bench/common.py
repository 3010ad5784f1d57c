"""What the bench suites share: the repository on sys.path, JSON lines, medians, device sync, the benchmarked
model shapes, and the one loop that follows a run from `areal-hpc submit` to its first step."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# decoder shapes of the benchmarked architectures (random init); the suites add the rest of the config
QWEN25_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
}
QWEN25_VOCAB = 151936
# a tiny qwen2 for the --smoke runs on CPU
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024)


def emit(**kw) -> dict:
    """One JSON line on stdout (what every suite prints per measurement)."""
    print(json.dumps(kw), flush=True)
    return kw


def sync(device) -> None:
    """Wait for a CUDA device's queued work (a no-op on CPU), so that a timer sees it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def median(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def medians(runs: List[Dict[str, float]]) -> Dict[str, float]:
    """Per key, the median over the runs that have it (numbers only)."""
    keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, (int, float))})
    return {k: statistics.median([r[k] for r in runs if k in r]) for k in keys}


def proc_start_time(pid: int) -> Optional[float]:
    """Wall-clock start time of a live local process: now - (uptime - its start in jiffies since boot).
    (/proc/stat's btime is whole seconds; /proc/uptime has 10 ms.)"""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        uptime = float(open("/proc/uptime").read().split()[0])
        now = time.time()
        return now - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return None


def follow_launch(root: Path, name: str, overrides: List[str], until_exit: bool,
                  timeout_s: float = 600) -> Dict:
    """Start ``areal-hpc submit QUICKSTART overrides`` (trial ``t0`` of experiment ``name`` under
    ``root``) and poll its registry and metrics every 20 ms: when the server and trainer processes
    started (their pids' /proc start times, read while they live), when the server registered
    ready, when the first step was written, when `submit` returned. ``until_exit``: stop polling
    when `submit` exits (a local/ray submit runs the whole run; a Slurm one returns once the job
    runs). Returns ``{"t0", "marks", "starts", "run_dir", "submit_rc", "output"}``."""
    from areal_hpc.registry import Registry

    t0 = time.time()
    submit = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", str(QUICKSTART), *overrides],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    rd, reg = None, None
    marks: Dict[str, float] = {}
    starts: Dict[str, Optional[float]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and "first_step" not in marks:
        if until_exit and submit.poll() is not None:
            break
        now = time.time()
        if rd is None:
            rd = next(root.glob(f"*/{name}/t0"), None)
            if rd is None:
                time.sleep(0.02)
                continue
            reg = Registry.for_run(rd)
        if submit.poll() is not None and "submit_returned" not in marks:
            marks["submit_returned"] = now
        srv = reg.get("servers", "server-0")
        if srv and "server" not in starts:  # read its start time now: it is gone after the run
            starts["server"] = proc_start_time(int(srv["pid"]))
        if srv and srv.get("state") in ("ready", "paused") and "server_ready" not in marks:
            marks["server_ready"] = now
        tr = reg.get("", "trainer")
        if tr and "trainer" not in starts:
            starts["trainer"] = proc_start_time(int(tr["pid"]))
        m = rd / "metrics.jsonl"
        if m.exists() and m.stat().st_size > 0:
            marks["first_step"] = now
        time.sleep(0.02)
    out, _ = submit.communicate(timeout=timeout_s)
    return {"t0": t0, "marks": marks, "starts": starts, "run_dir": rd, "submit_rc": submit.returncode,
            "output": out}


def launch_figures(run: Dict) -> Dict[str, float]:
    """Seconds from the submit of `follow_launch`'s ``run`` to each mark, and the launch overhead:
    the last run process's start - submit (``launch_overhead_s``), and server start -> ready
    (``model_load_s``)."""
    t0, marks, starts = run["t0"], run["marks"], run["starts"]
    if "first_step" not in marks:
        raise RuntimeError(f"no first step (submit exit {run['submit_rc']}):\n{run['output']}")
    res = {"submit_to_server_ready_s": marks["server_ready"] - t0, "submit_to_first_step_s": marks["first_step"] - t0}
    if starts.get("server") and starts.get("trainer"):
        res.update({"submit_to_server_process_s": starts["server"] - t0,
                    "submit_to_trainer_process_s": starts["trainer"] - t0,
                    "launch_overhead_s": max(starts["server"], starts["trainer"]) - t0,
                    "model_load_s": marks["server_ready"] - starts["server"],
                    "trainer_start_to_first_step_s": marks["first_step"] - starts["trainer"]})
    return res
