"""mode=ray on a real multi-node Ray cluster started on this machine (ray.cluster_utils: a head
without resources and two nodes with 2 declared GPUs each), the real CLI, real servers/trainers."""

import ast
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import time

import pytest
from helpers import wait_until
from test_e2e_local import QUICKSTART, SMALL, metrics, run_dir, submit, wait_for_steps

from areal_hpc.launch.outcome import latest_checkpoint_step
from areal_hpc.registry import free_port

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason='ray is not installed (pip install "areal-hpc[ray]")')
OBJECT_STORE = 100_000_000  # bytes per node: 2 cores / 24 GB machines
GPUS_PER_NODE = 2
# the cluster's nodes declare 8 logical CPUs: steps ask cluster.cpus_per_gpu=1 each


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, num_gpus=0,
                                                                object_store_memory=OBJECT_STORE))
    for _ in range(2):
        cluster.add_node(num_cpus=8, num_gpus=GPUS_PER_NODE, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    return ray_cluster.address


def on_ray(address, n_gpus=1, *more):
    """Overrides for a run on the test cluster: ``n_gpus`` per plan node, on 2 nodes."""
    return ["mode=ray", f"cluster.ray_address={address}", "cluster.n_nodes=2", f"cluster.n_gpus_per_node={n_gpus}",
            "cluster.cpus_per_gpu=1", *more]


def cli(tmp_path, *words, timeout=300):
    return subprocess.run([sys.executable, "-m", "areal_hpc", *words, f"cluster.fileroot={tmp_path}",
                           "experiment_name=quickstart", "trial_name=run0"], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def status(tmp_path):
    p = cli(tmp_path, "status", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def ray_query(address, code: str):
    """``code`` (an expression over ``ray``) evaluated by a separate Ray driver: what the cluster holds."""
    script = ("import json, logging, ray; from ray.util import placement_group_table\n"
              f"ray.init(address={address!r}, logging_level=logging.ERROR, log_to_driver=False)\n"
              f"print(json.dumps({code}))")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def leftovers(address):
    """Every live actor and placement group of the whole cluster (any namespace)."""
    return ray_query(address, "[ray.util.list_named_actors(all_namespaces=True), "
                              "[v['name'] for v in placement_group_table().values() if v['state'] != 'REMOVED']]")


def steps_of(rd):
    return json.loads((rd / "registry" / "run.json").read_text())["steps"]


def started(rd):
    """Each step's placement as the owner logged it when it started the step (the latest start)."""
    out = {}
    for m in re.finditer(r"started (\S+): (\{.*\})$", (rd / "logs" / "driver.log").read_text(), re.M):
        out[m.group(1)] = ast.literal_eval(m.group(2))
    return out


def ray_nodes(rd):
    return json.loads((rd / "registry" / "ray.json").read_text())["nodes"]


@needs_ray
def test_quickstart_learns_on_ray(tmp_path, ray_address):
    """Server on the run's first Ray node, trainer on the second, as the plan places them; it learns."""
    submit(tmp_path, *on_ray(ray_address), "allocation_mode=hf:d1+d1", "trainer.total_train_steps=80",
           "saver.freq_steps=0", timeout=900)
    rd = run_dir(tmp_path)
    r = [x["reward_mean"] for x in metrics(rd)]
    first, last = sum(r[:10]) / 10, sum(r[-10:]) / 10
    assert last > first + 0.1, (first, last)
    nodes, steps = ray_nodes(rd), started(rd)
    assert len(set(nodes)) == 2
    assert steps["server-0"]["nodes"] == [nodes[0]] and len(steps["server-0"]["gpus"][0]) == 1, steps
    assert steps["trainer"]["nodes"] == [nodes[1]] and len(steps["trainer"]["gpus"][0]) == 1, steps
    assert leftovers(ray_address) == [[], []]


@needs_ray
def test_elastic_run_on_ray(tmp_path, ray_address):
    """Two trainer ranks on one node's two GPUs, a server on the other node; add-servers mid-run
    lands on the free GPU; a killed trainer actor is restarted from its checkpoint with the servers
    untouched and no step lost or repeated; `stop` leaves no actor or placement group behind."""
    owner = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                              "stats.progress_bar=False", "trainer.total_train_steps=100000", *SMALL[:-1],
                              "saver.freq_steps=2", *on_ray(ray_address, GPUS_PER_NODE), "allocation_mode=hf:d1+d2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        rd = wait_for_steps(tmp_path, 2)
        nodes, steps = ray_nodes(rd), steps_of(rd)
        server0, trainer = steps["server-0"], steps["trainer"]
        assert server0["nodes"] == [nodes[0]] and len(server0["gpus"][0]) == 1, steps
        assert trainer["nodes"] == [nodes[1], nodes[1]]
        assert sorted(g for gs in trainer["gpus"] for g in gs) == ["0", "1"]
        for rank in (0, 1):  # the environment srun gives a task: rank, world size, its GPU
            head = (rd / "logs" / f"trainer-{rank}.log").read_text()
            assert f"trainer rank {rank} on" in head and f"gpus=[{trainer['gpus'][rank][0]}]" in head
        st = status(tmp_path)
        assert st["trainer"]["world_size"] == 2
        groups = {g["name"].rsplit("/", 1)[1].split(".")[0] for g in st["ray"]["placement_groups"]}
        assert groups == {"server-0", "trainer"}

        add = cli(tmp_path, "add-servers", "count=1")
        assert add.returncode == 0 and "server-1" in add.stdout, add.stdout + add.stderr
        server1 = steps_of(rd)["server-1"]
        assert server1["nodes"] == [nodes[0]] and server1["gpus"] != server0["gpus"], (server0, server1)
        servers = {name: steps_of(rd)[name]["pids"] for name in ("server-0", "server-1")}

        ckpt = wait_until(lambda: latest_checkpoint_step(rd / "checkpoints"), 120, "a checkpoint", interval=0.5)
        killed = trainer["actors"][1]
        ray_query(ray_address, f"ray.kill(ray.get_actor({killed!r}, namespace='areal-hpc')) or 1")
        wait_until(lambda: json.loads((rd / "registry" / "run.json").read_text()).get("trainer_restarts") == 1, 120,
                   "the owner to restart the trainer", interval=0.5)
        recovered = wait_until(lambda: re.findall(r"recovered from checkpoint: step (\d+)",
                                                  (rd / "logs" / "trainer-0.log").read_text()), 120, "the recovery")
        assert int(recovered[-1]) >= ckpt, (recovered, ckpt)
        wait_until(lambda: len(metrics(rd)) >= int(recovered[-1]) + 3, 300, "steps after the restart", interval=0.5)
        now = steps_of(rd)
        assert now["trainer"]["actors"] != trainer["actors"] and now["trainer"]["nodes"] == [nodes[1], nodes[1]]
        assert {name: now[name]["pids"] for name in servers} == servers  # the servers were not touched
        assert [m["step"] for m in metrics(rd)] == list(range(1, len(metrics(rd)) + 1))
        driver_log = (rd / "logs" / "driver.log").read_text()
        assert "killed" in driver_log or "SIGKILL" in driver_log

        stop = cli(tmp_path, "stop", "--timeout", "120", timeout=200)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert owner.wait(60) == 130  # a stopped run, as with mode=local
        st = status(tmp_path)
        assert st["state"] == "STOPPED" and st["servers"] == [] and st["trainer"] is None
        assert st["ray"]["placement_groups"] == [] and st["ray"]["actors"] == []
        assert leftovers(ray_address) == [[], []]
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(30)


@needs_ray
def test_servers_outlive_the_submit_and_a_restart_reuses_them_on_ray(tmp_path, ray_address):
    """shutdown_server_on_exit=False: the server is a detached actor that outlives `submit`; a
    later `submit ... min_required_servers=1` starts only a trainer, which continues the step count;
    `stop` with no owner left removes the detached actor and placement group."""
    common = [*SMALL[:-1], "shutdown_server_on_exit=False", "saver.freq_steps=2", *on_ray(ray_address),
              "allocation_mode=hf:d1+d1"]
    submit(tmp_path, *common, "trainer.total_train_steps=4")
    rd = run_dir(tmp_path)
    st = status(tmp_path)
    assert len(st["servers"]) == 1 and st["servers"][0]["healthy"], st
    assert len(st["ray"]["placement_groups"]) == 1 and len(st["ray"]["actors"]) == 1, st["ray"]
    pid = st["servers"][0]["pid"]
    text = cli(tmp_path, "status")
    assert text.returncode == 0 and "1 placement group(s), 1 actor(s)" in text.stdout, text.stdout + text.stderr
    submit(tmp_path, *common, "trainer.total_train_steps=8", "min_required_servers=1")
    assert [s["pid"] for s in status(tmp_path)["servers"]] == [pid]  # the same server served both trainers
    assert [m["step"] for m in metrics(rd)] == list(range(1, 9))
    assert "recovered from checkpoint: step 4" in (rd / "logs" / "trainer-0.log").read_text()
    stop = cli(tmp_path, "stop", "--timeout", "60", timeout=200)
    assert stop.returncode == 0 and "removed" in stop.stdout, stop.stdout + stop.stderr
    st = status(tmp_path)
    assert st["servers"] == [] and st["ray"]["placement_groups"] == [] and st["ray"]["actors"] == []
    assert leftovers(ray_address) == [[], []]


@needs_ray
def test_eval_only_on_ray(tmp_path, ray_address):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)}) + "\n"
                            for a in range(4) for b in range(4)))
    p = submit(tmp_path, *on_ray(ray_address, GPUS_PER_NODE), "trainer.type=null", "allocation_mode=hf:d2+eval",
               f"valid_dataset.path={data}", "rollout.n_samples=2")
    assert "eval:" in p.stdout, p.stdout
    report = json.loads((run_dir(tmp_path) / "eval.json").read_text())
    assert report["n_prompts"] == 16 and report["n_samples"] == 2 and "pass@2" in report
    steps = started(run_dir(tmp_path))  # two servers, one per GPU of the first node; the runner beside them
    assert steps["server-0"]["nodes"] == steps["server-1"]["nodes"] == [ray_nodes(run_dir(tmp_path))[0]]
    assert steps["server-0"]["gpus"] != steps["server-1"]["gpus"]
    assert leftovers(ray_address) == [[], []]


