"""Config -> the job steps of a run (`StepSpec`), placed: on one node servers take the first GPUs, the trainer the
next; else servers and trainer get disjoint whole nodes (servers first), so an SPMD trainer has the same ranks on each
node and no GPU is shared. Every launcher runs them. Servers are named by one rule (`next_server_index`)."""

from __future__ import annotations

import getpass
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from areal_hpc.config import AllocationMode, ExperimentConfig
from areal_hpc.config.allocation import nodes_needed, server_nodes
from areal_hpc.registry import Registry


@dataclass
class StepSpec:
    role: str  # "server" | "trainer"
    name: str  # "server-0", ..., "trainer"
    nodes: int
    ntasks: int
    ntasks_per_node: int
    gpus_per_task: int
    cpus_per_task: int
    mem_per_node_mb: int
    relative_node: int  # first node of the step within the allocation (srun --relative); -1 = any
    gpu_ids: List[int] = field(default_factory=list)  # local placement on the (first) node
    command: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    log: str = ""  # srun --output pattern (absolute)

    @property
    def gpus_per_node(self) -> int:
        return self.gpus_per_task * self.ntasks_per_node


@dataclass
class Plan:
    run_dir: str
    job_name: str
    mode: str
    nodes: int  # nodes of the allocation
    gpus_per_node: int  # 0 = CPU-only
    steps: List[StepSpec]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["steps"] = [StepSpec(**s) for s in d["steps"]]
        return cls(**d)

    @property
    def servers(self) -> List[StepSpec]:
        return [s for s in self.steps if s.role == "server"]

    @property
    def trainer(self) -> Optional[StepSpec]:
        return next((s for s in self.steps if s.role == "trainer"), None)


def node_load(steps: List[StepSpec], nodes: int) -> List[Dict[str, int]]:
    """The CPUs, GPUs and memory (MB) ``steps`` take on each of ``nodes`` nodes (from their relative nodes)."""
    load = [{"cpus": 0, "gpus": 0, "mem": 0} for _ in range(nodes)]
    for s in steps:
        first = max(s.relative_node, 0)
        for k in range(first, min(first + s.nodes, nodes)):
            load[k]["cpus"] += s.cpus_per_task * s.ntasks_per_node
            load[k]["gpus"] += s.gpus_per_node
            load[k]["mem"] += s.mem_per_node_mb
    return load


def python_executable(cfg: ExperimentConfig) -> str:
    return cfg.cluster.python or sys.executable


def hf_cache_dir(cfg: ExperimentConfig) -> Path:
    """The Hugging Face cache (``HF_HOME``) every node sees: ``cluster.hf_cache``, default
    ``{fileroot}/{user}/hf-cache`` (shared by the user's runs, writable by them alone)."""
    c = cfg.cluster
    root = c.hf_cache or str(Path(os.path.expanduser(c.fileroot)) / getpass.getuser() / "hf-cache")
    return Path(os.path.abspath(os.path.expanduser(root)))


def step_env(cfg: ExperimentConfig, cpus: int) -> Dict[str, str]:
    """Each task uses the CPUs it was given (else torch starts a thread per core in every process), and never reaches
    the Hub (`launch.resolve` made every name a local path); caches are the shared one (a dataset is prepared once)."""
    root = hf_cache_dir(cfg)
    return {"OMP_NUM_THREADS": str(cpus), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root), "HF_HUB_CACHE": str(root / "hub"),
            "HF_DATASETS_CACHE": str(root / "datasets")}


def _step(cfg: ExperimentConfig, role: str, name: str, nodes: int, ntasks: int, per_node: int, gpus: int,
          relative_node: int, gpu_ids: List[int], command: List[str], log: Path) -> StepSpec:
    """A step of ``ntasks`` tasks (``per_node`` a node) of ``gpus`` GPUs each, with their CPUs and memory."""
    c = cfg.cluster
    if c.n_gpus_per_node == 0 or gpus == 0:
        cpus, mem = c.cpus_per_task_cpu, c.mem_per_task_cpu_gb * 1024 * per_node
    else:
        cpus, mem = c.cpus_per_gpu * gpus, c.mem_per_gpu_gb * 1024 * gpus * per_node
    return StepSpec(role=role, name=name, nodes=nodes, ntasks=ntasks, ntasks_per_node=per_node, gpus_per_task=gpus,
                    cpus_per_task=cpus, mem_per_node_mb=mem, relative_node=relative_node, gpu_ids=gpu_ids,
                    env=step_env(cfg, cpus), command=[python_executable(cfg), "-m", "areal_hpc", *command],
                    log=str(log))


