"""Fault tests: frozen workers, dead networks, REST limits, full disks, busy threads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import urllib.request

import psutil
import pytest

from mdlogger.fakes.binance import FakeBinance

from helpers import Service, assert_tables_whole, fast_logger, fast_section, service_for, wait_for

pytestmark = pytest.mark.slow

SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]


def two_shards(tmp_path, fake, **kw):
    """The service on the fake's symbols, two per connection."""
    kw.setdefault("symbols_per_connection", 2)
    return service_for(tmp_path, fake, **kw)


def test_frozen_worker_is_killed_and_restarted(tmp_path):
    """A worker whose heartbeat stops (SIGSTOP: alive, silent) is SIGKILLed and replaced."""
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=20, ping_interval=1.0) as fake, \
            two_shards(tmp_path, fake, logger={"heartbeat_timeout_secs": 2.0}) as svc:
        shards = svc.wait_all_connected(2)
        victim = shards[0]["pid"]
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
                 timeout=15, what="the frozen worker killed")
        wait_for(lambda: svc.shards()[0]["pid"] not in (None, victim) and svc.shards()[0]["connected"],
                 timeout=15, what="a new worker")
        assert "heartbeat stopped" in svc.log_text()
        assert svc.shards()[0]["restarts"] == 1
        assert svc.stop() == 0


def failed_attempts(svc, shard: int) -> int:
    """Connection attempts of one binance shard that failed, from the service log."""
    return len(re.findall(r"binance#%d: connection failed" % shard, svc.log_text()))


def test_network_failures_are_retried_forever_and_shown(tmp_path):
    fake = FakeBinance(symbols=SYMBOLS, mode="steady", rate=20, ping_interval=1.0).start()
    port = fake.port
    try:
        with two_shards(tmp_path, fake) as svc:
            svc.wait_all_connected(2)
            fake.stop()  # the exchange disappears: connections drop, new ones are refused
            code, doc = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(svc.health()), what="503")
            assert doc["status"] == "degraded"
            # many failed attempts at the (short) capped delay
            wait_for(lambda: min(failed_attempts(svc, 0), failed_attempts(svc, 1)) >= 3, what="three failed attempts a shard")
            shards = svc.shards()
            assert all(not s["connected"] and s["down_since"] and s["state"] == "running" for s in shards)
            assert all(s["restarts"] == 0 for s in shards)  # reconnects are inside the worker, never fatal
            fake = FakeBinance(symbols=SYMBOLS, mode="steady", rate=20, ping_interval=1.0, port=port).start()
            svc.wait_all_connected(2)
            assert all(s["reconnects"] >= 1 for s in svc.shards())
            assert svc.stop() == 0
    finally:
        fake.stop()


def test_rest_429_retry_after_is_honoured(tmp_path):
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=5, ping_interval=1.0) as fake:
        fake.rest_failures = 2
        with two_shards(tmp_path, fake) as svc:
            svc.wait_all_connected(2)
            log = svc.log_text()
            assert log.count("HTTP 429; retrying in 1.0 s") == 2
            assert fake.rest_calls == 3
            assert svc.stop() == 0


def test_unreachable_rest_keeps_discovering_and_reports_503(tmp_path):
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=5, ping_interval=1.0) as fake:
        fake.rest_status_override = 500
        with two_shards(tmp_path, fake, rest_retries=0) as svc:
            code, doc = wait_for(lambda: (lambda r: r if r[1]["exchanges"]["binance"]["error"] else None)(svc.health()),
                                 what="a discovery error on /health")
            assert code == 503 and doc["exchanges"]["binance"]["state"] == "discovering"
            assert "HTTP 500" in doc["exchanges"]["binance"]["error"]
            fake.rest_status_override = None
            svc.wait_all_connected(2)
            assert svc.stop() == 0


