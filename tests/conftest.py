"""Shared pytest setup: markers, a real local Slurm cluster, GPU skipping.

Markers (also listed in setup.cfg):
  slurm -- needs a Slurm cluster; the session fixture ``slurm_cluster`` starts a throw-away
           4-node cluster (tools/slurm/local-cluster.sh) the first time such a test runs and
           stops it at the end of the session. ``@pytest.mark.slurm`` alone is enough; tests
           may also take ``slurm_cluster`` as an argument to read ``.conf``/``.nodes``.
  gpu   -- needs a CUDA GPU; skipped when ``torch.cuda.is_available()`` is false.
  slow  -- takes long; deselect with ``-m "not slow"``.

Outside CI a test that cannot get a cluster (not root, Slurm not installable) is skipped with
the reason; in CI (env CI=true) it fails instead, so a broken runner cannot pass silently.

Each pytest run gets its own cluster directory and ports (/tmp/areal-slurm-pytest-<base>,
claimed with a lock), so concurrent pytest runs on one machine, or a cluster started by hand
in /tmp/areal-slurm, do not disturb each other. Set AREAL_SLURM_DIR (and optionally
AREAL_SLURM_PORT_BASE) to choose them yourself.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO_ROOT / "tools" / "slurm" / "local-cluster.sh"

MARKERS = {
    "slurm": "needs a Slurm cluster (a local throw-away one is started for the session)",
    "gpu": "needs a CUDA GPU (skipped when torch.cuda.is_available() is false)",
    "slow": "slow test (deselect with -m 'not slow')",
}

NUM_NODES = 4
GPUS_PER_NODE = 4
START_TIMEOUT_S = 600  # start takes ~3 s, install ~20 s; the machine may be very busy
STOP_TIMEOUT_S = 300
# Port bases tried for per-run clusters; 17000 is left to the script's hand-started default.
PORT_BASES = range(17100, 18000, 100)
# Offsets from the base that local-cluster.sh uses: slurmctld, slurmd n1..n4, slurmdbd, mariadb.
PORT_OFFSETS = (0, *range(1, NUM_NODES + 1), 90, 91)


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in setup.cfg; registering here keeps --strict-markers working when the
    # tests run with another config file (and is skipped when the ini already has them).
    declared = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    for name, help_text in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {help_text}")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `-n N --dist loadgroup` (tools/test.sh): every Slurm test goes to one worker, in turn, on the one cluster
    that worker starts; any other test goes with its file, which keeps each module fixture built once."""
    for item in items:
        slurm = item.get_closest_marker("slurm") is not None or "slurm_cluster" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.xdist_group("slurm" if slurm else item.path.stem))