def next_server_index(reg: Registry, known: Iterable[str] = (), reserve: int = 0) -> int:
    """The number after every server name the run has used (``known``, records, the run record, server jobs) or
    handed out; ``reserve=N`` hands out N from there, under the registry's lock, so two additions never clash."""
    with reg.locked("server-names"):
        jobs = reg.list("jobs", live_only=False).values()
        names = {*known, *reg.list("servers", live_only=False), *(reg.run_record().get("servers") or []),
                 *(name for job in jobs for name in job.get("servers") or [])}
        used = [int(n[7:]) for n in names if n.startswith("server-") and n[7:].isdigit()]
        handed = (reg.get("", "server_names", live_only=False) or {}).get("next", 0)
        first = max(max(used, default=-1) + 1, int(handed))
        if reserve:
            reg.put("", "server_names", {"next": first + reserve}, ttl=False)
    return first


def server_step(cfg: ExperimentConfig, alloc: AllocationMode, run_dir: Path, index: int,
                relative_node: int, gpu_ids: List[int]) -> StepSpec:
    G = cfg.cluster.n_gpus_per_node
    per = alloc.gen.gpus_per_instance if G else 0
    nodes = max(1, -(-per // G)) if G else 1
    name = f"server-{index}"
    return _step(cfg, "server", name, nodes=nodes, ntasks=nodes, per_node=1, gpus=per // nodes if G else 0,
                 relative_node=relative_node, gpu_ids=gpu_ids,  # a file per node: appends from nodes would interleave
                 log=run_dir / "logs" / (f"{name}-%t.log" if nodes > 1 else f"{name}.log"),
                 command=["serve", "--run-dir", str(run_dir), "--server-id", name])


def trainer_step(cfg: ExperimentConfig, alloc: AllocationMode, run_dir: Path, relative_node: int,
                 gpu_ids: List[int]) -> StepSpec:
    world = alloc.train.world_size if alloc.train else 1
    G = cfg.cluster.n_gpus_per_node if alloc.train else 0  # no trainer: a rollout/eval runner, one CPU process
    nodes = max(1, -(-world // G)) if G else 1
    per_node = min(world, G) if G else world
    return _step(cfg, "trainer", "trainer", nodes=nodes, ntasks=world, per_node=per_node, gpus=1 if G else 0,
                 relative_node=relative_node, gpu_ids=gpu_ids, command=["train", "--run-dir", str(run_dir)],
                 log=run_dir / "logs" / "trainer-%t.log")


def has_servers(cfg: ExperimentConfig, alloc: AllocationMode) -> bool:
    """Whether the run has inference servers: every trainer but sft talks to them (null evaluates through them)."""
    return alloc.gen is not None and cfg.trainer.type != "sft"


def build_plan(cfg: ExperimentConfig, alloc: AllocationMode, run_dir: Path,
               with_servers: bool = True, with_trainer: bool = True, first_server: int = 0) -> Plan:
    """All steps of a run. ``with_servers=False`` is a trainer-only restart; ``first_server`` numbers servers added
    to a live run after the existing ones."""
    G = cfg.cluster.n_gpus_per_node
    gen, steps = alloc.gen, []
    placed = has_servers(cfg, alloc)
    if placed and with_servers:
        per = gen.gpus_per_instance if G else 0
        per_node = max(1, G // per) if G and per <= G else 1
        for k in range(gen.dp):
            if not G:
                node, ids = 0, []
            elif per > G:  # multi-node server: whole nodes
                node, ids = k * (per // G), list(range(G))
            else:
                node, first = k // per_node, (k % per_node) * per
                ids = list(range(first, first + per))
            steps.append(server_step(cfg, alloc, run_dir, first_server + k, node, ids))
    if with_trainer:
        n = alloc.train.world_size if alloc.train else 0
        if not G:
            node, ids = 0, []
        elif nodes_needed(alloc, G) == 1:  # after the servers' GPUs, even in a trainer-only restart
            first = gen.dp * gen.gpus_per_instance if placed else 0
            node, ids = 0, list(range(first, first + n))
        else:
            # a rollout runner (no trainer GPUs) is a CPU process: it shares node 0 rather than take a node of its own
            node = server_nodes(alloc, G) if placed and with_servers and alloc.train else 0
            ids = list(range(min(G, n)))
        steps.append(trainer_step(cfg, alloc, run_dir, node, ids))
    return Plan(run_dir=str(run_dir), job_name=f"areal-{cfg.experiment_name}-{cfg.trial_name}", mode=cfg.mode,
                nodes=max((s.relative_node + s.nodes for s in steps), default=1), gpus_per_node=G, steps=steps)
