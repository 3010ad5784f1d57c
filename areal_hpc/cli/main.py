"""`areal-hpc`: parse, validate, dispatch. No logic of its own beyond turning input into calls.

Exit codes: 0 ok, 1 the run failed, 2 bad input (one line naming the key; nothing submitted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from areal_hpc.config import ConfigError

DESCRIPTION = """\
areal-hpc: asynchronous RL for language models, Slurm-first.

Inference servers (SGLang on GPUs, or the embedded `hf` engine) generate rollouts while FSDP2
trainers learn from them; new weights flow back to the servers; rollouts are at most
rollout.max_head_offpolicyness versions stale. A run lives in
{cluster.fileroot}/{user}/{experiment_name}/{trial_name}/ (config, plan, registry, logs, metrics).

Every command takes an optional CONFIG.yaml and key=value overrides (or --key value), e.g.
  areal-hpc submit configs/quickstart.yaml                       # the CPU quickstart, mode=local
  areal-hpc submit configs/quickstart.yaml mode=slurm --dry-run  # render sbatch script, submit nothing
  areal-hpc status experiment_name=my-exp trial_name=t1
"""

CONFIG_HELP = "optional YAML config, then key=value overrides (e.g. trainer.ppo.async_training=False)"


def _split_args(items: Sequence[str], allow_role: bool = False) -> Tuple[Optional[str], List[str], Optional[str]]:
    """Positional words -> (config file, overrides, role)."""
    config, overrides, role = None, [], None
    items = list(items)
    i = 0
    while i < len(items):
        a = items[i]
        if a.startswith("--"):
            overrides.append(a)
            if "=" not in a and i + 1 < len(items) and not items[i + 1].startswith("--") and "=" not in items[i + 1]:
                overrides.append(items[i + 1])
                i += 1
        elif "=" in a:
            overrides.append(a)
        elif a.endswith((".yaml", ".yml")) and config is None:
            config = a
        elif allow_role and role is None:
            role = a
        else:
            raise ConfigError("", f"unexpected argument {a!r}",
                              "give at most one CONFIG.yaml, then key=value overrides")
        i += 1
    return config, overrides, role


def _load(args, full: bool = True):
    """(config, allocation, role). ``full=False`` (commands on an existing run) only needs the
    names that locate the run, so it parses but does not validate a whole new run."""
    from areal_hpc.config import load_config, validate

    config, overrides, role = _split_args(args.args, allow_role=getattr(args, "allow_role", False))
    config = args.config or config
    cfg = load_config(config, overrides)
    if full:
        alloc = validate(cfg)
    else:
        from areal_hpc.config.checks import check_location

        check_location(cfg)
        alloc = None
    _private(cfg)
    return cfg, alloc, role


def _private(cfg) -> None:
    """Every process of a run writes with the run's umask: private unless cluster.group_readable."""
    import os

    from areal_hpc.config.validate import run_umask

    os.umask(run_umask(cfg))


def _find_run(cfg) -> Path:
    from areal_hpc.config import run_dir

    rd = run_dir(cfg)
    if not (rd / "config.yaml").exists():
        raise ConfigError("experiment_name/trial_name",
                          f"no run found for experiment_name={cfg.experiment_name} trial_name={cfg.trial_name} "
                          f"(looked in {rd})", "check the names and cluster.fileroot, or start one with `areal-hpc submit`")
    return rd


# ----------------------------------------------------------------- commands

def cmd_submit(args) -> int:
    from areal_hpc.launch import submit

    cfg, alloc, _ = _load(args)
    return submit.submit(cfg, alloc, dry_run=args.dry_run)


def cmd_add_servers(args) -> int:
    from areal_hpc.launch import control

    cfg, alloc, _ = _load(args, full=False)
    if args.count < 1:
        raise ConfigError("count", f"must be >= 1, got {args.count}")
    return control.add_servers(cfg, _find_run(cfg), args.count, new_job=args.new_job)


def cmd_status(args) -> int:
    from areal_hpc.launch import control

    cfg, _, _ = _load(args, full=False)
    return control.status(cfg, _find_run(cfg), as_json=args.json)


def cmd_logs(args) -> int:
    from areal_hpc.launch import control

    args.allow_role = True
    cfg, _, role = _load(args, full=False)
    return control.logs(_find_run(cfg), role or "trainer", follow=args.follow, lines=args.lines)


def cmd_stop(args) -> int:
    from areal_hpc.launch import control

    cfg, _, _ = _load(args, full=False)
    return control.stop(cfg, _find_run(cfg), timeout_s=args.timeout)


def _run_dir_arg(path: str) -> Path:
    rd = Path(path)
    if not (rd / "config.yaml").exists():
        raise ConfigError("--run-dir", f"{path} holds no config.yaml", "pass the run directory `areal-hpc submit` wrote")
    from areal_hpc.config import load_resolved

    _private(load_resolved(rd / "config.yaml"))
    return rd


def cmd_serve(args) -> int:
    from areal_hpc.launch import entry

    return entry.serve(_run_dir_arg(args.run_dir), args.server_id, args.backend)


def cmd_train(args) -> int:
    from areal_hpc.launch import entry

    return entry.train(_run_dir_arg(args.run_dir))


def cmd_driver(args) -> int:
    from areal_hpc.launch import driver

    return driver.main(_run_dir_arg(args.run_dir))


