"""The local throw-away Slurm cluster (tools/slurm/local-cluster.sh) behaves like a real one:
4 nodes with 4 GPUs each, concurrent exact-sized steps on different nodes, accounting, and
submitit end to end. Other Slurm tests rely on these facts."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers import run, wait_until

pytestmark = pytest.mark.slurm






FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def job_state(job_id: str) -> str:
    """The job's state from slurmctld (finished jobs stay visible for MinJobAge=300 s)."""
    out = run("scontrol", "show", "job", "-o", job_id)
    return next(f.split("=", 1)[1] for f in out.split() if f.startswith("JobState="))


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A scratch dir under /tmp: jobs run as root on the fake nodes and must reach it
    (pytest's tmp_path may live under a TMPDIR that a real cluster would not share)."""
    path = Path(tempfile.mkdtemp(prefix="areal-slurm-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_cluster_has_idle_nodes_with_gpus(slurm_cluster):
    assert os.environ["SLURM_CONF"] == slurm_cluster.conf
    lines = run("sinfo", "-h", "-N", "-p", slurm_cluster.partition, "-o", "%N %t %G").split("\n")
    nodes = {}
    for line in filter(None, lines):
        name, state, gres = line.split()
        nodes[name] = (state, gres)
    assert sorted(nodes) == slurm_cluster.nodes == ["n1", "n2", "n3", "n4"]
    for name, (state, gres) in nodes.items():
        assert state == "idle", f"{name} is {state}"
        assert gres == f"gpu:{slurm_cluster.gpus_per_node}", f"{name} has gres {gres}"
    for name in slurm_cluster.nodes:
        info = run("scontrol", "show", "node", name)
        assert f"gres/gpu={slurm_cluster.gpus_per_node}" in info  # CfgTRES


TASK_SCRIPT = """\
#!/bin/bash
# One task of a step: record where/when it ran and which GPUs it saw.
start=$(date +%s.%N)
sleep 2
end=$(date +%s.%N)
echo "$SLURMD_NODENAME $SLURM_STEP_ID ${SLURM_STEP_GPUS:--} ${CUDA_VISIBLE_DEVICES:--} $start $end" \\
    > "$1/task-$SLURM_STEP_ID-$SLURM_PROCID.txt"
"""

BATCH_SCRIPT = """\
#!/bin/bash
#SBATCH --job-name=areal-two-steps
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --gres=gpu:2
#SBATCH --mem=4G
#SBATCH --time=5
#SBATCH --output={out}/slurm-%j.out
set -eu
# Two differently shaped steps, concurrently, each on its own node. --exact plus explicit
# --gres/--mem make each step take exactly what it asks for (otherwise the second waits).
srun --nodes=1 --ntasks=1 --gres=gpu:2 --exact --mem=1G --relative=0 {task} {out} &
a=$!
srun --nodes=1 --ntasks=2 --ntasks-per-node=2 --gres=gpu:2 --gpus-per-task=1 --exact \\
    --mem=1G --relative=1 {task} {out} &
b=$!
wait $a
wait $b
"""


def test_two_concurrent_steps_on_different_nodes(slurm_cluster, shared_tmp):
    task = shared_tmp / "task.sh"
    task.write_text(TASK_SCRIPT)
    task.chmod(0o755)
    batch = shared_tmp / "job.sh"
    batch.write_text(BATCH_SCRIPT.format(out=shared_tmp, task=task))

    job_id = run("sbatch", "--parsable", str(batch)).strip().split(";")[0]
    # Poll ourselves: `sbatch --wait` checks only every few seconds and would double the time.
    def finished():
        state = job_state(job_id)
        return state if state in FINAL_STATES else None

    state = wait_until(finished, timeout=180, what=f"job {job_id} to finish")
    logs = "\n".join(p.read_text() for p in shared_tmp.glob("slurm-*.out"))
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{logs}"

    records = []
    for f in sorted(shared_tmp.glob("task-*.txt")):
        node, step, step_gpus, cvd, start, end = f.read_text().split()
        records.append(dict(node=node, step=int(step), step_gpus=step_gpus, cvd=cvd,
                            start=float(start), end=float(end)))
    steps = {r["step"] for r in records}
    assert len(records) == 3 and len(steps) == 2, records
    # Step A is the single-task one, step B the two-task one.
    by_step = {s: [r for r in records if r["step"] == s] for s in steps}
    (a,) = next(v for v in by_step.values() if len(v) == 1)
    b_tasks = next(v for v in by_step.values() if len(v) == 2)

    # Different nodes, both inside the allocation.
    assert {r["node"] for r in b_tasks} == {b_tasks[0]["node"]}
    assert a["node"] != b_tasks[0]["node"]
    assert {a["node"], b_tasks[0]["node"]} <= set(slurm_cluster.nodes)

    # Concurrent: the time intervals overlap.
    for r in b_tasks:
        assert max(a["start"], r["start"]) < min(a["end"], r["end"]), (a, r)

    # GPUs: A got 2. B got 2, one per task (--gpus-per-task binds each task to its own GPU:
    # both SLURM_STEP_GPUS and CUDA_VISIBLE_DEVICES then name just that task's GPU).
    assert len(a["step_gpus"].split(",")) == 2, a
    assert len(a["cvd"].split(",")) == 2, a
    for r in b_tasks:
        assert len(r["step_gpus"].split(",")) == 1, r
        assert len(r["cvd"].split(",")) == 1, r
    assert b_tasks[0]["cvd"] != b_tasks[1]["cvd"], b_tasks

    # Accounting saw the job and both steps complete (records reach slurmdbd shortly after).
    def states():
        out = run("sacct", "-j", job_id, "-n", "-P", "-o", "JobID,State")
        got = dict(line.split("|", 1) for line in out.splitlines() if line)
        want = [job_id, f"{job_id}.batch", f"{job_id}.0", f"{job_id}.1"]
        return got if all(got.get(k) == "COMPLETED" for k in want) else None

    try:
        wait_until(states, timeout=60, what=f"sacct to show job {job_id} and its steps COMPLETED")
    except AssertionError:
        print(run("sacct", "-j", job_id, "-o", "JobID,JobName,State,NodeList,AllocTRES%40"))
        raise


def test_submitit_job_returns_result(slurm_cluster, shared_tmp):
    submitit = pytest.importorskip("submitit")

    def answer() -> int:  # a local function: pickled by value, nothing to import on the node
        return 42

    executor = submitit.AutoExecutor(folder=shared_tmp / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=5, mem_gb=1,
                               cpus_per_task=1, name="areal-submitit-smoke")
    job = executor.submit(answer)
    wait_until(job.done, timeout=120, what=f"submitit job {job.job_id}", interval=0.5)
    assert job.result() == 42
    # submitit reads job states from sacct (accounting): it must see the job COMPLETED.
    wait_until(lambda: job.get_info(mode="force").get("State") == "COMPLETED", timeout=60,
               what=f"submitit to see job {job.job_id} COMPLETED via sacct", interval=0.5)
