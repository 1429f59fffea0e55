"""The per-process state machine and the backoff, without forking anything."""

import random

from mdlogger.backoff import Backoff
from mdlogger.exchanges.base import SymbolInfo, split_shards
from mdlogger.supervisor import BACKOFF, FATAL, RUNNING, STARTING, STOPPED, ProcessState
from mdlogger.worker import EXIT_FATAL


def machine(base=1.0, cap=8.0):
    return ProcessState("t", Backoff(base, cap, random.Random(1)))


def test_backoff_grows_capped_and_jittered():
    b = Backoff(1.0, 8.0, random.Random(7))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for d, c in zip(delays, ceilings):
        assert c / 2 <= d <= c
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay() <= 1.0


def test_starting_running_backoff_cycle_and_reset_after_healthy_run():
    m = machine()
    assert m.state == STOPPED and m.due(0)
    m.on_started(0.0)
    assert m.state == STARTING
    m.on_tick(0.5, healthy_run=10)
    assert m.state == STARTING
    m.on_tick(1.5, healthy_run=10)
    assert m.state == RUNNING
    d1 = m.on_exit(-9, 2.0)
    assert m.state == BACKOFF and 0.5 <= d1 <= 1.0 and "SIGKILL" in m.reason
    assert not m.due(2.0) and m.due(2.0 + d1)
    m.on_started(3.0)
    assert m.restarts == 1
    d2 = m.on_exit(1, 3.1)
    assert 1.0 <= d2 <= 2.0  # grew
    m.on_started(10.0)
    m.on_tick(11.5, healthy_run=10)
    m.on_tick(21.6, healthy_run=10)  # healthy for 10 s: backoff resets
    assert m.on_exit(1, 22.0) <= 1.0


def test_fatal_exit_is_never_retried():
    m = machine()
    m.on_started(0.0)
    assert m.on_exit(EXIT_FATAL, 0.1) == float("inf")
    assert m.state == FATAL and not m.due(1e9)


def test_writer_has_no_fatal_code():
    m = machine()
    m.on_started(0.0)
    m.on_exit(EXIT_FATAL, 0.1, fatal_code=None)
    assert m.state == BACKOFF


def test_network_style_failures_keep_retrying_at_the_cap():
    m = machine(cap=4.0)
    t = 0.0
    for _ in range(50):
        m.on_started(t)
        t += m.on_exit(1, t + 0.1) + 0.1
    assert m.state == BACKOFF and m.backoff.ceiling() == 4.0


def test_split_shards_within_limits():
    syms = [SymbolInfo("S%d-USDT" % i, "S%dUSDT" % i, "S%d" % i, "USDT") for i in range(25)]
    shards, uncovered = split_shards(syms, per_connection=10, max_connections=5)
    assert len(shards) == 3 and all(len(s) <= 10 for s in shards) and not uncovered
    assert sorted(s.symbol for sh in shards for s in sh) == sorted(s.symbol for s in syms)
    shards, uncovered = split_shards(syms, per_connection=4, max_connections=3)
    assert len(shards) == 3 and sum(map(len, shards)) == 12 and len(uncovered) == 13


def test_health_answers_json_before_the_first_loop(tmp_path):
    """The view is published before the health server starts: no 500 at start-up."""
    from mdlogger.health import build_app
    from mdlogger.settings import load_settings
    from mdlogger.supervisor import Supervisor

    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    sup = Supervisor(settings)
    sup._publish_view()
    resp = build_app(sup).test_client().get("/health")
    assert resp.status_code == 503 and resp.get_json()["exchanges"]["binance"]["state"] == "discovering"
