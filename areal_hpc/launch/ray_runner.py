"""`mode=ray`: the plan's steps on an existing Ray cluster (``cluster.ray_address``).

Each step is a placement group shaped like its ``srun`` step (one bundle per node), pinned to the Ray node picked at
submit for its plan node (while alive). Each task is a `StepTask` actor running the step's command with the
environment srun would give it; the process dies with its actor. The owner runs in the submitting process, as with
mode=local. With ``shutdown_server_on_exit=False`` the servers' actors and groups are detached (`stop_leftovers`
removes them).
``registry/ray.json`` names the cluster, namespace and name prefix of the run's actors and placement groups.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from areal_hpc.config import ConfigError, ExperimentConfig
from areal_hpc.launch.entry import LAUNCHER_PID_ENV
from areal_hpc.launch.local import host_env, killpg, spawn, step_exit, task_env
from areal_hpc.launch.owner import Runner, StepHandle
from areal_hpc.launch.plan import Plan, StepSpec, node_load
from areal_hpc.registry import Registry, free_port, set_parent_death_signal

log = logging.getLogger("areal_hpc.launch")

NAMESPACE = "areal-hpc"
NODE_LABEL = "ray.io/node-id"
PLACEMENT_TIMEOUT_S = 120.0  # a planned step's resources must be free within this (a restarted trainer's are)
RESERVE_TIMEOUT_S = 5.0  # add-servers: a placement not ready by then means the cluster is full
CONNECT_TIMEOUT_S = 5.0
START_HINT = "start one (`ray start --head`) or give its head's GCS address host:port"


def require_ray() -> Any:
    """The ``ray`` module, or a `ConfigError` naming ``mode`` and how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("mode", f"mode=ray needs the ray package, which does not import here ({e})",
                          'pip install "areal-hpc[ray]", or use mode=slurm / mode=local') from None
    return ray


def connect(address: str) -> Any:
    """Connect to the Ray cluster at ``address`` (host:port or auto); returns ``ray``. An address nothing listens on
    or no Ray listens on fails in seconds (ray.init itself retries for minutes)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    target = os.environ.get("RAY_ADDRESS", "") if address in ("", "auto") else address
    if target and "://" not in target:
        host, _, port = target.rpartition(":")
        try:
            conn = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
        except (OSError, ValueError) as e:
            raise ConfigError("cluster.ray_address", f"cannot reach a Ray cluster at {target}"
                              f"{'' if target == address else ' (RAY_ADDRESS)'}: {getattr(e, 'strerror', None) or e}",
                              START_HINT) from None
        # a GCS (gRPC) answers HTTP/2's preface with a SETTINGS frame, one behind TLS with an alert; another answer (an
        # HTTP server: the dashboard's 8265) is no Ray, which ray.init retries for minutes. No answer: ray.init says.
        reply = b""
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\4\0\0\0\0\0")
            reply = conn.recv(9)
        if reply and reply[3:4] != b"\4" and reply[:1] not in (b"\x15", b"\x16"):
            raise ConfigError("cluster.ray_address", f"{target} is not a Ray cluster (no GCS answers there)",
                              "give the head's GCS address host:port (6379 by default; not the dashboard's 8265)")
    try:
        ray.init(address=address or "auto", namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError...: say it on one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError("cluster.ray_address", f"cannot connect to a Ray cluster at {address}: {first}",
                          START_HINT) from None
    return ray


def _eligible(ray: Any, gpus_per_node: int) -> List[Dict[str, Any]]:
    """Alive nodes that can be a node of the run: CPUs, and ``gpus_per_node`` GPUs (stable order)."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0
             and n["Resources"].get("GPU", 0) >= gpus_per_node]
    return sorted(nodes, key=lambda n: (n.get("NodeManagerAddress", ""), n["NodeID"]))


