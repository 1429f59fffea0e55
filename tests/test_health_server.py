"""The health listener (waitress): bounded threads, half-sent requests dropped, no Server header, and a
supervisor that keeps handling its signals while hundreds of slow clients hold the listener."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import threading
import urllib.error
import urllib.request

import psutil
import pytest
from helpers import service_for, wait_for

from mdlogger import web
from mdlogger.analytics import Analytics
from mdlogger.fakes.binance import FakeBinance

HALF_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n"  # no blank line: never ends


@contextlib.contextmanager
def slow_clients(port: int, count: int):
    """Up to ``count`` loopback connections, each with a request half-sent; all closed on leaving.

    Stops opening at the first connection the kernel does not take within 2 s (its queue is full)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(2.0)
            try:
                sock.connect(("127.0.0.1", port))
                sock.sendall(HALF_REQUEST)
            except OSError:
                sock.close()
                break
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def get(port: int, path: str, timeout: float = 30.0):
    """(status, headers, body) of a GET; the timeout bounds a broken server, it is not a requirement."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture
def server():
    srv = web.start_health_server(lambda: None, Analytics(60), "127.0.0.1", 0)
    try:
        yield srv
    finally:
        srv.shutdown()


def test_slow_clients_cost_no_threads_and_responses_name_no_server(server):
    before = threading.active_count()
    with slow_clients(server.port, 300) as socks:
        assert len(socks) == 300
        status, headers, _body = get(server.port, "/analytics")
        assert status == 200
        assert "Server" not in headers and "waitress" not in str(headers).lower()
        assert threading.active_count() <= before  # the socket thread and web.THREADS request threads, still


def test_shutdown_ends_every_thread_of_the_server():
    before = {t.ident for t in threading.enumerate()}
    srv = web.start_health_server(lambda: None, Analytics(60), "127.0.0.1", 0)
    with slow_clients(srv.port, 20):
        assert get(srv.port, "/analytics")[0] == 200
        srv.shutdown()
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= before


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (reads block at most the socket's timeout)."""
    try:
        return sock.recv(4096) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_half_sent_and_dripping_requests_are_dropped_at_the_deadline(monkeypatch):
    monkeypatch.setattr(web, "REQUEST_SECS", 1)  # read by the server's maintenance on every pass
    monkeypatch.setattr(web, "IDLE_SECS", 300)  # so the idle timeout is not what drops them
    srv = web.start_health_server(lambda: None, Analytics(60), "127.0.0.1", 0)
    try:
        half = socket.create_connection(("127.0.0.1", srv.port))
        drip = socket.create_connection(("127.0.0.1", srv.port))
        idle = socket.create_connection(("127.0.0.1", srv.port))  # nothing sent: no request in progress
        for sock in (half, drip, idle):
            sock.settimeout(0.2)
        half.sendall(HALF_REQUEST)
        wait_for(lambda: closed_by_server(half), timeout=20, interval=0, what="the half-sent request dropped")
        payload = iter(HALF_REQUEST * 50)

        def drip_one_byte_then_look() -> bool:  # one byte per 0.2 s: never idle, never whole
            try:
                drip.sendall(bytes([next(payload)]))
            except (BrokenPipeError, ConnectionResetError):
                return True
            return closed_by_server(drip)

        wait_for(drip_one_byte_then_look, timeout=20, interval=0, what="the dripping request dropped")
        assert not closed_by_server(idle)  # a connection without a request waits for the idle timeout
        assert get(srv.port, "/analytics")[0] == 200
        for sock in (half, drip, idle):
            sock.close()
    finally:
        srv.shutdown()


def test_waitress_log_lines_are_escaped_and_throttled(caplog):
    import logging

    logger = logging.getLogger("waitress")
    with caplog.at_level(logging.INFO, logger="waitress"):
        for _ in range(50):
            logger.info("Client disconnected while serving %s", "/\x1b[31mCRITICAL\nforged")
    lines = [r.getMessage() for r in caplog.records if r.name == "waitress"]
    assert len(lines) == 1
    assert "\n" not in lines[0] and "\x1b" not in lines[0] and "CRITICAL" in lines[0]


@pytest.mark.slow
def test_supervisor_handles_signals_while_slow_clients_flood_the_listener(tmp_path):
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT"], mode="steady", rate=20, ping_interval=1.0) as fake, \
            service_for(tmp_path, fake) as svc:
        svc.wait_all_connected(1)
        supervisor = psutil.Process(svc.proc.pid)
        threads_before = supervisor.num_threads()
        port = svc.health_port()
        with slow_clients(port, 500) as socks:
            assert len(socks) == 500
            status, headers, body = get(port, "/health")
            assert status == 200 and json.loads(body)["status"] == "ok", body[:300]
            assert "Server" not in headers
            assert supervisor.num_threads() < threads_before + 10  # not one per connection (Werkzeug's: 500 more)
            for sock in socks:  # every request completed at once: 500 to serve
                sock.sendall(b"\r\n")
            mark = len(svc.log_text())
            svc.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "received SIGHUP" in svc.log_text()[mark:], timeout=60, what="the reload in the log")
            assert get(port, "/health")[0] == 200
            assert svc.stop() == 0
        log = svc.log_text()
        assert re.search(r"received SIGTERM: shutting down", log) and "supervisor stopped" in log
        assert "Traceback" not in log, log[-3000:]
