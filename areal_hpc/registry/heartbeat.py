"""Keep a record alive while its process lives; remove it when the process ends cleanly."""

from __future__ import annotations

import atexit
import functools
import logging
import signal
import threading
from typing import Any, Callable, Dict, List, Optional, Set

from areal_hpc.registry.store import Registry

log = logging.getLogger("areal_hpc.registry")
_live: List["Heartbeat"] = []


def _remove_all() -> None:
    for hb in list(_live):
        hb.stop()


def _on_signal(signum, frame) -> None:
    _remove_all()
    # Restore the default action and re-raise, so the exit status still says "killed by signal".
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


@functools.lru_cache(maxsize=None)  # once per process
def install_exit_handlers() -> None:
    """atexit + SIGTERM/SIGINT handlers that deregister every live heartbeat (main thread only)."""
    atexit.register(_remove_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(sig, _on_signal)


class Heartbeat:
    """Writes ``kind/name`` and refreshes it every ``interval_s`` on a daemon thread. With a callable ``data`` the
    record is rewritten each beat (a server's weight version stays current), else touched. A vanished record is
    written again, unless ``still_ours()`` says its run is gone (registry wiped for a new run): then ``on_lost()``."""

    def __init__(self, registry: Registry, kind: str, name: str,
                 data: Dict[str, Any] | Callable[[], Dict[str, Any]], interval_s: float = 2.0,
                 remove_on_exit: bool = True, still_ours: Optional[Callable[[], bool]] = None,
                 on_lost: Optional[Callable[[], None]] = None):
        self.registry, self.kind, self.name = registry, kind, name
        self._data, self.interval_s, self.remove_on_exit = data, interval_s, remove_on_exit
        self._stop = threading.Event()
        # held through a beat and by `stop`: a beat in progress cannot write the record back after `stop` removed it
        self._lock = threading.RLock()
        self.still_ours, self.on_lost = still_ours, on_lost

    def _put(self) -> None:
        data = self._data() if callable(self._data) else self._data
        self.registry.put(self.kind, self.name, data, ttl=True)

    def beat(self) -> None:
        """Refresh now (rewrite if data is dynamic, or if the record vanished); nothing once stopped."""
        with self._lock:
            if self._stop.is_set():
                return
            if self.registry.touch(self.kind, self.name):
                if callable(self._data):
                    self._put()
            elif self.still_ours is not None and not self.still_ours():
                self._stop.set()
                if self.on_lost is not None:
                    self.on_lost()
            else:
                self._put()

    def start(self) -> "Heartbeat":
        self._put()
        _live.append(self)
        install_exit_handlers()
        threading.Thread(target=self._run, name=f"heartbeat-{self.name}", daemon=True).start()
        return self

    def _run(self) -> None:
        failed: Set[type] = set()
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - a dead heartbeat lets the record expire while its process lives
                if type(e) not in failed:  # once a kind: a flaky filesystem fails many beats
                    failed.add(type(e))
                    log.warning("heartbeat of %s/%s failed (the next beats retry): %r", self.kind, self.name, e)

    def stop(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
        if self in _live:
            _live.remove(self)
        if self.remove_on_exit:
            self.registry.delete(self.kind, self.name)
