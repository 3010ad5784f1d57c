"""Bad input found on the login node, before anything is written or submitted (issue 16, item 2).

Every case goes through the real CLI (`areal_hpc.cli.main.main`): exit 2, exactly one line on
stderr naming the key, no traceback, nothing written under the fileroot. The Slurm rejection
cases (Slurm itself refuses the allocation) are at the end, against the local cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from areal_hpc.cli.main import main
from areal_hpc.config.validate import walk
from areal_hpc.config.schema import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
LONG = "x" * 300  # longer than NAME_MAX (255) on every common filesystem
# a small valid run for tests that bring their own YAML file
TINY = ["trainer.ppo.actor.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum", "allocation_mode=hf:d1+d1",
        "cluster.n_gpus_per_node=0"]


@pytest.fixture(autouse=True)
def _keep_umask():
    """`main` sets the run's umask in this process (as it does in a real one); put it back."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def assert_one_line(rc, err, command, key):
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith(f"areal-hpc {command}: error: {key}"), err


def yaml_file(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# (overrides, key the message must name). Overrides are appended to the quickstart config.
BAD_OVERRIDES = [
    # not finite (the three, and friends)
    (["trainer.ppo.actor.optimizer.lr=nan"], "trainer.ppo.actor.optimizer.lr"),
    (["trainer.ppo.actor.optimizer.lr=inf"], "trainer.ppo.actor.optimizer.lr"),
    (["rollout.gen.temperature=nan"], "rollout.gen.temperature"),
    (["launcher.ttl_s=nan"], "launcher.ttl_s"),
    (["launcher.heartbeat_s=-inf"], "launcher.heartbeat_s"),
    (["trainer.ppo.eps_clip=nan"], "trainer.ppo.eps_clip"),
    (["trainer.ppo.c_clip=inf"], "trainer.ppo.c_clip"),
    # Slurm time limits, read as Slurm reads them
    (["cluster.time=0"], "cluster.time"),
    (["cluster.time=99:99:99"], "cluster.time"),
    (["cluster.time=UNLIMITED"], "cluster.time"),
    (["cluster.time=1-25"], "cluster.time"),
    (["cluster.time=4h"], "cluster.time"),
    (["cluster.time=1:2:3:4"], "cluster.time"),
    (["cluster.time=1"], "cluster.time"),  # 1 minute: USR2@90 at once, requeued for ever ("1" meant as an hour?)
    # USR2 90 s before the limit, up to 60 s early: as the job starts (the driver died of it: FAILED, no log)
    (["cluster.time=2"], "cluster.time"),
    (["cluster.time=00:02:30"], "cluster.time"),
    # control characters in what reaches the job script (and NUL anywhere)
    (["cluster.partition=debug\nrm -rf ~"], "cluster.partition"),
    (["cluster.account=proj\r"], "cluster.account"),
    (["cluster.python=/usr/bin/python3\nrm -rf ~"], "cluster.python"),
    (["cluster.qos=normal\tx"], "cluster.qos"),
    (["cluster.partition=debug gpu"], "cluster.partition"),
    (["cluster.constraint=a100 ib"], "cluster.constraint"),
    (["train_dataset.system_prompt=be brief\x00"], "train_dataset.system_prompt"),
    # names longer than the filesystem allows
    ([f"experiment_name={LONG}"], "experiment_name"),
    ([f"trial_name={LONG}"], "trial_name"),
    # positive where positive, ranges where ranges
    (["rollout.request_timeout_s=0"], "rollout.request_timeout_s"),
    (["rollout.drop_timeout_s=0"], "rollout.drop_timeout_s"),
    (["rollout.stall_timeout_s=-1"], "rollout.stall_timeout_s"),
    (["server.port=70000"], "server.port"),
    (["server.port=30000", "allocation_mode=hf:d2+d1"], "server.port"),  # two servers of one node on one port
    (["server.mem_fraction_static=0"], "server.mem_fraction_static"),
    (["server.context_length=0"], "server.context_length"),
    (["rollout.gen.top_k=0"], "rollout.gen.top_k"),
    (["rollout.gen.stop_token_ids=[5, -1]"], "rollout.gen.stop_token_ids[1]"),
    (["rollout.gen.stop_token_ids=[5, eos]"], "rollout.gen.stop_token_ids[1]"),  # each item of a list checked
    (["trainer.ppo.actor.optimizer.beta2=1"], "trainer.ppo.actor.optimizer.beta2"),
    (["trainer.ppo.actor.optimizer.eps=0"], "trainer.ppo.actor.optimizer.eps"),
    (["trainer.ppo.behav_imp_weight_cap=0.5"], "trainer.ppo.behav_imp_weight_cap"),
    (["trainer.ppo.kl_ctl=-0.1"], "trainer.ppo.kl_ctl"),
    (["trainer.ppo.mb_spec.n_mbs=0"], "trainer.ppo.mb_spec.n_mbs"),
    (["train_dataset.max_prompt_len=0"], "train_dataset.max_prompt_len"),
    # servers refuse a prompt plus max_new_tokens over their context (SGLang does): every request of the run would
    (["server.context_length=300", "train_dataset.max_prompt_len=100", "rollout.gen.max_new_tokens=256"],
     "rollout.gen.max_new_tokens"),
    # ... and a sample resumed after a pause is its prompt and what it generated: SGLang refuses such an input within
    # 6 tokens of the context, so a sample paused near its end would fail
    (["server.context_length=300", "train_dataset.max_prompt_len=44", "valid_dataset.max_prompt_len=44",
      "rollout.gen.max_new_tokens=256"],
     "rollout.gen.max_new_tokens"),
    (["launcher.server_startup_timeout_s=0"], "launcher.server_startup_timeout_s"),
    (["cluster.sbatch_args=[-x]"], "cluster.sbatch_args[0]"),
    # a pasted "#SBATCH -p x" after a bare flag is a short option, not the flag's value
    (["cluster.sbatch_args=[--exclusive, '#SBATCH -p debug']"], "cluster.sbatch_args[1]"),
    (["cluster.sbatch_args=[--exclusive, ' #SBATCH -p debug']"], "cluster.sbatch_args[1]"),  # pasted with a space
    # an option areal-hpc sets itself: the user's would win, silently (--signal: no checkpoint before the limit)
    (["cluster.sbatch_args=[--exclusive, --time=10]"], "cluster.sbatch_args[1]"),
    (["cluster.sbatch_args=['#SBATCH --signal=B:USR1@60']"], "cluster.sbatch_args[0]"),
    (["cluster.sbatch_args=[--output, /tmp/x.out]"], "cluster.sbatch_args[0]"),
    (["cluster.sbatch_args=['--time 10']"], "cluster.sbatch_args[0]"),
    (["cluster.sbatch_args=[--tim=10]"], "cluster.sbatch_args[0]"),  # sbatch takes an unambiguous prefix as --time
    (["cluster.srun_args=[--me=0]"], "cluster.srun_args[0]"),
    # srun options each step is sized with (the README's rule for sbatch_args): --mem=0 made a step ask for all of a
    # node's memory, the next step waited for ever
    (["cluster.srun_args=[--mpi=pmix, --mem=0]"], "cluster.srun_args[1]"),
    (["cluster.srun_args=[-n4]"], "cluster.srun_args[0]"),  # the value in the same entry: #SBATCH --time 10
    # a batch the trainer ranks cannot share evenly (found here, not by every rank after loading the model)
    (["allocation_mode=hf:d1+d3", "rollout.batch_size=8"], "rollout.batch_size"),
    # more PPO minibatches than prompt groups on a rank: fewer were taken, silently
    (["allocation_mode=hf:d1+d2", "rollout.batch_size=8", "trainer.ppo.ppo_n_minibatches=8"],
     "trainer.ppo.ppo_n_minibatches"),
    (["allocation_mode=fsdp:d2", "trainer.type=sft", "trainer.sft.model.path=toy:qwen3", "trainer.sft.batch_size=5"],
     "trainer.sft.batch_size"),
    # a name no registry knows (without trainer.plugins, which may add names)
    (["rollout.reward_fn=exact_matc"], "rollout.reward_fn"),
    (["rollout.workflow=rvlr"], "rollout.workflow"),
    (["train_dataset.path=toy:foo"], "train_dataset.path"),  # areal_hpc.toy has no such dataset
    # a flag's list on the command line is YAML as in the file: [] and a broken list are refused, not passed as text
    (["server.sglang_args.enable-memory-saver=[]"], "server.sglang_args.enable-memory-saver"),
    (["server.sglang_args.cuda-graph-bs=[1, 2"], "server.sglang_args.cuda-graph-bs"),
    # so is a broken list of a list key: it was one item of text, e.g. a job script line "[module load cuda, ..."
    (["cluster.setup_commands=[module load cuda, source /opt/env.sh"], "cluster.setup_commands"),
    (["rollout.gen.stop_token_ids=[1, 2"], "rollout.gen.stop_token_ids:"),  # not "[0]: expected int, got '[1, 2'"
    # a system prompt with raw-text prompts (no chat template to carry it) was dropped without a word
    (["train_dataset.chat_template=none", "train_dataset.system_prompt=Be brief."], "train_dataset.system_prompt"),
    (["train_dataset.system_prompt=Be brief."], "train_dataset.system_prompt"),  # a toy: tokenizer has no template
    (["train_dataset.chat_template_kwargs.enable_thinking=false"], "train_dataset.chat_template_kwargs"),  # and kwargs
    # a setting the workflow lacks (rlvr has none of its own): it would be an attribute nothing reads
    (["rollout.workflow_args.max_turns=2"], "rollout.workflow_args.max_turns"),
    # a key given twice on the command line
    (["rollout.batch_size=8", "rollout.batch_size=16"], "rollout.batch_size"),
    (["seed=1", "--seed", "2"], "seed"),
    # mode=local / torchrun run on this machine: a plan over several nodes ran every node's steps here, servers and
    # trainer ranks of different nodes on the same GPUs (the seed's `mode=torchrun allocation_mode=sglang.d16p1m1+...`)
    (["mode=torchrun", "allocation_mode=sglang.d16p1m1+d32p1m1", "cluster.n_gpus_per_node=8", "cluster.n_nodes=6"],
     "mode"),
    (["mode=local", "allocation_mode=sglang:d4+fsdp:d8", "cluster.n_gpus_per_node=8", "cluster.n_nodes=2"], "mode"),
    # start over, but only the trainer of a run whose servers (and checkpoints, weights) live on: the new trainer's
    # lower steps and versions lost to the old ones (keep-last pruning, weights/latest)
    (["min_required_servers=1", "recover.mode=disabled"], "recover.mode"),
    # resume a trial that has no checkpoint: the trainer refused it on the node, after the servers had started
    (["recover.mode=resume"], "recover.mode"),
]


@pytest.mark.parametrize("extra, key", BAD_OVERRIDES, ids=[repr(" ".join(e))[1:-1][:60] for e, _ in BAD_OVERRIDES])
def test_bad_override_exit_2(extra, key, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    # --dry-run: should a case ever pass validation, it writes files (and fails) instead of training
    rc, _, err = cli(capsys, "submit", QUICKSTART, f"cluster.fileroot={root}", *extra, "--dry-run")
    assert_one_line(rc, err, "submit", key)
    assert list(root.iterdir()) == []  # nothing written, nothing submitted



def test_the_submit_check_keeps_samples_within_what_the_server_takes(tmp_path, capsys):
    """The submit check and the server's refusal read one margin (``SGLANG_INPUT_MARGIN``, was a 6 written in both): the
    longest run the check passes resumes its samples with inputs the hf server still takes; one more token is refused
    at submit."""
    from areal_hpc.config.schema import SGLANG_INPUT_MARGIN
    from areal_hpc.inference.http_validate import RequestError, _check_prompt

    root, context, prompt = tmp_path / "root", 300, 44
    longest_new = context - SGLANG_INPUT_MARGIN - prompt
    run = [*TINY, f"cluster.fileroot={root}", f"server.context_length={context}",
           f"train_dataset.max_prompt_len={prompt}"]
    rc, _, err = cli(capsys, "submit", *run, f"rollout.gen.max_new_tokens={longest_new + 1}", "--dry-run")
    assert_one_line(rc, err, "submit", "rollout.gen.max_new_tokens")
    rc, _, err = cli(capsys, "submit", *run, f"rollout.gen.max_new_tokens={longest_new}", "--dry-run")
    assert rc == 0, err
    _check_prompt([5] * (prompt + longest_new - 1), 64, context)  # resumed before its last token: taken
    with pytest.raises(RequestError, match="exceeds the maximum allowed length"):
        _check_prompt([5] * (context - SGLANG_INPUT_MARGIN), 64, context)


def test_plugins_do_not_hide_a_misspelt_name_at_submit(tmp_path, capsys):
    """With trainer.plugins, a misspelt built-in name was caught only by the trainer on a node, after the queue."""
    root, plugin = tmp_path / "root", tmp_path / "submit_names_plugin.py"
    root.mkdir()
    plugin.write_text("from areal_hpc.rollout import register_reward\n\n"
                      "register_reward('length')(lambda prompt, completion, answer, **row: float(len(completion)))\n")
    rc, _, err = cli(capsys, "submit", QUICKSTART, f"cluster.fileroot={root}", f"trainer.plugins=[{plugin}]",
                     "rollout.reward_fn=exact_matc", "--dry-run")
    assert_one_line(rc, err, "submit", "rollout.reward_fn")
    assert "'exact_matc' is not one of" in err and "length" in err, err
    assert list(root.iterdir()) == []


# (YAML text, key). A whole config file, checked before anything else.
BAD_YAML = [
    ("seed: 1\nseed: 2\n", "seed"),
    ("cluster:\n  n_nodes: 1\n  partition: a\n  partition: b\n", "cluster.partition"),
    ("server:\n  sglang_args:\n    x: '1'\n    x: '2'\n", "server.sglang_args.x"),
    # an empty list would render the bare flag (as true does): refused, not a silent surprise
    ("server:\n  sglang_args:\n    enable-memory-saver: []\n", "server.sglang_args.enable-memory-saver"),
    ("rollout:\n  batch_size: 1:30\n", "rollout.batch_size"),  # YAML 1.1 would read 90
    (f"trial_name: {LONG}\n", "trial_name"),
    ("cluster:\n  setup_commands: [\"module load x\\nrm -rf ~\"]\n", "cluster.setup_commands[0]"),
    ("cluster:\n  time: .nan\n", "cluster.time"),
    ("rollout:\n  gen:\n    stop_token_ids: [2, eos]\n", "rollout.gen.stop_token_ids[1]"),
    ("trainer:\n  ppo:\n    actor:\n      optimizer:\n        lr: .nan\n", "trainer.ppo.actor.optimizer.lr"),
]


@pytest.mark.parametrize("text, key", BAD_YAML, ids=[k for _, k in BAD_YAML])
def test_bad_yaml_exit_2(text, key, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    f = yaml_file(tmp_path, text)
    rc, _, err = cli(capsys, "submit", f, f"cluster.fileroot={root}", *TINY, "--dry-run")
    assert_one_line(rc, err, "submit", key)
    assert list(root.iterdir()) == []


def test_yaml_hours_stay_a_time(tmp_path, capsys):
    """`time: 4:00:00` is a string to us (YAML 1.1 reads the integer 14400, i.e. 14400 minutes)."""
    f = yaml_file(tmp_path, "cluster:\n  time: 4:00:00\n")
    rc, _, err = cli(capsys, "submit", f, f"cluster.fileroot={tmp_path}", *TINY, "mode=slurm", "--dry-run")
    assert rc == 0, err
    script = next(tmp_path.glob("*/areal/trial0/sbatch/allocation.sbatch")).read_text()
    assert "#SBATCH --time=4:00:00" in script


def test_yaml_exponent_floats_are_floats(tmp_path):
    """`lr: 1e-5` is the float everyone means (YAML 1.1 would read the string "1e-5" and the
    type check would refuse it); a quoted one is still a string."""
    from areal_hpc.config import load_config

    f = yaml_file(tmp_path, "trainer:\n  ppo:\n    actor:\n      optimizer:\n        lr: 1e-5\n"
                            "rollout:\n  gen:\n    temperature: 5E-1\n")
    cfg = load_config(str(f), ["trainer.ppo.actor.optimizer.weight_decay=2.5e-2"])
    opt = cfg.trainer.ppo.actor.optimizer
    assert (opt.lr, opt.weight_decay, cfg.rollout.gen.temperature) == (1e-5, 0.025, 0.5)
    quoted = yaml_file(tmp_path, "experiment_name: '1e5'\n")
    assert load_config(str(quoted), []).experiment_name == "1e5"


@pytest.mark.parametrize("kind", ["binary", "directory", "too-large", "not-utf8"])
def test_config_file_types(kind, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    if kind == "binary":
        f = tmp_path / "model.yaml"
        f.write_bytes(bytes(range(256)) * 4)
    elif kind == "directory":
        f = tmp_path / "dir.yaml"
        f.mkdir()
    elif kind == "too-large":
        f = tmp_path / "big.yaml"
        f.write_text("# " + "x" * (2 << 20) + "\nseed: 1\n")
    else:
        f = tmp_path / "latin1.yaml"
        f.write_bytes("experiment_name: caf\xe9\n".encode("latin-1"))
    rc, _, err = cli(capsys, "submit", f, f"cluster.fileroot={root}", "--dry-run")
    assert_one_line(rc, err, "submit", "config")
    assert list(root.iterdir()) == []


def test_long_fileroot_component(tmp_path, capsys):
    rc, _, err = cli(capsys, "submit", QUICKSTART, f"cluster.fileroot={tmp_path}/{LONG}", "--dry-run")
    assert_one_line(rc, err, "submit", "cluster.fileroot")


def test_long_name_is_measured_in_bytes(tmp_path, capsys):
    """The filesystem's limit is in bytes; the message says what it counted."""
    rc, _, err = cli(capsys, "submit", QUICKSTART, f"cluster.fileroot={tmp_path}", f"trial_name={LONG}", "--dry-run")
    assert_one_line(rc, err, "submit", "trial_name")
    assert f"is {len(LONG)} bytes long" in err


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_long_names_on_existing_run_commands(command, tmp_path, capsys):
    rc, _, err = cli(capsys, command, f"cluster.fileroot={tmp_path}", f"experiment_name={LONG}")
    assert_one_line(rc, err, command, "experiment_name")


@pytest.mark.parametrize("damage", ["binary", "not-yaml", "not-a-mapping", "wrong-type"])
def test_status_on_a_corrupt_run_config(damage, tmp_path, capsys):
    assert cli(capsys, "submit", QUICKSTART, f"cluster.fileroot={tmp_path}", "--dry-run")[0] == 0
    cfg = next(tmp_path.glob("*/quickstart/run0/config.yaml"))
    cfg.write_bytes({"binary": b"\x00\x01\x02" * 100, "not-yaml": b"cluster: [unclosed\n",
                     "not-a-mapping": b"- a\n- b\n", "wrong-type": b"cluster: 3\n"}[damage])
    rc, _, err = cli(capsys, "status", f"cluster.fileroot={tmp_path}", "experiment_name=quickstart", "trial_name=run0")
    assert_one_line(rc, err, "status", str(cfg))


def test_one_line_from_a_separate_process(tmp_path):
    """The real console entry point: no traceback for a newline in a value (stderr as a user sees it)."""
    p = subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                        "cluster.partition=debug\nrm -rf ~", "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("areal-hpc submit: error: cluster.partition: contains the control character")
    assert list(tmp_path.iterdir()) == []


def _string_keys():
    """Every string-valued key of the schema, list items and dict entries included."""
    cfg = ExperimentConfig()
    cfg.cluster.setup_commands, cfg.cluster.sbatch_args, cfg.cluster.srun_args = ["true"], ["--exclusive"], ["-v"]
    cfg.server.sglang_args = {"x": "1"}
    cfg.trainer.plugins = []
    keys = []
    for key, value in walk(cfg):
        if isinstance(value, str) and "(name)" not in key or key.endswith("(name)"):
            keys.append(key)
    return keys


STRING_KEYS = _string_keys()
MARK = "INJECTED_LINE_MARK"


def _nested(key: str, value, base: ExperimentConfig) -> dict:
    """A YAML document setting ``key`` (dotted, with [i] or a dict entry) to ``value``."""
    import re

    name = key.removesuffix(" (name)")
    m = re.fullmatch(r"(.*)\[(\d+)\]", name)
    parts = (m.group(1) if m else name).split(".")
    obj = base
    for p in parts[:-1]:
        obj = getattr(obj, p) if not isinstance(obj, dict) else obj[p]
    if key.endswith(" (name)"):  # a dict entry's name: server.sglang_args.x (name)
        leaf: object = {value: "1"}
        parts = parts[:-1]
    elif m:
        leaf = [value]
    elif isinstance(obj, dict):
        leaf = {parts[-1]: value}
        parts = parts[:-1]
    else:
        leaf = value
    doc: dict = {}
    d = doc
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = leaf
    return doc


@pytest.mark.parametrize("key", STRING_KEYS)
def test_a_newline_never_reaches_a_rendered_script(key, tmp_path, capsys):
    """Any string value with a newline either is refused (exit 2, one line) or never shows up as a
    line of the rendered sbatch scripts (e.g. a multi-line system prompt, which only Python reads)."""
    root = tmp_path / "root"
    root.mkdir()
    doc = _nested(key, f"x\n{MARK} rm -rf ~", ExperimentConfig())
    f = yaml_file(tmp_path, yaml.safe_dump(doc))
    rc, _, err = cli(capsys, "submit", f, f"cluster.fileroot={root}", *TINY, "mode=slurm", "--dry-run")
    if rc == 2:
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert list(root.iterdir()) == []
        return
    assert rc == 0, err
    for script in root.rglob("*.sbatch"):
        lines = script.read_text().splitlines()
        assert not any(line.lstrip().startswith(MARK) for line in lines), (key, script)


@pytest.mark.slurm
@pytest.mark.parametrize("extra, key, reason", [
    (["cluster.partition=nosuchpartition"], "cluster.partition", "invalid partition"),
    (["cluster.cpus_per_task_cpu=64"], "cluster.cpus_per_task_cpu", "node configuration is not available"),  # 16/node
    (["cluster.mem_per_task_cpu_gb=100000"], "cluster.mem_per_task_cpu_gb", "node configuration is not available"),
    (["cluster.n_gpus_per_node=4", "cluster.n_nodes=8", "allocation_mode=hf:d16+d16", "cluster.cpus_per_gpu=1",
      "cluster.mem_per_gpu_gb=1"], "cluster.n_nodes", "node configuration is not available"),  # 4 nodes
    # 4 GPUs a node: the key was left out of those named (cluster.n_nodes/cluster.cpus_per_gpu/cluster.mem_per_gpu_gb)
    (["cluster.n_gpus_per_node=8", "allocation_mode=hf:d1+d1", "cluster.cpus_per_gpu=1", "cluster.mem_per_gpu_gb=1"],
     "cluster.n_gpus_per_node", "node configuration is not available"),
], ids=["partition", "cpus", "memory", "nodes", "gpus"])
def test_slurm_rejection_is_one_line_and_leaves_nothing(extra, key, reason, tmp_path, squeue_empty):
    """Slurm itself refuses the allocation: one line with Slurm's reason, exit 2, nothing queued and
    no run dir left behind (a run dir that existed before keeps its files)."""
    root = tmp_path / "root"
    root.mkdir()
    base = [f"cluster.fileroot={root}", "mode=slurm", "cluster.time=00:05:00", "trainer.total_train_steps=1"]
    if not any(e.startswith("cluster.partition=") for e in extra):
        base.append("cluster.partition=debug")
    p = slurm_submit(tmp_path, *base, *extra)
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("areal-hpc submit: error: cluster") and ": Slurm rejected the allocation: " in err, err
    # the key (or keys) that asked for it
    assert key in err.split(": Slurm rejected")[0].split("error: ", 1)[1].split("/"), err
    assert reason.lower() in err.lower(), err
    assert squeue_empty()
    assert list(root.rglob("*")) == [], list(root.rglob("*"))  # not even the {user} dir


def slurm_submit(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, *overrides],
                          capture_output=True, text=True, cwd=cwd, timeout=300, env=dict(os.environ))


@pytest.mark.slurm
def test_slurm_rejection_keeps_an_existing_run_dir_as_it_was(tmp_path, squeue_empty):
    """A rejected resubmit of an existing trial puts its files back and adds nothing."""
    names = [f"cluster.fileroot={tmp_path}", "mode=slurm", "cluster.time=00:05:00", "cluster.partition=debug"]
    assert slurm_submit(tmp_path, *names, "--dry-run").returncode == 0
    rd = next(tmp_path.glob("*/quickstart/run0"))
    before = {p: p.read_bytes() for p in rd.rglob("*") if p.is_file()}
    p = slurm_submit(tmp_path, *names[:-1], "cluster.partition=nosuchpartition")
    assert p.returncode == 2 and "cluster.partition: Slurm rejected" in p.stderr, p.stderr
    after = {p: p.read_bytes() for p in rd.rglob("*") if p.is_file()}
    assert after == before
    assert squeue_empty()


@pytest.mark.parametrize("body, line", [("import os\n\nx = undefined_name + 1\n", 3), ("\nimport no_such_module_xyz\n", 2),
                                        ("def f(:\n", 1)], ids=["NameError", "ImportError", "SyntaxError"])
def test_a_plugin_that_fails_to_import_is_named_with_its_line_at_submit(tmp_path, capsys, body, line):
    """`submit` said `importing [...] failed: NameError("name 'undefined_name' is not defined")`: not which file of
    the list nor which line."""
    root, plugin = tmp_path / "root", tmp_path / "broken_at_submit.py"
    root.mkdir()
    plugin.write_text(body)
    rc, _, err = cli(capsys, "submit", QUICKSTART, f"cluster.fileroot={root}", f"trainer.plugins=[{plugin}]",
                     "--dry-run")
    assert_one_line(rc, err, "submit", "trainer.plugins")
    assert f"{plugin}, line {line}" in err, err
