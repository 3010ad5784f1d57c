"""A run's registry: JSON records on a shared filesystem, under ``{run_dir}/registry/`` (0700)::

    run.json  servers/<id>.json  trainer.json  weights/latest.json  requests/<id>.json
    replies/<id>.json  jobs/<id>.json  secret

A record is ``{kind}/{name}.json`` (kind ``""`` for top-level ones). Writes are atomic (temp file, ``os.replace``), so
plain `put`/`get` need no lock; read-modify-write (`update`) holds a lock of the configured kind. A record written with
``ttl=True`` is alive while its mtime is younger than the TTL; writers heartbeat with `touch` (`Heartbeat`). On NFS
readers retry ESTALE and treat a record that vanishes between listing and reading as absent.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import filelock

from areal_hpc.registry.util import atomic_write, temp_name

_TTL_KEY = "_ttl"
# flock: kernel locks (local disks; Lustre/GPFS mounted with flock). The others are lock files
# created atomically, which NFS honours; a `lease` is renewed by its holder, so a dead one expires.
LOCK_CLASSES = {"flock": filelock.FileLock, "soft": filelock.SoftFileLock, "lease": filelock.SoftFileLease}
_ESTALE_RETRIES = 5
_MAX_RECORD = 1 << 20  # bytes of a record that are read (a bigger one reads as torn, i.e. absent)


class RegistryTimeout(TimeoutError):
    """Waiting for records or a lock took longer than allowed."""


def _retry_estale(fn: Callable[[], Any]) -> Any:
    for attempt in range(_ESTALE_RETRIES):
        try:
            return fn()
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == _ESTALE_RETRIES - 1:
                raise
            time.sleep(0.01 * (attempt + 1))


class Registry:
    """Records of one run. Cheap to construct; safe to use from many processes and hosts."""

    def __init__(self, root: str | os.PathLike, lock_kind: str = "flock", ttl_s: float = 15.0,
                 lock_timeout_s: float = 30.0, stale_lock_s: float = 60.0):
        self.root, self.lock_kind, self.ttl_s = Path(root), lock_kind, float(ttl_s)
        self.lock_timeout_s, self.stale_lock_s = lock_timeout_s, stale_lock_s
        self._dirs: Dict[str, str] = {}

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, launcher: Any = None) -> "Registry":
        """The registry of a run dir, with the lock kind and TTL of the config's ``launcher`` section."""
        settings = {} if launcher is None else {"lock_kind": launcher.lock_kind, "ttl_s": launcher.ttl_s}
        return cls(Path(run_dir) / "registry", **settings)

    def path(self, kind: str, name: str) -> Path:
        return self.root / kind / f"{name}.json"  # kind "" is the root itself

    def _dir(self, kind: str) -> str:
        """The directory of a kind, created (0700) on first use by this object."""
        if kind not in self._dirs:
            old = os.umask(0o077)
            try:
                os.makedirs(self.root / kind, mode=0o700, exist_ok=True)
            finally:
                os.umask(old)
            self._dirs[kind] = str(self.root / kind)
        return self._dirs[kind]

    def put(self, kind: str, name: str, data: Dict[str, Any], ttl: bool = True) -> str:
        """Atomically write a record. ``ttl=True`` records die unless heartbeated."""
        body = {**data, _TTL_KEY: self.ttl_s if ttl else None}
        return atomic_write(f"{self._dir(kind)}/{name}.json", json.dumps(body).encode(), mode=0o600)

    def touch(self, kind: str, name: str) -> bool:
        """Heartbeat: refresh a record's liveness. False if the record is gone."""
        return self._on_file(os.utime, kind, name)

    def delete(self, kind: str, name: str) -> bool:
        return self._on_file(os.unlink, kind, name)

    def _on_file(self, fn: Callable[[Path], Any], kind: str, name: str) -> bool:
        try:
            _retry_estale(lambda: fn(self.path(kind, name)))
            return True
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(path: str, live_only: bool, now: float) -> Optional[Dict[str, Any]]:
        def read() -> Tuple[bytes, float]:
            with open(path, "rb") as f:  # records are replaced, never rewritten in place: the size read is the record's
                st = os.fstat(f.fileno())
                return f.read(min(st.st_size, _MAX_RECORD)), st.st_mtime

        try:
            raw, mtime = _retry_estale(read)
            data = json.loads(raw)
        except (FileNotFoundError, IsADirectoryError, ValueError):  # ValueError: torn (not JSON, not even UTF-8)
            return None
        if not isinstance(data, dict):  # JSON, but no record: damaged, or not ours
            return None
        ttl = data.pop(_TTL_KEY, None)
        if live_only and ttl is not None and now - mtime > ttl:
            return None
        data["_age_s"] = max(0.0, now - mtime)
        return data

    def get(self, kind: str, name: str, live_only: bool = True) -> Optional[Dict[str, Any]]:
        return self._read(str(self.path(kind, name)), live_only, time.time())

    def run_record(self) -> Dict[str, Any]:  # run.json as its owner last wrote it, live or not; {} if none
        return self.get("", "run", live_only=False) or {}

    def list(self, kind: str, live_only: bool = True) -> Dict[str, Dict[str, Any]]:
        """All (live) records of a kind, by name."""
        d = self.root / kind
        try:
            names = _retry_estale(lambda: os.listdir(d))
        except FileNotFoundError:
            return {}
        now = time.time()
        records = {fname[:-5]: self._read(str(d / fname), live_only, now) for fname in names
                   if fname.endswith(".json") and not fname.startswith(".")}
        return {name: rec for name, rec in records.items() if rec is not None}

    @contextmanager
    def locked(self, name: str = "registry") -> Iterator[None]:
        """Hold a lock of the configured kind, shared by every process of the run."""
        path = f"{self._dir('locks')}/{name}.lock"
        # a lease is taken over by a contender that saw it unrenewed this long, so within one wait for it
        lease = {"lease_duration": min(self.stale_lock_s, self.lock_timeout_s / 2)} if self.lock_kind == "lease" else {}
        lk = LOCK_CLASSES[self.lock_kind](path, timeout=self.lock_timeout_s, thread_local=False, **lease)
        # a soft lock's dead holder is known by the lock's age only: look again while waiting, until it would be stale
        soft = self.lock_kind == "soft"
        wait_s = max(self.lock_timeout_s, self.stale_lock_s + 1) if soft else self.lock_timeout_s
        deadline = time.monotonic() + wait_s
        while True:
            if soft:
                self._break_stale(lk.lock_file)
            left = max(0.0, deadline - time.monotonic())
            try:
                held = lk.acquire(timeout=min(left, 1.0) if soft else left)
                break
            except filelock.Timeout as e:
                if time.monotonic() >= deadline:
                    raise RegistryTimeout(f"could not take registry lock {lk.lock_file} within {wait_s:.0f}s: its "
                                          "holder hangs, or launcher.lock_kind does not suit this filesystem") from e
        with held:
            yield

    def _break_stale(self, lock_file: str) -> None:
        """Remove a soft lock file older than ``stale_lock_s``: a SIGKILLed holder on another host is known dead by
        age only. Racers that all saw it stale must not all remove it (a late one would remove the lock the first one
        just took), so they remove it in turn, holding a breaker lock, and look at its age again under it."""
        if not self._is_stale(lock_file):
            return
        breaker = f"{lock_file}.break"
        if self._is_stale(breaker):  # left by a racer that died breaking the lock
            with contextlib.suppress(FileNotFoundError):
                os.unlink(breaker)
        with contextlib.suppress(filelock.Timeout, FileNotFoundError), \
                filelock.SoftFileLock(breaker, timeout=0, thread_local=False):
            if self._is_stale(lock_file):
                os.unlink(lock_file)

    def _is_stale(self, path: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            return time.time() - os.stat(path).st_mtime > self.stale_lock_s
        return False

    def update(self, kind: str, name: str, fn: Callable[[Optional[Dict[str, Any]]], Optional[Dict[str, Any]]],
               ttl: bool = False) -> Optional[Dict[str, Any]]:
        """Locked read-modify-write. ``fn(old) -> new``; returning None deletes the record."""
        with self.locked(f"{kind or 'top'}.{name}"):
            old = self.get(kind, name, live_only=False)
            if old is not None:
                old.pop("_age_s", None)
            new = fn(old)
            if new is None:
                self.delete(kind, name)
            else:
                self.put(kind, name, new, ttl=ttl)
            return new

    def wait_for(self, kind: str, n: int, timeout_s: float, poll_s: float = 0.2,
                 stop: Optional[Callable[[], bool]] = None,
                 predicate: Optional[Callable[[Dict[str, Any]], bool]] = None) -> Dict[str, Dict[str, Any]]:
        """Block until ``n`` live records of a kind (that pass ``predicate``, e.g. servers that are ready, not loading)
        exist; ``stop()`` true ends the wait with `RegistryTimeout`."""
        deadline = time.monotonic() + timeout_s
        while True:
            if stop is not None and stop():
                raise RegistryTimeout(f"stopped while waiting for {n} '{kind}' records")
            recs = {k: v for k, v in self.list(kind).items() if predicate is None or predicate(v)}
            if len(recs) >= n:
                return recs
            if time.monotonic() >= deadline:
                raise RegistryTimeout(f"waited {timeout_s:.0f}s for {n} live '{kind}' records under {self.root}, "
                                      f"found {len(recs)}: is the run dir on a filesystem shared by all nodes?")
            time.sleep(poll_s)

    def watch(self, kind: str, poll_s: float = 0.2, stop: Optional[Callable[[], bool]] = None
              ) -> Iterator[Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]]:
        """Yield ``(appeared, disappeared)`` whenever the live set of a kind changes."""
        known: Dict[str, Dict[str, Any]] = {}
        while stop is None or not stop():
            now = self.list(kind)
            appeared = {k: v for k, v in now.items() if k not in known}
            gone = {k: v for k, v in known.items() if k not in now}
            known = now
            if appeared or gone:
                yield appeared, gone
            else:
                time.sleep(poll_s)

    def secret(self) -> str:
        """The run's API key (created once, mode 0600)."""
        self._dir("")
        path = self.root / "secret"
        with contextlib.suppress(FileNotFoundError):
            return path.read_text().strip()
        key = secrets.token_urlsafe(32)
        # link fails if the secret exists: racing processes all get the first key, never half a file
        tmp = self.root / temp_name("secret")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(key)
        try:
            os.link(tmp, path)
        except FileExistsError:
            key = path.read_text().strip()
        finally:
            os.unlink(tmp)
        return key
