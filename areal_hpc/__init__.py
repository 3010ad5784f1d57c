"""areal-hpc: Slurm-first asynchronous RL for language models (the AReaL-lite design).

``__version__`` is the installed distribution's (or, in a source tree never installed, setup.cfg's),
looked up on first access: every process of a run imports this package, not all need the version.
"""

from __future__ import annotations

from pathlib import Path


def __getattr__(name: str) -> str:
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("areal-hpc")
    except PackageNotFoundError:
        import configparser

        cfg = configparser.ConfigParser()
        cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
        found = cfg.get("metadata", "version", fallback="0+unknown")
    globals()["__version__"] = found  # a module attribute now: __getattr__ is not asked again
    return found
