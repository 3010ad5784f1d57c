"""The command-line surface: help, dry-run, and bad input (exit 2, one line naming the key, nothing written)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from areal_hpc.cli.main import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def run_cli(*argv):
    return main([str(a) for a in argv])


def test_help_for_every_command(capsys):
    for cmd in (None, "submit", "add-servers", "status", "logs", "stop", "serve", "train", "driver"):
        with pytest.raises(SystemExit) as e:
            main(([cmd] if cmd else []) + ["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: areal-hpc" in out and len(out) > 200


def test_python_dash_m_matches_console_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                          "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "nothing submitted" in out.stdout


def test_dry_run_writes_run_dir(tmp_path, capsys):
    rc = run_cli("submit", QUICKSTART, "mode=slurm", "allocation_mode=sglang:d2t2+fsdp:d4", "cluster.n_nodes=2",
                 "cluster.n_gpus_per_node=4", f"cluster.fileroot={tmp_path}", "--dry-run", "cluster.partition=debug",
                 "experiment_name=e1", "trial_name=t1")
    assert rc == 0
    rd = next(tmp_path.glob("*/e1/t1"))
    plan = json.loads((rd / "plan.json").read_text())
    steps = {s["name"]: s for s in plan["steps"]}
    assert set(steps) == {"server-0", "server-1", "trainer"}
    assert steps["server-0"]["gpus_per_task"] == 2 and steps["server-0"]["ntasks"] == 1
    assert steps["trainer"] == {**steps["trainer"], "role": "trainer", "nodes": 1, "ntasks": 4, "gpus_per_task": 1,
                                "relative_node": 1}
    script = (rd / "sbatch" / "allocation.sbatch").read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --nodes=2" in script
    assert script.count("areal_hpc serve") == 2 and script.count("areal_hpc train") == 1
    cfg = (rd / "config.yaml").read_text()
    assert "sglang:d2t2+fsdp:d4" in cfg
    assert "nothing submitted" in capsys.readouterr().out


def test_status_logs_stop_without_run(tmp_path, capsys):
    for cmd in ("status", "logs", "stop", "add-servers"):
        rc = run_cli(cmd, f"cluster.fileroot={tmp_path}", "experiment_name=nope", "trial_name=none")
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "no run found" in err and "experiment_name=nope" in err, (cmd, err)


BAD_INPUTS = [
    # (extra args, key the message must name)
    (["mode=ray", "cluster.ray_address=head-without-port"], "cluster.ray_address"),
    (["mode=kubernetes"], "mode"),
    (["allocation_mode=sglang"], "allocation_mode"),
    (["allocation_mode=hf:d4|fsdp:d4"], "allocation_mode"),
    (["allocation_mode=hf.d16p1m1+d32p2m1"], "allocation_mode"),
    (["allocation_mode=vllm:d1+d1"], "allocation_mode"),
    (["allocation_mode=hf:d1+fsdp:d1t2"], "allocation_mode"),
    (["allocation_mode=sglang:d1+d1"], "allocation_mode"),  # sglang on a CPU-only cluster
    (["allocation_mode=hf:d1+eval"], "allocation_mode"),     # ppo trainer without trainer GPUs
    (["cluster.n_gpus_per_node=4", "allocation_mode=hf:d8+d8"], "allocation_mode"),
    (["cluster.n_gpus_per_node=4", "allocation_mode=hf:d1t8+d1"], "allocation_mode"),
    (["cluster.n_gpus_per_node=4", "allocation_mode=hf:d1t2+d1"], "allocation_mode"),  # hf: one device a server
    (["allocation_mode=hf:d1p2+d1"], "allocation_mode"),
    (["trainer.type=null"], "trainer.type"),
    (["trainer.type=dpo"], "trainer.type"),
    (["trainer.ppo.asyn_training=True"], "trainer.ppo.asyn_training"),
    (["trainer.ppo.async_training=perhaps"], "trainer.ppo.async_training"),
    (["cluster.n_nodes=0"], "cluster.n_nodes"),
    (["cluster.n_nodes=two"], "cluster.n_nodes"),
    (["cluster.time=forever"], "cluster.time"),
    (["cluster.fileroot=/proc/nope"], "cluster.fileroot"),
    (["experiment_name=a/b"], "experiment_name"),
    (["trial_name="], "trial_name"),
    (["rollout.batch_size=0"], "rollout.batch_size"),
    (["rollout.n_samples=-1"], "rollout.n_samples"),
    (["rollout.gen.max_new_tokens=0"], "rollout.gen.max_new_tokens"),
    (["rollout.gen.temperature=-1"], "rollout.gen.temperature"),
    (["rollout.gen.top_p=1.5"], "rollout.gen.top_p"),
    (["trainer.ppo.actor.path=/no/such/model"], "trainer.ppo.actor.path"),
    (["trainer.ppo.actor.path=toy:gpt5"], "trainer.ppo.actor.path"),
    (["train_dataset.path=/no/such/data.jsonl"], "train_dataset.path"),
    (["train_dataset.path=toy:"], "train_dataset.path"),
    (["train_dataset.path=toy:sum-0"], "train_dataset.path"),  # no rows
    (["trainer.ppo.actor.path=toy:qwen3-l0"], "trainer.ppo.actor.path"),  # no layers
    (["trainer.ppo.actor.optimizer.lr=0"], "trainer.ppo.actor.optimizer.lr"),
    (["trainer.ppo.actor.optimizer.lr_schedule=linear"], "trainer.ppo.actor.optimizer.lr_schedule"),
    (["trainer.ppo.adv_norm=global"], "trainer.ppo.adv_norm"),
    (["trainer.ppo.actor.fsdp_units=block"], "trainer.ppo.actor.fsdp_units"),
    (["trainer.ppo.weight_update=nccl"], "trainer.ppo.weight_update"),
    (["trainer.ppo.weight_update=gloo", "cluster.n_gpus_per_node=4"], "trainer.ppo.weight_update"),
    (["trainer.ppo.weight_update=mpi"], "trainer.ppo.weight_update"),
    (["trainer.ppo.c_clip=0.5"], "trainer.ppo.c_clip"),
    (["launcher.lock_kind=nfs"], "launcher.lock_kind"),
    (["launcher.ttl_s=1"], "launcher.ttl_s"),
    (["recover.mode=sometimes"], "recover.mode"),
    (["saver.freq_steps=-5"], "saver.freq_steps"),
    (["server.dtype=int4"], "server.dtype"),
    (["what"], ""),
    (["--rollout.batch_size"], "rollout.batch_size"),
    (["--config", "/no/such.yaml"], "config"),
    (["--dry"], "dry"),  # no abbreviations: not --dry-run
]


@pytest.mark.parametrize("extra, key", BAD_INPUTS, ids=[" ".join(e) for e, _ in BAD_INPUTS])
def test_bad_input_exit_2(extra, key, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    args = ["submit", QUICKSTART, f"cluster.fileroot={root}", *extra]
    if extra[0] == "--config":
        args = ["submit", f"cluster.fileroot={root}", *extra]
    rc = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("areal-hpc submit: error: " + (key + ":" if key else "")), err
    assert list(root.iterdir()) == []  # nothing written, nothing submitted


def test_usage_errors_are_one_line(capsys):
    """A command's own options take the seed form too (count=N is --count N); their errors are one line."""
    with pytest.raises(SystemExit) as e:
        run_cli("add-servers", "count=x", "experiment_name=e")
    assert e.value.code == 2
    assert capsys.readouterr().err == "areal-hpc add-servers: error: argument --count: invalid int value: 'x'\n"
    assert run_cli("train", "--run-dir", "/nope", "extra=1") == 2
    assert capsys.readouterr().err.startswith("areal-hpc train: error: unexpected argument 'extra=1'")


