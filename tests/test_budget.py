"""SharedBucket: one token bucket for every process and thread opening the same file."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import stat
import threading
import time

import pytest

from mdlogger import budget
from mdlogger.budget import SharedBucket, bucket_path, runtime_dir

CTX = multiprocessing.get_context("spawn")  # children start clean: no inherited locks or threads


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "x.rest")


# -- one process ------------------------------------------------------------------------------------


def test_runtime_dir_is_made_on_demand_with_mode_0750(tmp_path):
    data = tmp_path / "data"
    run = runtime_dir(str(data))
    assert run == str(data / ".run")
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o750
    assert runtime_dir(str(data)) == run  # a second call is harmless
    assert bucket_path(str(data), "binance", "rest") == os.path.join(run, "binance.rest")
    assert bucket_path(str(data), "okx", "connect") == os.path.join(run, "okx.connect")
    with pytest.raises(ValueError):
        bucket_path(str(data), "okx", "other")


def test_starts_full_then_refills_at_its_rate(path):
    clock = FakeClock()
    b = SharedBucket(path, rate=2.0, burst=3.0, clock=clock)
    assert [b.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.try_acquire() == pytest.approx(0.5)  # one token at 2/s
    clock.t += 0.5
    assert b.try_acquire() == 0.0
    clock.t += 100.0
    assert b.tokens() == 3.0  # never more than the burst
    assert b.try_acquire(2.5) == 0.0 and b.tokens() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        b.try_acquire(3.5)  # more than the burst could never be paid
    b.close()


def test_pause_keeps_the_later_end_and_blocks_every_opener(path):
    clock = FakeClock()
    a = SharedBucket(path, rate=10.0, burst=10.0, clock=clock)
    b = SharedBucket(path, rate=10.0, burst=10.0, clock=clock)
    a.pause(30.0)
    b.pause(5.0)  # shorter: the 30 s pause stays
    assert a.paused_for() == b.paused_for() == 30.0
    assert b.try_acquire() == pytest.approx(30.0)
    assert not b.acquire(deadline=clock.t)  # a deadline that has passed: nothing taken
    clock.t += 29.0
    assert a.try_acquire() == pytest.approx(1.0)
    clock.t += 1.0
    assert b.paused_for() == 0.0 and b.try_acquire() == 0.0
    a.close(), b.close()


def test_a_file_that_does_not_parse_starts_full(path):
    clock = FakeClock()
    b = SharedBucket(path, rate=1.0, burst=4.0, clock=clock)
    assert b.try_acquire(4.0) == 0.0 and b.tokens() == 0.0
    good = open(path, "rb").read()
    for garbage in (b"", b"garbage", good[:10], good[:-1] + bytes([good[-1] ^ 1])):
        with open(path, "wb") as f:
            f.write(garbage)
        assert b.tokens() == 4.0, garbage
    b.close()


def test_state_of_another_boot_is_not_trusted(path, monkeypatch):
    clock = FakeClock()
    b = SharedBucket(path, rate=1.0, burst=4.0, clock=clock)
    b.try_acquire(4.0)
    b.pause(100.0)
    monkeypatch.setattr(budget, "_BOOT_ID", b"\x01" * 16)
    assert b.tokens() == 4.0 and b.paused_for() == 0.0
    b.close()


def test_openers_with_other_values_refill_with_their_own(path):
    clock = FakeClock()
    slow = SharedBucket(path, rate=1.0, burst=5.0, clock=clock)
    fast = SharedBucket(path, rate=10.0, burst=2.0, clock=clock)
    assert slow.try_acquire(5.0) == 0.0
    clock.t += 0.1
    assert slow.tokens() == pytest.approx(0.1)
    assert fast.tokens() == pytest.approx(1.0)
    clock.t += 10.0
    assert fast.tokens() == 2.0 and slow.tokens() == 5.0  # each caps at its own burst
    slow.close(), fast.close()


def test_acquire_honours_stop_and_deadline(path):
    b = SharedBucket(path, rate=1.0, burst=1.0)
    b.pause(300.0)
    stop = threading.Event()
    stop.set()
    assert b.acquire(stop=stop) is False
    assert b.acquire(deadline=time.monotonic()) is False
    b.close()


def test_closing_one_opener_keeps_the_others_working(path):
    a = SharedBucket(path, rate=1.0, burst=5.0)
    b = SharedBucket(path, rate=1.0, burst=5.0)
    a.close()
    a.close()  # twice is harmless
    assert b.try_acquire() == 0.0
    with pytest.raises(ValueError):
        a.try_acquire()
    b.close()


def test_threads_of_one_process_share_the_budget(path):
    rate, burst, per_thread, threads = 2000.0, 10.0, 40, 4
    start = time.monotonic()
    stamps: list[float] = []

    def take():
        b = SharedBucket(path, rate=rate, burst=burst)
        for _ in range(per_thread):
            assert b.acquire()
            stamps.append(time.monotonic())
        b.close()

    workers = [threading.Thread(target=take) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(stamps) == per_thread * threads
    assert len(stamps) <= burst + rate * (max(stamps) - start) + 1e-6


# -- several processes ------------------------------------------------------------------------------


def _hammer(path: str, rate: float, burst: float, n: int, out) -> None:
    b = SharedBucket(path, rate=rate, burst=burst)
    stamps = []
    for _ in range(n):
        assert b.acquire()
        stamps.append(time.monotonic())
    b.close()
    out.put(stamps)


def test_two_processes_never_take_more_than_the_bucket_gives(path):
    rate, burst, n = 400.0, 10.0, 120
    out = CTX.Queue()
    start = time.monotonic()  # before any take: the bucket is full at most from here
    procs = [CTX.Process(target=_hammer, args=(path, rate, burst, n, out)) for _ in range(2)]
    for p in procs:
        p.start()
    stamps = out.get(timeout=60) + out.get(timeout=60)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    # Each stamp is taken after its take, so [start, last stamp] covers every take.
    assert len(stamps) == 2 * n
    assert len(stamps) <= burst + rate * (max(stamps) - start) + 1e-6


def _pause_then_report(path: str, seconds: float, out) -> None:
    b = SharedBucket(path, rate=100.0, burst=100.0)
    b.pause(seconds)
    out.put(b.paused_for())
    b.close()


def _report_wait(path: str, out) -> None:
    b = SharedBucket(path, rate=100.0, burst=100.0)
    out.put(b.try_acquire())
    b.close()


def test_a_pause_set_in_one_process_stops_the_others(path):
    out = CTX.Queue()
    mine = SharedBucket(path, rate=100.0, burst=100.0)
    assert mine.try_acquire() == 0.0
    p = CTX.Process(target=_pause_then_report, args=(path, 120.0, out))
    p.start()
    assert out.get(timeout=60) > 0
    p.join()
    assert mine.paused_for() > 60.0  # the child's pause, seen here
    assert mine.try_acquire() > 60.0
    assert mine.acquire(deadline=time.monotonic() + 0.05) is False
    mine.pause(600.0)  # and one set here is seen by another process
    p = CTX.Process(target=_report_wait, args=(path, out))
    p.start()
    assert out.get(timeout=60) > 300.0
    p.join()
    mine.close()


def _hold_lock_forever(path: str, held) -> None:
    b = SharedBucket(path, rate=1.0, burst=1.0)
    with b.holding_lock():
        held.set()
        threading.Event().wait()  # until killed


def test_a_holder_killed_with_the_lock_does_not_block_the_others(path):
    mine = SharedBucket(path, rate=10.0, burst=10.0)
    held = CTX.Event()
    p = CTX.Process(target=_hold_lock_forever, args=(path, held))
    p.start()
    assert held.wait(60)
    probe = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError):
            fcntl.lockf(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the child really holds it
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        fcntl.lockf(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel released it
        fcntl.lockf(probe, fcntl.LOCK_UN)
    finally:
        os.close(probe)
    assert mine.acquire(deadline=time.monotonic() + 60) is True
    assert mine.try_acquire() == 0.0
    mine.close()
