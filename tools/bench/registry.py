#!/usr/bin/env python
"""Registry benchmarks on a local disk; one JSON line per measurement, then a markdown table.

    python tools/bench/registry.py --dir /work          # everything, in a temp dir under /work
    python tools/bench/registry.py --dir /dev/shm       # tmpfs: what the code costs without a disk
    python tools/bench/registry.py --only writes,list   # a subset of: syscalls writes churn update list watch
    python tools/bench/registry.py --smoke              # every measurement, short and small (CI)

What is measured (against the issue's targets: >= 20k record writes/s, listing 1,000 live
records in <= 20 ms):

* ``syscalls`` -- the floor: what the system calls under `put` and `list` cost here, per call.
* ``writes`` -- `Registry.put` of a ~300-byte server-like record, records/s, for 1 process and
  for N writer processes at once (aggregate: all records written / the common time window;
  median of ``--repeats``, each in a fresh directory). Two cases: ``overwrite`` rewrites 16
  existing records per process (a heartbeat carrying fresh data, a state change: the rename
  replaces a file) and ``new`` writes a fresh name every time. Every write carries different
  content. The same for a bare "lock-free name service" baseline: temp file + ``os.replace`` of
  the JSON, no liveness stamp -- the simplest thing that is still atomic.
* ``churn``  -- one process overwriting for ``--churn-s`` seconds in one directory: writes/s in
  each second (does the rate hold up?).
* ``update`` -- locked read-modify-write (`Registry.update`) ops/s with ``flock`` and ``soft``
  locks, 1 process and N processes incrementing one shared counter (no lost update is
  checked); ``raw-flock`` is the same read-modify-write under a bare ``fcntl.flock`` (what the
  ``filelock`` library costs on top).
* ``list``   -- `Registry.list` of 1,000 live records: median and p95 of 50 listings (plus
  ``live_only=False``); with ``--list-ref REV`` also with store.py as of git revision REV,
  alternating with the current one in the same process (before/after under the same load).
* ``watch``  -- a watcher thread iterating `Registry.watch(poll_s=...)` while this process
  writes 1,000 records as fast as it can: delay from each record's write to the watcher seeing
  it (median, p95, max).

Every writer process writes only its own records; the temp directory is removed at the end.
On ext4 the temp directory gets the "top directory" flag (``chattr +T``) so that each
measurement's directory lands in its own block group (see `fresh_dir`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Callable, Dict, List

from common import REPO as ROOT

from areal_hpc.registry import Registry

RESULTS: List[dict] = []

RECORD = {"address": "10.0.12.34:30001", "backend": "hf", "gpus": [0, 1], "slurm_job": "123456",
          "slurm_step": "3", "pid": 4242, "host": "node-017", "weight_version": 12, "state": "ready",
          "started": 1795700000.123, "load": 7, "api": "http", "extra": "x" * 40}


def emit(**kw) -> None:
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ---------------------------------------------------------------------- writers

def baseline_put(d: str, name: str, data: dict, seq: List[int], pid: int) -> None:
    """The simplest atomic name service: temp file + os.replace, nothing else."""
    seq[0] += 1
    tmp = f"{d}/.{name}.{pid}.{seq[0]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(data).encode())
    finally:
        os.close(fd)
    os.replace(tmp, f"{d}/{name}.json")


def make_writer(impl: str, root: str, kind: str) -> Callable[[str, int], None]:
    """``write(name, k)``: write record ``name`` with content that differs per ``k`` (a real
    rewrite, as a heartbeat carrying a new load figure or a state change is)."""
    if impl == "registry":
        reg = Registry(root, ttl_s=60)
        return lambda name, k: reg.put(kind, name, {**RECORD, "seq": k})
    d = f"{root}/{kind}"
    os.makedirs(d, exist_ok=True)
    seq, pid = [0], os.getpid()
    return lambda name, k: baseline_put(d, name, {**RECORD, "seq": k}, seq, pid)


def _write_proc(impl: str, root: str, kind: str, idx: int, case: str, n_names: int, barrier, t_start, duration: float,
                out) -> None:
    write = make_writer(impl, root, kind)
    names = [f"w{idx}-{k}" for k in range(n_names)]
    if case == "overwrite":  # every timed write replaces an existing file
        for name in names:
            write(name, -1)
    barrier.wait()
    while t_start.value == 0.0 or time.time() < t_start.value:  # the parent sets it after the barrier
        time.sleep(0.0005)
    end = t_start.value + duration
    n, k = 0, 0
    cpu0 = time.process_time()
    while True:
        for _ in range(64):  # check the clock every 64 writes
            name = names[k % n_names] if case == "overwrite" else f"w{idx}-n{k}"
            write(name, k)
            k += 1
        n += 64
        if time.time() >= end:
            break
    out.put((n, time.time() - t_start.value, time.process_time() - cpu0))


def run_writers(impl: str, root: Path, case: str, n_procs: int, duration: float) -> tuple:
    """(records written, seconds, CPU seconds of the writers) by ``n_procs`` processes at once."""
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(n_procs + 1), ctx.Queue()
    t_start = ctx.Value("d", 0.0)
    ps = [ctx.Process(target=_write_proc, args=(impl, str(root), "servers", i, case, 16, barrier, t_start,
                                                duration, out)) for i in range(n_procs)]
    for p in ps:
        p.start()
    barrier.wait()
    t_start.value = time.time() + 0.05
    results = [out.get(timeout=120 + duration) for _ in ps]
    for p in ps:
        p.join(60)
    # the window runs until the last writer stopped
    return sum(r[0] for r in results), max(r[1] for r in results), sum(r[2] for r in results)


def bench_writes(base: Path, procs: List[int], duration: float, repeats: int) -> None:
    # registry and baseline alternate within each repeat, so both see the same machine load
    for case in ("overwrite", "new"):
        for n_procs in procs:
            got: Dict[str, List[tuple]] = {"registry": [], "baseline": []}
            for rep in range(repeats):
                for impl in (("registry", "baseline") if rep % 2 == 0 else ("baseline", "registry")):
                    root = fresh_dir(base, f"w-{impl}-{case}-{n_procs}-{rep}")
                    total, window, cpu = run_writers(impl, root, case, n_procs, duration)
                    got[impl].append((total / window, 1e6 * cpu / total))
                    shutil.rmtree(root, ignore_errors=True)
            for impl, runs in got.items():
                med = statistics.median(r for r, _ in runs)
                emit(bench="writes", impl=impl, case=case, procs=n_procs, repeats=repeats, seconds=duration,
                     writes_per_s=round(med), best_writes_per_s=round(max(r for r, _ in runs)),
                     cpu_us_per_write=round(statistics.median(c for _, c in runs), 1), target_writes_per_s=20000,
                     meets_target=med >= 20000)


def bench_churn(base: Path, seconds: int) -> None:
    """One process rewriting 16 records for ``seconds`` s in one directory: writes/s per second.
    Each overwrite creates an inode and frees the replaced one; on an ext4 without a journal the
    allocator skips "recently deleted" inodes of the block group one by one, so this can decay."""
    for impl in ("registry", "baseline"):
        root = fresh_dir(base, f"churn-{impl}")
        write = make_writer(impl, str(root), "servers")
        names = [f"s{k}" for k in range(16)]
        per_s, k = [], 0
        for _ in range(seconds):
            end, n = time.perf_counter() + 1.0, 0
            while time.perf_counter() < end:
                for _ in range(32):
                    write(names[k % 16], k)
                    k += 1
                n += 32
            per_s.append(n)
        emit(bench="churn", impl=impl, case="overwrite", procs=1, writes_per_s_each_second=per_s)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- the filesystem floor

def bench_syscalls(base: Path, n: int = 3000) -> None:
    """What the system calls under `put`/`list` cost here, per call (wall and CPU): the floor."""
    body = json.dumps({**RECORD, "_ttl": 60.0}).encode()
    d = str(fresh_dir(base, "syscalls"))

    def create(path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, body)
        os.close(fd)

    def read(path: str, size: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.read(fd, size)
            os.fstat(fd)
        finally:
            os.close(fd)

    def timed(what: str, fn: Callable[[int], None]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            fn(i)
        wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
        emit(bench="syscalls", op=what, calls=n, wall_us=round(wall * 1e6, 1), cpu_us=round(cpu * 1e6, 1))

    timed("create+write+close (new file)", lambda i: create(f"{d}/a{i}"))
    timed("rename to a new name", lambda i: os.replace(f"{d}/a{i}", f"{d}/b{i}"))
    timed("create+write+close, rename over an existing file", lambda i: (create(f"{d}/t{i}"),
                                                                         os.replace(f"{d}/t{i}", f"{d}/b{i}")))
    timed("utime (touch)", lambda i: os.utime(f"{d}/b{i}"))
    timed("open+read(64 KiB)+fstat+close", lambda i: read(f"{d}/b{i}", 1 << 16))
    timed("open+read(1 MiB)+fstat+close", lambda i: read(f"{d}/b{i}", 1 << 20))
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------- locked read-modify-write

def raw_flock_update(reg: Registry, name: str, fn) -> None:
    """Baseline for `Registry.update`: the same read-modify-write under a bare fcntl.flock."""
    fd = os.open(f"{reg._dir('locks')}/raw.{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = reg.get("", name, live_only=False)
        if old is not None:
            old.pop("_age_s", None)
        reg.put("", name, fn(old), ttl=False)
    finally:
        os.close(fd)  # drops the flock


def _update_proc(root: str, lock_kind: str, barrier, t_start, duration: float, out) -> None:
    reg = Registry(root, lock_kind="flock" if lock_kind == "raw-flock" else lock_kind, ttl_s=60)
    inc = lambda old: {"n": (old or {"n": 0})["n"] + 1}  # noqa: E731
    if lock_kind == "raw-flock":
        reg.update = lambda kind, name, fn: raw_flock_update(reg, name, fn)  # noqa: E731
    reg.update("", "counter", lambda old: old or {"n": 0})
    barrier.wait()
    while t_start.value == 0.0 or time.time() < t_start.value:
        time.sleep(0.0005)
    end, n = t_start.value + duration, 0
    cpu0 = time.process_time()
    while time.time() < end:
        reg.update("", "counter", inc)
        n += 1
    out.put((n, time.time() - t_start.value, time.process_time() - cpu0))


def bench_update(base: Path, procs: List[int], duration: float) -> None:
    ctx = mp.get_context("fork")
    for lock_kind in ("flock", "soft", "raw-flock"):
        for n_procs in procs:
            root = fresh_dir(base, f"u-{lock_kind}-{n_procs}")
            barrier, out, t_start = ctx.Barrier(n_procs + 1), ctx.Queue(), ctx.Value("d", 0.0)
            ps = [ctx.Process(target=_update_proc, args=(str(root), lock_kind, barrier, t_start, duration, out))
                  for _ in range(n_procs)]
            for p in ps:
                p.start()
            barrier.wait()
            t_start.value = time.time() + 0.05
            results = [out.get(timeout=120 + duration) for _ in ps]
            for p in ps:
                p.join(60)
            total = sum(r[0] for r in results)
            window = max(r[1] for r in results)
            final = Registry(root).get("", "counter", live_only=False)["n"]
            assert final == total, (final, total)  # no lost update
            emit(bench="update", lock=lock_kind, procs=n_procs, ops=total, seconds=round(window, 3),
                 ops_per_s=round(total / window), cpu_us_per_op=round(1e6 * sum(r[2] for r in results) / total, 1))
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- list

def store_at(rev: str) -> type:
    """`Registry` as `areal_hpc/registry/store.py` was at git revision ``rev`` (for before/after)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:areal_hpc/registry/store.py"], check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType(f"store_at_{rev}")
    exec(compile(src, f"{rev}:areal_hpc/registry/store.py", "exec"), module.__dict__)
    return module.Registry


