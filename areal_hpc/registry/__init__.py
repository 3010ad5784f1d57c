"""Shared-filesystem registry of a run (depends on nothing else of ours)."""

from areal_hpc.registry.errors import RegistryTimeout
from areal_hpc.registry.heartbeat import Heartbeat, install_exit_handlers
from areal_hpc.registry.store import Registry

__all__ = ["Registry", "Heartbeat", "RegistryTimeout", "install_exit_handlers"]
