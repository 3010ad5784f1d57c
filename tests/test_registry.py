"""The registry under concurrency, liveness and failure: real processes, real files, real locks."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from areal_hpc.registry import Heartbeat, Registry, RegistryTimeout, atomic_write

N_PROCS, N_WRITES, N_INCR = 64, 200, 10


def _worker(root, lock_kind, idx, barrier, errors):
    reg = Registry(root, lock_kind=lock_kind, ttl_s=60)
    barrier.wait()
    bad = 0
    for i in range(N_WRITES):
        reg.put("w", f"p{idx}", {"writer": idx, "i": i, "pad": "x" * (idx * 7)})
        other = reg.get("w", f"p{(idx + i) % N_PROCS}")
        # A record is either absent (not written yet) or whole and self-consistent.
        if other is not None and other["pad"] != "x" * (other["writer"] * 7):
            bad += 1
    for _ in range(N_INCR):
        reg.update("", "counter", lambda old: {"n": (old or {"n": 0})["n"] + 1})
    errors.put(bad)


@pytest.mark.parametrize("lock_kind", ["flock", "soft"])
def test_many_processes_no_lost_or_torn_records(tmp_path, lock_kind):
    ctx = mp.get_context("fork")
    barrier, errors = ctx.Barrier(N_PROCS), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), lock_kind, i, barrier, errors)) for i in range(N_PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sum(errors.get() for _ in procs) == 0
    reg = Registry(tmp_path)
    recs = reg.list("w")
    assert len(recs) == N_PROCS
    assert all(r["i"] == N_WRITES - 1 for r in recs.values())  # every writer's last write is the one seen
    assert reg.get("", "counter")["n"] == N_PROCS * N_INCR  # no lost read-modify-write
    assert not [f for f in os.listdir(tmp_path / "w") if f.endswith(".tmp")]  # no temp files left


def test_watcher_sees_1000_records_within_1s(tmp_path):
    reg = Registry(tmp_path, ttl_s=60)
    seen, done = {}, threading.Event()

    def watch():
        for appeared, _ in reg.watch("servers", poll_s=0.01, stop=done.is_set):
            now = time.monotonic()
            for k in appeared:
                seen.setdefault(k, now)
            if len(seen) >= 1000:
                return

    t = threading.Thread(target=watch)
    t.start()
    writer = Registry(tmp_path, ttl_s=60)
    written = {}
    for i in range(1000):
        writer.put("servers", f"s{i}", {"address": f"h:{i}"})
        written[f"s{i}"] = time.monotonic()
    t.join(5)
    done.set()
    assert len(seen) == 1000
    worst = max(seen[k] - written[k] for k in written)
    assert worst < 1.0, f"slowest record seen after {worst:.3f}s"


def test_expired_records_leave_live_view(tmp_path):
    reg = Registry(tmp_path, ttl_s=0.3)
    reg.put("servers", "a", {"x": 1})
    reg.put("servers", "b", {"x": 2})
    reg.put("weights", "latest", {"version": 3}, ttl=False)
    time.sleep(0.2)
    reg.touch("servers", "b")
    time.sleep(0.2)
    assert set(reg.list("servers")) == {"b"}
    assert set(reg.list("servers", live_only=False)) == {"a", "b"}
    assert reg.get("weights", "latest")["version"] == 3  # non-expiring records stay


def test_a_record_a_crash_left_zero_filled_reads_as_absent(tmp_path):
    """A node that crashed mid-write can leave a record of NUL bytes (no fsync): it is torn, not a reader's crash."""
    reg = Registry(tmp_path)
    reg.put("servers", "a", {"x": 1})
    reg.put("servers", "b", {"x": 2})
    reg.path("servers", "b").write_bytes(b"\0" * 150)  # (a length json reads as truncated UTF-32)
    assert set(reg.list("servers")) == {"a"} and reg.get("servers", "b") is None


@pytest.mark.parametrize("body", [b"[1]", b"7", b'"x"', b"null"])
def test_a_record_that_is_json_but_no_object_reads_as_absent(tmp_path, body):
    """A file in a record's place holding JSON that is not an object (damaged, or not written by us) crashed every
    `list` of its kind (``list.pop`` takes no default), so `status` and a trainer waiting for servers with it."""
    reg = Registry(tmp_path)
    reg.put("servers", "a", {"x": 1})
    reg.path("servers", "b").write_bytes(body)
    assert set(reg.list("servers")) == {"a"} and reg.get("servers", "b") is None


def test_wait_for_and_timeout(tmp_path):
    reg = Registry(tmp_path, ttl_s=10)
    threading.Timer(0.2, lambda: [reg.put("servers", f"s{i}", {}) for i in range(3)]).start()
    assert len(reg.wait_for("servers", 3, timeout_s=5, poll_s=0.02)) == 3
    with pytest.raises(RegistryTimeout, match="shared by all nodes"):
        reg.wait_for("servers", 4, timeout_s=0.2, poll_s=0.02)


