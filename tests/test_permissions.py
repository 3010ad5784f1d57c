"""Private by default (issue 16, item 7): a run dir and everything in it is not readable by other
users (dirs 0700, files 0600, from the umask every process of the run gets), unless
``cluster.group_readable`` (0750 / 0640); the registry and its secret stay private either way."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from areal_hpc.cli.main import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _loose_umask():
    """Start from a permissive umask (as many login shells have), so the run's own umask is what is tested."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(rd: Path):
    """{relative path: permission bits} of the run dir and all it holds."""
    return {str(p.relative_to(rd)): stat.S_IMODE(p.lstat().st_mode) for p in [rd, *rd.rglob("*")] if not p.is_symlink()}


def assert_modes(rd: Path, group: bool):
    for rel, mode in modes(rd).items():
        path = rd / rel
        assert mode & 0o007 == 0, f"{rel} is {oct(mode)}: others can access it"
        private = rel == "registry" or rel.startswith("registry/")
        if group and not private:
            assert mode & 0o040, f"{rel} is {oct(mode)}: not group-readable"
            assert not mode & 0o020, f"{rel} is {oct(mode)}: group-writable"
        else:
            assert mode & 0o070 == 0, f"{rel} is {oct(mode)}: the group can access it"
        if path.is_dir():
            assert mode & 0o700 == 0o700, rel


def test_dry_run_is_private(tmp_path, capsys):
    assert main(["submit", QUICKSTART, f"cluster.fileroot={tmp_path}", "--dry-run"]) == 0
    rd = next(tmp_path.glob("*/quickstart/run0"))
    assert_modes(rd, group=False)
    assert stat.S_IMODE(rd.parent.parent.stat().st_mode) == 0o700  # {fileroot}/{user}


def test_group_readable_and_back(tmp_path, capsys):
    args = ["submit", QUICKSTART, f"cluster.fileroot={tmp_path}", "--dry-run"]
    assert main(args) == 0
    rd = next(tmp_path.glob("*/quickstart/run0"))
    assert main(args + ["cluster.group_readable=True"]) == 0  # an existing run dir is brought along
    assert_modes(rd, group=True)
    assert main(args) == 0
    assert_modes(rd, group=False)


def test_missing_fileroot_is_created_traversable(tmp_path, capsys):
    """The shared fileroot (made when missing) lets other users reach their own {user} dirs."""
    root = tmp_path / "shared" / "areal"
    assert main(["submit", QUICKSTART, f"cluster.fileroot={root}", "--dry-run"]) == 0
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert stat.S_IMODE(next(root.iterdir()).stat().st_mode) == 0o700


def test_a_fileroot_another_submit_creates_meanwhile(tmp_path, monkeypatch):
    """Two first submits under a missing fileroot: the one that saw a directory missing, then found it made by the
    other, failed with a FileExistsError traceback."""
    from areal_hpc.config import load_config
    from areal_hpc.launch.resolve import make_fileroot

    root = tmp_path / "shared" / "areal"
    mkdir = Path.mkdir

    def the_other_first(self, *args, **kwargs):
        mkdir(self, *args, **kwargs)  # the other submit
        mkdir(self, *args, **kwargs)  # this one
    monkeypatch.setattr(Path, "mkdir", the_other_first)
    make_fileroot(load_config(None, [f"cluster.fileroot={root}"]))
    monkeypatch.undo()
    assert root.is_dir()


def test_a_local_run_is_private_throughout(tmp_path):
    """Servers, trainer, launcher: logs, checkpoints, weights, metrics, registry, secret."""
    p = subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                        "stats.progress_bar=False", "rollout.batch_size=4", "rollout.n_samples=2",
                        "trainer.total_train_steps=2", "saver.freq_steps=1"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rd = next(tmp_path.glob("*/quickstart/run0"))
    have = modes(rd)
    for expected in ("logs/trainer-0.log", "logs/server-0.log", "metrics.jsonl", "registry/secret", "weights",
                     "checkpoints"):
        assert any(k == expected or k.startswith(expected + "/") for k in have), (expected, sorted(have))
    assert any(k.startswith("checkpoints/") for k in have) and any(k.startswith("weights/") for k in have)
    assert_modes(rd, group=False)
    assert have["registry/secret"] == 0o600


@pytest.mark.slurm
def test_a_slurm_run_is_private_throughout(tmp_path, squeue_empty):
    """The same under Slurm: the driver (submitit's payload on the batch host), its srun steps, the
    job's own output file and submitit's folder."""
    p = subprocess.run([sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
                        "mode=slurm", "cluster.partition=debug", "cluster.time=00:10:00", "launcher.wait=True",
                        "stats.progress_bar=False", "rollout.batch_size=4", "rollout.n_samples=2",
                        "trainer.total_train_steps=1", "saver.freq_steps=1"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    rd = next(tmp_path.glob("*/quickstart/run0"))
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    have = modes(rd)
    for expected in ("logs/driver.log", "logs/trainer-0.log", "submitit", "checkpoints", "weights"):
        assert any(k == expected or k.startswith(expected + "/") for k in have), (expected, sorted(have))
    assert any(k.startswith("logs/slurm-") for k in have), sorted(have)
    assert_modes(rd, group=False)
    assert squeue_empty()


def test_commands_on_a_run_take_its_umask(tmp_path, capsys):
    """`status`, `logs`, `stop`, `add-servers`, ... on an existing run write with the umask of the run's own config,
    whatever their words say: the names locate the run, they do not configure it."""
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=quickstart", "trial_name=run0"]
    assert main(["submit", QUICKSTART, *names, "cluster.group_readable=True", "--dry-run"]) == 0
    os.umask(0o022)
    main(["logs", *names])
    assert os.umask(0o022) == 0o027
    assert main(["submit", QUICKSTART, *names, "--dry-run"]) == 0  # private again
    main(["logs", *names, "cluster.group_readable=True"])
    assert os.umask(0o022) == 0o077
