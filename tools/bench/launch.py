#!/usr/bin/env python
"""Launch overhead: `areal-hpc submit` -> server registered -> trainer's first step, for the CPU
quickstart (one `hf` server, one trainer rank), beside the bare scheduler's own round trips in the
same run. All on this host; run dirs under /tmp.

    python tools/bench/launch.py slurm [--repeat 5] [--markdown]   # $SLURM_CONF, else a local cluster
    python tools/bench/launch.py ray [--address HOST:6379] [--repeat 3] [--markdown]
    python tools/bench/launch.py slurm --smoke                     # one run of each (CI)

``launch_overhead_s`` = the last run process's start - submit start (CLI start-up, validation,
scheduling, driver or placement groups, step creation); the rest of ``submit_to_first_step_s`` is
the processes' own start-up and model load (``model_load_s``: server process start -> ready).

* slurm: baseline ``sbatch --wrap true`` until slurmctld reports COMPLETED (polled every 20 ms,
  the floor any Slurm launcher pays); ``overhead_vs_baseline_s`` = launch overhead - baseline
  (target <= 3 s); ``model_load_log_s`` is the server log's own split at 1 s resolution.
* ray: baselines from a fresh driver (connect, first and warm task round trips, a placement group
  + actor answering: what the launcher does per step); the quickstart on 2 Ray nodes with 1 GPU
  each, and the same in mode=local: ``ray_minus_local_s`` is what Ray adds.

Prints one JSON object (and with ``--markdown`` a table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

from common import REPO, follow_launch, launch_figures, median, medians

CLUSTER_SH = REPO / "tools" / "slurm" / "local-cluster.sh"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SMALL_RUN = ["trial_name=t0", "rollout.batch_size=8", "rollout.n_samples=4", "trainer.total_train_steps=3",
             "saver.freq_steps=0", "stats.progress_bar=False"]
OBJECT_STORE = 100_000_000

ROWS = {  # figure key -> table label
    "slurm": [("baseline_sbatch_s", "baseline `sbatch --wrap true` round trip"),
              ("launch_overhead_s", "submit -> last run process started (launch overhead)"),
              ("overhead_vs_baseline_s", "launch overhead - baseline (target <= 3 s)"),
              ("submit_to_server_process_s", "submit -> server process started"),
              ("submit_to_trainer_process_s", "submit -> trainer process started"),
              ("model_load_s", "server process start -> registered ready (model load)"),
              ("model_load_log_s", "same, from the server log (1 s resolution)"),
              ("submit_to_server_ready_s", "submit -> server registered"),
              ("submit_to_first_step_s", "submit -> trainer's first step"),
              ("submit_returned_s", "`submit` returned (job RUNNING)")],
    "ray": [("ray_init_s", "bare Ray: connect a driver (`ray.init`)"),
            ("task_first_s", "bare Ray: first task round trip (starts a worker)"),
            ("task_warm_s", "bare Ray: warm task round trip (median of 50)"),
            ("pg_actor_s", "Ray: placement group ready + actor answering (per step)"),
            ("launch_overhead_s", "mode=ray: submit -> last run process started"),
            ("local_launch_overhead_s", "mode=local: the same"),
            ("ray_minus_local_s", "mode=ray minus mode=local"),
            ("model_load_s", "mode=ray: server process start -> registered ready (model load)"),
            ("submit_to_server_ready_s", "mode=ray: submit -> server registered"),
            ("submit_to_first_step_s", "mode=ray: submit -> trainer's first step")],
}


# ---------------------------------------------------------------------------- Slurm

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


def sbatch_baseline(repeat: int, partition: str, out_dir: Path) -> List[float]:
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


def _log_time(path: Path, pattern: str, day: datetime) -> Optional[float]:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if re.search(pattern, line):
                t = datetime.strptime(f"{day:%Y-%m-%d} {line.split()[0]}", "%Y-%m-%d %H:%M:%S")
                return t.timestamp()
    except (OSError, ValueError):
        pass
    return None


def slurm_run(root: Path, partition: str, name: str) -> Dict[str, float]:
    from areal_hpc.registry import Registry

    run = follow_launch(root, name, [
        "mode=slurm", f"cluster.fileroot={root}", "cluster.n_nodes=1", "cluster.n_gpus_per_node=4",
        "cluster.cpus_per_gpu=1", "cluster.mem_per_gpu_gb=1", f"cluster.partition={partition}",
        "cluster.time=00:20:00", f"experiment_name={name}", *SMALL_RUN], until_exit=False)
    rd = run["run_dir"]
    job_id = str((Registry.for_run(rd).get("", "run", live_only=False) or {}).get("job_id"))
    state = wait_final(job_id, poll_s=0.5)
    if state != "COMPLETED":
        raise RuntimeError(f"job {job_id} ended {state}:\n{run['output']}")
    res = {"submit_returned_s": run["marks"].get("submit_returned", time.time()) - run["t0"], **launch_figures(run)}
    day = datetime.fromtimestamp(run["t0"])
    srv_log = rd / "logs" / "server-0.log"
    log_entry = _log_time(srv_log, r"areal_hpc\.launch\.entry: server server-0 on", day)
    log_ready = _log_time(srv_log, r"server server-0 \(hf\) ready at", day)
    if log_entry and log_ready:
        res["model_load_log_s"] = log_ready - log_entry
    return res


def start_slurm() -> Dict[str, str]:
    env = dict(os.environ, AREAL_SLURM_DIR="/tmp/areal-slurm-bench", AREAL_SLURM_PORT_BASE="18500")
    r = subprocess.run(["bash", str(CLUSTER_SH), "start"], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"could not start a local cluster:\n{r.stdout}\n{r.stderr}")
    os.environ["SLURM_CONF"] = "/tmp/areal-slurm-bench/slurm.conf"
    return env


def bench_slurm(a, root: Path) -> Dict:
    cluster_env = None if os.environ.get("SLURM_CONF") else start_slurm()
    try:
        base = sbatch_baseline(a.repeat, a.partition, root)
        runs = [slurm_run(root, a.partition, f"bench{i}") for i in range(a.repeat)]
        for r in runs:
            if "launch_overhead_s" in r:
                r["overhead_vs_baseline_s"] = r["launch_overhead_s"] - median(base)
        ver = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()
        return {"slurm_version": ver.replace("slurm ", ""), "baseline": base,
                "runs": [dict(r, baseline_sbatch_s=b) for r, b in zip(runs, base)],
                "median": {"baseline_sbatch_s": median(base), **medians(runs)}}
    finally:
        if cluster_env is not None:
            subprocess.run(["bash", str(CLUSTER_SH), "stop"], env=cluster_env, capture_output=True, timeout=600)


# ---------------------------------------------------------------------------- Ray

RAY_BASELINE = r"""
import json, logging, statistics, sys, time
t0 = time.perf_counter()
import ray
from ray.util import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
t1 = time.perf_counter()
@ray.remote(num_cpus=1)
def noop():
    return 1
