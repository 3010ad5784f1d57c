"""Arguments a config passes through to sbatch, srun and SGLang: those naming an option areal-hpc sets itself are
refused, since they would win silently (or make a step wait where areal-hpc does not look)."""

from __future__ import annotations

import re

from areal_hpc.config.errors import ConfigError
from areal_hpc.config.schema import ExperimentConfig

# sbatch options areal-hpc sets itself (`launch.sbatch.sbatch_lines`): in cluster.sbatch_args one would win, silently
SBATCH_OWNED = {**{k: f"set cluster.{k}" for k in ("time", "partition", "account", "qos", "constraint")},
                "job-name": "set experiment_name and trial_name", "nodes": "set allocation_mode",
                "gres": "set cluster.n_gpus_per_node", "ntasks-per-node": "set allocation_mode",
                "cpus-per-task": "set cluster.cpus_per_gpu (cluster.cpus_per_task_cpu on CPU nodes)",
                **dict.fromkeys(("mem", "mem-per-cpu", "mem-per-gpu"),
                                "set cluster.mem_per_gpu_gb (cluster.mem_per_task_cpu_gb on CPU nodes)"),
                **dict.fromkeys(("output", "error", "open-mode"), "leave it out: the job's log is "
                                "{run}/logs/slurm-%j.out, where `areal-hpc logs` reads"),
                "signal": "leave it out: USR2 90 s before the time limit makes the run checkpoint and requeue"}
# srun options `launch.slurm.srun_argv` sizes every step with; cluster.srun_args come after and would win (--mem=0:
# each step asks for a node's memory, the next one waits for ever). Short spellings by their one letter.
SRUN_OWNED = dict.fromkeys(("nodes", "N", "ntasks", "n", "ntasks-per-node", "relative", "r", "exact", "cpus-per-task",
                            "c", "mem", "mem-per-cpu", "mem-per-gpu", "gres", "gpus-per-task", "job-name", "J",
                            "output", "o", "open-mode", "jobid"), "leave it out: areal-hpc sizes each step itself")
# SGLang flags the server step sets itself (it talks to SGLang at this address with this key, records the model)
SGLANG_OWNED = {"host": "server.host", "port": "server.port", "api-key": "the run's key", "config": "the run's key",
                "model-path": "server.model_path"}
# real sbatch/srun options that are prefixes of owned ones, not abbreviations of them
NOT_ABBREVIATIONS = ("ntasks", "gpus")


def check_pass_through(cfg: ExperimentConfig) -> None:
    """`cluster.sbatch_args`, `cluster.srun_args` and `server.sglang_args`: options only, none areal-hpc sets."""
    c = cfg.cluster
    for key, dash, owned in (("sbatch_args", "--", SBATCH_OWNED), ("srun_args", "-", SRUN_OWNED)):
        # as `launch.sbatch.sbatch_options` reads them (submitit takes long sbatch options only)
        args = [str(a).strip().removeprefix("#SBATCH").strip() for a in getattr(c, key)]
        for i, (raw, arg) in enumerate(zip(getattr(c, key), args)):
            if i and args[i - 1].startswith("-") and "=" not in args[i - 1] and not arg.startswith("-"):
                continue  # a bare flag's value (a pasted "#SBATCH -p x" after one is an option)
            if not arg.startswith(dash):
                raise ConfigError(f"cluster.{key}[{i}]", f"{raw!r} is not a{' long' if dash == '--' else 'n'} option",
                                  "give options like --exclusive or --reservation=NAME")
            long = arg.startswith("--")  # "--time 10" in one entry is a --time too; "-n4" is -n
            name = re.split(r"[=\s]", arg[2:], maxsplit=1)[0] if long else arg[1:2]
            if long and name and name not in owned and name not in NOT_ABBREVIATIONS:  # Slurm takes `--tim` as --time
                name = next((o for o in owned if o.startswith(name)), name)
            if name in owned:
                raise ConfigError(f"cluster.{key}[{i}]", f"{'--' if long else '-'}{name} is an option areal-hpc sets "
                                  "itself", owned[name])
    for name, value in cfg.server.sglang_args.items():
        flag = name.strip().lstrip("-").replace("_", "-")
        if flag in SGLANG_OWNED:
            raise ConfigError(f"server.sglang_args.{name}", f"--{flag} is a flag areal-hpc sets itself",
                              f"use {SGLANG_OWNED[flag]}")
        if value == []:  # [] renders a bare flag, as true does
            raise ConfigError(f"server.sglang_args.{name}", "is an empty list, which gives the flag no value",
                              "give true for a bare flag, false to leave the flag out, or a list of its values")
