"""Launch overhead of mode=slurm: `areal-hpc submit` -> servers registered -> trainer's first step,
against a bare ``sbatch --wrap true`` round trip on the same cluster in the same run.

    python tools/bench/slurm_overhead.py                    # uses $SLURM_CONF, else starts a local cluster
    python tools/bench/slurm_overhead.py --repeat 3 --markdown

What is measured (wall clock, all on this host; the run dir is under /tmp):

* ``baseline_sbatch_s``: ``sbatch --wrap true`` until slurmctld reports the job COMPLETED (median
  of ``--repeat``), polled every 20 ms -- the floor any Slurm launcher pays.
* For the CPU quickstart (``hf.d1+d1``, one server, one trainer rank), from the moment
  ``areal-hpc submit`` is started: when each process of the run started (``/proc/<pid>``
  start times of the server and trainer pids from their registry records), when the server
  registered as ready and when the first training step was written (registry and metrics.jsonl
  polled every 20 ms).
* ``launch_overhead_s`` = last process start - submit start: CLI start-up, validation, submitit
  + sbatch, scheduling, driver start, srun step creation. ``model_load_s`` (server process start
  -> ready: interpreter + torch import + model build + HTTP up + registration) and the trainer's
  own start-up are what the rest of ``submit_to_first_step_s`` is made of; the log timestamps
  (`server ... on` -> `ready at`) give the same split at one-second resolution (``model_load_log_s``).
* ``overhead_vs_baseline_s`` = launch_overhead_s - baseline_sbatch_s (target: <= 3 s).

Prints one JSON object (and with ``--markdown`` a section for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CLUSTER_SH = REPO / "tools" / "slurm" / "local-cluster.sh"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_state(job_id: str) -> Optional[str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    m = re.search(r"\bJobState=(\S+)", r.stdout)
    return m.group(1) if m else None


def wait_final(job_id: str, poll_s: float = 0.02, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = job_state(job_id)
        if s in FINAL:
            return s
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not end in {timeout_s}s")


def baseline(repeat: int, partition: str, out_dir: Path) -> List[float]:
    times = []
    for _ in range(repeat):
        t0 = time.time()
        r = subprocess.run(["sbatch", "--parsable", f"--partition={partition}", "--mem=100M", "--cpus-per-task=1",
                            f"--output={out_dir}/baseline-%j.out", "--wrap", "true"],
                           capture_output=True, text=True, timeout=120, check=True)
        state = wait_final(r.stdout.strip().split(";")[0])
        times.append(time.time() - t0)
        assert state == "COMPLETED", state
    return times


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


def _log_time(path: Path, pattern: str, day: datetime) -> Optional[float]:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if re.search(pattern, line):
                hms = line.split()[0]
                t = datetime.strptime(f"{day:%Y-%m-%d} {hms}", "%Y-%m-%d %H:%M:%S")
                return t.timestamp()
    except (OSError, ValueError):
        pass
    return None


def one_run(root: Path, partition: str, name: str) -> Dict[str, float]:
    from areal_hpc.registry import Registry

    overrides = ["mode=slurm", f"cluster.fileroot={root}", "cluster.n_nodes=1", "cluster.n_gpus_per_node=4",
                 "cluster.cpus_per_gpu=1", "cluster.mem_per_gpu_gb=1", f"cluster.partition={partition}",
                 "cluster.time=00:20:00", f"experiment_name={name}", "trial_name=t0", "rollout.batch_size=8",
                 "rollout.n_samples=4", "trainer.total_train_steps=3", "saver.freq_steps=0", "stats.progress_bar=False"]
    t0 = time.time()
    submit = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", str(QUICKSTART), *overrides],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    rd = None
    marks: Dict[str, float] = {}
    pids: Dict[str, int] = {}
    starts: Dict[str, Optional[float]] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and "first_step" not in marks:
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
        if srv and "server_pid" not in pids:  # read its start time now: it is gone after the run
            pids["server_pid"] = int(srv["pid"])
            starts["server"] = proc_start_time(pids["server_pid"])
        if srv and srv.get("state") in ("ready", "paused") and "server_ready" not in marks:
            marks["server_ready"] = now
        tr = reg.get("", "trainer")
        if tr and "trainer_pid" not in pids:
            pids["trainer_pid"] = int(tr["pid"])
            starts["trainer"] = proc_start_time(pids["trainer_pid"])
        m = rd / "metrics.jsonl"
        if m.exists() and m.stat().st_size > 0:
            marks["first_step"] = now
        time.sleep(0.02)
    out_text, _ = submit.communicate(timeout=600)
    run = Registry.for_run(rd).get("", "run", live_only=False) or {}
    job_id = str(run.get("job_id"))
    state = wait_final(job_id, poll_s=0.5)
    if state != "COMPLETED":
        raise RuntimeError(f"job {job_id} ended {state}:\n{out_text}")
    # times from the Slurm side and the driver
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    srv_start, trn_start = starts.get("server"), starts.get("trainer")
    day = datetime.fromtimestamp(t0)
    srv_log = rd / "logs" / "server-0.log"
    log_entry = _log_time(srv_log, r"areal_hpc\.launch\.entry: server server-0 on", day)
    log_ready = _log_time(srv_log, r"server server-0 \(hf\) ready at", day)
    res = {
        "job_id": job_id,
        "submit_returned_s": marks.get("submit_returned", time.time()) - t0,
        "submit_to_server_ready_s": marks["server_ready"] - t0,
        "submit_to_first_step_s": marks["first_step"] - t0,
    }
    if srv_start and trn_start:
        last = max(srv_start, trn_start)
        res.update({
            "submit_to_server_process_s": srv_start - t0,
            "submit_to_trainer_process_s": trn_start - t0,
            "launch_overhead_s": last - t0,
            "model_load_s": marks["server_ready"] - srv_start,
            "trainer_start_to_first_step_s": marks["first_step"] - trn_start,
        })
    if log_entry and log_ready:
        res["model_load_log_s"] = log_ready - log_entry
    m = re.search(r"\bSubmitTime=(\S+).*?\bStartTime=(\S+)", info)
    if m:
        sub = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").timestamp()
        start = datetime.strptime(m.group(2), "%Y-%m-%dT%H:%M:%S").timestamp()
        res["slurm_queue_s_1s_resolution"] = start - sub
    return res


def start_cluster() -> Optional[Dict[str, str]]:
    env = dict(os.environ, AREAL_SLURM_DIR="/tmp/areal-slurm-bench", AREAL_SLURM_PORT_BASE="18500")
    r = subprocess.run(["bash", str(CLUSTER_SH), "start"], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"could not start a local cluster:\n{r.stdout}\n{r.stderr}")
    os.environ["SLURM_CONF"] = "/tmp/areal-slurm-bench/slurm.conf"
    return env


def markdown(res: Dict, cmd: str) -> str:
    b, r = res["baseline"], res["runs"]
    med = res["median"]
    lines = [
        "## Slurm launch overhead",
        "",
        f"Machine: {res['machine']}; local Slurm {res['slurm_version']} cluster "
        "(`tools/slurm/local-cluster.sh`: 4 nodes x 4 fake GPUs on this one host, accounting on). "
        f"Date: 2026-11-26. Command: `{cmd}`.",
        "",
        "What: `areal-hpc submit configs/quickstart.yaml mode=slurm` (one `hf` server + one trainer rank, CPU) "
        "until the server is registered and the trainer wrote its first step, split into the launch path "
        "(CLI start-up, validation, submitit + sbatch, scheduling, driver, `srun --exact` steps; up to the "
        "last process of the run starting) and the processes' own start-up (interpreter, torch import, "
        "model build, HTTP up, registration). Baseline: `sbatch --wrap true` until COMPLETED, same cluster, same run.",
        "",
        "| measure | median | runs |",
        "| --- | --- | --- |",
        f"| baseline `sbatch --wrap true` round trip | {statistics.median(b):.2f} s | "
        + ", ".join(f"{x:.2f}" for x in b) + " |",
    ]
    for key, label in (("launch_overhead_s", "submit -> last run process started (launch overhead)"),
                       ("overhead_vs_baseline_s", "launch overhead - baseline (target <= 3 s)"),
                       ("submit_to_server_process_s", "submit -> server process started"),
                       ("submit_to_trainer_process_s", "submit -> trainer process started"),
                       ("model_load_s", "server process start -> registered ready (model load)"),
                       ("model_load_log_s", "same, from the server log (1 s resolution)"),
                       ("submit_to_server_ready_s", "submit -> server registered"),
                       ("submit_to_first_step_s", "submit -> trainer's first step"),
                       ("submit_returned_s", "`submit` returned (job RUNNING)")):
        if key in med:
            lines.append(f"| {label} | {med[key]:.2f} s | " + ", ".join(f"{x.get(key, float('nan')):.2f}" for x in r)
                         + " |")
    lines += ["", f"Verdict: launch overhead beyond a bare sbatch round trip is {med['overhead_vs_baseline_s']:.2f} s "
              f"({'within' if med['overhead_vs_baseline_s'] <= 3.0 else 'above'} the 3 s target); the rest of the "
              f"{med['submit_to_first_step_s']:.1f} s to the first step is process start-up and model load on a "
              "2-core machine shared with other work.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="quickstart submits and baseline round trips (default 3)")
    p.add_argument("--partition", default="debug")
    p.add_argument("--markdown", action="store_true", help="also print a docs/benchmarks.md section")
    a = p.parse_args(argv)
    cluster_env = None
    if not os.environ.get("SLURM_CONF"):
        cluster_env = start_cluster()
    root = Path(tempfile.mkdtemp(prefix="areal-slurm-bench-", dir="/tmp"))
    root.chmod(0o755)
    try:
        base = baseline(a.repeat, a.partition, root)
        runs = []
        for i in range(a.repeat):
            r = one_run(root, a.partition, f"bench{i}")
            if "launch_overhead_s" in r:
                r["overhead_vs_baseline_s"] = r["launch_overhead_s"] - statistics.median(base)
            runs.append(r)
        keys = {k for r in runs for k, v in r.items() if isinstance(v, float)}
        med = {k: statistics.median([r[k] for r in runs if k in r]) for k in sorted(keys)}
        ver = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()
        res = {"machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}",
               "slurm_version": ver.replace("slurm ", ""), "baseline": base,
               "baseline_median_s": statistics.median(base), "runs": runs, "median": med}
        print(json.dumps(res, indent=2))
        if a.markdown:
            print()
            print(markdown(res, "python tools/bench/slurm_overhead.py " + " ".join(argv or sys.argv[1:])))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if cluster_env is not None:
            subprocess.run(["bash", str(CLUSTER_SH), "stop"], env=cluster_env, capture_output=True, timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