def test_bad_yaml_file(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("trainer: [unclosed\n")
    assert run_cli("submit", f, f"cluster.fileroot={tmp_path}") == 2
    assert "not valid YAML" in capsys.readouterr().err


# fix8-B

def test_submit_names_the_checkpoint_the_trainer_resumes_from(tmp_path, capsys):
    """It named the highest-numbered step_* directory: a half-written one (no meta.json), not the one `latest` names."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0
    ckpts = next(tmp_path.glob("*/e1/t1")) / "checkpoints"
    for step in (4, 6):
        (ckpts / f"step_{step:08d}").mkdir(parents=True)
    (ckpts / "step_00000004" / "meta.json").write_text("{}")
    (ckpts / "latest").write_text("step_00000004")
    capsys.readouterr()
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0
    assert "resume    from step_00000004 " in capsys.readouterr().out


def test_dry_run_writes_no_server_script_with_taken_names(tmp_path, capsys):
    """`submit --dry-run` used to write sbatch/add-servers.sbatch for the whole allocation, naming its servers
    server-0..: run by hand, they clashed with the run's own. Only `add-servers --new-job` renders that
    template, with free names; the run dir holds just the allocation's script."""
    rc = run_cli("submit", QUICKSTART, "mode=slurm", "allocation_mode=sglang:d2+fsdp:d2", "cluster.n_gpus_per_node=4",
                 f"cluster.fileroot={tmp_path}", "--dry-run", "experiment_name=e1", "trial_name=t1")
    assert rc == 0, capsys.readouterr().err
    rd = next(tmp_path.glob("*/e1/t1"))
    assert sorted(p.name for p in (rd / "sbatch").iterdir()) == ["allocation.sbatch"]


# fix9-B

def test_add_servers_new_job_to_a_run_without_servers_is_bad_input(tmp_path, capsys):
    """`add-servers --new-job` on an SFT run (allocation_mode has no servers) crashed with a TypeError traceback."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "trainer.type=sft", "allocation_mode=fsdp:d1", "--dry-run", "mode=slurm",
                   "trainer.sft.model.path=toy:qwen3-h64-l1", *names) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert run_cli("add-servers", "--new-job", *names) == 2
    err = capsys.readouterr().err
    assert "allocation_mode: 'fsdp:d1' has no inference servers" in err, err


def test_add_servers_to_a_local_run_never_runs_sbatch(tmp_path, capsys):
    """A mode=local run with no live owner said "use --new-job"; following it ran sbatch on a host without Slurm (its
    raw errors, exit 1)."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert run_cli("add-servers", *names) == 2
    assert "--new-job" not in capsys.readouterr().err
    assert run_cli("add-servers", "--new-job", *names) == 2
    assert "--new-job: run" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["-1", "nan"])
