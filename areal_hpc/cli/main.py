"""`areal-hpc`: parse the command, hand its config words to the config package, dispatch.

Exit codes: 0 ok, 1 the run failed (or a registry wait timed out), 2 bad input (one line naming the key; nothing
submitted), 130 Ctrl-C, 141 stdout closed (`status | head`).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from areal_hpc.config import ConfigError, check_location, load_config, load_resolved, run_dir, run_umask, validate
from areal_hpc.registry import RegistryTimeout

DESCRIPTION = """\
areal-hpc: asynchronous RL for language models, Slurm-first. A run lives in
{cluster.fileroot}/{user}/{experiment_name}/{trial_name}/ (config, plan, registry, logs, metrics).

Every command takes an optional CONFIG.yaml and key=value overrides (or --key value), e.g.
  areal-hpc submit configs/quickstart.yaml                       # the CPU quickstart, mode=local
  areal-hpc submit configs/quickstart.yaml mode=slurm --dry-run  # render sbatch script, submit nothing
  areal-hpc status experiment_name=my-exp trial_name=t1
"""

CONFIG_USAGE = "%(prog)s [options] [CONFIG.yaml | --config FILE] [key=value | --key value ...]"
CONFIG_HELP = ("config words go to the config package untouched: an optional YAML config, then key=value overrides "
               "(e.g. trainer.ppo.async_training=False) or --key value; options of the command may come anywhere")


def _pop_name(args) -> Optional[str]:
    """The command's own positional (`logs` ROLE, `remove-server` SERVER): its first word that is no config word
    (``key=value``, ``--key value``, ``--key=value``, ``CONFIG.yaml``), wherever it comes among them."""
    words, i = args.words, 0
    while i < len(words):
        if words[i].startswith("-"):
            i += 1 if "=" in words[i] else 2  # an option's value is no name
        elif "=" in words[i] or words[i].endswith((".yaml", ".yml")):
            i += 1
        else:
            return words.pop(i)
    return None


def _run_dir_arg(path: str | Path) -> Path:
    """The run dir; this process takes the run's umask."""
    rd = Path(path)
    if not (rd / "config.yaml").exists():
        raise ConfigError("--run-dir", f"{path} holds no config.yaml", "pass the run dir `areal-hpc submit` wrote")
    os.umask(run_umask(load_resolved(rd / "config.yaml")))
    return rd


def _existing_run(args) -> Path:
    """The run dir a command acts on, from its config words (only the names that locate the run are checked)."""
    cfg = load_config(None, args.words)
    check_location(cfg)
    rd = run_dir(cfg)
    if not (rd / "config.yaml").exists():
        raise ConfigError("experiment_name/trial_name", f"no run found for experiment_name={cfg.experiment_name} "
                          f"trial_name={cfg.trial_name} (looked in {rd})",
                          "check the names and cluster.fileroot, or start one with `areal-hpc submit`")
    return _run_dir_arg(rd)


def cmd_submit(args) -> int:
    from areal_hpc.launch import submit

    cfg = load_config(None, args.words)
    alloc = validate(cfg)
    os.umask(run_umask(cfg))  # every process of a run writes with its umask: private unless cluster.group_readable
    return submit.submit(cfg, alloc, dry_run=args.dry_run)


def cmd_add_servers(args) -> int:
    from areal_hpc.launch import control

    if args.url is not None:
        from areal_hpc.launch.external import check_key, parse_url, read_key_file

        parse_url(args.url)  # a malformed URL is bad input before anything else is looked at
        if args.count != 1 or args.new_job:
            raise ConfigError("url", "attaches one running server", "leave out count= and --new-job with url=")
        if args.api_key_file is not None:
            if args.api_key is not None:
                raise ConfigError("api_key", "and api_key_file are both given", "keep api_key_file= alone")
            args.api_key = read_key_file(args.api_key_file)
        elif args.api_key is not None:
            check_key(args.api_key, "api_key")
    elif args.api_key is not None or args.api_key_file is not None:
        raise ConfigError("api_key" if args.api_key_file is None else "api_key_file",
                          "is the key of a server attached with url=", "give url=http://HOST:PORT too")
    elif args.count < 1:
        raise ConfigError("count", f"must be >= 1, got {args.count}")
    rd = _existing_run(args)
    if args.url is not None:
        return control.attach_server(rd, args.url, api_key=args.api_key)
    return control.add_servers(rd, args.count, new_job=args.new_job)


def cmd_remove_server(args) -> int:
    from areal_hpc.launch import control

    if (ident := _pop_name(args)) is None:
        raise ConfigError("SERVER", "which server?", "remove-server ID|URL experiment_name=... trial_name=...")
    return control.remove_server(_existing_run(args), ident)


