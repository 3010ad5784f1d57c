"""Render the sbatch templates, package data in `templates/` (`sbatch/` of a checkout links there), with a resolved
config and plan (no Slurm)."""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from areal_hpc.config import ConfigError, ExperimentConfig
from areal_hpc.launch.plan import Plan, StepSpec, node_load
from areal_hpc.launch.slurm import shell_line, srun_argv


def template_text(name: str) -> str:
    return (resources.files("areal_hpc.launch") / "templates" / name).read_text()


# ``{{NAME}}``: the scripts themselves use bash's ``${VAR}``
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def sbatch_opts(cfg: ExperimentConfig, plan: Plan) -> Dict[str, str]:
    """The ``#SBATCH`` options of an allocation of ``plan`` (``cluster.sbatch_args`` apart): the rendered script,
    ``--test-only`` and submitit all get these."""
    c = cfg.cluster
    G = plan.gpus_per_node
    # Slurm sizes every node alike: for the busiest node's steps, at least the GPUs' share (a CPU step,
    # e.g. a rollout runner, next to servers that use all of a node's GPUs needs room of its own).
    load = node_load(plan.steps, plan.nodes)
    mem_mb = max([1024 * (c.mem_per_gpu_gb * G if G else c.mem_per_task_cpu_gb)] + [n["mem"] for n in load])
    opts = {
        "ntasks-per-node": "1",  # the batch script itself; steps size themselves with srun
        "job-name": plan.job_name,
        "nodes": str(plan.nodes),
        "time": str(c.time),
        "output": str(Path(plan.run_dir) / "logs" / "slurm-%j.out"),
        "open-mode": "append",
        "signal": "USR2@90",
        "cpus-per-task": str(max([c.cpus_per_gpu * G if G else c.cpus_per_task_cpu] + [n["cpus"] for n in load])),
        "mem": f"{-(-mem_mb // 1024)}G",
    }
    if G:
        opts["gres"] = f"gpu:{G}"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key):
            opts[key] = str(getattr(c, key))
    return opts


def sbatch_lines(cfg: ExperimentConfig, plan: Plan) -> List[str]:
    """``#SBATCH`` lines of `sbatch_opts` (sorted, like submitit's; quoted, as sbatch reads them: a run dir may hold
    a space), then ``cluster.sbatch_args``, an option a line with its value joined (sbatch refuses a bare value)."""
    lines = [f"#SBATCH --{k}={shlex.quote(v)}" for k, v in sorted(sbatch_opts(cfg, plan).items())]
    return lines + [f"#SBATCH --{k}" + ("" if v is True else f"={v}") for k, v in extra_options(cfg, plan).items()]


def extra_options(cfg: ExperimentConfig, plan: Plan) -> Dict[str, Union[str, bool]]:
    """``cluster.sbatch_args`` as options, a GPU count in them (``--gpus=[type:]N``, ``--gpus-per-node``: a site's way
    to ask for GPUs) made this job's: a server job of one GPU asking for the run's N was refused."""
    sized = {"gpus": plan.gpus_per_node * plan.nodes, "gpus-per-node": plan.gpus_per_node}
    out = sbatch_options(cfg.cluster.sbatch_args)
    for k, v in out.items():
        if k in sized and v is not True and plan.gpus_per_node:
            gpu_type = v.rpartition(":")[0]  # "a100" of "a100:4", kept
            out[k] = f"{gpu_type}:{sized[k]}" if gpu_type else str(sized[k])
    return out


def sbatch_options(args: Sequence[str]) -> Dict[str, Union[str, bool]]:
    """``cluster.sbatch_args`` (``--exclusive``, ``--reservation=x``, ``--reservation x``; long options, as `validate`
    checked, an entry maybe pasted with its "#SBATCH") -> sbatch options."""
    words = [str(a).strip().removeprefix("#SBATCH").strip() for a in args]
    out: Dict[str, Union[str, bool]] = {}
    i = 0
    while i < len(words):
        key, eq, value = words[i][2:].partition("=")
        if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
            value, eq = words[i + 1], "="
            i += 1
        out[key] = value if eq else True
        i += 1
    return out


def _one_line(key: str, text: str) -> str:
    """A value rendered into a script is one line (also for a config that skipped validation: an edited config.yaml)."""
    if "\n" in text or "\r" in text:
        raise ConfigError(key, f"{text!r} has a line break and would inject a line into the job script",
                          "give one line of printable text")
    return text


def _step_line(step: StepSpec, plan: Plan, cfg: ExperimentConfig,
               command: Optional[Callable[[StepSpec], List[str]]]) -> str:
    if command is not None:
        step = replace(step, command=command(step))
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(step.env.items()))
    line = shell_line(srun_argv(step, plan.job_name, cfg.cluster.srun_args))  # every word quoted
    return f"{env} {line}" if env else line


def setup_lines(cfg: ExperimentConfig) -> List[str]:
    """``cluster.setup_commands``, each ending the job when it fails (else every step ran without a missing module);
    in braces, so that what they set stays in the script's shell."""
    lines = []
    for i, cmd in enumerate(cfg.cluster.setup_commands):
        key = f"cluster.setup_commands[{i}]"
        lines.append(f"{{ {_one_line(key, cmd)}\n}} || {{ echo \"areal-hpc: error: {key} failed (exit $?):\" "
                     f"{shlex.quote(cmd)} >&2; exit 1; }}")
    return lines


def render(template: str, cfg: ExperimentConfig, plan: Plan,
           command: Optional[Callable[[StepSpec], List[str]]] = None) -> str:
    """Fill the packaged ``template`` with the plan's steps; ``command`` replaces each step's command (tests run probes
    in the exact step shapes of a real run)."""
    text = template_text(template)
    servers = "\n".join(f"{_step_line(s, plan, cfg, command)} &\nSERVER_PIDS+=($!)" for s in plan.servers)
    trainer = _step_line(plan.trainer, plan, cfg, command) if plan.trainer else "true  # no trainer"
    sbatch = [_one_line("cluster", line) for line in sbatch_lines(cfg, plan)]
    values = dict(SBATCH_LINES="\n".join(sbatch), SERVER_STEPS=servers or ": # no servers", TRAINER_STEP=trainer,
                  SETUP="\n".join(setup_lines(cfg)) or "# (cluster.setup_commands: module loads, conda activate, ...)",
                  RUN_DIR=shlex.quote(_one_line("cluster.fileroot", plan.run_dir)),
                  SHUTDOWN=str(cfg.shutdown_server_on_exit))
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)  # KeyError: a placeholder without a value