def pytest_collection_finish(session: pytest.Session) -> None:
    """The groups above took effect (the worker names each test's group in its id), or the run stops here."""
    if getattr(session.config.option, "loadgroup", False) and any("@" not in item.nodeid for item in session.items):
        raise pytest.UsageError("pytest-xdist ignored the test groups (pytest-dev/pytest-xdist#1386, pytest 9.2): "
                                "a module's tests would be split between workers; run with -n 0")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the running cluster."""

    conf: str  # path of slurm.conf; also exported as os.environ["SLURM_CONF"]
    state_dir: str  # logs in <state_dir>/log
    nodes: list[str] = field(default_factory=list)  # ["n1", "n2", ...]
    gpus_per_node: int = GPUS_PER_NODE
    partition: str = "debug"


def _run_script(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    # The daemons the script starts detach and redirect their output, so capturing the
    # script's output does not hang on pipes held open by them.
    return subprocess.run(
        ["bash", str(LOCAL_CLUSTER), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _slurm_binaries_present() -> bool:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return all(shutil.which(b, path=path) for b in ("slurmctld", "slurmd", "slurmdbd", "sbatch", "munged", "mariadbd"))


def _ports_free(base: int) -> bool:
    for port in (base + off for off in PORT_OFFSETS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _claim_cluster_slot() -> tuple[str, int, object | None]:
    """Pick a state dir and port base for this run; returns (dir, base, lock file handle)."""
    if os.environ.get("AREAL_SLURM_DIR"):
        return os.environ["AREAL_SLURM_DIR"], int(os.environ.get("AREAL_SLURM_PORT_BASE", "17000")), None
    for base in PORT_BASES:
        lock = open(f"/tmp/areal-slurm-pytest-{base}.lock", "w")
        try:
            # Held for the whole session; released by the kernel even if pytest is killed.
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        # A cluster left by a killed run in this slot is stopped by `start` itself; only
        # ports held by something else make us move on.
        if _ports_free(base) or Path(f"/tmp/areal-slurm-pytest-{base}/slurm.conf").exists():
            return f"/tmp/areal-slurm-pytest-{base}", base, lock
        lock.close()
    raise RuntimeError(f"no free port base for a local Slurm cluster among {list(PORT_BASES)}")


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real 4-node Slurm cluster (4 fake GPUs per node) on this machine, for the session."""
    if os.geteuid() != 0:
        _skip_or_fail("the local Slurm cluster needs root (its daemons and jobs run as root)")
    if not LOCAL_CLUSTER.exists():
        _skip_or_fail(f"{LOCAL_CLUSTER} not found")

    env = dict(os.environ)
    if not _slurm_binaries_present():
        try:
            res = _run_script("install", env=env, timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _skip_or_fail("Slurm is not installed and `local-cluster.sh install` timed out")
        if res.returncode != 0:
            _skip_or_fail(
                "Slurm is not installed and `local-cluster.sh install` failed:\n" + _tail(res.stdout + res.stderr)
            )

    state_dir, port_base, lock = _claim_cluster_slot()
    env.update(AREAL_SLURM_DIR=state_dir, AREAL_SLURM_PORT_BASE=str(port_base),
               AREAL_SLURM_NODES=str(NUM_NODES), AREAL_SLURM_GPUS=str(GPUS_PER_NODE))
    conf = os.path.join(state_dir, "slurm.conf")
    old_conf = os.environ.get("SLURM_CONF")
    try:
        try:
            res = _run_script("start", env=env, timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"local Slurm cluster did not start in {START_TIMEOUT_S}s; logs in {state_dir}/log\n{exc}",
                        pytrace=False)
        if res.returncode != 0:
            pytest.fail(
                f"`local-cluster.sh start` failed (rc={res.returncode}); logs in {state_dir}/log\n"
                + _tail(res.stdout + res.stderr),
                pytrace=False,
            )
        # Every Slurm client (sbatch, squeue, submitit) in this process and its children.
        os.environ["SLURM_CONF"] = conf
        yield SlurmCluster(
            conf=conf,
            state_dir=state_dir,
            nodes=[f"n{k}" for k in range(1, NUM_NODES + 1)],
            gpus_per_node=GPUS_PER_NODE,
        )
    finally:
        try:
            res = _run_script("stop", env=env, timeout=STOP_TIMEOUT_S)
            if res.returncode != 0:
                print(f"warning: `local-cluster.sh stop` failed:\n{_tail(res.stdout + res.stderr)}")
        finally:
            if old_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old_conf
            if lock is not None:
                lock.close()


@pytest.fixture(autouse=True)
def _marker_driven_fixtures(request: pytest.FixtureRequest) -> Iterator[None]:
    """`@pytest.mark.slurm` starts the cluster; `@pytest.mark.gpu` skips without CUDA. The umask a test leaves (an
    in-process `main(["submit", ...])` takes the run's, 077) is undone: the next test's files get the usual modes."""
    umask = os.umask(0o022)
    os.umask(umask)
    if request.node.get_closest_marker("gpu") is not None:
        try:
            import torch  # lazy: most tests do not need it, and importing it is slow
        except ImportError:
            pytest.skip("gpu test: torch is not installed")
        if not torch.cuda.is_available():
            pytest.skip("gpu test: torch.cuda.is_available() is false")
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")
    yield
    os.umask(umask)


@pytest.fixture
def squeue_empty(slurm_cluster: SlurmCluster) -> Callable[[], bool]:
    """A function returning True when `squeue -h` lists no job (e.g. to assert a dry run
    submitted nothing). Raises if squeue itself fails, so an error never reads as "empty"."""

    def check() -> bool:
        res = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SLURM_CONF": slurm_cluster.conf})
        if res.returncode != 0:
            raise RuntimeError(f"squeue failed (rc={res.returncode}): {res.stderr.strip()}")
        return res.stdout.strip() == ""

    return check