def test_stop_with_a_negative_timeout_is_bad_input(tmp_path, capsys, timeout):
    """`stop --timeout -1` (meant as "no limit") skipped the wait for a graceful stop: what ran on this host was
    SIGKILLed (a Slurm job cancelled) at once, with no checkpoint. It is bad input now; nothing is asked of the run."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert run_cli("stop", *names, "--timeout", timeout) == 2
    assert capsys.readouterr().err.startswith("areal-hpc stop: error: --timeout: must be seconds >= 0")
    assert not list(next(tmp_path.glob("*/e1/t1")).glob("registry/requests/*"))


def test_logs_with_negative_lines_is_bad_input(tmp_path, capsys):
    """`logs -n -5` (tail's "last 5") printed no line of the log, and said nothing of why."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    (next(tmp_path.glob("*/e1/t1")) / "logs" / "trainer-0.log").write_text("step 1\nstep 2\n")
    capsys.readouterr()
    assert run_cli("logs", *names, "-n", "1") == 0 and capsys.readouterr().out == "step 2\n"
    assert run_cli("logs", *names, "-n", "-5") == 2
    assert capsys.readouterr().err.startswith("areal-hpc logs: error: --lines: must be >= 0, got -5")


def test_logs_role_after_the_config_words(tmp_path, capsys):
    """`logs configs/quickstart.yaml server-0` (the README's `logs -f CONFIG`, a role added) was refused with
    "unexpected argument 'server-0' (at most one CONFIG.yaml, then key=value overrides)": only a first word was
    a role."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    (next(tmp_path.glob("*/e1/t1")) / "logs" / "server-0.log").write_text("serving\n")
    capsys.readouterr()
    for words in ([QUICKSTART, *names, "server-0"], ["--experiment_name", "e1", *names[::2], "server-0"]):
        assert run_cli("logs", *words) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == "serving\n"


@pytest.mark.parametrize("words", [["submit", QUICKSTART, "--dryrun"], ["status", "--jsn", "trial_name=t1"]])
def test_a_mistyped_flag_is_named_as_such(words, capsys):
    """`submit CONFIG --dryrun` said "dryrun: option needs a value (write --dryrun VALUE or dryrun=VALUE)", as if
    the flag were a config key missing its value; a config key without its value still says that."""
    assert run_cli(*words) == 2
    assert "is not an option of this command, nor a config key (see its --help)" in capsys.readouterr().err
    assert run_cli("status", "--trial_name") == 2
    assert "trial_name: option needs a value" in capsys.readouterr().err


@pytest.mark.parametrize("count, got", [(["count=-1"], "-1"), (["--count", "0"], "0")])
def test_add_servers_with_a_count_below_one_is_bad_input(count, got, tmp_path, capsys):
    """The README's "a negative count": one line naming count, exit 2, and no server started."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert run_cli("add-servers", *count, *names) == 2
    assert capsys.readouterr().err == f"areal-hpc add-servers: error: count: must be >= 1, got {got}\n"
    assert not list(next(tmp_path.glob("*/e1/t1/logs")).iterdir())


def test_an_abbreviated_option_before_the_command_is_one_line(capsys):
    """`areal-hpc --vers` (no abbreviations) printed the whole --help on stdout, exit 2, where every other bad word is
    one line on stderr; `areal-hpc` alone still prints the help."""
    with pytest.raises(SystemExit) as e:
        run_cli("--vers")
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == ""
    assert out.err == "areal-hpc: error: --vers: is not an option of areal-hpc (see its --help)\n"
    assert run_cli() == 2 and "usage: areal-hpc" in capsys.readouterr().out


def test_status_into_a_closed_pipe_is_no_traceback(tmp_path, capsys):
    """`areal-hpc status | head` ended with a BrokenPipeError traceback once head had read its lines."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line
    with os.fdopen(w, "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "areal_hpc", "status", *names], stdout=out,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stderr == "" and proc.returncode == 141, (proc.returncode, proc.stderr)


def test_a_registry_timeout_is_one_line(tmp_path, capsys, monkeypatch):
    """A `RegistryTimeout` (a registry lock held too long, records that never come) reached the user as a traceback."""
    from areal_hpc.launch import status
    from areal_hpc.registry import RegistryTimeout

    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    capsys.readouterr()

    def held(*args, **kwargs):
        raise RegistryTimeout("could not take registry lock x.lock within 30s")
    monkeypatch.setattr(status, "status", held)
    assert run_cli("status", *names) == 1
    assert capsys.readouterr().err == "areal-hpc status: error: could not take registry lock x.lock within 30s\n"


@pytest.mark.parametrize("command", ["status", "logs", "stop", "add-servers", "submit"])
def test_a_run_dir_this_user_cannot_read_is_one_line(command, tmp_path, capsys):
    """A run dir of another user's permissions (made under `sudo -E`, or USER naming someone else on a shared
    fileroot) ended every command in a PermissionError traceback (exit 1)."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    rd = next(tmp_path.glob("*/e1/t1"))
    rd.chmod(0)
    # root reads a mode-0 dir anyway: drop the capabilities that let it
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    words = [QUICKSTART, "--dry-run"] if command == "submit" else []
    try:
        p = subprocess.run([*drop, sys.executable, "-m", "areal_hpc", command, *words, *names],
                           capture_output=True, text=True, cwd=tmp_path)
    finally:
        rd.chmod(0o700)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"areal-hpc {command}: error: ") and str(rd) in p.stderr
    assert "permission denied" in p.stderr.lower()