def bench_list(base: Path, n_records: int = 1000, repeats: int = 50, ref: str = "") -> None:
    root = fresh_dir(base, "list")
    reg = Registry(root, ttl_s=60)
    for i in range(n_records):
        reg.put("servers", f"s{i}", {**RECORD, "seq": i})
    impls = {"current": reg}
    if ref:  # the same listings with store.py of another revision, alternating with ours
        impls[f"git:{ref}"] = store_at(ref)(root, ttl_s=60)
    for live_only in (True, False):
        times: Dict[str, List[float]] = {k: [] for k in impls}
        cpu: Dict[str, List[float]] = {k: [] for k in impls}
        for r in impls.values():
            r.list("servers", live_only=live_only)  # warm the dentry/page cache, as a poller's would be
        for rep in range(repeats):
            for name, r in (list(impls.items()) if rep % 2 == 0 else list(reversed(impls.items()))):
                t0, c0 = time.perf_counter(), time.thread_time()
                recs = r.list("servers", live_only=live_only)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
                assert len(recs) == n_records
        for name, t in times.items():
            med, p95 = statistics.median(t) * 1e3, pct(t, 0.95) * 1e3
            emit(bench="list", store=name, records=n_records, live_only=live_only, repeats=repeats,
                 median_ms=round(med, 2), p95_ms=round(p95, 2), max_ms=round(max(t) * 1e3, 2),
                 cpu_median_ms=round(statistics.median(cpu[name]) * 1e3, 2), target_ms=20, meets_target=p95 <= 20)
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- watch