def prepare(cfg: ExperimentConfig, plan: Plan) -> List[str]:
    """Before anything is written: the Ray node id of each plan node; `ConfigError` if the cluster cannot hold it."""
    ray = connect(cfg.cluster.ray_address)
    nodes = _eligible(ray, plan.gpus_per_node)
    picked: List[str] = []
    for k, need in enumerate(node_load(plan.steps, plan.nodes)):
        node = next((n for n in nodes if n["NodeID"] not in picked and n["Resources"].get("CPU", 0) >= need["cpus"]
                     and n["Resources"].get("GPU", 0) >= need["gpus"]), None)
        if node is None:
            have = ", ".join(f"{n['NodeID'][:8]} ({n['Resources'].get('CPU', 0):g} CPU, "
                             f"{n['Resources'].get('GPU', 0):g} GPU)" for n in _eligible(ray, 0)) or "none alive"
            ray.shutdown()
            raise ConfigError("cluster.n_nodes", f"the plan needs {plan.nodes} Ray node(s) and none is left for its "
                              f"node {k} ({need['cpus']} CPUs, {need['gpus']} GPUs); alive nodes: {have}",
                              "lower cluster.n_nodes / the allocation, or grow the cluster")
        picked.append(node["NodeID"])
    return picked


def run_prefix(plan: Plan, run_dir: Path) -> str:
    """What the names of a run's placement groups and actors start with (unique per run dir)."""
    return f"{plan.job_name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}/"


