"""Shared-filesystem registry of a run (depends on nothing else of ours)."""

from areal_hpc.registry.heartbeat import Heartbeat
from areal_hpc.registry.store import Registry, RegistryTimeout
from areal_hpc.registry.util import (address_towards, atomic_write, free_port, pid_alive, runs_here,
                                    set_parent_death_signal)

__all__ = ["Registry", "Heartbeat", "RegistryTimeout", "address_towards", "atomic_write", "free_port", "pid_alive",
           "runs_here", "set_parent_death_signal"]