def bench_watch(base: Path, poll_values: List[float], n_records: int = 1000) -> None:
    for poll_s in poll_values:
        root = fresh_dir(base, f"watch-{poll_s}")
        reg = Registry(root, ttl_s=60)
        reg._dir("servers")
        seen: Dict[str, float] = {}
        stop = threading.Event()
        ready = threading.Event()

        def watcher():
            w = Registry(root, ttl_s=60)
            ready.set()
            for appeared, _ in w.watch("servers", poll_s=poll_s, stop=stop.is_set):
                t = time.time()
                for name in appeared:
                    seen.setdefault(name, t)
                if len(seen) >= n_records:
                    return

        th = threading.Thread(target=watcher, daemon=True)
        th.start()
        ready.wait()
        time.sleep(2 * poll_s)
        written: Dict[str, float] = {}
        t0 = time.time()
        for i in range(n_records):
            name = f"s{i}"
            reg.put("servers", name, {**RECORD, "seq": i})
            written[name] = time.time()
        write_s = time.time() - t0
        th.join(30)
        stop.set()
        delays = [seen[k] - written[k] for k in written if k in seen]
        emit(bench="watch", records=n_records, poll_s=poll_s, seen=len(delays), write_s=round(write_s, 3),
             median_ms=round(statistics.median(delays) * 1e3, 1), p95_ms=round(pct(delays, 0.95) * 1e3, 1),
             max_ms=round(max(delays) * 1e3, 1), all_seen_after_ms=round((max(seen.values()) - t0) * 1e3, 1))
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- report