def test_wait_for_ready_records_only(tmp_path):
    """`wait_for` lost its ``predicate`` while tests/test_gpu.py and tools/bench/infer.py still wait for servers that
    are ready (a server's record exists while it loads): they died of a TypeError."""
    reg = Registry(tmp_path, ttl_s=10)
    reg.put("servers", "s0", {"state": "loading"})
    with pytest.raises(RegistryTimeout):
        reg.wait_for("servers", 1, timeout_s=0.2, poll_s=0.02, predicate=lambda r: r.get("state") == "ready")
    threading.Timer(0.2, lambda: reg.put("servers", "s0", {"state": "ready"})).start()
    assert reg.wait_for("servers", 1, timeout_s=5, poll_s=0.02, predicate=lambda r: r.get("state") == "ready")


HOLDER = """
import sys, time
from areal_hpc.registry import Registry
reg = Registry(sys.argv[1], lock_kind=sys.argv[2], stale_lock_s=float(sys.argv[3]))
with reg.locked("x"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("lock_kind, stale_s", [("flock", 60.0), ("soft", 1.0), ("lease", 1.0)])
def test_sigkilled_holder_does_not_wedge(tmp_path, lock_kind, stale_s):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), lock_kind, str(stale_s)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(stale_s if lock_kind != "flock" else 0)
    reg = Registry(tmp_path, lock_kind=lock_kind, lock_timeout_s=5, stale_lock_s=stale_s)
    t0 = time.monotonic()
    with reg.locked("x"):
        pass
    assert time.monotonic() - t0 < 5


N_RACERS, N_ROUNDS = 4, 5


def _take_stale_lock(root, barrier, overlaps):
    real_stat = os.stat

    def slow_stat(path, *args, **kwargs):  # a shared file system: time passes between looking at a file and acting
        st = real_stat(path, *args, **kwargs)
        if str(path).endswith(".lock"):
            time.sleep(0.02)
        return st

    os.stat = slow_stat
    reg = Registry(root, lock_kind="soft", lock_timeout_s=60, stale_lock_s=30)
    for _ in range(N_ROUNDS):
        barrier.wait(60)
        with reg.locked("x"):
            try:  # mkdir is atomic: it fails while another racer is inside too
                os.mkdir(os.path.join(root, "inside"))
                time.sleep(0.002)
                os.rmdir(os.path.join(root, "inside"))
            except FileExistsError:
                overlaps.put(1)
        barrier.wait(60)  # the main process makes the lock stale again before the next round


def test_racers_on_a_stale_soft_lock_take_it_one_at_a_time(tmp_path):
    """A soft lock left by a holder that died on another host (an old file with no owner record) is taken over by
    its age. Racers that all judged it stale must not all remove it: one of them would remove the fresh lock of
    the racer that took it first, and both would hold it."""
    lock = tmp_path / "locks" / "x.lock"
    lock.parent.mkdir()
    ctx = mp.get_context("fork")
    barrier, overlaps = ctx.Barrier(N_RACERS + 1), ctx.Queue()
    procs = [ctx.Process(target=_take_stale_lock, args=(str(tmp_path), barrier, overlaps)) for _ in range(N_RACERS)]
    for p in procs:
        p.start()
    for _ in range(N_ROUNDS):
        lock.write_text("")
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
        barrier.wait(60)
        barrier.wait(60)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert overlaps.empty()


def test_a_lease_whose_holder_hangs_is_taken_over_after_stale_lock_s(tmp_path):
    """A lease holder on a host that hangs (SIGSTOP: alive, renewing nothing) kept its lock for filelock's default 30 s
    lease, whatever stale_lock_s said: as long as a waiter's whole lock timeout, so no waiter ever took it over."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "lease", "1.0"], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        p.send_signal(signal.SIGSTOP)
        with Registry(tmp_path, lock_kind="lease", lock_timeout_s=5, stale_lock_s=1.0).locked("x"):
            pass
    finally:
        p.kill()
        p.wait()


def test_live_holder_times_out_cleanly(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "flock", "60"], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        reg = Registry(tmp_path, lock_timeout_s=0.3)
        with pytest.raises(RegistryTimeout):
            with reg.locked("x"):
                pass
    finally:
        p.kill()
        p.wait()


