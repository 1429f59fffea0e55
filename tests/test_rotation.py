"""Make-before-break rotation (mdlogger/rotation.py): the overlap's rules, the switch, and one real notice.

The overlap and the switch are tested without a network (stub links read
from a script); one test rotates a real connection on the loopback fake
Binance's ``serverShutdown`` notice.
"""

from __future__ import annotations

import time

import pytest
import websocket

from mdlogger import records as rec
from mdlogger.exchanges import adapter_for
from mdlogger.exchanges.base import Reconnect, Rotate, SymbolInfo
from mdlogger.frames import ConnectionLost, read_one
from mdlogger.gaps import Mark
from mdlogger.rotation import Link, OverlapSink, rotate

from helpers import fake_settings, wait_for

BTC, ETH = b"BTC-USDT", b"ETH-USDT"
T0 = 1_795_544_258


def record(sym: bytes, tid: int, sec: int = T0, nanos: int = 0, price: float = 100.0, size: float = 1.0, side: int = 1):
    return rec.TRADE_WIRE.pack(sym, tid, sec, nanos, price, size, side, rec.ZERO_ID, rec.ZERO_ID)


class Recorder:
    """The worker sink's surface that an OverlapSink forwards to."""

    def __init__(self):
        self.trades: list[tuple] = []  # (symbol, id, sec, nanos, price, size, side, snapshot)
        self.tickers: list[tuple] = []
        self.refused: list[str] = []
        self.errors: list[str] = []

    def raw_trade(self, record: bytes) -> None:
        self.trades.append(rec.TRADE_WIRE.unpack(record)[:7] + (False,))

    def _add_snapshot(self, record: bytes) -> None:
        self.trades.append(rec.TRADE_WIRE.unpack(record)[:7] + (True,))

    def trade(self, symbol, trade_id, sec, nanos, price, size, side, maker=rec.ZERO_ID, taker=rec.ZERO_ID,
              snapshot=False):
        (self._add_snapshot if snapshot else self.raw_trade)(record(symbol, trade_id, sec, nanos, price, size, side))

    def ticker(self, *args):
        self.tickers.append(args)

    def refuse(self, reason, sample):
        self.refused.append(reason)

    def exchange_error(self, text, symbol=None):
        self.errors.append(text)

    def ids(self, sym: bytes | None = None) -> list[int]:
        return [t[1] for t in self.trades if sym is None or t[0].rstrip(b"\0") == sym]


# -- OverlapSink ---------------------------------------------------------------------------------


def test_the_old_connection_passes_everything_and_marks_the_newest_trade():
    inner = Recorder()
    passing = OverlapSink(inner, hold=False)
    passing.raw_trade(record(BTC, 7))
    passing.trade(BTC, 9, T0, 5, 100.0, 1.0, 2)
    passing.raw_trade(record(ETH, 3), True)
    passing.ticker(BTC, T0, 0, 100.0, 1.0, 0, 99.0, 101.0)
    assert inner.ids() == [7, 9, 3]
    assert [t[-1] for t in inner.trades] == [False, False, True]  # a snapshot stays a snapshot
    assert len(inner.tickers) == 1
    mark = passing.marks[rec.TRADE_WIRE.unpack(record(BTC, 0))[0]]
    assert isinstance(mark, Mark)  # the writer's own mark and rule (mdlogger/gaps.py)
    assert mark.edge_tuple() == (9, T0, 5)


def test_the_new_connection_holds_its_trades_and_drops_its_tickers():
    inner = Recorder()
    held = OverlapSink(inner, hold=True)
    held.raw_trade(record(BTC, 1))
    held.trade(BTC, 2, T0, 0, 100.0, 1.0, 1, snapshot=True)
    held.ticker(BTC, T0, 0, 100.0, 1.0, 0, 99.0, 101.0)
    held.refuse("json", b"{")
    held.exchange_error("no such symbol", "BTC-USDT")
    assert inner.trades == [] and inner.tickers == []
    assert len(held.held) == 2
    assert inner.refused == ["json"] and inner.errors == ["no such symbol"]  # counted at once, not held


