"""An installed areal-hpc works, not only the editable source tree (issue 21, packaging).

A wheel is built from a copy of this checkout (`pip wheel --no-deps --no-build-isolation`, no
network), installed non-editable into a fresh venv, and the console script of that venv runs
`--version`, `submit --dry-run mode=slurm` (the sbatch templates are package data) and a short
local run. `pip install <source dir>` into another fresh venv gets the same checks but the run.

The fresh venvs (`--without-pip`) see the test environment's installed packages (torch, pip,
setuptools, ...) through a `.pth` file naming a directory of symlinks to them, minus areal-hpc's
own entries (the editable install's dist-info and finder): pip in the venv neither sees an
installed areal-hpc nor could touch one, and `areal_hpc` can only come from the venv (asserted).
Everything runs with the working directory outside the checkout.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
_SETUP = configparser.ConfigParser()
_SETUP.read(REPO / "setup.cfg")
VERSION = _SETUP["metadata"]["version"]
TEMPLATES = ("allocation.sbatch", "add-servers.sbatch")
# What a build of a working checkout must not see: top-level build outputs, runs, venvs; caches.
_NOT_SOURCE_TOP = {".git", ".venv", "venv", "runs", "build", "dist", ".pytest_cache", ".whl", "shared"}
_NOT_SOURCE_ANY = shutil.ignore_patterns("__pycache__", "*.egg-info")
# Entries of the test environment's site-packages that belong to its (editable) areal-hpc.
_OURS = ("areal_hpc", "areal-hpc", "__editable__.areal_hpc", "__editable___areal_hpc")


def _run(cmd, cwd: Path, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert p.returncode == 0, \
        f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _source_copy(dst: Path) -> Path:
    """The checkout as `pip` would build it, in ``dst`` (so builds write nothing into the repo)."""
    def ignore(d: str, names):
        top = _NOT_SOURCE_TOP.intersection(names) if Path(d) == REPO else set()
        return top | _NOT_SOURCE_ANY(d, names)

    shutil.copytree(REPO, dst, symlinks=True, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def deps(tmp_path_factory) -> Path:
    """Symlinks to everything installed in this environment except areal-hpc itself."""
    d = tmp_path_factory.mktemp("deps")
    paths = sysconfig.get_paths()
    for sp in dict.fromkeys(Path(paths[k]) for k in ("purelib", "platlib")):
        for entry in sp.iterdir():
            if not entry.name.startswith(_OURS) and entry.suffix not in (".pth", ".egg-link") \
                    and not (d / entry.name).exists():
                (d / entry.name).symlink_to(entry)
    return d


def _fresh_venv(path: Path, deps: Path) -> Path:
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    site = next((path / "lib").glob("python3*/site-packages"))
    (site / "_test_env_deps.pth").write_text(f"{deps}\n")
    return path


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _check_installed(venv: Path, tmp: Path) -> None:
    """``areal_hpc`` imports from ``venv`` (not the source tree) and has its templates there."""
    out = _run([venv / "bin" / "python", "-c",
                "import areal_hpc, areal_hpc.launch.sbatch as s; print(areal_hpc.__file__); "
                f"print(*(len(s.template_text(n)) for n in {TEMPLATES!r}))"], cwd=tmp, env=_env(venv)).stdout
    path, sizes = out.splitlines()
    assert Path(path).resolve().is_relative_to(venv.resolve()), f"areal_hpc imported from {path}, not from {venv}"
    assert all(int(n) > 100 for n in sizes.split())


def _quickstart(tmp: Path) -> Path:
    """configs/quickstart.yaml, copied out of the checkout (the configs are not in the wheel)."""
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    path = tmp / "quickstart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _version(venv: Path, tmp: Path) -> None:
    out = _run([venv / "bin" / "areal-hpc", "--version"], cwd=tmp, env=_env(venv)).stdout
    assert out.strip() == f"areal-hpc {VERSION}"


def _slurm_dry_run(venv: Path, tmp: Path) -> None:
    fileroot = tmp / "runs-dry"
    out = _run([venv / "bin" / "areal-hpc", "submit", _quickstart(tmp), "mode=slurm", "cluster.partition=debug",
                f"cluster.fileroot={fileroot}", "trial_name=dry", "--dry-run"], cwd=tmp, env=_env(venv)).stdout
    assert "nothing submitted" in out
    rd = next(fileroot.glob("*/quickstart/dry"))
    script = (rd / "sbatch" / "allocation.sbatch").read_text()
    assert script.startswith("#!/bin/bash") and "{{" not in script
    assert "#SBATCH --partition=debug" in script
    srun = [line for line in script.splitlines() if "srun " in line]
    assert len(srun) == 2, script
    python = str(venv / "bin" / "python")  # the steps run the installed package's interpreter
    assert any(f"{python} -m areal_hpc serve" in line for line in srun), srun
    assert any(f"{python} -m areal_hpc train" in line for line in srun), srun


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp / "dist", src], cwd=tmp)
    (whl,) = (tmp / "dist").glob("areal_hpc-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel_venv(wheel, deps, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (non-editable)."""
    venv = _fresh_venv(tmp_path_factory.mktemp("wheel-venv") / "venv", deps)
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
         cwd=venv.parent, env=_env(venv))
    return venv