def test_unknown_configured_symbol_is_reported_not_fatal(tmp_path):
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=5, ping_interval=1.0) as fake, \
            two_shards(tmp_path, fake, symbols=SYMBOLS + ["NOPE-USDT", "OLD-BTC"]) as svc:
        svc.wait_all_connected(2)
        doc = svc.health()[1]
        assert sorted(doc["exchanges"]["binance"]["refused_symbols"]) == ["NOPE-USDT (unknown)", "OLD-BTC (inactive)"]
        assert svc.stop() == 0


def test_restarts_while_every_thread_is_busy(tmp_path):
    """Pitfall 1: children are forked from the forkserver, so busy supervisor threads cannot hang them."""
    stop = threading.Event()
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=200, ping_interval=1.0) as fake, \
            two_shards(tmp_path, fake, logger={"restart_delay_secs": 0.05, "max_restart_delay_secs": 0.1}) as svc:
        try:
            svc.wait_all_connected(2)
            port = svc.health_port()

            def hammer():
                while not stop.is_set():
                    try:
                        urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5).read()
                    except OSError:
                        pass

            threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            for round_ in range(5):
                shard = svc.shards()[round_ % 2]
                os.kill(shard["pid"], signal.SIGKILL)
                wait_for(lambda: (lambda s: s["pid"] not in (None, shard["pid"]) and s["connected"])(svc.shards()[round_ % 2]),
                         timeout=20, what="restart %d" % round_)
            stop.set()
            for t in threads:
                t.join(10)
            assert sum(s["restarts"] for s in svc.shards()) == 5
            assert svc.stop() == 0
            assert_tables_whole(svc.data_path)
        finally:
            stop.set()


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_counted_rolled_back_and_recovered(tmp_path, small_disk):
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=400, ping_interval=1.0) as fake, \
            two_shards(tmp_path, fake, data=str(small_disk / "data")) as svc:
        svc.wait_all_connected(2)
        doc = wait_for(lambda: (lambda d: d if d["writer"]["io_errors"] > 0 else None)(svc.health()[1]),
                       timeout=60, what="the disk to fill")
        assert_tables_whole(svc.data_path)  # a failed block is rolled back on every column
        assert all(s["connected"] for s in doc["shards"])  # capture goes on
        assert "No space left on device" in svc.log_text()
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        rows = svc.writer()["rows_written"]
        wait_for(lambda: svc.writer()["rows_written"] > rows + 1000, timeout=30, what="writing again")
        assert svc.stop() == 0
        assert_tables_whole(svc.data_path)


def test_systemd_readiness_and_watchdog_notifications(tmp_path):
    """Type=notify: READY=1 once every shard runs, WATCHDOG=1 from the main loop, RELOADING=1 then READY=1
    around a reload, STOPPING=1 at the end."""
    import socket

    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    messages = []

    def drain():
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                return

    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=5, ping_interval=1.0) as fake:
        config = {"logger": fast_logger(str(tmp_path / "data")),
                  "exchanges": {"binance": fast_section(fake, symbols_per_connection=2)}}
        svc = Service(tmp_path, config, env={"NOTIFY_SOCKET": sock_path})
        try:
            svc.wait_all_connected(2)
            wait_for(lambda: drain() or any(m.startswith("READY=1") for m in messages), what="READY=1")
            ready_at = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
            wait_for(lambda: drain() or "WATCHDOG=1" in messages[ready_at:], interval=0, what="WATCHDOG=1 after READY=1")
            # A reload (systemctl reload sends SIGHUP) is bracketed by RELOADING=1 ... READY=1.
            seen = len(messages)
            svc.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: drain() or any(m.startswith("READY=1") for m in messages[seen:]), what="READY=1 again")
            reloading = [m for m in messages[seen:] if m.startswith("RELOADING=1")]
            assert len(reloading) == 1 and "MONOTONIC_USEC=" in reloading[0]
            assert messages.index(reloading[0], seen) < next(
                i for i in range(seen, len(messages)) if messages[i].startswith("READY=1"))
            assert svc.stop() == 0
            drain()
            assert "STOPPING=1" in messages
        finally:
            svc.ensure_dead()
            sock.close()