def cmd_status(args) -> int:
    from areal_hpc.launch import status

    return status.status(_existing_run(args), as_json=args.json)


def cmd_logs(args) -> int:
    from areal_hpc.launch import status

    if args.lines < 0:  # `tail -n -5` style: it showed nothing, silently
        raise ConfigError("--lines", f"must be >= 0, got {args.lines}", "e.g. -n 100")
    role = _pop_name(args) or "trainer"
    return status.logs(_existing_run(args), role, follow=args.follow, lines=args.lines)


def cmd_stop(args) -> int:
    from areal_hpc.launch import control

    if not args.timeout >= 0:  # -1 (or nan) meant as "no limit" skipped the graceful stop: SIGKILL, no checkpoint
        raise ConfigError("--timeout", f"must be seconds >= 0, got {args.timeout}", "e.g. --timeout 600")
    return control.stop(_existing_run(args), timeout_s=args.timeout, external=args.external)


def cmd_serve(args) -> int:
    from areal_hpc.launch import entry
    from areal_hpc.launch.status import run_registry

    if args.run_dir is not None:  # what the launchers start
        if args.words:
            raise ConfigError("", f"unexpected argument {args.words[0]!r}", "give --run-dir or the run's names")
        if args.server_id is None:
            raise ConfigError("--server-id", "is required with --run-dir")
        return entry.serve(_run_dir_arg(args.run_dir), args.server_id, args.backend)
    # by hand, on any host that sees the run dir: joins the run as an external server
    rd = _existing_run(args)
    if args.server_id is not None and run_registry(rd).get("servers", args.server_id) is not None:
        raise ConfigError("--server-id", f"{args.server_id} is a live server of this run (its record would be "
                          "overwritten)", "leave out --server-id (a free one is picked) or give another")
    return entry.serve(rd, args.server_id or entry.manual_server_id(), args.backend, external=True)


def cmd_train(args) -> int:
    from areal_hpc.launch import entry

    return entry.train(_run_dir_arg(args.run_dir))


def cmd_driver(args) -> int:
    from areal_hpc.launch import driver

    return driver.main(_run_dir_arg(args.run_dir))


class _VersionAction(argparse.Action):
    """``--version``: the version is looked up only when asked for."""

    def __call__(self, parser, namespace, values, option_string=None):
        import areal_hpc

        print(f"areal-hpc {areal_hpc.__version__}")
        parser.exit()