@needs_ray
def test_a_plan_larger_than_the_cluster_is_refused(tmp_path, ray_address):
    p = submit(tmp_path, *on_ray(ray_address, GPUS_PER_NODE), "cluster.n_nodes=3", "allocation_mode=hf:d2+d4",
               check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "cluster.n_nodes" in lines[0], p.stderr
    assert not list(tmp_path.glob("*/quickstart"))  # nothing written


def test_mode_ray_without_ray_installed(tmp_path):
    """`import ray` fails (as where it is not installed): exit 2, one line naming `mode` and the extra."""
    code = ("import sys; sys.modules['ray'] = None\n"  # makes `import ray` raise ImportError
            "from areal_hpc.cli.main import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "submit", QUICKSTART, "mode=ray", f"cluster.fileroot={tmp_path}"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "mode:" in lines[0] and "areal-hpc[ray]" in lines[0], lines[0]
    assert not list(tmp_path.glob("*/quickstart"))


@needs_ray
@pytest.mark.parametrize("address,key", [("127.0.0.1:{port}", "cannot reach"), ("no-port-here", "not a Ray address")])
def test_unreachable_or_bad_ray_address(tmp_path, address, key):
    port = free_port()  # a port nothing listens on
    t0 = time.monotonic()
    p = submit(tmp_path, "mode=ray", f"cluster.ray_address={address.format(port=port)}", check=False, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "cluster.ray_address" in lines[0] and key in lines[0], lines[0]
    assert time.monotonic() - t0 < 60
    assert not list(tmp_path.glob("*/quickstart"))


# fix7-A

@needs_ray
def test_an_added_server_renamed_meanwhile_takes_the_placement_group_reserved_for_it(tmp_path, ray_address,
                                                                                     monkeypatch):
    """The owner asks the runner for room for server-1, a server job takes that name meanwhile, and the owner starts
    server-2 instead: it gets the placement group reserved, where that group was left holding its CPUs until the
    run ended and server-2 placed another one."""
    from areal_hpc.config import load_config, parse_allocation
    from areal_hpc.launch import owner as owner_mod
    from areal_hpc.launch import ray_runner
    from areal_hpc.launch.plan import build_plan, server_step

    cfg = load_config(None, [*on_ray(ray_address, 0), "allocation_mode=hf:d1+d1", f"cluster.fileroot={tmp_path}"])
    rd = tmp_path / "run"
    (rd / "logs").mkdir(parents=True)
    plan = build_plan(cfg, parse_allocation(cfg.allocation_mode), rd)
    runner = ray_runner.RayRunner(cfg, plan, rd, [], pin=False)
    owner = owner_mod.RunOwner(cfg, plan, rd, runner, mode="ray")
    # a stand-in process for the server (this test is about its placement, not about serving)
    monkeypatch.setattr(owner_mod, "server_step", lambda *a, **kw: dataclasses.replace(
        server_step(*a, **kw), command=["sleep", "60"]))
    ask = runner.can_start

    def a_job_takes_the_name(step, running):
        room = ask(step, running)
        owner.registry.put("jobs", "12", {"servers": [step.name]}, ttl=False)
        return room
    monkeypatch.setattr(runner, "can_start", a_job_takes_the_name)
    ray = ray_runner.connect(ray_address)
    try:
        assert owner.add_servers(1) == ["server-2"] and list(owner.servers) == ["server-2"]
        groups = ray_runner._run_objects(ray, runner.prefix)[1]
        assert list(groups) == [owner.servers["server-2"].info()["ray_placement_group"]]
    finally:
        for h in owner.servers.values():
            ray_runner.release(h.actors, h.pg, list(range(len(h.actors))))
        for pg, _ in runner._reserved.values():
            ray_runner.release([], pg, [])
        ray.shutdown()
    assert leftovers(ray_address) == [[], []]



# fix8-A

@needs_ray
def test_a_step_whose_actor_cannot_be_created_releases_its_placement_group(tmp_path, ray_address, monkeypatch):
    """Creating a step's second actor fails (here: its name is taken): the placement group placed for the step and
    the first actor are released. Both were made before the `try` that releases them, and the group kept holding its
    resources (a detached server's group: for good)."""
    import types
    import uuid

    from areal_hpc.config import load_config, parse_allocation
    from areal_hpc.launch import ray_runner
    from areal_hpc.launch.plan import build_plan

    cfg = load_config(None, [*on_ray(ray_address, 0), "allocation_mode=hf:d1+d2", f"cluster.fileroot={tmp_path}"])
    rd = tmp_path / "run"
    (rd / "logs").mkdir(parents=True)
    plan = build_plan(cfg, parse_allocation(cfg.allocation_mode), rd)
    runner = ray_runner.RayRunner(cfg, plan, rd, [], pin=False)
    monkeypatch.setattr(ray_runner, "uuid", types.SimpleNamespace(uuid4=lambda: uuid.UUID(int=0)))
    ray = ray_runner.connect(ray_address)
    taken = f"{runner.prefix}trainer.000000/1"
    squatter = ray.remote(ray_runner.StepTask).options(name=taken, namespace=ray_runner.NAMESPACE, num_cpus=0).remote()
    try:
        with pytest.raises(ValueError, match="already taken"):
            runner.start(plan.trainer, [])
        assert ray_runner._run_objects(ray, runner.prefix) == ([taken], {})
    finally:
        ray.kill(squatter)
        ray.shutdown()
    assert leftovers(ray_address) == [[], []]


@needs_ray
def test_a_plugin_module_on_the_submitters_pythonpath_loads_on_ray(tmp_path, ray_address):
    """`trainer.plugins=[module]` found through PYTHONPATH, as with mode=local and Slurm (srun passes the environment
    on): the tasks run the submitter's interpreter, and now its import path too; they had the Ray worker's and the
    trainer died with ModuleNotFoundError."""
    import os

    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "my_reward_mod.py").write_text(
        "from areal_hpc.rollout import register_reward\n\n\n@register_reward('my_exact')\n"
        "def my_exact(prompt, completion, answer, **row):\n    return float(completion.strip() == str(answer))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "plug"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                        "stats.progress_bar=False", *SMALL, "trainer.total_train_steps=3", *on_ray(ray_address),
                        "allocation_mode=hf:d1+d1", "trainer.plugins=[my_reward_mod]", "rollout.reward_fn=my_exact"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [m["step"] for m in metrics(run_dir(tmp_path))] == [1, 2, 3]
    assert leftovers(ray_address) == [[], []]


@needs_ray
def test_an_address_that_is_not_a_ray_cluster_is_refused_at_once(tmp_path):
    """Something listens there, but no Ray GCS (here an HTTP server, as the dashboard's port 8265 of `ray job submit`):
    one line and exit 2 within seconds; ray.init retried for over ten minutes, printing warnings."""
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        p = submit(tmp_path, "mode=ray", f"cluster.ray_address=127.0.0.1:{httpd.server_address[1]}", check=False,
                   timeout=90)
    finally:
        httpd.shutdown()
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "cluster.ray_address" in lines[0] and "not a Ray cluster" in lines[0], lines[0]
    assert time.monotonic() - t0 < 60
    assert not list(tmp_path.glob("*/quickstart"))


@needs_ray
@pytest.mark.parametrize("how", ["ctrl-c", "areal-hpc stop"])
def test_a_stop_while_the_cluster_has_no_room_stops_the_run(tmp_path, ray_address, how):
    """Another job holds every CPU: the run waits for room; Ctrl-C or `areal-hpc stop` then stops it at once (STOPPED,
    130). Both were ignored until the placement timed out two minutes later, and the run ended FAILED (exit 1), 'the
    launcher failed'."""
    hog = subprocess.Popen([sys.executable, "-c", (
        "import logging, sys, time, ray; from ray.util import placement_group\n"
        f"ray.init(address={ray_address!r}, logging_level=logging.ERROR, log_to_driver=False)\n"
        "ray.get(placement_group([{'CPU': 8}, {'CPU': 8}], strategy='STRICT_SPREAD').ready())\n"
        "print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "held"
        owner = subprocess.Popen([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                                  "stats.progress_bar=False", *on_ray(ray_address), "allocation_mode=hf:d1+d1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        try:
            wait_until(lambda: list(tmp_path.glob("*/quickstart/run0/registry/run.json")), 120, "the owner")
            time.sleep(3)  # in the placement wait
            if how == "ctrl-c":
                owner.send_signal(2)
            else:
                stop = subprocess.run([sys.executable, "-m", "areal_hpc", "stop", QUICKSTART, f"cluster.fileroot={tmp_path}"],
                                      capture_output=True, text=True, timeout=90, cwd=tmp_path)
                assert stop.returncode == 0, stop.stdout + stop.stderr
            out, _ = owner.communicate(timeout=60)
        finally:
            if owner.poll() is None:
                owner.kill()
        assert owner.returncode == 130, out
        assert json.loads((run_dir(tmp_path) / "registry" / "run.json").read_text())["state"] == "STOPPED"
    finally:
        hog.kill()
        hog.wait(30)
    wait_until(lambda: leftovers(ray_address) == [[], []], 60, "no leftovers")


@needs_ray
def test_a_step_pinned_to_a_node_that_left_the_cluster_is_placed_elsewhere(tmp_path, ray_cluster, monkeypatch):
    """The trainer's plan node dies (its actor with it): the restarted trainer goes where the cluster has room. It was
    pinned to the dead node: the owner waited for a placement that could never come, then failed the run ('no room
    ... within 120s')."""
    from areal_hpc.config import load_config, parse_allocation
    from areal_hpc.launch import ray_runner
    from areal_hpc.launch.plan import build_plan

    cfg = load_config(None, [*on_ray(ray_cluster.address, 0), "allocation_mode=hf:d1+d1",
                             f"cluster.fileroot={tmp_path}"])
    rd = tmp_path / "run"
    (rd / "logs").mkdir(parents=True)
    plan = build_plan(cfg, parse_allocation(cfg.allocation_mode), rd)
    step = dataclasses.replace(plan.trainer, command=["sleep", "60"])  # placement is the point, not training
    gone = ray_cluster.add_node(num_cpus=8, num_gpus=0, object_store_memory=OBJECT_STORE)
    ray_cluster.wait_for_nodes()
    ray_cluster.remove_node(gone)
    ray = ray_runner.connect(ray_cluster.address)
    monkeypatch.setattr(ray_runner, "PLACEMENT_TIMEOUT_S", 20.0)
    runner = ray_runner.RayRunner(cfg, plan, rd, [gone.node_id] * plan.nodes)
    try:
        wait_until(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == gone.node_id), 60, "node death")
        handle = runner.start(step, [])
        assert handle.info()["nodes"][0] != gone.node_id and handle.poll() is None
        ray_runner.release(handle.actors, handle.pg, [0])
    finally:
        ray.shutdown()
    assert leftovers(ray_cluster.address) == [[], []]
