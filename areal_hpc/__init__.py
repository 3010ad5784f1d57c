"""areal-hpc: Slurm-first asynchronous RL for language models (the AReaL-lite design).

``__version__`` is the installed distribution's (or, in a source tree never installed, setup.cfg's),
looked up on first access: every process of a run imports this package, not all need the version.
"""

from __future__ import annotations

import functools
from pathlib import Path

DIST_NAME = "areal-hpc"


@functools.lru_cache(maxsize=None)
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        import configparser

        cfg = configparser.ConfigParser()
        cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
        return cfg.get("metadata", "version", fallback="0+unknown")


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