# ----------------------------------------------------------------- parser

class _VersionAction(argparse.Action):
    """``--version``: prints ``areal-hpc X.Y.Z``; the version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the installed version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import areal_hpc

        print(f"areal-hpc {areal_hpc.__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="areal-hpc", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn, help: str, description: str, config: bool = True):
        sp = sub.add_parser(name, help=help, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        if config:
            sp.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help=CONFIG_HELP)
            sp.add_argument("--config", default=None, help="YAML config (instead of the positional one)")
        return sp

    s = add("submit", cmd_submit, "start a run (servers + trainer)",
            "Validate the config, write the run dir ({fileroot}/{user}/{experiment}/{trial}: config.yaml, plan.json,\n"
            "sbatch/allocation.sbatch), then start the run: mode=local as processes on this machine, mode=slurm as\n"
            "ONE Slurm allocation driven by a driver process. With min_required_servers=N on an existing run whose\n"
            "servers are alive, only a trainer is started; it resumes from the last checkpoint.\n"
            "Bad input exits with code 2 and submits nothing.")
    s.add_argument("--dry-run", action="store_true", help="resolve and write everything, print a summary, submit nothing")

    a = add("add-servers", cmd_add_servers, "add inference servers to a running run",
            "Ask the run's driver to start COUNT more servers inside the live allocation (or, with --new-job or when\n"
            "the allocation has no free GPUs, submit a separate job whose servers join the run). New servers load the\n"
            "current weights before registering; the trainer uses them within one heartbeat.")
    a.add_argument("--count", type=int, default=1, help="number of servers to add (also count=N)")
    a.add_argument("--new-job", action="store_true", help="always submit a separate job for the new servers")

    st = add("status", cmd_status, "show a run: job, steps, servers, trainer progress",
             "Job state (squeue/sacct or local pids), each step, each registered server with health and weight\n"
             "version, the trainer's step/version and recent throughput.")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    lg = add("logs", cmd_logs, "print (or follow) a run's logs",
             "areal-hpc logs [ROLE] [-f] [CONFIG] [key=value ...]; ROLE is trainer (default), driver, server-K,\n"
             "trainer-R (rank R) or slurm. Logs live in {run_dir}/logs/.")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    lg.add_argument("-n", "--lines", type=int, default=50, help="lines of history to show (default 50)")

    sp = add("stop", cmd_stop, "stop a run gracefully",
             "Ask the trainer to checkpoint, stop servers (they deregister), end the job (scancel for Slurm runs).")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a graceful stop before killing")

    sv = add("serve", cmd_serve, "(internal) run one inference server of a run",
             "Internal entry point the launchers start: one server (backend from the run's allocation), registered in\n"
             "the run's registry, heartbeating, deregistered on exit.", config=False)
    sv.add_argument("--run-dir", required=True)
    sv.add_argument("--server-id", required=True)
    sv.add_argument("--backend", default=None, help="override the allocation's backend (hf | sglang)")

    tr = add("train", cmd_train, "(internal) run one trainer rank of a run",
             "Internal entry point: one rank of the trainer (torch.distributed from torchrun or Slurm env).", config=False)
    tr.add_argument("--run-dir", required=True)

    dr = add("driver", cmd_driver, "(internal) the process that owns a Slurm allocation",
             "Internal entry point: runs on the batch host, starts and watches the job steps, serves add-servers /\n"
             "trainer-restart / stop requests, and checkpoints + requeues on USR2.", config=False)
    dr.add_argument("--run-dir", required=True)
    return p


def _pull_count(argv: List[str]) -> List[str]:
    """``add-servers count=N`` (the documented form) -> ``--count N``."""
    out = []
    for a in argv:
        if a.startswith("count="):
            out += ["--count", a.split("=", 1)[1]]
        else:
            out.append(a)
    return out


def _separate(parser: argparse.ArgumentParser, argv: List[str]) -> Tuple[List[str], List[str]]:
    """Split a subcommand's argv into its own flags and the config words (CONFIG, key=value,
    --dotted.key value), so flags may come anywhere: `submit cfg.yaml a=1 --dry-run b=2`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sp = sub.choices.get(argv[0]) if argv else None
    if sp is None or not any(a.dest == "args" for a in sp._actions):
        return argv, []
    takes = {o: (a.nargs != 0) for a in sp._actions for o in a.option_strings}
    ours, rest, i = [argv[0]], [], 1
    while i < len(argv):
        tok = argv[i]
        flag = tok.split("=", 1)[0]
        if flag in takes:
            ours.append(tok)
            if takes[flag] and "=" not in tok and i + 1 < len(argv):
                ours.append(argv[i + 1])
                i += 1
        else:
            rest.append(tok)
        i += 1
    return ours, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["add-servers"]:
        argv = _pull_count(argv)
    parser = build_parser()
    ours, rest = _separate(parser, argv)
    args = parser.parse_args(ours)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    if hasattr(args, "args"):
        args.args = rest
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"areal-hpc {args.command}: error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        import errno

        if e.errno != errno.ENAMETOOLONG:
            raise
        print(f"areal-hpc {args.command}: error: {e.filename or ''}: file name too long for the filesystem "
              "(use a shorter cluster.fileroot, experiment_name or trial_name)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
