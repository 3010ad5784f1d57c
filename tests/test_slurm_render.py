"""The rendered `sbatch/allocation.sbatch` runs on a real (local, 4-node) Slurm cluster exactly as
the plan says: every step starts, servers and trainer run at the same time on the nodes the plan
gives them, each task sees the GPUs it asked for and no GPU is shared; and bad input submits
nothing. The steps run probes (`render(..., command=probe)`) in the exact srun shapes of a run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from areal_hpc.cli.main import main
from areal_hpc.config import load_config, load_resolved, run_dir, validate
from areal_hpc.config.allocation import nodes_needed
from areal_hpc.launch.slurm_submit import servers_plan
from areal_hpc.launch.plan import Plan, StepSpec, build_plan
from areal_hpc.launch.sbatch import render
from areal_hpc.registry import Registry
from test_cli import BAD_INPUTS
from helpers import run, wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}

# One task of a step. Every task marks its start, then waits until every task of every step has
# started (a rendezvous: it can only succeed if all steps run at the same time). Then it waits
# for `wait_n` records matching `wait_glob` (other tasks that must end first: with
# shutdown_server_on_exit=True the trainer outlives the servers, so the script's SIGTERM to
# the servers finds nothing to stop and every step ends COMPLETED; with False the servers
# outlive the trainer). The record: node step-id step-gpus cuda-visible start end met.
PROBE = r"""
out=$1; name=$2; total=$3; wait_glob=$4; wait_n=$5
id="$name-$SLURM_PROCID"
start=$(date +%s.%N)
touch "$out/start-$id"
shopt -s nullglob
met=0
for _ in $(seq 900); do
    s=("$out"/start-*)
    if [ "${#s[@]}" -ge "$total" ]; then met=1; break; fi
    sleep 0.1
done
sleep 1
if [ "$wait_n" -gt 0 ]; then
    for _ in $(seq 900); do
        e=("$out"/$wait_glob)
        if [ "${#e[@]}" -ge "$wait_n" ]; then break; fi
        sleep 0.1
    done
    sleep 1
fi
end=$(date +%s.%N)
echo "$SLURMD_NODENAME $SLURM_STEP_ID ${SLURM_STEP_GPUS:--} ${CUDA_VISIBLE_DEVICES:--} $start $end $met" \
    > "$out/task-$id.tmp"
