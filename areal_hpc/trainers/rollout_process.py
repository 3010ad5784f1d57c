"""Rank 0's `RolloutSide` in a forked process, so the client's event loop and the trainer's step do not share a GIL.
The child answers over two pipes: one for the trainer's main thread, one for its weight-update thread. Disk weight
updates only: a broadcast's group belongs to the trainer's process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import pickle
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from areal_hpc.registry.util import die_with_parent
from areal_hpc.rollout import RolloutError, Trajectory
from areal_hpc.rollout.data import one_line
from areal_hpc.train import dist

_FAILED = "failed"  # (_FAILED, reason) goes to the other ranks when rank 0 fails


def share(make: Callable[[], Any], sent: Callable[[Any], Any] = lambda value: value) -> Any:
    """Rank 0 calls ``make()`` and sends ``sent(value)`` to the other ranks; rank 0 gets the value, the others what
    was sent. If ``make`` raises, the other ranks raise `RolloutError` at once rather than wait out the collective."""
    if dist.rank() != 0:
        got = dist.broadcast_object(None)
        if isinstance(got, tuple) and got[:1] == (_FAILED,):
            raise RolloutError(got[1])
        return got
    try:
        value = make()
    except BaseException as e:
        dist.broadcast_object((_FAILED, f"rank 0 failed: {type(e).__name__}: {one_line(e)}"))
        raise
    dist.broadcast_object(sent(value))
    return value


class _ChildGone(RuntimeError):
    """The rollout process ended: raised in place of an answer."""


class BackgroundUpdates:
    """What `RolloutSide` and `RolloutProcess` share: the batch handed to every rank, and disk weight updates on a
    thread while training goes on, one at a time (the subclass's ``apply_update(write, version)``)."""

    def __init__(self) -> None:
        self._updater = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-update")
        self._update: Optional[concurrent.futures.Future] = None  # the update in flight

    def next_batch(self, version: int) -> Optional[List[List[Trajectory]]]:
        """The next batch (its groups) for a trainer at ``version``, on every rank; None if a stop is requested while
        waiting (the servers may be gone). Stalled or failing rollouts raise on every rank."""
        return share(lambda: self.next_trajectories(version))

    def update_weights_later(self, write: Callable[[], Path], version: int) -> None:
        """``write()`` publishes the weights (`train.publish.stage_weights`), the servers load them, old versions
        are pruned; call `wait_update` first. The controller takes the new version once the servers have it."""
        if self._update is not None:
            raise RuntimeError("a weight update is still in flight: wait_update() first")
        self._update = self._updater.submit(self.apply_update, write, version)

    def wait_update(self) -> Dict[str, float]:
        """Wait for the update in flight, if any (its errors are raised here); its metrics."""
        fut, self._update = self._update, None
        return fut.result() if fut is not None else {}

    def stop(self) -> None:
        """The last weights reach the servers (or fail loudly), then the thread and the rest (``stop_rest()``) go."""
        try:
            self.wait_update()
        finally:
            self._updater.shutdown()
            self.stop_rest()


class RolloutProcess(BackgroundUpdates):
    """A `RolloutSide` that ``make_side(should_stop)`` builds in a child; its errors (and its death) raise here."""

    def __init__(self, make_side: Callable[[Callable[[], bool]], Any], should_stop: Callable[[], bool]):
        mp = multiprocessing.get_context("fork")
        self.should_stop, self._stop = should_stop, mp.Event()
        (self._calls, calls), (self._updates, updates) = mp.Pipe(), mp.Pipe()
        self._proc = mp.Process(target=_serve, args=(make_side, self._stop, calls, updates), daemon=True)
        self._proc.start()
        calls.close()
        updates.close()
        super().__init__()
        self._stats: Dict[str, float] = {}
        try:
            self._call(self._calls, "ready")  # the side is built (servers up), or its error is raised
        except BaseException:
            self._proc.join(10)
            raise

    def _call(self, conn, name: str, *args: Any) -> Any:
        with contextlib.suppress(OSError):  # a dead child is reported below
            conn.send((name, args))
        while not conn.poll(0.1):
            if self.should_stop():
                self._stop.set()
            if not self._proc.is_alive():
                raise _ChildGone(f"the rollout process died (exit code {self._proc.exitcode}) during {name}()")
        try:
            kind, value = conn.recv()
        except EOFError:
            raise _ChildGone(f"the rollout process exited during {name}()") from None
        if kind == "err":  # with the child's traceback as its cause (pickling drops it)
            exc, tb = value
            exc.__cause__ = RuntimeError(f"in the rollout process:\n{tb.rstrip()}")
            raise exc
        return value

    def start(self) -> None:
        self._call(self._calls, "start")

    def loader_state(self) -> Dict[str, Any]:
        return self._call(self._calls, "loader_state")

    def next_trajectories(self, version: int) -> Optional[List[List[Trajectory]]]:
        trajs, self._stats = self._call(self._calls, "next_trajectories", version)
        return trajs

    def stats(self) -> Dict[str, float]:
        return self._stats  # as of the last batch: one call a step, not two

    def apply_update(self, write: Callable[[], Path], version: int) -> Dict[str, float]:
        """`RolloutSide.apply_update`, but ``write()`` runs here (it reads this process's staged weights)."""
        t0 = time.monotonic()
        path = write()
        wrote = time.monotonic() - t0
        out = self._call(self._updates, "apply_update", str(path), version)
        return {**out, **{k: out.get(k, 0.0) + wrote for k in ("bg_phase/weight_publish", "bg_time_s")}}

    def stop_rest(self) -> None:
        try:
            with contextlib.suppress(_ChildGone):  # a dead child has nothing to stop (its death was reported)
                self._call(self._calls, "stop")
        finally:
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()


def _serve(make_side, stop_event, calls, updates) -> None:
    """The child: build the side, answer calls (updates on a thread of their own) until "stop" or EOF."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):  # the trainer decides when its side stops
        signal.signal(sig, signal.SIG_IGN)
    multiprocessing.current_process().daemon = False  # it may start reward workers (RewardScorer) and stops them
    die_with_parent()  # with the trainer, however it ends
    try:
        side = make_side(stop_event.is_set)
    except BaseException as e:  # noqa: BLE001 - the trainer raises it
        _reply(calls, "err", e)
        return
    threading.Thread(target=_answer, args=(side, updates), name="rollout-updates", daemon=True).start()
    _answer(side, calls)


def _answer(side, conn) -> None:
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if name == "apply_update":
                value = side.apply_update(lambda: Path(args[0]), args[1])
            elif name == "next_trajectories":
                value = side.next_trajectories(*args), side.stats()
            else:
                value = None if name == "ready" else getattr(side, name)(*args)
        except BaseException as e:  # noqa: BLE001 - the trainer raises it
            _reply(conn, "err", e)
        else:
            _reply(conn, "ok", value)
        if name == "stop":  # failed or not: the trainer joins this process next
            return


def _reply(conn, kind: str, value: Any, tb: Optional[str] = None) -> None:
    if kind == "err":  # an error goes with its traceback here
        tb = tb or "".join(traceback.format_exception(value))
    try:
        if kind == "err":  # one that pickles but cannot be rebuilt (its __init__ takes more than the message)
            pickle.loads(pickle.dumps(value))
        conn.send((kind, (value, tb) if kind == "err" else value))
    except OSError:  # the trainer is gone
        pass
    except Exception as e:  # noqa: BLE001 - what does not pickle goes as its text (the trainer may be gone)
        _reply(conn, "err", RuntimeError(f"{type(value).__name__}: {value} ({e})"), tb)