def test_wheel_holds_package_and_templates(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert wheel.name == f"areal_hpc-{VERSION}-py3-none-any.whl"
    for t in TEMPLATES:
        assert f"areal_hpc/launch/templates/{t}" in names
    assert "areal_hpc/cli/main.py" in names
    assert not any(n.startswith(("tests/", "sbatch/", "configs/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "areal-hpc = areal_hpc.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_version_and_slurm_dry_run(wheel_venv, tmp_path):
    _check_installed(wheel_venv, tmp_path)
    _version(wheel_venv, tmp_path)
    _slurm_dry_run(wheel_venv, tmp_path)


def test_installed_wheel_local_run(wheel_venv, tmp_path):
    fileroot = tmp_path / "runs"
    _run([wheel_venv / "bin" / "areal-hpc", "submit", _quickstart(tmp_path), f"cluster.fileroot={fileroot}",
          "trainer.total_train_steps=3", "stats.progress_bar=False", "rollout.batch_size=8", "rollout.n_samples=4",
          "saver.freq_steps=0"], cwd=tmp_path, env=_env(wheel_venv), timeout=600)
    rd = next(fileroot.glob("*/quickstart/run0"))
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    plan = json.loads((rd / "plan.json").read_text())
    assert all(s["command"][0] == str(wheel_venv / "bin" / "python") for s in plan["steps"])


def test_pip_install_source_dir(deps, tmp_path):
    """`pip install <checkout>` (non-editable) into a fresh venv; `--no-build-isolation`: this
    environment's setuptools builds it, no network."""
    src = _source_copy(tmp_path / "src")
    venv = _fresh_venv(tmp_path / "venv", deps)
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          src], cwd=tmp_path, env=_env(venv))
    _check_installed(venv, tmp_path)
    _version(venv, tmp_path)
    _slurm_dry_run(venv, tmp_path)


def test_installed_wheel_names_where_the_documented_configs_are(wheel_venv, tmp_path):
    """`areal-hpc submit configs/quickstart.yaml` (the README's command) outside a checkout: the configs are not in
    the wheel, and the error's hint was "give a YAML file's path, e.g. configs/quickstart.yaml", the very path that
    was not found."""
    p = subprocess.run([wheel_venv / "bin" / "areal-hpc", "submit", "configs/quickstart.yaml"], capture_output=True,
                       text=True, cwd=tmp_path, env=_env(wheel_venv))
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, (p.returncode, p.stderr)
    assert p.stderr.startswith("areal-hpc submit: error: config: configs/quickstart.yaml not found"), p.stderr
    assert "e.g. configs/quickstart.yaml" not in p.stderr and "source checkout" in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())