class _Once(argparse.Action):
    """An option that takes a value is given once (``count=2 count=3`` is an error, as a config key given twice is)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.dest in (given := namespace.__dict__.setdefault("given_", set())):
            raise argparse.ArgumentError(self, "given twice (give it once)")  # no values: one may be an API key
        given.add(self.dest)
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, like every other bad input (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="areal-hpc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False)
    p.add_argument("--version", action=_VersionAction, nargs=0, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                   help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn, help: str, description: str, config: bool = True):
        """A command; with ``config``, the words argparse does not know are its config words."""
        sp = sub.add_parser(name, help=help, description=description, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            usage=CONFIG_USAGE if config else None, epilog=CONFIG_HELP if config else None)
        sp.set_defaults(fn=fn, words=[] if config else None)
        return sp

    s = add("submit", cmd_submit, "start a run (servers + trainer)",
            "Validate the config, write the run dir (config.yaml, plan.json, sbatch/) and start the run: processes on\n"
            "this machine (mode=local, torchrun), ONE Slurm allocation (mode=slurm) or a Ray cluster (mode=ray).\n"
            "With min_required_servers=N on a run whose servers are alive, only a trainer starts, from the last\n"
            "checkpoint. Bad input exits with code 2 and submits nothing.")
    s.add_argument("--dry-run", action="store_true", help="resolve and write it all, print a summary, submit nothing")

    a = add("add-servers", cmd_add_servers, "add inference servers to a running run",
            "Start COUNT more servers in the live allocation (or, with --new-job or when it has no free GPUs, in a\n"
            "separate job that joins the run); or attach a running server with url=. New servers load the current\n"
            "weights before registering.")
    a.add_argument("--count", action=_Once, type=int, default=1, help="number of servers to add (also count=N)")
    a.add_argument("--new-job", action="store_true", help="always submit a separate job for the new servers")
    a.add_argument("--url", action=_Once, help="attach a running SGLang or hf server (also url=http://HOST:PORT)")
    a.add_argument("--api-key", action=_Once, help="that server's API key (also api_key=...; default: the run's); "
                   "on a shared host every user sees it in `ps`, and it stays in shell history: prefer --api-key-file")
    a.add_argument("--api-key-file", action=_Once, help="a file (mode 0600) or pipe holding that server's key, e.g. "
                   "api_key_file=~/.sglang-key or api_key_file=/dev/stdin")

    add("remove-server", cmd_remove_server, "detach an external server from a run",
        "areal-hpc remove-server ID|URL [CONFIG] [key=value ...]: the run stops using a server attached with\n"
        "`add-servers url=...`; the server keeps running.")

    st = add("status", cmd_status, "show a run: job, steps, servers, trainer progress",
             "Job state (squeue/sacct or local pids), each step, each registered server with health and weight\n"
             "version, the trainer's step/version and recent throughput.")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    lg = add("logs", cmd_logs, "print (or follow) a run's logs",
             "areal-hpc logs [ROLE] [-f] [CONFIG] [key=value ...]; ROLE is trainer (default), driver, server-K,\n"
             "trainer-R (rank R), server-K-N (node N of a multi-node server) or slurm. Logs live in {run_dir}/logs/.")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    lg.add_argument("-n", "--lines", action=_Once, type=int, default=50, help="lines of history to show (default 50)")

    sp = add("stop", cmd_stop, "stop a run gracefully",
             "Ask the trainer to checkpoint, stop servers (they deregister), end the job (scancel for Slurm runs).")
    sp.add_argument("--timeout", action=_Once, type=float, default=120.0,
                    help="seconds to wait for a graceful stop before killing (the trainer gets all but 40 of them)")
    sp.add_argument("--external", action="store_true",
                    help="also stop external servers (attached by URL, or `serve` by hand) where possible: their own "
                         "Slurm job is cancelled, a process on this host gets SIGTERM; without it they are detached "
                         "and keep running")

    sv = add("serve", cmd_serve, "run one inference server of a run (the launchers do; or by hand)",
             "One server, registered in the run's registry while it lives. The launchers pass --run-dir and\n"
             "--server-id. By hand, on any host that sees the run dir, `areal-hpc serve experiment_name=...\n"
             "trial_name=...` joins the run as an external server (`areal-hpc stop` stops it only with --external).")
    sv.add_argument("--run-dir", action=_Once)
    sv.add_argument("--server-id", action=_Once)
    sv.add_argument("--backend", action=_Once, help="override the allocation's backend (hf | sglang)")

    tr = add("train", cmd_train, "(internal) run one trainer rank of a run",
             "Internal entry point: one rank of the trainer (torch.distributed from torchrun or Slurm).", config=False)
    tr.add_argument("--run-dir", required=True)

    dr = add("driver", cmd_driver, "(internal) the process that owns a Slurm allocation",
             "Internal entry point: runs on the batch host, starts and watches the job steps, serves add-servers /\n"
             "trainer-restart / stop requests, and checkpoints + requeues on USR2.", config=False)
    dr.add_argument("--run-dir", required=True)
    return p


def _own_options(argv: List[str], known: argparse.Namespace) -> List[str]:
    """``count=2`` -> ``--count=2``: a command's own option also takes the seed's ``name=value``
    form (dest ``api_key`` is option ``--api-key``); every other word is left as it is."""
    own = set(vars(known)) - {"fn", "command", "words", "given_"}
    out = []
    for word in argv:
        name, eq, value = word.partition("=")
        out.append(f"--{name.replace('_', '-')}={value}" if eq and name in own else word)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, words = parser.parse_known_args(_own_options(argv, parser.parse_known_args(argv)[0]))
    if not getattr(args, "fn", None):  # no COMMAND: its help; a word that is none (`--vers`) is one line, as all input
        if words:
            parser.error(f"{words[0]}: is not an option of areal-hpc (see its --help)")
        parser.print_help()
        return 2
    try:
        if words and args.words is None:
            raise ConfigError("", f"unexpected argument {words[0]!r}", f"see areal-hpc {args.command} --help")
        args.words = words
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, not at exit
        return rc
    except ConfigError as e:
        print(f"areal-hpc {args.command}: error: {e.one_line()}", file=sys.stderr)
        return 2
    except RegistryTimeout as e:
        print(f"areal-hpc {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `status | head`: the reader is gone; nothing more to write, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # as a process SIGPIPE killed
    except OSError as e:  # another user's run dir (`sudo -E`, USER naming someone else), a name too long: no traceback
        denied = isinstance(e, PermissionError)
        if not denied and e.errno != errno.ENAMETOOLONG:
            raise
        why = ("permission denied (a run of another user? check cluster.fileroot, experiment_name, trial_name and who "
               "owns that path)" if denied else "file name too long for the filesystem (use a shorter "
               "cluster.fileroot, experiment_name or trial_name)")
        print(f"areal-hpc {args.command}: error: {e.filename or ''}: {why}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