def test_serve_by_hand_with_the_id_of_a_live_server_is_bad_input(tmp_path, capsys):
    """`areal-hpc serve ... --server-id server-0` by hand in a run whose server-0 lives took over its registry record
    (the trainer sent it rollouts and weights) until the real one's next heartbeat wrote it back, and then ran on,
    orphaned: in no record, never updated, not stopped by `stop --external`."""
    from areal_hpc.config import load_resolved
    from areal_hpc.registry import Registry

    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    rd = next(tmp_path.glob("*/e1/t1"))
    reg = Registry.for_run(rd, load_resolved(rd / "config.yaml").launcher)
    own = subprocess.Popen([sys.executable, "-m", "areal_hpc", "serve", "--run-dir", rd, "--server-id", "server-0"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while reg.get("servers", "server-0") is None:
            assert own.poll() is None and time.monotonic() < deadline, "the run's server-0 did not register"
            time.sleep(0.2)
        p = subprocess.run([sys.executable, "-m", "areal_hpc", "serve", *names, "--server-id", "server-0"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, (p.returncode, p.stderr)
        assert p.stderr.startswith("areal-hpc serve: error: --server-id: server-0"), p.stderr
        assert reg.get("servers", "server-0")["pid"] == own.pid
    finally:
        own.terminate()
        own.wait(60)


@pytest.mark.parametrize("word", ["=5", "--=5"])
def test_an_override_without_a_key_is_named(word, tmp_path, capsys):
    """`submit CONFIG =5` (a key lost, e.g. to a shell variable that was empty) said only "error: unknown key"."""
    assert run_cli("submit", QUICKSTART, f"cluster.fileroot={tmp_path}", word, "--dry-run") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and repr(word) in err and "key=value" in err, err
    assert list(tmp_path.iterdir()) == []


def test_logs_follow_waits_for_a_log_not_opened_yet(tmp_path, capsys):
    """`logs trainer -f` right after `submit` (the README's next command) exited 2, "no log for 'trainer'", while the
    trainer step had not opened its log yet (job pending, servers starting). With -f it waits for it, saying so once;
    a name no step of the run can have (a server beyond the plan, a typo) still fails at once."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=e1", "trial_name=t1"]
    assert run_cli("submit", QUICKSTART, "--dry-run", *names) == 0, capsys.readouterr().err
    capsys.readouterr()
    for role in ("server-9", "trainre", "trainer-1"):
        assert run_cli("logs", role, "-f", *names) == 2
        assert f"no log for {role!r}" in capsys.readouterr().err
    proc = subprocess.Popen([sys.executable, "-m", "areal_hpc", "logs", "trainer", "-f", *names], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
        (next(tmp_path.glob("*/e1/t1")) / "logs" / "trainer-0.log").write_text("step 1\n")
        assert proc.stdout.readline() == "step 1\n"
    finally:
        proc.kill()
    err = proc.communicate()[1]
    assert err.count("waiting") == 1 and "'trainer'" in err, err


@pytest.mark.parametrize("words", [["count=2", "count=3"], ["--count", "2", "count=2"], ["-n", "5", "--lines=9"],
                                   ["api_key=k1", "--api-key", "k2"]])
def test_an_option_of_the_command_given_twice_is_bad_input(words, capsys):
    """`add-servers count=2 count=3` started 3 servers without a word, where a config key given twice is refused; the
    refusal names the option, not its values (one may be an API key)."""
    command = "logs" if "-n" in words else "add-servers"
    with pytest.raises(SystemExit) as e:
        run_cli(command, *words, "trial_name=t1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "given twice" in err, err
    assert err.startswith(f"areal-hpc {command}: error: argument ") and "k1" not in err and "k2" not in err