mv "$out/task-$id.tmp" "$out/task-$id.txt"
"""






def job_fields(job_id: str) -> Dict[str, str]:
    out = run("scontrol", "show", "job", "-o", job_id)
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """Under /tmp: jobs run as root on the fake nodes and must reach it."""
    path = Path(tempfile.mkdtemp(prefix="areal-render-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(root: Path, *extra: str):
    base = ["mode=slurm", "cluster.n_nodes=2", "cluster.cpus_per_gpu=1", "cluster.mem_per_gpu_gb=1",
            "cluster.partition=debug", "cluster.time=00:05:00", "trainer.ppo.actor.path=toy:qwen3-h64-l1",
            "train_dataset.path=toy:sum", f"cluster.fileroot={root}", "shutdown_server_on_exit=True",
            "experiment_name=render"]
    given = {e.split("=", 1)[0] for e in extra}  # extra wins (a key given twice is an error)
    cfg = load_config(None, [b for b in base if b.split("=", 1)[0] not in given] + list(extra))
    return cfg, validate(cfg)


def run_rendered(cfg, plan: Plan, out: Path) -> tuple[str, Dict[str, List[dict]], str]:
    """Render the real template with probes, sbatch it, wait; (job id, task records by step, script)."""
    out.mkdir()
    total = sum(s.ntasks for s in plan.steps)
    server_tasks = sum(s.ntasks for s in plan.servers)
    trainer_tasks = plan.trainer.ntasks if plan.trainer else 0

    def probe(step: StepSpec) -> List[str]:
        if cfg.shutdown_server_on_exit:  # the trainer ends last; the script then stops the servers
            wait = ("task-server-*.txt", server_tasks) if step.role == "trainer" else ("-", 0)
        else:  # servers outlive the trainer; the script must keep the allocation until they end
            wait = ("task-trainer-*.txt", trainer_tasks) if step.role == "server" else ("-", 0)
        return ["bash", "-c", PROBE, "probe", str(out), step.name, str(total), wait[0], str(wait[1])]

    script = render("allocation.sbatch", cfg, plan, command=probe)
    Path(plan.run_dir, "logs").mkdir(parents=True, exist_ok=True)
    path = Path(plan.run_dir) / "allocation.sbatch"
    path.write_text(script)

    job_id = run("sbatch", "--parsable", str(path)).strip().split(";")[0]

    def finished():
        state = job_fields(job_id)["JobState"]
        return state if state in FINAL_STATES else None

    try:
        state = wait_until(finished, timeout=240, what=f"job {job_id} to finish")
    except AssertionError:
        subprocess.run(["scancel", job_id])
        raise
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(Path(plan.run_dir, "logs").glob("*")))
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{script}\n{logs}"

    records: Dict[str, List[dict]] = {s.name: [] for s in plan.steps}
    for f in sorted(out.glob("task-*.txt")):
        name = f.name[len("task-"):-len(".txt")].rsplit("-", 1)[0]
        node, step_id, step_gpus, cvd, start, end, met = f.read_text().split()
        records[name].append(dict(node=node, step=int(step_id), step_gpus=step_gpus, cvd=cvd,
                                  start=float(start), end=float(end), met=met == "1", file=f.name))
    for s in plan.steps:
        assert len(records[s.name]) == s.ntasks, f"{s.name}: {records[s.name]}\n{logs}"
        assert all(r["met"] for r in records[s.name]), f"{s.name} never saw all steps running: {records}"
    return job_id, records, script


def assert_concurrent(records: Dict[str, List[dict]]) -> None:
    tasks = [r for rs in records.values() for r in rs]
    assert max(r["start"] for r in tasks) < min(r["end"] for r in tasks), tasks


def assert_steps_completed_in_sacct(job_id: str, plan: Plan) -> None:
    want = {f"{plan.job_name}:{s.name}" for s in plan.steps}

    def states():
        out = run("sacct", "-j", job_id, "-n", "-P", "-o", "JobID,JobName,State")
        rows = [line.split("|") for line in out.splitlines() if line]
        by_name = {name: state for jid, name, state in rows if "." in jid}
        job = next((state for jid, _, state in rows if jid == job_id), None)
        batch = next((state for jid, _, state in rows if jid == f"{job_id}.batch"), None)
        ok = job == batch == "COMPLETED" and all(by_name.get(n) == "COMPLETED" for n in want)
        return rows if ok else None

    try:
        wait_until(states, timeout=90, what=f"sacct to show job {job_id} and steps {sorted(want)} COMPLETED")
    except AssertionError:
        print(run("sacct", "-j", job_id, "-o", "JobID,JobName%40,State,NodeList,AllocTRES%50"))
        raise


def test_rendered_allocation_runs_as_planned(slurm_cluster, shared_tmp):
    G = slurm_cluster.gpus_per_node
    cfg, alloc = make_config(shared_tmp / "root", "allocation_mode=sglang:d2t2+fsdp:d4",
                             f"cluster.n_gpus_per_node={G}", "trial_name=gpu")
    # Two servers of 2 GPUs fill node 0; the 4-rank trainer needs node 1.
    assert nodes_needed(alloc, G) == 2
    plan = build_plan(cfg, alloc, run_dir(cfg))
    servers, trainer = plan.servers, plan.trainer
    assert [s.relative_node for s in servers] == [0, 0] and trainer.relative_node == 1

    job_id, records, script = run_rendered(cfg, plan, shared_tmp / "out")
    assert script.count("srun ") == 3 and "--gres=none" not in script

    # Every step is its own Slurm step; each step's tasks share one step id.
    step_ids = {name: {r["step"] for r in rs} for name, rs in records.items()}
    assert all(len(ids) == 1 for ids in step_ids.values()), step_ids
    assert len({next(iter(ids)) for ids in step_ids.values()}) == len(plan.steps), step_ids

    assert_concurrent(records)

    # Placement: relative node k of the plan is the k-th node of the allocation.
    hostnames = run("scontrol", "show", "hostnames", job_fields(job_id)["NodeList"]).split()
    assert len(hostnames) == plan.nodes == 2, hostnames
    for step in plan.steps:
        nodes = {r["node"] for r in records[step.name]}
        assert nodes == {hostnames[step.relative_node]}, (step.name, nodes, hostnames)
    assert {r["node"] for s in servers for r in records[s.name]}.isdisjoint(
        {r["node"] for r in records[trainer.name]})

    # GPUs: each task sees what it asked for (servers 2 in one task, trainer 1 per task).
    used: Dict[tuple, str] = {}  # (node, gpu) -> step
    for step in plan.steps:
        for r in records[step.name]:
            cvd = r["cvd"].split(",") if r["cvd"] != "-" else []
            step_gpus = r["step_gpus"].split(",") if r["step_gpus"] != "-" else []
            assert len(cvd) == step.gpus_per_task, (step.name, r)
            assert len(step_gpus) == step.gpus_per_task, (step.name, r)
            for gpu in step_gpus:
                owner = used.setdefault((r["node"], gpu), f"{step.name}/{r['file']}")
                assert owner == f"{step.name}/{r['file']}", f"GPU {gpu} on {r['node']} used by {owner} and {r}"
    assert len(used) == sum(s.ntasks * s.gpus_per_task for s in plan.steps) == 8

    assert_steps_completed_in_sacct(job_id, plan)


def test_rendered_cpu_only_allocation_runs(slurm_cluster, shared_tmp):
    cfg, alloc = make_config(shared_tmp / "root", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             "trial_name=cpu")
    plan = build_plan(cfg, alloc, run_dir(cfg))
    assert plan.nodes == 1 and plan.gpus_per_node == 0
    assert [s.gpus_per_task for s in plan.steps] == [0, 0]

    job_id, records, script = run_rendered(cfg, plan, shared_tmp / "out")
    assert "--gres=gpu" not in script
    assert_concurrent(records)
    for step in plan.steps:
        for r in records[step.name]:
            assert r["step_gpus"] == "-", (step.name, r)  # no GPU handed to a CPU step
    assert_steps_completed_in_sacct(job_id, plan)


def test_rendered_servers_outlive_trainer_without_shutdown(slurm_cluster, shared_tmp):
    """shutdown_server_on_exit=False: when the trainer step ends, the servers stay up (the batch
    script must not return and end the allocation under them)."""
    cfg, alloc = make_config(shared_tmp / "root", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             "trial_name=keep", "shutdown_server_on_exit=False")
    plan = build_plan(cfg, alloc, run_dir(cfg))
    job_id, records, _ = run_rendered(cfg, plan, shared_tmp / "out")
    (server,), (trainer,) = records["server-0"], records["trainer"]
    assert server["end"] > trainer["end"], (server, trainer)
    assert_steps_completed_in_sacct(job_id, plan)


def _jobs_known() -> set:
    """Job ids slurmctld knows (finished ones stay for MinJobAge) plus those in accounting."""
    ids = set()
    for line in run("scontrol", "show", "job", "-o").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobId" in fields:
            ids.add(fields["JobId"])
    ids |= {line.strip() for line in run("sacct", "-n", "-X", "-a", "-o", "JobID").splitlines() if line.strip()}
    return ids


def test_bad_input_submits_nothing(slurm_cluster, shared_tmp, squeue_empty, capsys):
    wait_until(squeue_empty, timeout=120, what="the queue to drain before the test")
    before = _jobs_known()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    root = shared_tmp / "root"
    root.mkdir()
    failures = []
    for extra, key in BAD_INPUTS:
        argv = ["submit", QUICKSTART, "mode=slurm", "cluster.partition=debug", f"cluster.fileroot={root}", *extra]
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        err = capsys.readouterr().err.strip()
        if rc != 2:
            failures.append((extra, rc, err))
        assert squeue_empty(), f"{extra}: something was queued"
    assert not failures, failures
    assert list(root.iterdir()) == []  # nothing written either
    time.sleep(2)  # give a (wrongly) submitted job time to reach accounting before looking
    assert squeue_empty()
    # sacct: no job submitted since the test started (jobs of earlier tests may still be listed
    # when they ended in the same second, so compare submit times and ids).
    out = run("sacct", "-n", "-X", "-a", "-P", "-S", started, "-o", "JobID,Submit")
    new = [line for line in out.splitlines() if line and (line.split("|")[0] not in before
                                                           or line.split("|")[1] >= started)]
    assert not new, f"jobs recorded since {started}: {new}"
    assert _jobs_known() == before


def test_rendered_rollout_only_runner_runs_next_to_servers_filling_a_node(slurm_cluster, shared_tmp):
    """No trainer GPUs: the rollout runner's CPU step shares node 0 with servers that use all of its GPUs; the
    allocation must hold CPUs and memory for it too, or its `srun --exact` waits for the servers to end."""
    G = slurm_cluster.gpus_per_node
    cfg, alloc = make_config(shared_tmp / "root", f"allocation_mode=hf:d{G}", "trainer.type=null",
                             "valid_dataset.path=toy:sum", f"cluster.n_gpus_per_node={G}", "trial_name=rollout")
    plan = build_plan(cfg, alloc, run_dir(cfg))
    assert plan.nodes == 1 and {s.relative_node for s in plan.steps} == {0}
    job_id, records, _ = run_rendered(cfg, plan, shared_tmp / "out")
    assert_concurrent(records)
    assert_steps_completed_in_sacct(job_id, plan)


def _echo_script(root: Path, trial: str):
    """A two-step allocation script whose steps only echo, written into its run dir (logs/ made)."""
    cfg, alloc = make_config(root, "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0", f"trial_name={trial}")
    plan = build_plan(cfg, alloc, run_dir(cfg))
    path = Path(plan.run_dir) / "allocation.sbatch"
    Path(plan.run_dir, "logs").mkdir(parents=True)
    path.write_text(render("allocation.sbatch", cfg, plan, command=lambda s: ["bash", "-c", f"echo {s.name} ran"]))
    return plan, path


def test_rendered_steps_append_to_their_logs(slurm_cluster, shared_tmp):
    """A requeued allocation runs its script again: every step's log keeps what the last run wrote (srun truncates
    an --output file unless in append mode: each step's srun line says so, as the driver's do)."""
    plan, path = _echo_script(shared_tmp / "root", "append")
    for _ in range(2):  # as a requeue does: the same script again, same logs
        run("sbatch", "--wait", str(path), timeout=180)
    logs = Path(plan.run_dir, "logs")

    def written_by_step(name: str) -> str:
        # the script TERMs the servers once the trainer is done: one still tearing down after its echo gets
        # slurmstepd's "*** STEP ... CANCELLED ***" line in its log (a race of the test's instant steps)
        lines = (logs / name).read_text().splitlines(keepends=True)
        return "".join(line for line in lines if not line.startswith("slurmstepd"))

    assert written_by_step("trainer-0.log") == "trainer ran\n" * 2
    assert written_by_step("server-0.log") == "server-0 ran\n" * 2


def test_rendered_script_lets_servers_shut_down_when_the_trainer_ends(slurm_cluster, shared_tmp):
    """shutdown_server_on_exit=True: once the trainer step ends, the script stops the servers that still run. It sent
    SIGTERM to their srun clients, which answer it by killing the step: the server never saw a signal, did not
    deregister (its record stayed in the registry) and its step ended CANCELLED. The servers' tasks must get SIGTERM
    and end in their own time."""
    cfg, alloc = make_config(shared_tmp / "root", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             "trial_name=term")
    plan = build_plan(cfg, alloc, run_dir(cfg))
    out = shared_tmp / "out"
    out.mkdir()
    server = (f'trap \'sleep 1; echo "$SLURM_STEP_ID" > {out}/termed; exit 0\' TERM; touch {out}/up; '
              "while true; do sleep 0.1; done")
    trainer = f"for _ in $(seq 600); do [ -e {out}/up ] && exit 0; sleep 0.1; done; exit 1"
    script = render("allocation.sbatch", cfg, plan,
                    command=lambda s: ["bash", "-c", server if s.role == "server" else trainer])
    path = Path(plan.run_dir) / "allocation.sbatch"
    Path(plan.run_dir, "logs").mkdir(parents=True)
    path.write_text(script)
    job_id = run("sbatch", "--parsable", str(path)).strip().split(";")[0]
    state = wait_until(lambda: (s := job_fields(job_id)["JobState"]) in FINAL_STATES and s,
                       timeout=180, what=f"job {job_id} to finish")
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(Path(plan.run_dir, "logs").glob("*")))
    assert state == "COMPLETED" and (out / "termed").exists(), f"job {job_id} {state}; server not TERMed:\n{logs}"
    assert_steps_completed_in_sacct(job_id, plan)


def test_a_run_dir_with_a_space_gets_its_job_log(slurm_cluster, shared_tmp):
    """sbatch reads the quoted ``#SBATCH --output`` of a run dir with a space: the job's log is in the run's logs/
    (unquoted, sbatch took the path up to the space)."""
    plan, path = _echo_script(shared_tmp / "my root", "space")
    job_id = run("sbatch", "--parsable", "--wait", str(path), timeout=180).strip().split(";")[0]
    logs = Path(plan.run_dir, "logs")
    assert (logs / f"slurm-{job_id}.out").exists(), sorted(p.name for p in logs.iterdir())
    assert (logs / "trainer-0.log").read_text() == "trainer ran\n"


def test_steps_keep_their_environment_in_a_job_submitted_with_export_none(slurm_cluster, shared_tmp):
    """A job submitted with ``--export=NONE`` (cluster.sbatch_args, or SBATCH_EXPORT=NONE on the login node, as some
    sites set) has SLURM_EXPORT_ENV=NONE, which every srun of the job inherits: its steps got none of the environment
    the driver or the script gives them (HF_HOME and the offline switches, OMP_NUM_THREADS, the modules' PATH). Each
    step says ``--export=ALL``."""
    cfg, alloc = make_config(shared_tmp / "root", "allocation_mode=hf:d1+d1", "cluster.n_gpus_per_node=0",
                             "trial_name=export", "cluster.sbatch_args=[--export=NONE]")
    plan = build_plan(cfg, alloc, run_dir(cfg))
    out = shared_tmp / "out"
    out.mkdir()
    script = render("allocation.sbatch", cfg, plan, command=lambda s: [
        "/bin/bash", "-c", f'echo "${{HF_HOME:-unset}} ${{OMP_NUM_THREADS:-unset}}" > {out}/{s.name}'])
    path = Path(plan.run_dir) / "allocation.sbatch"
    Path(plan.run_dir, "logs").mkdir(parents=True)
    path.write_text(script)
    run("sbatch", "--wait", str(path), timeout=180)
    for step in plan.steps:
        got = (out / step.name).read_text().split()
        assert got == [step.env["HF_HOME"], step.env["OMP_NUM_THREADS"]], (step.name, got)


def test_stop_of_an_allocation_run_by_hand(slurm_cluster, shared_tmp):
    """`sbatch {run}/sbatch/allocation.sbatch` (no driver, no run record): `areal-hpc stop`, which the script's
    comment offers, posted a request no owner reads, waited its whole --timeout and then said from a login node that
    the steps were "not ours to kill", exit 1 (on their own host: SIGKILL, no checkpoint). From another host it now
    says at once how to stop it (`scancel --signal=TERM JOB`); on the steps' host it stops them with SIGTERM, so the
    trainer checkpoints."""
    names = [QUICKSTART, "mode=slurm", f"cluster.fileroot={shared_tmp}", "trial_name=byhand",
             "trainer.total_train_steps=100000", "saver.freq_steps=0"]
    assert main(["submit", *names, "--dry-run"]) == 0
    rd = next(shared_tmp.glob("*/quickstart/byhand"))
    job_id = run("sbatch", "--parsable", str(rd / "sbatch" / "allocation.sbatch")).strip().split(";")[0]
    stop = [sys.executable, "-m", "areal_hpc", "stop", *names, "--timeout", "60"]
    try:
        reg = Registry.for_run(rd, load_resolved(rd / "config.yaml").launcher)
        wait_until(lambda: (reg.get("", "trainer") or {}).get("step", 0) >= 3, 120, "the trainer's first steps")
        t0 = time.monotonic()  # from a login node: another hostname
        p = subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname login && exec "$@"', "sh", *stop],
                           capture_output=True, text=True, timeout=100)
        assert p.returncode == 2 and time.monotonic() - t0 < 30, (p.returncode, p.stdout, p.stderr)
        assert f"scancel --signal=TERM {job_id}" in p.stderr, p.stderr
        assert job_fields(job_id)["JobState"] == "RUNNING"
        p = subprocess.run(stop, capture_output=True, text=True, timeout=100)  # on the steps' host
        assert p.returncode == 0 and "timed out" not in p.stdout, (p.returncode, p.stdout, p.stderr)
        assert list((rd / "checkpoints").glob("step_*")), "the trainer did not checkpoint"
        wait_until(lambda: job_fields(job_id)["JobState"] in FINAL_STATES, 60, f"job {job_id} to end")
        # stopped, checkpointed: CANCELLED as a driver's stopped run (the script exited with the trainer's 130: the job
        # ended FAILED, 2:0 in sacct, as a crash would), and no success for --dependency=afterok
        def ended():
            row = run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode").strip()
            return row if row and not row.startswith(("RUNNING", "PENDING", "COMPLETING")) else None
        sacct = wait_until(ended, 60, "sacct to record the job's end")
        assert sacct.startswith("CANCELLED"), (sacct, (rd / "logs" / f"slurm-{job_id}.out").read_text())
    finally:
        subprocess.run(["scancel", job_id])


def test_a_server_job_of_a_run_whose_site_asks_gpus_as_gpus_n_is_accepted(slurm_cluster, shared_tmp):
    """``cluster.sbatch_args=[--gpus=4]`` (a site that wants GPUs asked that way) sized the run's allocation, and was
    copied as is into `add-servers --new-job`'s script of one 1-GPU server: sbatch refused it ("Invalid generic
    resource (gres) specification"), so no server could be added in a job of its own."""
    cfg, alloc = make_config(shared_tmp / "root", "allocation_mode=sglang:d2+fsdp:d2", "cluster.n_nodes=1",
                             "cluster.n_gpus_per_node=4", "cluster.sbatch_args=[--gpus=4]", "trial_name=gpus")
    rd = run_dir(cfg)
    rd.mkdir(parents=True)
    (rd / "plan.json").write_text(build_plan(cfg, alloc, rd).to_json())
    plan = servers_plan(cfg, rd, 1)
    script = render("add-servers.sbatch", cfg, plan)
    r = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stderr, script)
    assert "#SBATCH --gpus=1\n" in script
