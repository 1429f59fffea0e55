"""Hostile frames in a live stream (issue 10, "A worker must never die of a frame").

End to end: the real service against the loopback fakes of Coinbase and Kraken, with hostile
frames (the issue's reproductions and values that round to nonsense) pushed between good trades.
The workers keep their pids, every hostile frame is counted under its reason, and the rows on disk
are exactly the good trades. Below that, the receive path's safety net: an exception an adapter
was never meant to raise is counted as ``parser_error`` (frames.deliver and the worker's inlined
copy of it), and refusals are logged once per reason per minute with a count.
"""

from __future__ import annotations

import logging
import os
import time

import pytest

from mdlogger import frames, worker
from mdlogger.exchanges.base import Pause, Reconnect, Refused, Rotate
from mdlogger.reader import read_rows
from mdlogger.stats import WORKER_FIELDS, Block

from helpers import SPECS, all_subscribed, assert_tables_whole, service, service_config, started_fakes, symbol_of, today, wait_for

DEEP = "[" * 990 + "]" * 990  # a full repr of it raises RecursionError


def iso_now() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + ".%06dZ" % (ns // 1000 % 10**6)


def coinbase_match(**fields) -> str:
    import json

    match = {"type": "match", "trade_id": 10**9, "side": "buy", "size": "0.5", "price": "100.5",
             "product_id": "BTC-USD", "sequence": 1, "time": iso_now()}
    match.update(fields)
    return json.dumps(match)


def kraken_trade(price="30000.1", size="0.5", when=None, side='"b"') -> str:
    when = when or "%.6f" % time.time()
    return '[0,[["%s","%s","%s",%s,"l",""]],"trade","XBT/USD"]' % (price, size, when, side)


def arabic(text: str) -> str:
    return text.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))


# Each exchange's hostile frames (made fresh each round: times must be current) and the reason
# each is counted under.
HOSTILE = {
    "coinbase": lambda: [
        ('{"type":[]}', "unknown_type"),
        ('{"type":{}}', "unknown_type"),
        (DEEP, "unknown_type"),
        (coinbase_match(price="1e-50"), "bad_price"),
        (coinbase_match(price=" 7 "), "bad_price"),
        (coinbase_match(size="١٠٠"), "bad_size"),
        (coinbase_match(trade_id=1.5), "missing_field"),
        ('{"type":"error","message":"Failed","reason":%s}' % DEEP, "exchange_error"),
    ],
    "kraken": lambda: [
        (kraken_trade(side='["b"]'), "missing_field"),
        (kraken_trade(side='{"b":1}'), "missing_field"),
        ('{"event":"subscriptionStatus","status":"subscribed","channelName":"trade","pair":[]}', "missing_field"),
        ('[0,{"c":"12","b":"3","a":"4"},"ticker","XBT/USD"]', "missing_field"),
        (kraken_trade(price="1e-50"), "bad_price"),
        (kraken_trade(price="١٠٠"), "bad_price"),
        (kraken_trade(size="1_000"), "bad_size"),
        (kraken_trade(when=arabic("%.6f" % time.time())), "bad_time"),
    ],
}
ROUNDS = 3


def reasons_of(svc, exchange: str) -> dict:
    out: dict = {}
    for s in svc.shards():
        if s["exchange"] == exchange:
            for reason, n in s["parse_errors_by_reason"].items():
                out[reason] = out.get(reason, 0) + n
    return out


@pytest.mark.slow
def test_hostile_frames_between_good_trades_are_counted_and_the_workers_live_on(tmp_path):
    names = sorted(HOSTILE)
    data = os.path.join(str(tmp_path), "data")
    with started_fakes(names) as fakes, service(tmp_path, service_config(data, fakes.values())) as svc:
        svc.wait_all_connected(len(fakes), timeout=60)
        for name, fake in fakes.items():
            wait_for(lambda: all_subscribed(fake), what="%s subscribed" % name)
        pids = svc.pids()
        want: dict = {name: {} for name in names}
        for _ in range(ROUNDS):
            for name, fake in fakes.items():
                for sym in SPECS[name]["symbols"]:
                    fake.push_trade(sym)
                for text, reason in HOSTILE[name]():
                    fake.push_raw(text)
                    want[name][reason] = want[name].get(reason, 0) + 1
        for name, fake in fakes.items():  # a good trade after the last hostile frame
            for sym in SPECS[name]["symbols"]:
                fake.push_trade(sym)
        sent = sum(len(f.sent_trades) for f in fakes.values())
        assert sent == len(names) * 2 * (ROUNDS + 1)
        wait_for(lambda: svc.writer()["rows_trades"] >= sent, timeout=30, what="the good trades written")
        for name in names:
            wait_for(lambda: reasons_of(svc, name) == want[name], what="%s refusals counted by reason" % name)
        doc = svc.health()[1]
        assert all(s["restarts"] == 0 and s["reconnects"] == 0 and s["connected"] for s in doc["shards"])
        assert svc.pids() == pids  # no worker died, none was restarted
        assert svc.stop() == 0
        for name, fake in fakes.items():
            for sym in SPECS[name]["symbols"]:
                expected = [SPECS[name]["trade"](e) for e in fake.sent_trades if symbol_of(name, e) == sym]
                assert read_rows(data, name, sym, "TRADES", today()) == expected, "%s %s" % (name, sym)
        assert_tables_whole(data)
        log = svc.log_text()
        assert "Traceback" not in log and "parser_error" not in log
        for name in names:  # three rounds of three unknown_type frames (or four missing_field ones): one line each
            for reason in ("unknown_type", "missing_field"):
                lines = [ln for ln in log.splitlines() if "refused as %s" % reason in ln and name + "#0" in ln]
                assert len(lines) <= (1 if want[name].get(reason) else 0) + 1, lines