def test_release_forwards_only_newer_ids_in_arrival_order():
    inner = Recorder()
    passing, held = OverlapSink(inner, hold=False), OverlapSink(Recorder(), hold=True)
    for tid in (8, 9, 10):
        passing.raw_trade(record(BTC, tid))
    passing.raw_trade(record(ETH, 50))
    for sym, tid in ((BTC, 9), (ETH, 50), (BTC, 10), (ETH, 51), (BTC, 11), (ETH, 52), (BTC, 12)):
        held.raw_trade(record(sym, tid))
    held.inner = inner
    assert held.release(passing.marks) == (4, 3)
    assert [(t[0].rstrip(b"\0"), t[1]) for t in inner.trades[4:]] == [(ETH, 51), (BTC, 11), (ETH, 52), (BTC, 12)]
    assert held.held == []


def test_release_forwards_everything_of_a_symbol_the_old_connection_did_not_deliver():
    inner = Recorder()
    held = OverlapSink(inner, hold=True)
    for tid in (5, 6):
        held.raw_trade(record(ETH, tid))
    assert held.release(OverlapSink(inner, hold=False).marks) == (2, 0)
    assert inner.ids(ETH) == [5, 6]


def test_release_without_ids_uses_the_writers_rule_for_replayed_rows():
    """No ids (Kraken): earlier is a duplicate, later is new, and at the mark's own time
    only a trade with the same price, size and side was already had."""
    inner = Recorder()
    passing, held = OverlapSink(inner, hold=False), OverlapSink(inner, hold=True)
    passing.raw_trade(record(BTC, 0, T0, 100, price=10.0))
    passing.raw_trade(record(BTC, 0, T0, 200, price=11.0))
    before = len(inner.trades)
    for nanos, price in ((100, 10.0), (200, 11.0), (200, 12.5), (300, 13.0)):
        held.raw_trade(record(BTC, 0, T0, nanos, price=price))
    assert held.release(passing.marks) == (2, 2)
    assert [(t[3], t[4]) for t in inner.trades[before:]] == [(200, 12.5), (300, 13.0)]
    mark = passing.marks[rec.TRADE_WIRE.unpack(record(BTC, 0))[0]]
    assert mark.is_duplicate(rec.TRADE_WIRE.unpack(record(BTC, 0, T0, 200, price=11.0)), True)
    assert not mark.is_duplicate(rec.TRADE_WIRE.unpack(record(BTC, 0, T0, 200, price=12.5)), True)


# -- rotate(), with stub links -------------------------------------------------------------------


class StubSession:
    def __init__(self, sink):
        self.sink = sink

    def rebind(self, sink):
        self.sink = sink


class StubLink:
    """A link whose reads follow a script: trade ids to parse, or an exception to raise."""

    def __init__(self, sink, script=()):
        self.session = StubSession(sink)
        self.script = list(script)
        self.closed = False

    def close(self):
        self.closed = True


def stub_read(link):
    if not link.script:
        return
    step = link.script.pop(0)
    if isinstance(step, BaseException):
        raise step
    link.session.sink.raw_trade(record(BTC, step))


def run_rotate(old, new_script=(), open_error=None, stopping=lambda: False, clock=time.monotonic, overlap_secs=30.0):
    inner = old.session.sink
    opened = []

    def open_link(sink):
        if open_error is not None:
            raise open_error
        opened.append(StubLink(sink, new_script))
        return opened[-1]

    ticks = []
    new = rotate(old, Rotate("test"), inner, open_link, stub_read, lambda: ticks.append(1), stopping, "test",
                 overlap_secs=overlap_secs, clock=clock)
    assert new is opened[0]
    return new, ticks


def test_rotate_switches_when_the_old_connection_ends():
    inner = Recorder()
    old = StubLink(inner, [10, 11, ConnectionLost("closed by the exchange")])
    new, ticks = run_rotate(old, [10, 11, 12])
    assert inner.ids() == [10, 11, 12]  # 10 and 11 from the old; the new one's copies skipped
    assert old.closed and not new.closed
    assert new.session.sink is inner  # the new connection now feeds the worker directly
    assert len(ticks) == 3


def test_rotate_switches_after_the_overlap_even_if_the_old_connection_stays():
    inner = Recorder()
    now = [0.0]

    def clock():
        now[0] += 1.0  # one second per look at the clock: no sleeping
        return now[0]

    old = StubLink(inner, [1, 2, 3, 4, 5, 6, 7, 8])
    new, ticks = run_rotate(old, [3, 4, 5, 6, 7, 8], clock=clock, overlap_secs=4.0)
    assert len(ticks) == 3 and old.closed and old.script  # three turns; the old one still had trades to give
    assert inner.ids() == [1, 2, 3, 4, 5]  # 4 and 5 only the new one had read
    assert new.session.sink is inner