def fresh_dir(base: Path, name: str) -> Path:
    """A new measurement directory. ``base`` carries ext4's "top directory" flag (chattr +T), so
    the allocator spreads its subdirectories over block groups: a measurement does not inherit
    the group an earlier one churned through (see bench_churn)."""
    d = base / name
    d.mkdir()
    return d


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()
        return out[1].split()[1]
    except Exception:  # noqa: BLE001
        return "?"


def table() -> str:
    lines = ["| measurement | value | target |", "| --- | --- | --- |"]
    for r in RESULTS:
        b = r["bench"]
        if b == "syscalls":
            lines.append(f"| syscalls: {r['op']} | {r['wall_us']} us ({r['cpu_us']} us CPU) | |")
        elif b == "writes":
            lines.append(f"| put {r['impl']} {r['case']}, {r['procs']} proc | {r['writes_per_s']:,} writes/s "
                         f"(best {r['best_writes_per_s']:,}; {r['cpu_us_per_write']} us CPU/write) | >= 20,000 "
                         f"{'yes' if r['meets_target'] else '**no**'} |")
        elif b == "churn":
            lines.append(f"| put {r['impl']} overwrite, 1 proc, sustained: writes/s in each second | "
                         f"{', '.join(f'{x:,}' for x in r['writes_per_s_each_second'])} | |")
        elif b == "update":
            lines.append(f"| update ({r['lock']}), {r['procs']} proc | {r['ops_per_s']:,} ops/s "
                         f"({r['cpu_us_per_op']} us CPU/op) | |")
        elif b == "list":
            store = "" if r["store"] == "current" else f", store.py at {r['store']}"
            lines.append(f"| list {r['records']} records (live_only={r['live_only']}{store}) | median {r['median_ms']} ms, "
                         f"p95 {r['p95_ms']} ms (CPU median {r['cpu_median_ms']} ms) | <= 20 ms (p95) "
                         f"{'yes' if r['meets_target'] else '**no**'} |")
        elif b == "watch":
            lines.append(f"| watch poll_s={r['poll_s']}, {r['records']} records written in {r['write_s']} s | "
                         f"delay median {r['median_ms']} ms, p95 {r['p95_ms']} ms, max {r['max_ms']} ms | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp", help="parent of the temp dir (its filesystem is what is measured)")
    ap.add_argument("--only", default="syscalls,writes,churn,update,list,watch")
    ap.add_argument("--procs", default="1,2,4,8,64", help="writer process counts")
    ap.add_argument("--update-procs", default="1,4")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per throughput measurement")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each write measurement (median reported)")
    ap.add_argument("--churn-s", type=int, default=10, help="seconds of the sustained-overwrite measurement")
    ap.add_argument("--list-ref", default="", help="also list with store.py of this git revision (before/after)")
    ap.add_argument("--poll", default="0.01,0.05,0.2", help="watch poll_s values")
    ap.add_argument("--smoke", action="store_true", help="1 and 2 processes, 0.2 s per measurement, 1 repeat (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.procs, args.update_procs, args.poll = "1,2", "1,2", "0.05"
        args.duration, args.repeats, args.churn_s = 0.2, 1, 1
    only = set(args.only.split(","))
    base = Path(tempfile.mkdtemp(prefix="areal-bench-registry-", dir=args.dir))
    try:  # ext4 only; elsewhere (tmpfs, NFS, no chattr) it does not matter
        topdir = subprocess.run(["chattr", "+T", str(base)], capture_output=True).returncode == 0
    except OSError:
        topdir = False
    try:
        emit(bench="env", dir=str(base), fs=fs_type(base), cpus=os.cpu_count(), kernel=platform.release(),
             python=platform.python_version(), loadavg_1m=round(os.getloadavg()[0], 2), topdir_flag=topdir)
        if "syscalls" in only:
            bench_syscalls(base)
        if "writes" in only:
            bench_writes(base, [int(x) for x in args.procs.split(",")], args.duration, args.repeats)
        if "churn" in only:
            bench_churn(base, args.churn_s)
        if "update" in only:
            bench_update(base, [int(x) for x in args.update_procs.split(",")], args.duration)
        if "list" in only:
            bench_list(base, ref=args.list_ref)
        if "watch" in only:
            bench_watch(base, [float(x) for x in args.poll.split(",")])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    emit(bench="env-end", loadavg_1m=round(os.getloadavg()[0], 2))
    print()
    env = RESULTS[0]
    print(f"Registry on {env['fs']} ({env['dir']}), {env['cpus']} CPUs, kernel {env['kernel']}, "
          f"Python {env['python']}, load average {env['loadavg_1m']} at start, {RESULTS[-1]['loadavg_1m']} at end\n")
    print(table())


if __name__ == "__main__":
    main()