class StepTask:
    """One task (rank) of a step in a Ray actor; methods run on its main thread (the parent-death signal is per
    thread)."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None

    def where(self) -> Dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "port": free_port("")}  # rank 0's: for torch.distributed's rendezvous

    def start(self, command: List[str], env: Dict[str, str], log_path: str, cwd: str) -> int:
        # no Slurm variables of a Ray worker started by srun; SIGKILL when its actor dies, as a Slurm step's tasks die
        # with it (a graceful stop goes through `signal` first)
        self.proc = spawn(command, dict(host_env(LAUNCHER_PID_ENV), **env), log_path, cwd,
                          preexec_fn=functools.partial(set_parent_death_signal, signal.SIGKILL))
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            killpg(self.proc, sig)

    def stop(self, grace_s: float) -> None:
        """SIGTERM (a server deregisters), SIGKILL after ``grace_s``: `stop_leftovers`, on every actor at once."""
        if self.proc is None:
            return
        killpg(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            killpg(self.proc, signal.SIGKILL)


class RayStepHandle(StepHandle):
    """A step on Ray: its placement group and one `StepTask` actor per task."""

    def __init__(self, step: StepSpec, pg: Any, actors: List[Any], info: Dict[str, object]):
        self.step, self.pg, self.actors, self._info = step, pg, actors, info
        self._pending: List[Any] = [None] * len(actors)
        self._codes: List[Optional[int]] = [None] * len(actors)
        self._rc: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self._rc is not None:
            return self._rc
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        for i, (actor, ref) in enumerate(zip(self.actors, self._pending)):
            if self._codes[i] is not None:
                continue
            if ref is None:
                self._pending[i] = actor.poll.remote()
            elif ray.wait([ref], timeout=0)[0]:
                self._pending[i] = None
                try:
                    self._codes[i] = ray.get(ref)
                except ActorUnavailableError:  # for now: asked again at the next poll
                    pass
                except RayActorError:  # its actor died (killed, placement group removed, node lost): so did the task
                    self._codes[i] = -int(signal.SIGKILL)
        self._rc = step_exit(self._codes)
        if self._rc is not None:  # the step is over: kill what is left, release its actors and placement group
            release(self.actors, self.pg, [i for i, c in enumerate(self._codes) if c is None])
        return self._rc

    def signal(self, sig: int) -> None:
        if self._rc is None:
            _call_all([a for a, c in zip(self.actors, self._codes) if c is None], "signal", sig)

    def info(self) -> Dict[str, object]:
        return self._info


def _call_all(actors: List[Any], method: str, *args: Any, timeout_s: float = 10.0) -> None:
    """Call ``method`` of every actor at once and wait for all of them (a dead actor's call just fails)."""
    import ray

    refs = [getattr(a, method).remote(*args) for a in actors]
    with contextlib.suppress(Exception):  # the cluster went away: nothing left to call
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


def release(actors: List[Any], pg: Optional[Any], alive: List[int]) -> None:
    """SIGKILL the tasks of the ``alive`` actors, then remove every actor and the placement group."""
    import ray
    from ray.util import remove_placement_group

    _call_all([actors[i] for i in alive], "signal", signal.SIGKILL)
    for a in actors:
        with contextlib.suppress(Exception):  # gone already
            ray.kill(a, no_restart=True)
    if pg is not None:
        with contextlib.suppress(Exception):  # removed already
            remove_placement_group(pg)


class RayRunner(Runner):
    """Starts StepSpecs as placement groups + `StepTask` actors. Planned steps sit on their plan node (``nodes``: the
    Ray node id of each); added servers and a trainer-only plan (``pin=False``) go wherever the cluster has room."""

    def __init__(self, cfg: ExperimentConfig, plan: Plan, run_dir: Path, nodes: List[str], pin: bool = True):
        self.cfg, self.run_dir, self.nodes, self.pin = cfg, run_dir, nodes, pin
        self.prefix = run_prefix(plan, run_dir)
        # by role, not name: the owner may rename the added server it asked about (`RunOwner.add_servers`)
        self._reserved: Dict[str, Any] = {}

    def _pinned(self, step: StepSpec) -> bool:
        """On its plan node(s), while they are alive (a step restarted after its node died goes where there is room)."""
        if not (self.pin and step.relative_node >= 0):
            return False
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        if set(self.nodes[step.relative_node:step.relative_node + step.nodes]) <= alive:
            return True
        log.warning("%s: its plan node(s) left the Ray cluster; placing it where the cluster has room", step.name)
        return False

    def _placement(self, step: StepSpec, timeout_s: float) -> Optional[Tuple[Any, str]]:
        """(placement group, its name) for ``step`` once ready; None (nothing left behind) if the cluster has no
        room within ``timeout_s``."""
        import ray
        from ray.util import placement_group, remove_placement_group

        per_node = {"CPU": float(step.cpus_per_task * step.ntasks_per_node),
                    **({"GPU": float(step.gpus_per_node)} if step.gpus_per_task else {})}
        labels = ([{NODE_LABEL: self.nodes[step.relative_node + j]} for j in range(step.nodes)]
                  if self._pinned(step) else None)  # on the plan's nodes, when pinned
        name = f"{self.prefix}{step.name}.{uuid.uuid4().hex[:6]}"
        pg = placement_group([dict(per_node) for _ in range(step.nodes)],
                             strategy="STRICT_PACK" if step.nodes == 1 else "STRICT_SPREAD", name=name,
                             lifetime="detached" if self._detached(step) else None, bundle_label_selector=labels)
        ready, deadline = pg.ready(), time.monotonic() + timeout_s
        while not ray.wait([ready], timeout=1.0)[0]:  # a Ctrl-C meanwhile stops the run (the owner's KeyboardInterrupt)
            if self.stopping() or time.monotonic() > deadline:
                remove_placement_group(pg)
                if self.stopping():
                    raise KeyboardInterrupt
                return None
        return pg, name

    def _detached(self, step: StepSpec) -> bool:
        return step.role == "server" and not self.cfg.shutdown_server_on_exit

    def can_start(self, step: StepSpec, running: List[StepHandle]) -> bool:
        if not self._pinned(step) and step.role not in self._reserved:
            placed = self._placement(step, RESERVE_TIMEOUT_S)
            if placed is None:
                return False
            self._reserved[step.role] = placed
        return True

    def start(self, step: StepSpec, running: List[StepHandle]) -> StepHandle:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        placed = self._reserved.pop(step.role, None) or self._placement(step, PLACEMENT_TIMEOUT_S)
        if placed is None:
            where = f"node {self.nodes[step.relative_node]}" if self._pinned(step) else "any node"
            raise RuntimeError(f"the Ray cluster had no room for {step.name} ({step.ntasks} task(s) x "
                               f"{step.cpus_per_task} CPU, {step.gpus_per_task} GPU on {where}) within "
                               f"{PLACEMENT_TIMEOUT_S:.0f}s")
        pg, pg_name = placed
        task_cls = ray.remote(StepTask)
        names = [f"{pg_name}/{rank}" for rank in range(step.ntasks)]
        actors: List[Any] = []
        try:  # whatever fails (creating an actor too) releases the placement group and the actors made so far
            for rank, name in enumerate(names):
                actors.append(task_cls.options(
                    name=name, namespace=NAMESPACE, lifetime="detached" if self._detached(step) else None,
                    num_cpus=step.cpus_per_task, num_gpus=step.gpus_per_task, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, rank // step.ntasks_per_node)).remote())
            places = ray.get([a.where.remote() for a in actors], timeout=PLACEMENT_TIMEOUT_S)
            master = (places[0]["ip"], places[0]["port"])
            # the task runs this interpreter (`plan.python_executable`): with this import path (plugins, a checkout)
            path = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
            pids = ray.get([a.start.remote(step.command, {**task_env(step, rank, places[rank]["gpus"], master), **path},
                                           step.log.replace("%t", str(rank)), str(self.run_dir))
                            for rank, a in enumerate(actors)], timeout=PLACEMENT_TIMEOUT_S)
        except Exception:
            release(actors, pg, list(range(len(actors))))
            raise
        return RayStepHandle(step, pg, actors, {
            "ray_placement_group": pg_name, "actors": names, "pids": pids, "nodes": [p["node_id"] for p in places],
            "hosts": [p["host"] for p in places], "gpus": [p["gpus"] for p in places]})


def run(cfg: ExperimentConfig, plan: Plan, rd: Path, nodes: List[str]) -> int:
    """Own the run from this process (`local.run` with a `RayRunner`); ``nodes`` from `prepare`."""
    from areal_hpc.launch import local

    ray = connect(cfg.cluster.ray_address)
    runner = RayRunner(cfg, plan, rd, nodes, pin=bool(plan.servers))  # a trainer-only plan: where servers left room
    where = {"address": ray.get_runtime_context().gcs_address, "namespace": NAMESPACE, "prefix": runner.prefix}
    Registry.for_run(rd, cfg.launcher).put("", "ray", {**where, "nodes": nodes}, ttl=False)
    try:
        return local.run(cfg, plan, rd, runner)
    finally:
        for pg, _ in runner._reserved.values():
            release([], pg, [])
        ray.shutdown()  # Ray removes what this process started and did not detach


def _run_objects(ray: Any, prefix: str) -> Tuple[List[str], Dict[str, Dict[str, Any]]]:
    """The names of the run's actors, and its placement groups that are not removed, by name."""
    from ray.util import placement_group_table

    return (sorted(n for n in ray.util.list_named_actors() if n.startswith(prefix)),
            {v["name"]: v for v in placement_group_table().values()
             if str(v.get("name", "")).startswith(prefix) and v.get("state") != "REMOVED"})


def describe(reg: Registry) -> Dict[str, Any]:
    """For `status`: the run's placement groups (state, nodes) and live actors on its Ray cluster."""
    rec = reg.get("", "ray", live_only=False)
    if not rec:
        return {}
    try:
        ray = connect(rec["address"])
    except ConfigError as e:
        return {"address": rec["address"], "error": e.one_line()}
    actors, groups = _run_objects(ray, rec["prefix"])
    return {"address": rec["address"], "actors": actors,
            "placement_groups": [{"name": name, "state": g.get("state"), "strategy": g.get("strategy"),
                                  "nodes": sorted(set((g.get("bundles_to_node_id") or {}).values()))}
                                 for name, g in sorted(groups.items())]}


def stop_leftovers(reg: Registry, external: bool = False, grace_s: float = 30.0) -> None:
    """`stop` with no owner: SIGTERM to every task the run left on its Ray cluster (detached servers), SIGKILL after
    ``grace_s``, then its actors and placement groups go, and its servers' records (external ones with ``external``)."""
    rec = reg.get("", "ray", live_only=False)
    try:
        ray = connect(rec["address"]) if rec else None
    except ConfigError as e:  # the cluster is gone: so is what the run had on it
        ray = None
        print(f"Ray: {e.one_line()}", flush=True)
    if ray is not None:
        from ray.util.placement_group import PlacementGroup

        names, pgs = _run_objects(ray, rec["prefix"])
        actors = []
        for n in names:
            with contextlib.suppress(ValueError):
                actors.append(ray.get_actor(n, namespace=NAMESPACE))
        _call_all(actors, "stop", grace_s, timeout_s=grace_s + 10)
        release(actors, None, [])
        for g in pgs.values():
            release([], PlacementGroup(ray.PlacementGroupID(bytes.fromhex(g["placement_group_id"]))), [])
        if names or pgs:
            print(f"removed {len(names) + len(pgs)} Ray actor(s) and placement group(s) the run had left", flush=True)
    for sid, server in reg.list("servers", live_only=False).items():
        if external or not server.get("external"):
            reg.delete("servers", sid)