SERVER = """
import sys, time
from areal_hpc.registry import Heartbeat, Registry
reg = Registry(sys.argv[1], ttl_s=0.5)
Heartbeat(reg, "servers", "s0", {"pid": 1}, interval_s=0.1).start()
print("up", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig, gone_immediately",
                         [(signal.SIGTERM, True), (signal.SIGINT, True), (signal.SIGKILL, False)])
def test_heartbeat_deregisters_or_expires(tmp_path, sig, gone_immediately):
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    reg = Registry(tmp_path, ttl_s=0.5)
    time.sleep(0.7)  # longer than the TTL: only the heartbeat keeps it alive
    assert "s0" in reg.list("servers")
    p.send_signal(sig)
    p.wait(10)
    assert p.returncode == -sig  # still reports death by that signal
    if gone_immediately:
        assert reg.list("servers", live_only=False) == {}
    else:
        assert "s0" in reg.list("servers", live_only=False)
        time.sleep(0.6)
        assert reg.list("servers") == {}


def test_secret_is_private_and_stable(tmp_path):
    reg = Registry(tmp_path / "reg")
    keys = {Registry(tmp_path / "reg").secret() for _ in range(5)}
    assert len(keys) == 1 and len(keys.pop()) >= 32
    assert oct(os.stat(tmp_path / "reg" / "secret").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "reg").st_mode & 0o777) == "0o700"
    assert reg.secret()


def test_heartbeat_of_a_wiped_run_does_not_come_back(tmp_path):
    """A record whose registry was wiped (a new run in the same dir) is not re-created once
    `still_ours` says the run is gone; `on_lost` is told instead."""
    reg = Registry(tmp_path / "reg", ttl_s=5)
    key = reg.secret()
    lost = threading.Event()
    hb = Heartbeat(reg, "servers", "s0", {"pid": 1}, interval_s=0.05,
                   still_ours=lambda: (tmp_path / "reg" / "secret").exists()
                   and (tmp_path / "reg" / "secret").read_text() == key, on_lost=lost.set).start()
    reg.delete("servers", "s0")
    time.sleep(0.3)
    assert "s0" in reg.list("servers")  # same run: a vanished record is written again
    import shutil

    shutil.rmtree(tmp_path / "reg")
    assert lost.wait(2)
    time.sleep(0.2)
    assert Registry(tmp_path / "reg").list("servers") == {}
    hb.stop()


def test_heartbeat_stopped_mid_beat_stays_deregistered(tmp_path):
    """`stop` while the heartbeat thread is inside a beat: the beat must not write the record back after
    `stop` removed it (a stopped server or trainer would look alive for a TTL)."""
    inside, go = threading.Event(), threading.Event()

    class SlowTouch(Registry):
        def touch(self, kind, name):
            if threading.current_thread().name.startswith("heartbeat-"):
                inside.set()
                go.wait(5)
            return super().touch(kind, name)

    reg = SlowTouch(tmp_path / "reg", ttl_s=5)
    hb = Heartbeat(reg, "servers", "s0", {"pid": 1}, interval_s=0.05).start()
    assert inside.wait(5)
    stopper = threading.Thread(target=hb.stop)
    stopper.start()
    time.sleep(0.2)  # stop() runs (or waits for the beat) while the beat is held inside touch
    go.set()
    stopper.join(5)
    time.sleep(0.2)
    assert reg.list("servers", live_only=False) == {}


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    (tmp_path / "target").mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(OSError):
        atomic_write(tmp_path / "target", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    atomic_write(tmp_path / "f", "text")
    assert (tmp_path / "f").read_text() == "text" and sorted(p.name for p in tmp_path.iterdir()) == ["f", "target"]


# fix8-A

def test_heartbeat_survives_an_error_that_is_no_os_error_and_logs_it_once(tmp_path, caplog):
    """A record that fails to build or serialise (ValueError here) ended the heartbeat thread, and the record expired
    while its process lived: the heartbeat logs the error once and keeps beating."""
    reg = Registry(tmp_path, ttl_s=10)
    beats = []

    def data():
        beats.append(1)
        if 2 <= len(beats) <= 4:
            raise ValueError("a bad record")
        return {"beats": len(beats)}
    hb = Heartbeat(reg, "servers", "s0", data, interval_s=0.02).start()
    try:
        deadline = time.monotonic() + 10
        while (reg.get("servers", "s0") or {}).get("beats", 0) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        hb.stop()
    assert len(beats) >= 6
    assert [r.getMessage() for r in caplog.records if "a bad record" in r.getMessage()] == [
        "heartbeat of servers/s0 failed (the next beats retry): ValueError('a bad record')"]


# fix9-C
def test_atomic_write_temp_names_carry_the_host(tmp_path, monkeypatch):
    """Writers on two hosts of a shared file system may have the same pid: the temp file's name has the hostname too."""
    import socket

    renamed = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(src), replace(src, dst)))
    atomic_write(tmp_path / "f.json", "{}")
    assert (tmp_path / "f.json").read_text() == "{}"
    assert f".{socket.gethostname()}.{os.getpid()}." in os.path.basename(renamed[0])


def test_a_soft_lock_of_a_holder_killed_on_another_host_just_now_is_taken_over_by_a_waiter(tmp_path):
    """A holder SIGKILLed on another host (filelock cannot probe its pid) leaves a young soft lock. A waiter looked at
    its age once, before waiting: with stale_lock_s (60 s) longer than lock_timeout_s (30 s), the defaults, it waited
    out its timeout and raised RegistryTimeout (`submit`, `stop`, `add-servers` failed, "its holder hangs") though the
    lock turned stale during the wait."""
    lock = tmp_path / "locks" / "x.lock"
    lock.parent.mkdir()
    lock.write_text("4242\nnode-that-died\n")  # filelock's marker: pid, host
    t0 = time.monotonic()
    with Registry(tmp_path, lock_kind="soft", lock_timeout_s=1, stale_lock_s=2).locked("x"):
        pass
    assert 1.5 < time.monotonic() - t0 < 5