# -- the safety net, in process -------------------------------------------------------------------------


class Boom:
    """A session whose parser fails in a way no adapter should (a bug of tomorrow)."""

    def __init__(self, exc):
        self.exc = exc
        self.calls = 0

    def on_message(self, payload, recv_ns):
        self.calls += 1
        raise self.exc

    def keepalive(self, idle_secs):
        return None


class CountingSink:
    def __init__(self):
        self.refused = []

    def refuse(self, reason, sample):
        self.refused.append((reason, sample))


@pytest.mark.parametrize("exc", [TypeError("unhashable type: 'list'"), RecursionError("deep"), KeyError("x\ny"),
                                 ValueError(), ZeroDivisionError(), IndexError(), AttributeError("a")])
def test_deliver_counts_an_unexpected_exception_as_parser_error(exc):
    sink = CountingSink()
    session = Boom(exc)
    frames.deliver(session, sink, b'{"type":[]}\n', 1 << 20, 0)
    assert [r for r, _ in sink.refused] == ["parser_error"]
    sample = sink.refused[0][1]
    assert type(exc).__name__ in sample and '{"type":[]}' in sample and "\n" not in sample


@pytest.mark.parametrize("exc", [Reconnect("r"), Rotate("planned"), Pause(5, "maintenance"), OSError(5, "EIO")])
def test_deliver_lets_the_sessions_orders_and_io_errors_through(exc):
    sink = CountingSink()
    with pytest.raises(type(exc)):
        frames.deliver(Boom(exc), sink, b"{}", 1 << 20, 0)
    assert sink.refused == []


def test_deliver_still_counts_refusals_by_their_reason():
    sink = CountingSink()
    frames.deliver(Boom(Refused("bad_price", "1e-50")), sink, b"{}", 1 << 20, 0)
    frames.deliver(Boom(AssertionError()), sink, b"x" * 100, 10, 0)  # oversized: never parsed
    assert sink.refused == [("bad_price", "1e-50"), ("oversized", b"x" * 64)]


class FakeReader:
    """Hands out a few text messages as wsframes.WsReader.messages does, then asks the loop to stop."""

    def __init__(self, payloads, owner):
        self.payloads = list(payloads)
        self.owner = owner
        self.frame_at = 0.0
        self.messages = self._messages()

    def settimeout(self, value):
        pass

    def _messages(self):
        yield from self.payloads
        while True:
            self.owner.stop_requested = True
            yield None  # a socket timeout


class FakeLink:
    def __init__(self, reader, session):
        self.reader, self.session = reader, session
        self.limiter, self.opened = None, time.monotonic()


class Sender:
    trades_added = 0
    seal_at = float("inf")

    def last_trade_time(self):
        return None

    def seal(self):
        pass

    def pump(self):
        return True

    def add_md(self, record):
        pass

    add_trade = add_snapshot = add_md


def test_the_worker_receive_loop_counts_an_unexpected_exception_as_parser_error(monkeypatch):
    """Worker._receive inlines deliver: its copy has the same safety net (and passes orders on)."""
    stats = Block(WORKER_FIELDS)
    w = worker.Worker.__new__(worker.Worker)
    w.stop_requested = False
    w.sender = Sender()
    w.sink = worker.WorkerSink(Sender(), stats, "test#0")
    w.stats = stats
    w.clock = None
    w.messages = 0
    w.batch_delay = 0.01
    w._next_tick = float("inf")
    w.xsettings = type("X", (), {"silence_timeout_secs": 60.0})()
    w.settings = type("S", (), {"logger": type("L", (), {"healthy_run_secs": 60.0})()})()
    w.adapter = type("A", (), {"max_frame_bytes": 1 << 20, "max_connection_age": None})()
    session = Boom(TypeError("unhashable type: 'list'"))
    w._receive(FakeLink(FakeReader([b'{"type":[]}', b"{}", b"[]"], w), session))
    assert session.calls == 3
    assert stats.get("drop_parser_error") == 3 and stats.get("parse_errors") == 3
    w.stop_requested = False
    with pytest.raises(Rotate):
        w._receive(FakeLink(FakeReader([b"{}"], w), Boom(Rotate("planned"))))


def test_refusals_are_logged_once_a_minute_per_reason_with_a_count(monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: clock[0])
    stats = Block(WORKER_FIELDS)
    sink = worker.WorkerSink(Sender(), stats, "test#0")
    caplog.set_level(logging.WARNING, logger="mdlogger.worker")
    for i in range(500):
        clock[0] += 0.1  # 50 s
        sink.refuse("unknown_type", b'{"type":[]}')
        sink.refuse("parser_error", "TypeError: 'unhashable' on frame b'{}'")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("first message refused as" in ln for ln in lines)
    clock[0] += 20.0  # past the minute since the first lines
    sink.refuse("unknown_type", b'{"type":{}}')
    last = caplog.records[-1].getMessage()
    assert len(caplog.records) == 3 and "500 messages refused as unknown_type" in last and '{"type":{}}' in last
    assert stats.get("drop_unknown_type") == 501 and stats.get("drop_parser_error") == 500
    assert stats.get("parse_errors") == 1001


def test_a_refused_time_far_out_takes_no_clock_sample():
    stats = Block(WORKER_FIELDS)
    sink = worker.WorkerSink(Sender(), stats, "test#0")

    class Clock:
        samples = []

        def sample(self, *args):
            self.samples.append(args)

    sink.clock = Clock()
    sink.refuse("bad_time", "9" * 4000)  # (int/float of it would overflow the offset)
    sink.refuse("bad_time", arabic("1700000000"))
    sink.refuse("bad_time", "1700000000")
    assert [s[1] for s in Clock.samples] == [1700000000]