ray.get(noop.remote())
t2 = time.perf_counter()
warm = []
for _ in range(50):
    s = time.perf_counter(); ray.get(noop.remote()); warm.append(time.perf_counter() - s)
@ray.remote
class A:
    def ping(self):
        return 1
s = time.perf_counter()
pg = placement_group([{"CPU": 1, "GPU": 1}], strategy="STRICT_PACK")
ray.get(pg.ready())
a = A.options(num_cpus=1, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote()
ray.get(a.ping.remote())
pg_actor = time.perf_counter() - s
ray.kill(a); remove_placement_group(pg)
print(json.dumps({"ray_init_s": t1 - t0, "task_first_s": t2 - t1, "task_warm_s": statistics.median(warm),
                  "pg_actor_s": pg_actor}))
"""


def ray_run(root: Path, name: str, mode_words: List[str]) -> Dict[str, float]:
    run = follow_launch(root, name, [*mode_words, f"cluster.fileroot={root}", f"experiment_name={name}",
                                     "allocation_mode=hf:d1+d1", *SMALL_RUN], until_exit=True)
    if run["submit_rc"] != 0 or "first_step" not in run["marks"]:
        raise RuntimeError(f"submit {' '.join(mode_words)} failed ({run['submit_rc']}):\n{run['output']}")
    return launch_figures(run)


def bench_ray(a, root: Path) -> Dict:
    import ray
    from ray.cluster_utils import Cluster

    cluster = None
    if not a.address:
        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, num_gpus=0,
                                                                    object_store_memory=OBJECT_STORE))
        for _ in range(2):
            cluster.add_node(num_cpus=4, num_gpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
    address = a.address or cluster.address
    try:
        r = subprocess.run([sys.executable, "-c", RAY_BASELINE, address], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        base = json.loads(r.stdout.strip().splitlines()[-1])
        words = ["mode=ray", f"cluster.ray_address={address}", "cluster.n_nodes=2", "cluster.n_gpus_per_node=1",
                 "cluster.cpus_per_gpu=1"]
        runs = [ray_run(root, f"ray{i}", words) for i in range(a.repeat)]
        local = [ray_run(root, f"local{i}", ["mode=local"]) for i in range(a.repeat)]
        med, loc = medians(runs), medians(local)
        med.update(base, local_launch_overhead_s=loc.get("launch_overhead_s"))
        if "launch_overhead_s" in med and "launch_overhead_s" in loc:
            med["ray_minus_local_s"] = med["launch_overhead_s"] - loc["launch_overhead_s"]
        return {"ray_version": ray.__version__, "baseline": base, "runs": runs, "local_runs": local, "median": med}
    finally:
        if cluster is not None:
            cluster.shutdown()


def markdown(which: str, res: Dict) -> str:
    lines = ["| measure | median | runs |", "| --- | --- | --- |"]
    for key, label in ROWS[which]:
        v = res["median"].get(key)
        if v is not None:
            runs = ", ".join(f"{r[key]:.2f}" for r in res["runs"] if key in r)
            lines.append(f"| {label} | " + (f"{v * 1000:.1f} ms" if v < 0.1 else f"{v:.2f} s") + f" | {runs} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["slurm", "ray"])
    p.add_argument("--repeat", type=int, default=3, help="submits (and baseline round trips) per side")
    p.add_argument("--partition", default="debug", help="slurm: the partition")
    p.add_argument("--address", help="ray: an existing cluster (GCS host:port) with 2 nodes of >= 1 GPU")
    p.add_argument("--smoke", action="store_true", help="one run of each (CI)")
    p.add_argument("--markdown", action="store_true", help="also print a table for docs/benchmarks.md")
    a = p.parse_args(argv)
    if a.smoke:
        a.repeat = 1
    root = Path(tempfile.mkdtemp(prefix=f"areal-{a.which}-bench-", dir="/tmp"))
    root.chmod(0o755)
    try:
        res = bench_slurm(a, root) if a.which == "slurm" else bench_ray(a, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {"bench": f"launch_{a.which}", "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}",
           "repeat": a.repeat, **res}
    print(json.dumps(res, indent=2))
    if a.markdown:
        print("\n" + markdown(a.which, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
