"""Where a training step's wall time goes: named phases, exclusive of each other (an inner phase's time is taken out
of the outer one; ``other`` is what no phase claims). ``sync`` ends the phases opened with ``device=True``, so queued
GPU work is charged to the phase that queued it."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, List, Optional

PREFIX = "phase/"
BG_PREFIX = "bg_phase/"  # work beside the steps (a background weight update); its wall time is bg_time_s


class PhaseTimer:
    """A step runs from the previous `split` (or `begin`) to its own."""

    def __init__(self, sync: Optional[Callable[[], None]] = None, clock: Callable[[], float] = time.perf_counter):
        self.sync, self.clock = sync, clock
        self._t_step: Optional[float] = None
        self._acc: Dict[str, float] = {}
        self._stack: List[List] = []  # [name, started_at] of the open phases, innermost last

    def begin(self) -> None:
        """Start the first step's clock (later steps start at the previous `split`)."""
        self._t_step = self.clock()
        self._acc = {}

    @contextlib.contextmanager
    def phase(self, name: str, device: bool = False) -> Iterator[None]:
        now = self.clock()
        if self._stack:  # pause the enclosing phase
            outer = self._stack[-1]
            self._acc[outer[0]] = self._acc.get(outer[0], 0.0) + now - outer[1]
        entry = [name, now]
        self._stack.append(entry)
        try:
            yield
        finally:
            if device and self.sync is not None:
                self.sync()
            end = self.clock()
            self._stack.pop()
            self._acc[name] = self._acc.get(name, 0.0) + end - entry[1]
            if self._stack:  # resume the enclosing phase
                self._stack[-1][1] = end

    def split(self) -> Dict[str, float]:
        """End the step: ``{"phase/<name>": s, ..., "phase/other": s, "step_time_s": wall}``, the phases summing to
        ``step_time_s``. The next step starts now."""
        if self._t_step is None:
            raise RuntimeError("PhaseTimer.split before begin")
        if self._stack:
            raise RuntimeError(f"PhaseTimer.split inside phase {self._stack[-1][0]!r}")
        now = self.clock()
        wall = now - self._t_step
        out = {PREFIX + k: v for k, v in self._acc.items()}
        out[PREFIX + "other"] = max(0.0, wall - sum(self._acc.values()))
        out["step_time_s"] = wall
        self._t_step, self._acc = now, {}
        return out
