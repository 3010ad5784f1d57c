"""RolloutController: runs workflows on its own thread and asyncio loop (the client pool's too) and hands the trainer
thread staleness-bounded batches.

Staleness bound (AReaL's rule): with trainer weight version ``v`` and bound ``k``, at most ``(k + v + 1) * batch_size``
groups are ever accepted or in flight, and batches go out oldest-first; a group whose oldest token is older than
``v - k`` is dropped. ``k = 0`` is synchronous RL. Nothing polls: submission waits on an event, `get_batch` on a
condition, both set by completions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional, Sequence

from areal_hpc.rollout.workflow import Group, RolloutWorkflow

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """Episodes keep failing (e.g. no server answers): the trainer should stop, not spin."""


class RolloutStall(RolloutError):
    """No batch within a bound (see `RolloutController.next_batch`); the message says why."""


DROP_LOG_EVERY_S = 10.0  # stale drops are logged at most this often
MAX_FAILURES_IN_ROW = 50  # then RolloutError, rather than spin on a dead backend


class RolloutController:
    def __init__(self, workflow: RolloutWorkflow, client: Any, rows: Iterator[Dict[str, Any]], batch_size: int,
                 max_head_offpolicyness: int, max_concurrent: int = 0, start_version: int = 0,
                 skip: Sequence[int] = ()):
        self.workflow, self.client, self.rows = workflow, client, rows
        # Rows by index since the start (`rows_state`): taken, in flight (running or accepted, not handed out or
        # dropped), and to pass over (``skip``: trained on before the checkpoint this run resumes from)
        self._taken, self._in_flight, self._skip = 0, set(), set(skip)
        self.batch_size, self.max_staleness = batch_size, max_head_offpolicyness
        self.max_concurrent = max_concurrent or batch_size * (max_head_offpolicyness + 1)
        self._cv = threading.Condition()
        self._pending: List[Group] = []
        self._version = start_version
        self._trainer_version = start_version  # ahead of _version while a weight update is on its way
        self._accepted = start_version * batch_size  # as if every earlier version consumed one batch
        self._running, self._paused, self._stopping, self._exhausted = 0, False, False, False
        self._error: Optional[BaseException] = None
        self.stats = {"submitted": 0, "accepted": 0, "rejected": 0, "failed": 0, "dropped_stale": 0}
        self.last_failure: Optional[str] = None
        self.last_drop: Optional[Dict[str, int]] = None
        self._failures_in_row, self._drops_unlogged, self._drop_logged_t = 0, 0, 0.0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wake: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "RolloutController":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="rollout", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise RolloutError(f"rollout loop failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        self._stopping = True
        self._poke()
        if self._thread:
            self._thread.join(timeout=30)

    def submit(self, coro: Awaitable) -> "concurrent.futures.Future":
        """Start a coroutine (e.g. a pool call) on the rollout loop; returns without waiting."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Awaitable, timeout: Optional[float] = None) -> Any:
        """Run a coroutine on the rollout loop from the trainer thread and wait for its result."""
        return self.submit(coro).result(timeout)

    def set_version(self, version: int) -> None:
        self._version = version
        self._poke()

    def set_trainer_version(self, version: int) -> None:
        """The trainer's version, which the servers may not have yet: later batches are bounded by it."""
        self._trainer_version = version

    def pause(self) -> None:
        """Stop submitting new episodes (running ones continue; the servers decide about them)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._poke()

    def get_batch(self, timeout: Optional[float] = None) -> List[Group]:
        """Block until ``batch_size`` groups are ready; return the oldest ones. Raises `TimeoutError` after
        ``timeout``, `StopIteration` once the rows are used up and nothing runs, `RolloutError` after a loop failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                self._drop_stale()
                if len(self._pending) >= self.batch_size:
                    self._pending.sort(key=lambda g: g.submit_version)  # stable: oldest first
                    batch, self._pending = self._pending[:self.batch_size], self._pending[self.batch_size:]
                    self._in_flight.difference_update(g.row_index for g in batch)
                    return batch
                if self._error is not None:
                    raise RolloutError(str(self._error)) from self._error
                if self._exhausted and self._running == 0:
                    raise StopIteration("the dataset is exhausted")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no full batch within {timeout}s ({len(self._pending)} ready)")
                self._cv.wait(remaining)

    def next_batch(self, should_stop: Callable[[], bool] = lambda: False, drop_timeout_s: Optional[float] = None,
                   stall_timeout_s: Optional[float] = None) -> Optional[List[Group]]:
        """The next batch, or None once ``should_stop()`` or the rows are used up. No silent stalls: while no batch
        comes it logs why, and raises `RolloutStall` when most finished groups were wasted (stale, failed, rejected)
        for ``drop_timeout_s`` (e.g. a server whose weights lag), or no batch came for ``stall_timeout_s`` while
        servers are live."""
        t0 = last_log = time.monotonic()
        start = dict(self.stats)
        bounds = [b for b in (drop_timeout_s, stall_timeout_s) if b]
        log_every = min([60.0] + [b / 2 for b in bounds])
        while True:
            try:
                return self.get_batch(timeout=min([1.0] + [b / 4 for b in bounds]))
            except TimeoutError:
                pass
            except StopIteration:  # the rows are used up
                return None
            if should_stop():
                return None
            now = time.monotonic()
            waited = now - t0
            d = {k: self.stats[k] - start[k] for k in self.stats}
            wasted = d["dropped_stale"] + d["failed"] + d["rejected"]
            servers = self._servers()
            live = servers is None or any(v.get("healthy", True) for v in servers.values())
            finished = d["accepted"] + d["failed"] + d["rejected"]
            wasting = drop_timeout_s and waited >= drop_timeout_s and wasted and 2 * wasted > finished
            silent = stall_timeout_s and waited >= stall_timeout_s and live
            if wasting or silent:
                bound = "rollout.drop_timeout_s" if wasting else "rollout.stall_timeout_s"
                reason = self._why_waiting(waited, d, servers)
                log.error("rollout stalled (%s): %s", bound, reason)
                raise RolloutStall(f"rollout stalled ({bound}): {reason}")
            if now - last_log >= log_every:
                log.warning("waiting for a batch: %s", self._why_waiting(waited, d, servers))
                last_log = now

    def _servers(self) -> Optional[Dict[str, Dict[str, Any]]]:
        """The client pool's servers (id -> healthy, weight_version, ...); None if it lists none."""
        if not hasattr(self.client, "servers") or self._loop is None:
            return None

        async def snapshot():
            return dict(self.client.servers)
        try:
            return self.run(snapshot(), timeout=5.0)
        except Exception:  # noqa: BLE001 - a diagnostic only
            return None

    def _why_waiting(self, waited: float, d: Dict[str, int], servers: Optional[Dict[str, Dict[str, Any]]]) -> str:
        with self._cv:
            ready, running = len(self._pending), self._running
        finished = d["accepted"] + d["failed"] + d["rejected"]
        kept = d["accepted"] - d["dropped_stale"]
        parts = [f"no batch for {waited:.0f}s ({ready} of {self.batch_size} groups ready, {running} running); "
                 f"{finished} finished meanwhile: {max(0, kept)} kept, {d['dropped_stale']} dropped as stale, "
                 f"{d['failed']} failed, {d['rejected']} rejected by the workflow"]
        if d["dropped_stale"] and self.last_drop:
            ld = self.last_drop
            parts.append(f"stale groups carry tokens of weight version {ld['oldest_version']} while the trainer is at "
                         f"version {ld['version']} and rollout.max_head_offpolicyness={ld['max_staleness']}: "
                         "a server's weights lag the trainer's (did a weight update fail? see the server logs)")
        if d["failed"] and self.last_failure:
            parts.append(f"last episode error: {self.last_failure[:300]}")
        if servers is not None:
            parts.append("servers: " + (", ".join(
                f"{sid} v{info.get('weight_version')} {'healthy' if info.get('healthy', True) else 'unhealthy'}"
                for sid, info in sorted(servers.items())) or "none live"))
        return "; ".join(parts)

    def rows_state(self) -> Dict[str, Any]:
        """The rows' ``state_dict`` rewound to the oldest row in flight (a restart generates those again), with
        ``skip``: the rows after it that are done (groups finish out of order). Read under the lock the loop takes a
        row under: no row is lost or generated twice."""
        with self._cv:
            oldest = min(self._in_flight, default=self._taken)
            state = self.rows.state_dict(rewind=self._taken - oldest)
            skip = [i - oldest for i in range(oldest, self._taken) if i not in self._in_flight]
            skip += sorted(i - oldest for i in self._skip if i >= self._taken)  # not reached yet: still to skip
            return {**state, "skip": skip} if skip else state

    def _poke(self) -> None:
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended (stopped, or it failed to start)
                self._loop.call_soon_threadsafe(self._wake.set)

    def _drop_stale(self) -> None:
        trainer = max(self._version, self._trainer_version)
        lowest = trainer - self.max_staleness
        stale = [g for g in self._pending if g.oldest_version < lowest]
        if not stale:
            return
        oldest = min(g.oldest_version for g in stale)
        self.last_drop = {"oldest_version": oldest, "version": trainer, "max_staleness": self.max_staleness}
        self._in_flight.difference_update(g.row_index for g in stale)
        self._pending = [g for g in self._pending if g.oldest_version >= lowest]
        self._accepted -= len(stale)  # frees their capacity
        self.stats["dropped_stale"] += len(stale)
        self._drops_unlogged += len(stale)
        now = time.monotonic()
        if now - self._drop_logged_t >= DROP_LOG_EVERY_S:
            log.warning("dropped %d stale group(s): their oldest tokens come from weight version %d, the trainer "
                        "is at version %d with max_head_offpolicyness=%d (%d dropped in all)", self._drops_unlogged,
                        oldest, trainer, self.max_staleness, self.stats["dropped_stale"])
            self._drops_unlogged, self._drop_logged_t = 0, now
        self._poke()

    def _capacity(self) -> int:
        with self._cv:
            used, running = self._accepted + self._running, self._running
        bound = (self.max_staleness + self._version + 1) * self.batch_size - used
        return min(bound, self.max_concurrent - running)

    async def _main(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        try:
            if hasattr(self.client, "start"):
                await self.client.start()
        except BaseException as e:  # noqa: BLE001 - reported to the trainer thread
            self._error, self._stopping = e, True  # what the client opened before failing is closed below
        finally:
            self._ready.set()
        tasks = set()
        while not self._stopping:
            self._wake.clear()
            while not self._paused and not self._stopping and not self._exhausted and self._capacity() > 0:
                with self._cv:  # the row and its count at once (`rows_state`)
                    try:
                        row = next(self.rows)
                    except Exception as e:  # noqa: BLE001 - the end of the rows, or a loader that fails: no more rows
                        if not isinstance(e, StopIteration):
                            self._error = RolloutError(f"reading the next prompt row failed: {e!r}")
                        self._exhausted = True
                        self._cv.notify_all()
                        break
                    index, self._taken = self._taken, self._taken + 1
                    if index in self._skip:  # trained on before the restart
                        continue
                    self._running += 1
                    self._in_flight.add(index)
                self.stats["submitted"] += 1
                t = asyncio.create_task(self._episode(row, self._version, index))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await self._wake.wait()
        for t in list(tasks):
            t.cancel()
        if hasattr(self.client, "close"):
            await self.client.close()
        if hasattr(self.workflow, "close"):  # its reward workers
            self.workflow.close()

    async def _episode(self, row: Dict[str, Any], version: int, index: int) -> None:
        group: Optional[Group] = None
        failed = False
        try:
            got = await self.workflow.arun_episode(self.client, row)
            if got is not None and not isinstance(got, Group):
                raise TypeError(f"the workflow's arun_episode returned a {type(got).__name__}: a Group, or None")
            group = got
            self._failures_in_row = 0
        except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - one bad episode must not stop the run
            if isinstance(e, asyncio.CancelledError) and self._stopping:  # `stop` cancels the episodes
                raise
            failed = True
            self.stats["failed"] += 1
            self._failures_in_row += 1
            self.last_failure = repr(e)
            log.warning("episode failed (%d in a row): %r", self._failures_in_row, e)
            if self._failures_in_row >= MAX_FAILURES_IN_ROW:
                self._error = RolloutError(f"{self._failures_in_row} episodes failed in a row; last: {e!r}")
        with self._cv:
            self._running -= 1
            if group is not None and group.trajectories:
                group.submit_version, group.row_index = version, index
                self._accepted += 1
                self._pending.append(group)
                self.stats["accepted"] += 1
            else:
                self._in_flight.discard(index)
                if not failed:  # the workflow returned no group, or an empty one: rejected (a failure: failed)
                    self.stats["rejected"] += 1
            self._cv.notify_all()
        self._wake.set()