def test_rotate_stops_the_overlap_when_the_worker_stops():
    inner = Recorder()
    old = StubLink(inner, [1, 2, 3])
    new, ticks = run_rotate(old, [1, 2, 3], stopping=lambda: True)
    assert ticks == [] and old.closed and inner.ids() == []
    assert new.session.sink is inner


def test_rotate_reconnects_plainly_when_the_next_connection_cannot_open():
    inner = Recorder()
    old = StubLink(inner, [1])
    with pytest.raises(Reconnect):
        run_rotate(old, open_error=ConnectionRefusedError("refused"))
    assert old.session.sink is inner and not old.closed  # untouched: the caller closes it


def test_a_new_connection_that_fails_during_the_overlap_is_closed_and_the_error_raised():
    inner = Recorder()
    old = StubLink(inner, [1, 2, 3])
    opened = []

    def open_link(sink):
        opened.append(StubLink(sink, [websocket.WebSocketConnectionClosedException("gone")]))
        return opened[-1]

    with pytest.raises(websocket.WebSocketConnectionClosedException):
        rotate(old, Rotate("test"), inner, open_link, stub_read, lambda: None, lambda: False, "test")
    assert opened[0].closed and not old.closed


# -- one real rotation -----------------------------------------------------------------------------


def until(condition, links, sink, what, limit=15.0):
    """Read the links until ``condition()`` holds (bounded; the bound is a failure, not a wait)."""
    def read():
        if condition():
            return True
        for link in links:
            read_one(link, sink, 1 << 20, 0.01)
        return False

    wait_for(read, timeout=limit, interval=0, what=what)


def test_a_server_shutdown_notice_rotates_a_real_connection_without_gap_or_duplicate(tmp_path, caplog):
    from mdlogger.fakes.binance import FakeBinance

    caplog.set_level("INFO", logger="mdlogger.worker")

    names = ["BTC-USDT", "ETH-USDT"]
    with FakeBinance(symbols=names, mode="script", ping_interval=60.0) as fake:
        settings = fake_settings(fake, data_path=str(tmp_path))
        adapter = adapter_for(settings.exchange("binance"))
        symbols = [SymbolInfo(n, n.replace("-", ""), *n.split("-")) for n in names]
        sink = Recorder()
        old = Link.open(adapter, symbols, sink, 5.0)
        until(lambda: len(fake.open_connections()) == 1 and fake.subscribed_streams(), [old], sink, "subscription")
        streams = fake.subscribed_streams()
        doomed = fake.open_connections()
        for n in names:
            fake.push_trades(n, 3)
        until(lambda: len(sink.trades) == 6, [old], sink, "trades before the notice")

        # The notice send_server_shutdown sends; the close it does after its delay comes below,
        # once the overlap has had trades on both connections.
        fake.push_raw('{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":%d}}' % (time.time() * 1000))
        with pytest.raises(Rotate) as notice:
            until(lambda: False, [old], sink, "notice")

        links = {}
        phase = []

        def open_link(held):
            links["new"] = Link.open(adapter, symbols, held, 5.0)
            return links["new"]

        def overlap_step(link):
            read_one(link, sink, 1 << 20, 0.01)
            new = links["new"]
            conns = fake.open_connections()
            if not phase and len(conns) == 2 and all(c.state.get("streams") == streams for c in conns):
                for n in names:
                    fake.push_trades(n, 4)  # on both connections
                phase.append("both")
            elif phase == ["both"] and len(sink.trades) == 14 and len(new.session.sink.held) == 8:
                for conn in doomed:
                    conn.close(1001, "server shutdown")
                for n in names:
                    fake.push_trades(n, 2)  # on the new connection only
                phase.append("closed")

        new = rotate(old, notice.value, sink, open_link, overlap_step, lambda: None, lambda: False, "test")
        try:
            assert phase == ["both", "closed"]
            until(lambda: len(sink.trades) == 18, [new], sink, "trades after the switch")
            for n in names:
                fake.push_trades(n, 1)
            until(lambda: len(sink.trades) == 20, [new], sink, "trades on the new connection")
        finally:
            new.close()
        for n in names:
            sent = [t["t"] for t in fake.sent_trades if t["s"] == n.replace("-", "")]
            assert sink.ids(n.encode()) == sent == list(range(sent[0], sent[0] + 10))
        assert not any(t[-1] for t in sink.trades) and sink.refused == []
        assert "8 already had" in caplog.text  # the overlap's copies, held on the new connection and skipped
