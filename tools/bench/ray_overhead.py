"""Launch overhead of mode=ray: `areal-hpc submit` -> servers registered -> trainer's first step,
beside bare Ray round trips on the same cluster in the same run.

    python tools/bench/ray_overhead.py                      # starts a 2-node Ray cluster on this host
    python tools/bench/ray_overhead.py --address HOST:6379 --repeat 3 --markdown

What is measured (wall clock, all on this host; run dirs under /tmp), as tools/bench/slurm_overhead.py
does for Slurm:

* Baselines, from a fresh Ray driver: ``ray_init_s`` (connect), ``task_first_s`` (the first
  ``ray.get(noop.remote())``: a worker is started), ``task_warm_s`` (median of 50 more),
  ``pg_actor_s`` (a one-bundle placement group ready + an actor in it answering a call: what the
  launcher does per step before starting the step's process).
* For the quickstart on Ray (``hf:d1+d1`` on 2 nodes with 1 "GPU" each: one server on the first, one
  trainer rank on the second), from the moment ``areal-hpc submit`` is started: when each process of
  the run started (``/proc/<pid>`` start times of the server and trainer pids from their registry
  records), when the server registered ready and when the first step was written.
* ``launch_overhead_s`` = last process start - submit start: CLI start-up, validation, connecting,
  placement groups, actors, process start. The rest of ``submit_to_first_step_s`` is the processes'
  own start-up and the model load (``model_load_s``: server process start -> registered ready).
* The same quickstart in mode=local gives ``local_launch_overhead_s``; ``ray_minus_local_s`` is what
  Ray adds.

Prints one JSON object (and with ``--markdown`` a section for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_overhead import proc_start_time  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
OBJECT_STORE = 100_000_000

BASELINE = r"""
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


def baseline(address: str) -> Dict[str, float]:
    r = subprocess.run([sys.executable, "-c", BASELINE, address], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_run(root: Path, name: str, mode_words: List[str]) -> Dict[str, float]:
    from areal_hpc.registry import Registry

    overrides = [*mode_words, f"cluster.fileroot={root}", f"experiment_name={name}", "trial_name=t0",
                 "allocation_mode=hf:d1+d1", "rollout.batch_size=8", "rollout.n_samples=4",
                 "trainer.total_train_steps=3", "saver.freq_steps=0", "stats.progress_bar=False"]
    t0 = time.time()
    submit = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", str(QUICKSTART), *overrides],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    rd, reg = None, None
    marks: Dict[str, float] = {}
    starts: Dict[str, Optional[float]] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and "first_step" not in marks and submit.poll() is None:
        now = time.time()
        if rd is None:
            rd = next(root.glob(f"*/{name}/t0"), None)
            if rd is None:
                time.sleep(0.02)
                continue
            reg = Registry.for_run(rd)
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
    out, _ = submit.communicate(timeout=600)
    if submit.returncode != 0 or "first_step" not in marks:
        raise RuntimeError(f"submit {' '.join(mode_words)} failed ({submit.returncode}):\n{out}")
    res = {"submit_to_server_ready_s": marks["server_ready"] - t0, "submit_to_first_step_s": marks["first_step"] - t0}
    if starts.get("server") and starts.get("trainer"):
        res.update({"submit_to_server_process_s": starts["server"] - t0,
                    "submit_to_trainer_process_s": starts["trainer"] - t0,
                    "launch_overhead_s": max(starts["server"], starts["trainer"]) - t0,
                    "model_load_s": marks["server_ready"] - starts["server"]})
    return res


def start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, num_gpus=0,
                                                                object_store_memory=OBJECT_STORE))
    for _ in range(2):
        cluster.add_node(num_cpus=4, num_gpus=1, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    return cluster


def _median(runs: List[Dict[str, float]]) -> Dict[str, float]:
    keys = sorted({k for r in runs for k in r})
    return {k: statistics.median([r[k] for r in runs if k in r]) for k in keys}


def markdown(res: Dict, cmd: str) -> str:
    b, med, loc = res["baseline"], res["median"], res["local_median"]
    rows = [("Ray: connect a driver (`ray.init`)", b["ray_init_s"]),
            ("Ray: first task round trip (starts a worker)", b["task_first_s"]),
            ("Ray: warm task round trip (median of 50)", b["task_warm_s"]),
            ("Ray: placement group ready + actor answering (per step)", b["pg_actor_s"]),
            ("mode=ray: submit -> last run process started (launch overhead)", med.get("launch_overhead_s")),
            ("mode=local: the same", loc.get("launch_overhead_s")),
            ("mode=ray minus mode=local", res.get("ray_minus_local_s")),
            ("mode=ray: server process start -> registered ready (model load)", med.get("model_load_s")),
            ("mode=ray: submit -> server registered", med.get("submit_to_server_ready_s")),
            ("mode=ray: submit -> trainer's first step", med.get("submit_to_first_step_s"))]
    lines = ["## Ray launch overhead", "",
             f"Machine: {res['machine']}; Ray {res['ray_version']}, a cluster of a head and 2 nodes on this one "
             f"host (ray.cluster_utils; 1 declared GPU per node). Command: `{cmd}`. Medians of {res['repeat']} runs.",
             "", "| measure | median |", "| --- | --- |"]
    lines += [f"| {label} | " + (f"{v * 1000:.1f} ms" if v < 0.1 else f"{v:.2f} s") + " |"
              for label, v in rows if v is not None]
    return "\n".join(lines + [""])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="an existing Ray cluster (GCS host:port) with 2 nodes of >= 1 GPU")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--markdown", action="store_true", help="also print a docs/benchmarks.md section")
    a = p.parse_args(argv)
    import ray

    cluster = None if a.address else start_cluster()
    address = a.address or cluster.address
    root = Path(tempfile.mkdtemp(prefix="areal-ray-bench-", dir="/tmp"))
    try:
        base = baseline(address)
        ray_words = ["mode=ray", f"cluster.ray_address={address}", "cluster.n_nodes=2", "cluster.n_gpus_per_node=1",
                     "cluster.cpus_per_gpu=1"]
        runs = [one_run(root, f"ray{i}", ray_words) for i in range(a.repeat)]
        local = [one_run(root, f"local{i}", ["mode=local"]) for i in range(a.repeat)]
        med, loc = _median(runs), _median(local)
        res = {"machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}",
               "ray_version": ray.__version__, "repeat": a.repeat, "baseline": base, "runs": runs, "median": med,
               "local_runs": local, "local_median": loc}
        if "launch_overhead_s" in med and "launch_overhead_s" in loc:
            res["ray_minus_local_s"] = med["launch_overhead_s"] - loc["launch_overhead_s"]
        print(json.dumps(res, indent=2))
        if a.markdown:
            print()
            print(markdown(res, "python tools/bench/ray_overhead.py " + " ".join(argv or sys.argv[1:])))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if cluster is not None:
            cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
