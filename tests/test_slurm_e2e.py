"""mode=slurm end to end on a REAL local Slurm cluster (4 nodes x 4 fake GPUs, tests/conftest.py):
the CPU quickstart through `areal-hpc submit` -> submitit -> one allocation -> driver -> srun steps.

Covered: a run to completion with every step placed where the plan says and no GPU shared; add
servers mid-run (inside the allocation, and as a separate job once it is full); SIGKILL of the
trainer with shutdown_server_on_exit=False and a trainer restart through the live driver; SIGKILL
of a server; USR2 -> checkpoint -> submitit requeue -> resume; graceful `stop`; and a manual
`sbatch` of the rendered sbatch/allocation.sbatch. Processes run on CPU (the GPUs are fake).

Runs as root (jobs run as root on the fake nodes), everything under /tmp (the "shared" filesystem).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from helpers import wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

CLUSTER = ["mode=slurm", "cluster.n_nodes=2", "cluster.n_gpus_per_node=4", "cluster.cpus_per_gpu=1",
           "cluster.mem_per_gpu_gb=1", "cluster.partition=debug", "cluster.time=00:30:00"]
# small batches (the CPU is slow and shared); quick heartbeats so records expire within seconds
SMALL = ["rollout.batch_size=8", "rollout.n_samples=4", "stats.progress_bar=False", "launcher.heartbeat_s=1",
         "launcher.ttl_s=8"]


# ----------------------------------------------------------------------------- helpers



def sh(*cmd: str, timeout: float = 60) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def job_state(job_id: str) -> Optional[str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60)
    m = re.search(r"\bJobState=(\S+)", r.stdout)
    return m.group(1) if m else None


def job_field(job_id: str, field: str) -> Optional[str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60)
    m = re.search(rf"\b{field}=(\S+)", r.stdout)
    return m.group(1) if m else None


class Run:
    """One experiment of this module: its names, its run dir, the CLI on it."""

    def __init__(self, root: Path, exp: str):
        self.root, self.exp = root, exp
        self.names = [f"cluster.fileroot={root}", f"experiment_name={exp}", "trial_name=t0"]

    @property
    def dir(self) -> Path:
        return next(self.root.glob(f"*/{self.exp}/t0"))

    def cli(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "areal_hpc", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args[:1])} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                                 f"{r.stderr[-3000:]}\n{self.logs()}")
        return r

    def submit(self, *overrides: str, **kw) -> subprocess.CompletedProcess:
        return self.cli("submit", QUICKSTART, *CLUSTER, *SMALL, *self.names, *overrides, **kw)

    def status(self) -> Dict:
        return json.loads(self.cli("status", "--json", *self.names, timeout=120).stdout)

    def registry(self):
        from areal_hpc.registry import Registry

        return Registry(self.dir / "registry", ttl_s=8)

    def run_record(self) -> Dict:
        return self.registry().get("", "run", live_only=False) or {}

    @property
    def job_id(self) -> str:
        return str(self.run_record()["job_id"])

    def metrics(self) -> List[Dict]:
        p = self.dir / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]

    def steps(self) -> List[int]:
        return [m["step"] for m in self.metrics()]

    def logs(self, tail: int = 2500) -> str:
        try:
            d = self.dir / "logs"
        except StopIteration:
            return "(no run dir)"
        return "".join(f"\n--- {f.name}\n{f.read_text(errors='replace')[-tail:]}" for f in sorted(d.glob("*")))

    def wait_steps(self, n: int, timeout: float = 300) -> None:
        wait_until(lambda: len(self.metrics()) >= n, timeout, f"{self.exp}: {n} training steps\n{self.logs()}",
                   interval=0.05)  # a quickstart step takes 0.05-0.3 s: a kill after step n must land soon after it

    def wait_job(self, timeout: float = 600, want: Optional[str] = "COMPLETED") -> str:
        jid = self.job_id
        state = wait_until(lambda: (job_state(jid) in FINAL) and job_state(jid), timeout,
                           f"job {jid} to end\n{self.logs()}", interval=1.0)
        if want is not None:
            assert state == want, f"job {jid} ended {state}:\n{self.logs()}"
        return state


@pytest.fixture(scope="module")
def root(slurm_cluster) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="areal-slurm-e2e-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run(root, request) -> Iterator[Run]:
    exp = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40].strip("-")
    r = Run(root, exp)
    yield r
    # leave the cluster empty for the next test: cancel this experiment's jobs
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=60).stdout
    ids = [line.split()[0] for line in out.splitlines() if f"areal-{exp}-t0" in line]
    if ids:
        subprocess.run(["scancel", *ids], timeout=60)
        wait_until(lambda: not any(job_state(i) not in FINAL | {None} for i in ids), 120, "cancelled jobs to end")


def assert_contiguous(steps: List[int], total: int) -> None:
    assert steps == list(range(1, total + 1)), f"steps skipped or repeated: {steps}"


def trainer_placement(log_text: str) -> List[Dict[str, str]]:
    """`trainer rank R on HOST, gpus=[..] node=nK step=J.S SLURM_STEP_GPUS=.. CUDA_VISIBLE_DEVICES=..` lines."""
    out = []
    for m in re.finditer(r"trainer rank (\d+) on \S+ gpus=\S+ node=(\S+) step=(\S+) SLURM_STEP_GPUS=(\S*) "
                         r"CUDA_VISIBLE_DEVICES=(\S*)", log_text.replace(", gpus", " gpus")):
        out.append({"rank": m.group(1), "node": m.group(2), "step": m.group(3), "step_gpus": m.group(4),
                    "cvd": m.group(5)})
    return out


def server_placement(log_text: str) -> List[Dict[str, str]]:
    out = []
    for m in re.finditer(r"server (\S+) on \S+ gpus=\S+ node=(\S+) step=(\S+) SLURM_STEP_GPUS=(\S*) "
                         r"CUDA_VISIBLE_DEVICES=(\S*)", log_text.replace(", gpus", " gpus")):
        out.append({"id": m.group(1), "node": m.group(2), "step": m.group(3), "step_gpus": m.group(4),
                    "cvd": m.group(5)})
    return out


def check_placement(run: Run) -> None:
    """Every task ran on the node the plan gives its step (relative to the job's node list) with
    the plan's GPU ids, and no GPU was used by two steps."""
    plan = json.loads((run.dir / "plan.json").read_text())
    nodes = sh("scontrol", "show", "hostnames", job_field(run.job_id, "NodeList")).split()
    used = {}
    for step in plan["steps"]:
        if step["role"] == "server":
            got = server_placement((run.dir / "logs" / f"{step['name']}.log").read_text())
            got = [g for g in got if g["id"] == step["name"]]
        else:
            got = []
            for rank in range(step["ntasks"]):
                got += trainer_placement((run.dir / "logs" / f"trainer-{rank}.log").read_text())
        assert len(got) >= step["ntasks"], (step["name"], got)
        for i, g in enumerate(got[:step["ntasks"]]):
            node_index = step["relative_node"] + i // step["ntasks_per_node"]
            assert g["node"] == nodes[node_index], (step["name"], g, nodes)
            gpus = [int(x) for x in g["cvd"].split(",") if x]
            assert g["step_gpus"] == g["cvd"], g
            assert len(gpus) == step["gpus_per_task"], (step["name"], g)
            if step["ntasks_per_node"] == 1:
                assert gpus == step["gpu_ids"], (step["name"], g, step["gpu_ids"])
            else:
                assert set(gpus) <= set(step["gpu_ids"]), (step["name"], g, step["gpu_ids"])
            for gpu in gpus:
                assert (g["node"], gpu) not in used, f"GPU {gpu} on {g['node']}: {used[(g['node'], gpu)]} and {g}"
                used[(g["node"], gpu)] = g


# ----------------------------------------------------------------------------- (a) a run to completion

def test_quickstart_runs_to_completion(run):
    t0 = time.monotonic()
    p = run.submit("trainer.total_train_steps=16", "saver.freq_steps=0", "launcher.wait=True")
    wall = time.monotonic() - t0
    assert "ended COMPLETED" in p.stdout, p.stdout
    assert_contiguous(run.steps(), 16)
    rows = run.metrics()
    assert all(r["staleness_max"] <= 1 for r in rows)
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    check_placement(run)
    st = run.status()
    assert st["mode"] == "slurm" and st["job"]["state"] == "COMPLETED", st["job"]
    names = {s["name"].split(":")[-1]: s for s in st["job"]["steps"]}
    assert names["server-0"]["state"] in ("COMPLETED", "CANCELLED") and names["trainer"]["state"] == "COMPLETED"
    assert st["servers"] == [] and st["trainer"] is None  # deregistered on the way out
    assert (run.dir / "logs" / f"slurm-{run.job_id}.out").exists() and (run.dir / "logs" / "driver.log").exists()
    print(f"quickstart mode=slurm, 16 steps: {wall:.1f}s submit-to-end")


def test_gpus_in_sbatch_args_do_not_reach_the_steps(run):
    """A site that wants GPUs asked as ``--gpus=N`` (cluster.sbatch_args): every srun inherited SLURM_GPUS=N, so
    server-0's step took all of the node's GPUs and the trainer's waited for ever (the run hung, never a step)."""
    p = run.submit("trainer.total_train_steps=3", "saver.freq_steps=0", "launcher.wait=True",
                   "cluster.sbatch_args=[--gpus=4]", timeout=240)
    assert "ended COMPLETED" in p.stdout, p.stdout
    check_placement(run)


def test_multi_node_placement(run):
    # 4 servers fill node 0, a 2-rank trainer gets node 1: each task on its planned node and GPU
    run.submit("allocation_mode=hf.d4p1m1+d2p1m1", "trainer.total_train_steps=3", "saver.freq_steps=0",
               "launcher.wait=True")
    plan = json.loads((run.dir / "plan.json").read_text())
    assert plan["nodes"] == 2 and {s["relative_node"] for s in plan["steps"]} == {0, 1}
    assert_contiguous(run.steps(), 3)
    check_placement(run)


def test_trainer_across_two_nodes(run):
    # 2 servers fill node 0, a 4-rank trainer spans nodes 1-2 (2 GPUs a node): its ranks meet across nodes
    cluster = [c for c in CLUSTER if not c.startswith(("cluster.n_nodes=", "cluster.n_gpus_per_node="))]
    run.cli("submit", QUICKSTART, *cluster, *SMALL, *run.names, "cluster.n_nodes=3", "cluster.n_gpus_per_node=2",
            "allocation_mode=hf.d2p1m1+d4p1m1", "trainer.total_train_steps=3", "saver.freq_steps=0",
            "launcher.wait=True", timeout=900)
    plan = json.loads((run.dir / "plan.json").read_text())
    trainer = next(s for s in plan["steps"] if s["role"] == "trainer")
    assert plan["nodes"] == 3 and (trainer["relative_node"], trainer["nodes"], trainer["ntasks"]) == (1, 2, 4), plan
    assert_contiguous(run.steps(), 3)
    check_placement(run)
    st = run.status()
    assert st["state"] == "COMPLETED", st


@pytest.mark.slow
def test_quickstart_learns_on_slurm(root, request):
    # The quickstart's own batch size: reward rises like in mode=local. Mean of the first / last 10
    # steps: ~0.06 -> 0.25-0.36 at step 80 over 16 seeds in mode=local (lr 2e-4); 80 steps, because
    # a CI run under load once learned at half the pace.
    r = Run(root, "learn")
    r.cli("submit", QUICKSTART, *CLUSTER, *r.names, "stats.progress_bar=False", "trainer.total_train_steps=80",
          "saver.freq_steps=0", "launcher.wait=True", timeout=1800)
    rewards = [m["reward_mean"] for m in r.metrics()]
    assert_contiguous(r.steps(), 80)
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, (first, last)


# ----------------------------------------------------------------------------- (b) add servers mid-run

def test_add_servers_mid_run(run):
    run.submit("trainer.total_train_steps=100000", "saver.freq_steps=0")
    run.wait_steps(3)
    version_before = run.metrics()[-1]["version"]
    t_add = time.monotonic()
    p = run.cli("add-servers", "count=1", *run.names)
    assert "server-1" in p.stdout, p.stdout
    added_s = time.monotonic() - t_add
    reg = run.registry()
    rec = reg.get("servers", "server-1")
    assert rec is not None and rec["state"] in ("ready", "paused") and rec["slurm_job_id"] == run.job_id
    # it loaded the run's current weights before it registered, not the initial ones
    loaded = re.findall(r"loaded published weights v(\d+)", (run.dir / "logs" / "server-1.log").read_text())
    assert loaded and int(loaded[0]) >= version_before, loaded
    # the trainer picks it up within one heartbeat: the next weight updates reach both servers
    t_ready = time.monotonic()
    n_rows = len(run.metrics())
    wait_until(lambda: any(m.get("servers_updated") == 2 for m in run.metrics()[n_rows:]), 30,
               f"a weight update reaching both servers\n{run.logs()}", interval=0.2)
    picked_s = time.monotonic() - t_ready
    st = run.status()
    ids = {s["id"]: s for s in st["servers"]}
    assert set(ids) == {"server-0", "server-1"} and all(s["healthy"] for s in ids.values()), st["servers"]
    assert ids["server-1"]["slurm_step"] is not None
    # the allocation (1 node, 4 GPUs: 2 servers + trainer) has room for one more of two: the other
    # is a separate job whose server joins the same run, and the command waits for both
    p = run.cli("add-servers", "count=2", *run.names)
    assert "room for 1 of 2" in p.stdout and "separate job" in p.stdout, p.stdout
    assert "added 2 server(s): server-2, server-3" in p.stdout, p.stdout
    p = run.cli("add-servers", "count=1", "--new-job", *run.names)  # a job of its own, room or not
    assert "added 1 server(s): server-4 (job" in p.stdout, p.stdout
    st = run.status()
    ids = {s["id"]: s for s in st["servers"]}
    assert set(ids) == {f"server-{i}" for i in range(5)}, st["servers"]
    jobs = sorted(run.registry().list("jobs", live_only=False), key=int)
    assert len(jobs) == 2 and run.job_id not in jobs
    assert sorted(((j["job_id"], j["state"], j["servers"]) for j in st["server_jobs"]), key=lambda j: int(j[0])) == [
        (jobs[0], "RUNNING", ["server-3"]), (jobs[1], "RUNNING", ["server-4"])]
    print(f"add-servers: registered in {added_s:.1f}s, in the trainer's weight updates {picked_s:.1f}s later")
    # graceful stop: trainer checkpoints, servers deregister, both jobs end
    p = run.cli("stop", *run.names, "--timeout", "180")
    assert "stopped" in p.stdout, p.stdout
    assert run.registry().list("servers") == {}
    assert any((run.dir / "checkpoints").glob("step_*")), "no checkpoint on stop"
    wait_until(lambda: all(job_state(j) in FINAL for j in [run.job_id, *jobs]), 120, "every job to end")
    # stopped on purpose before the trainer finished: CANCELLED (not COMPLETED, a success), status STOPPED
    assert job_state(run.job_id) == "CANCELLED"
    assert run.status()["state"] == "STOPPED"


# ----------------------------------------------------------------------------- (c) trainer killed, restarted

def test_trainer_sigkill_and_restart_through_driver(run):
    # max_restarts=0: the restart by hand (the driver restarts a dead trainer itself by default)
    run.submit("trainer.total_train_steps=24", "saver.freq_steps=4", "shutdown_server_on_exit=False",
               "trainer.max_restarts=0")
    run.wait_steps(9)
    reg = run.registry()
    servers_before = {k: (v["pid"], v["slurm_step_id"]) for k, v in reg.list("servers").items()}
    trainer = reg.get("", "trainer")
    assert trainer is not None and servers_before
    os.kill(int(trainer["pid"]), signal.SIGKILL)
    wait_until(lambda: run.run_record().get("trainer_rc") not in (None, 0), 60, "the driver to see the trainer die")
    assert reg.get("", "trainer") is None  # its record went with it: a restart is not blocked by the TTL
    assert job_state(run.job_id) == "RUNNING"
    servers_after = {k: (v["pid"], v["slurm_step_id"]) for k, v in reg.list("servers").items()}
    assert servers_after == servers_before
    killed_at = max(run.steps())
    # the same submit with min_required_servers: a start_trainer request to the live driver
    t0 = time.monotonic()
    p = run.submit("trainer.total_train_steps=24", "saver.freq_steps=4", "shutdown_server_on_exit=False",
                   "trainer.max_restarts=0", "min_required_servers=1", "launcher.wait=True")
    assert "asked its driver to start a trainer" in p.stdout, p.stdout
    print(f"trainer restart through the driver: {time.monotonic() - t0:.1f}s to finish")
    assert_contiguous(run.steps(), 24)
    log = (run.dir / "logs" / "trainer-0.log").read_text()
    rec = re.findall(r"recovered from checkpoint: step (\d+)", log)
    assert rec and int(rec[-1]) >= 4 and int(rec[-1]) <= killed_at, (rec, killed_at)
    # servers were never restarted; the job is still up (shutdown_server_on_exit=False) until stop
    servers_end = {k: (v["pid"], v["slurm_step_id"]) for k, v in reg.list("servers").items()}
    assert servers_end == servers_before
    steps = {s["name"].split(":")[-1]: s for s in run.status()["job"]["steps"] if s["name"].endswith("trainer")}
    assert job_state(run.job_id) == "RUNNING", steps
    p = run.cli("stop", *run.names, "--timeout", "120")
    assert "stopped" in p.stdout
    assert run.wait_job(120) == "COMPLETED"


# ----------------------------------------------------------------------------- (d) a server killed

def test_server_sigkill_run_completes(run):
    # shutdown_server_on_exit=False keeps the job (and server-0) up after the trainer, so status can
    # be read once the killed server's record has expired even if training finished first
    run.submit("allocation_mode=hf.d2p1m1+d1p1m1", "trainer.total_train_steps=40", "saver.freq_steps=0",
               "shutdown_server_on_exit=False")
    run.wait_steps(3)
    reg = run.registry()
    victim = reg.get("servers", "server-1")
    survivor = reg.get("servers", "server-0")
    os.kill(int(victim["pid"]), signal.SIGKILL)
    killed = time.monotonic()

    def gone():
        st = run.status()
        return {s["id"] for s in st["servers"]} == {"server-0"} and st

    st = wait_until(gone, 60, f"server-1 to disappear from status\n{run.logs()}")
    print(f"killed server gone from status after {time.monotonic() - killed:.1f}s")
    assert st["servers"][0]["pid"] == survivor["pid"] and st["servers"][0]["healthy"]
    run.wait_steps(40, timeout=600)
    wait_until(lambda: run.run_record().get("trainer_rc") == 0, 120, "the trainer to finish")
    assert_contiguous(run.steps(), 40)
    assert "server-1 exited with" in (run.dir / "logs" / "driver.log").read_text()
    run.cli("stop", *run.names, "--timeout", "120")
    run.wait_job(120)


# ----------------------------------------------------------------------------- (e) USR2: checkpoint, requeue, resume

def test_usr2_checkpoints_requeues_and_resumes(run):
    run.submit("trainer.total_train_steps=30", "saver.freq_steps=0")
    run.wait_steps(5)
    jid = run.job_id
    sh("scancel", "--signal=USR2", "--batch", jid)  # what Slurm sends 90 s before the time limit
    wait_until(lambda: job_field(jid, "Restarts") == "1", 180, f"job {jid} to be requeued\n{run.logs()}")
    ckpts = sorted(p.name for p in (run.dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    assert ckpts, "no checkpoint before the requeue"
    saved = int(ckpts[-1].split("_")[1])
    # Slurm holds a requeued job for ~2 minutes (BeginTime); start it sooner (root may). Not in the
    # same second as the requeue: slurmd refuses a credential issued in the second it revoked the
    # old one ("Job credential revoked").
    wait_until(lambda: job_state(jid) == "PENDING", 120, f"job {jid} pending again")
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], timeout=60)
    assert run.wait_job(600) == "COMPLETED"
    assert_contiguous(run.steps(), 30)
    log = (run.dir / "logs" / "trainer-0.log").read_text()
    assert f"recovered from checkpoint: step {saved}" in log
    out = (run.dir / "logs" / f"slurm-{jid}.out").read_text()
    assert "Requeued job" in out and "requeued 1x" in (run.dir / "logs" / "driver.log").read_text()


# ----------------------------------------------------------------------------- (f) the rendered sbatch script

def test_manual_sbatch_of_rendered_script(run):
    run.submit("trainer.total_train_steps=8", "saver.freq_steps=0", "--dry-run")
    script = run.dir / "sbatch" / "allocation.sbatch"
    assert script.exists() and not run.metrics()
    jid = sh("sbatch", "--parsable", str(script)).strip().split(";")[0]
    state = wait_until(lambda: job_state(jid) in FINAL and job_state(jid), 600, f"job {jid}\n{run.logs()}", 1.0)
    assert state == "COMPLETED", run.logs()
    assert_contiguous(run.steps(), 8)
