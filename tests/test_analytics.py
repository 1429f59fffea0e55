"""Analytics figures against values computed by hand from a known trade sequence."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import struct
import threading

import pytest

from mdlogger import analytics
from mdlogger import records as rec
from mdlogger.analytics import Analytics, AnalyticsThread, format_table, parse_written
from mdlogger.storage import TableFiles, TableKey, iter_tables, pack_column, read_columns

from helpers import wait_for

T0 = 1795478400  # 2026-11-24T00:00:00Z, a multiple of 60
BUY, SELL = rec.SIDE_BUY, rec.SIDE_SELL


def trades(*rows):
    return [(sec, 0, price, size, side) for sec, price, size, side in rows]


def test_interval_figures_by_hand():
    a = Analytics(interval_secs=60)
    a.add("binance", "BTC-USDT", trades(
        (T0 + 10, 100.0, 1.0, BUY),
        (T0 + 20, 102.0, 3.0, SELL),
        (T0 + 59, 101.0, 2.0, BUY),   # last second of the first interval
        (T0 + 60, 110.0, 4.0, SELL),  # first second of the next one
    ))
    rep = a.report(now=T0 + 61)["exchanges"]["binance"]["BTC-USDT"]
    first = rep["interval"]
    assert first["start"] == T0 and first["trades"] == 3
    assert first["vwap"] == pytest.approx((100 * 1 + 102 * 3 + 101 * 2) / 6)  # 101.333...
    assert (first["high"], first["low"]) == (102.0, 100.0)
    assert (first["buy_volume"], first["sell_volume"]) == (3.0, 3.0) and first["buy_sell_ratio"] == 1.0
    cur = rep["current_interval"]
    assert cur["start"] == T0 + 60 and cur["trades"] == 1 and cur["sell_volume"] == 4.0
    assert cur["buy_sell_ratio"] == 0.0
    day = rep["today"]
    assert day["trades"] == 4 and day["vwap"] == pytest.approx((100 + 306 + 202 + 440) / 10)
    assert (day["high"], day["low"]) == (110.0, 100.0) and rep["last_price"] == 110.0


def test_no_sells_gives_no_ratio_and_an_idle_interval_reports_zero():
    a = Analytics(interval_secs=60)
    a.add("okx", "ETH-USDT", trades((T0 + 5, 10.0, 1.0, BUY), (T0 + 6, 12.0, 1.0, rec.SIDE_UNKNOWN)))
    rep = a.report(now=T0 + 30)["exchanges"]["okx"]["ETH-USDT"]
    assert rep["current_interval"]["buy_sell_ratio"] is None
    assert rep["current_interval"]["buy_volume"] == 1.0 and rep["current_interval"]["volume"] == 2.0
    later = a.report(now=T0 + 200)["exchanges"]["okx"]["ETH-USDT"]
    assert later["interval"]["trades"] == 0 and later["current_interval"]["trades"] == 0
    assert later["today"]["trades"] == 2


def test_large_trades_by_notional_global_and_per_symbol():
    a = Analytics(60, large_notional=1000.0, per_symbol_notional={"binance:BTC-USDT": 50000.0})
    a.add("binance", "ETH-USDT", trades((T0, 100.0, 10.0, BUY), (T0 + 1, 100.0, 9.99, BUY)))
    a.add("binance", "BTC-USDT", trades((T0, 100.0, 10.0, BUY), (T0 + 1, 1000.0, 50.0, SELL)))
    rep = a.report(now=T0 + 2)["exchanges"]["binance"]
    assert rep["ETH-USDT"]["current_interval"]["large_trades"] == 1
    big = rep["BTC-USDT"]["current_interval"]
    assert big["large_trades"] == 1 and big["large"][0]["notional"] == 50000.0 and big["large"][0]["side"] == SELL


def test_new_thresholds_from_a_reload_apply_to_later_trades_only():
    a = Analytics(60, large_notional=1000.0)
    a.add("binance", "ETH-USDT", trades((T0, 100.0, 10.0, BUY)))  # 1000: large
    a.set_thresholds(0.0, 0.0, {"binance:ETH-USDT": 2000.0})
    a.add("binance", "ETH-USDT", trades((T0 + 1, 100.0, 10.0, BUY), (T0 + 2, 100.0, 20.0, SELL)))
    cur = a.report(now=T0 + 3)["exchanges"]["binance"]["ETH-USDT"]["current_interval"]
    assert cur["large_trades"] == 2 and [x["time"] for x in cur["large"]] == [T0, T0 + 2]


def test_large_trades_by_median_multiple():
    a = Analytics(60, large_median_multiple=5.0)
    a.add("kraken", "BTC-USD", trades(*[(T0 + i, 100.0, 1.0, BUY) for i in range(9)], (T0 + 9, 100.0, 5.0, SELL),
                                      (T0 + 10, 100.0, 4.9, SELL)))
    rep = a.report(now=T0 + 11)["exchanges"]["kraken"]["BTC-USD"]
    assert rep["current_interval"]["large_trades"] == 1 and rep["median_size"] == 1.0


def test_the_thread_reads_what_the_writer_stored(tmp_path):
    day = rec.day_string(T0)
    key = TableKey("coinbase", "BTC-USD", rec.KIND_TRADES, day)
    rows = [(1, T0 + 1, 0, 100.0, 2.0, BUY, rec.ZERO_ID, rec.ZERO_ID), (2, T0 + 2, 0, 104.0, 2.0, SELL, rec.ZERO_ID, rec.ZERO_ID)]
    files = TableFiles(str(tmp_path), key)
    cols = list(zip(*rows))
    files.append([struct.pack("<%d%s" % (len(v), c.code), *v) if c.code != "16s" else b"".join(v)
                  for c, v in zip(rec.TRADE_COLUMNS, cols)], len(rows))
    engine = Analytics(60)
    t = AnalyticsThread(str(tmp_path), engine, threading.Event(), clock=lambda: T0 + 5)
    assert t.poll() == 2 and t.poll() == 0  # only new rows are read
    files.append([struct.pack("<%d%s" % (1, c.code), v) if c.code != "16s" else v
                  for c, v in zip(rec.TRADE_COLUMNS, (3, T0 + 3, 0, 96.0, 4.0, BUY, rec.ZERO_ID, rec.ZERO_ID))], 1)
    files.close()
    assert t.poll() == 1
    fig = engine.report(now=T0 + 5)["exchanges"]["coinbase"]["BTC-USD"]["current_interval"]
    assert fig["trades"] == 3 and fig["vwap"] == pytest.approx((200 + 208 + 384) / 8)
    assert "coinbase" in format_table(engine.most_active(now=T0 + 61))
    assert not math.isnan(fig["vwap"])


def test_columns_fast_path_equals_row_by_row():
    import random

    rng = random.Random(3)
    rows = [(T0 + 60 + i // 10, 100 + rng.random(), rng.random() * 3 + 0.01, rng.choice([0, 1, 2])) for i in range(300)]
    slow, fast = Analytics(60, large_notional=250.0), Analytics(60, large_notional=250.0)
    slow.add("binance", "X-Y", trades(*rows))
    fast.add("binance", "X-Y", trades(*rows[:1]))  # opens the interval and the day
    t, p, s, d = (list(c) for c in zip(*rows[1:]))
    fast.add_columns("binance", "X-Y", t, p, s, d)
    a = slow.report(now=T0 + 100)["exchanges"]["binance"]["X-Y"]
    b = fast.report(now=T0 + 100)["exchanges"]["binance"]["X-Y"]
    for window in ("current_interval", "today"):
        for k in ("trades", "high", "low", "large_trades"):
            assert a[window][k] == b[window][k], (window, k)
        for k in ("vwap", "volume", "buy_volume", "sell_volume"):
            assert a[window][k] == pytest.approx(b[window][k], rel=1e-12), (window, k)


# -- the thread follows the writer's "written" feed ------------------------------------------------------

DAY = rec.day_string(T0)
BTC = TableKey("coinbase", "BTC-USD", rec.KIND_TRADES, DAY)
ETH = TableKey("coinbase", "ETH-USD", rec.KIND_TRADES, DAY)


def append(files: TableFiles, *trades):
    """Append ``(sec, price, size, side)`` trades to an open table, as the writer does (one block)."""
    first = files.rows + 1
    rows = [(first + i, sec, 0, price, size, side, rec.ZERO_ID, rec.ZERO_ID)
            for i, (sec, price, size, side) in enumerate(trades)]
    files.append([pack_column(c, v) for c, v in zip(rec.TRADE_COLUMNS, zip(*rows))], len(rows))
    return files.rows


def written(*tables) -> bytes:
    """A "written" datagram: ``(key, rows_on_disk_total)`` pairs."""
    return json.dumps({"op": "written", "tables": [[k.exchange, k.symbol, k.day, n] for k, n in tables]}).encode()


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """Two open tables of today, and a record of every table read and every walk of the tree."""
    files = {key: TableFiles(str(tmp_path), key) for key in (BTC, ETH)}
    seen = {"read": [], "walks": 0}

    def reading(data_path, key, names, start, stop):
        seen["read"].append((key, start, stop))
        return read_columns(data_path, key, names, start, stop)

    def walking(*args, **kw):
        seen["walks"] += 1
        return iter_tables(*args, **kw)

    monkeypatch.setattr(analytics, "read_columns", reading)
    monkeypatch.setattr(analytics, "iter_tables", walking)
    yield str(tmp_path), files, seen
    for f in files.values():
        f.close()


@contextlib.contextmanager
def feed_pair():
    """A real SEQPACKET pair, as WriterChild makes it: (ours, the writer's); both closed after."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        yield ours, theirs
    finally:
        theirs.close()
        ours.close()


@pytest.fixture
def feed():
    with feed_pair() as pair:
        yield pair


def trades_of(engine, key):
    return engine.report(now=T0 + 5)["exchanges"].get(key.exchange, {}).get(key.symbol, {}).get("today", {}).get(
        "trades", 0)


def test_the_thread_reads_only_the_tables_the_feed_names(disk, feed):
    data, files, seen = disk
    ours, theirs = feed
    append(files[BTC], (T0 + 1, 100.0, 1.0, BUY))
    append(files[ETH], (T0 + 1, 10.0, 1.0, SELL))  # (written before the thread has a feed)
    engine = Analytics(60)
    t = AnalyticsThread(data, engine, threading.Event(), clock=lambda: T0 + 5, feed=ours)
    assert t.fed
    assert t.step() == t.POLL_SECS
    assert seen["walks"] == 1 and {k for k, *_ in seen["read"]} == {BTC, ETH}  # the catch-up walk
    assert trades_of(engine, BTC) == 1 and trades_of(engine, ETH) == 1

    # Both tables grow on disk; the writer names only BTC: only BTC is read, and no directory is walked.
    seen["read"].clear()
    btc_total = append(files[BTC], (T0 + 2, 101.0, 1.0, BUY), (T0 + 3, 102.0, 1.0, SELL))
    append(files[ETH], (T0 + 2, 11.0, 1.0, BUY))
    theirs.send(written((BTC, btc_total)))
    t.step()
    assert seen["read"] == [(BTC, 1, 3)] and seen["walks"] == 1
    assert trades_of(engine, BTC) == 3 and trades_of(engine, ETH) == 1  # ETH's new row waits
    t.step()  # nothing named: nothing read
    assert seen["read"] == [(BTC, 1, 3)] and seen["walks"] == 1 and t.offsets == {BTC: 3, ETH: 1}

    # A new feed (a writer restart) brings one catch-up walk: ETH's unnamed row is picked up, once.
    seen["read"].clear()
    with feed_pair() as (ours2, theirs2):
        t.set_feed(ours2)
        t.step()
        assert seen["walks"] == 2 and seen["read"] == [(ETH, 1, 2)] and trades_of(engine, ETH) == 2
        assert ours.fileno() == -1 and t.feed is ours2  # the old feed is closed by the thread


def test_named_tables_are_merged_and_old_totals_read_nothing(disk, feed):
    data, files, seen = disk
    ours, theirs = feed
    engine = Analytics(60)
    t = AnalyticsThread(data, engine, threading.Event(), clock=lambda: T0 + 5, feed=ours)
    t.step()  # catch-up walk of empty tables
    one = append(files[BTC], (T0 + 1, 100.0, 1.0, BUY))
    two = append(files[BTC], (T0 + 2, 100.0, 1.0, BUY))
    theirs.send(written((BTC, one)))
    theirs.send(written((BTC, two), (ETH, 0)))  # the writer splits long lists; totals only grow
    theirs.send(written((BTC, one)))  # an older total (out of date): nothing more to read
    t.step()
    assert seen["read"] == [(BTC, 0, 2)] and trades_of(engine, BTC) == 2 and t.named == {}


def test_malformed_datagrams_are_counted_and_ignored(disk, feed, caplog):
    data, files, seen = disk
    ours, theirs = feed
    engine = Analytics(60)
    stop = threading.Event()
    t = AnalyticsThread(data, engine, stop, clock=lambda: T0 + 5, feed=ours)
    bad = [
        b"garbage", b"\xff\xfe", b"[1, 2]", b"null", b'{"op": "other", "tables": []}', b'{"op": "written"}',
        b'{"op": "written", "tables": {}}', written((BTC, 1))[:-3],
        b'{"op": "written", "tables": [["nowhere", "BTC-USD", "%s", 1]]}' % DAY.encode(),  # unknown exchange
        b'{"op": "written", "tables": [["coinbase", "../../etc", "%s", 1]]}' % DAY.encode(),  # not a symbol
        b'{"op": "written", "tables": [["coinbase", "BTC-USD", "%s", -1]]}' % DAY.encode(),
        b'{"op": "written", "tables": [["coinbase", "BTC-USD", "%s", true]]}' % DAY.encode(),
        b'{"op": "written", "tables": [["coinbase", "BTC-USD", "%s", 1.5]]}' % DAY.encode(),
        b'{"op": "written", "tables": [["coinbase", "BTC-USD", 1]]}',
        b"[" * 100000,  # nesting deep enough for a RecursionError
        b" " * (AnalyticsThread.FEED_MAX + 1),  # longer than any datagram the writer sends: truncated
    ]
    with caplog.at_level(logging.WARNING, "mdlogger.analytics"):
        t.start()
        try:
            for datagram in bad:
                theirs.send(datagram)
            total = append(files[BTC], (T0 + 1, 100.0, 1.0, BUY), (T0 + 2, 100.0, 2.0, SELL))
            theirs.send(written((BTC, total)))
            wait_for(lambda: trades_of(engine, BTC) == 2 and t.bad_datagrams == len(bad), what="the good datagram")
            assert t.is_alive() and t.errors == len(bad)
        finally:
            stop.set()
            t.wake()
            t.join(10)
    assert not t.is_alive()
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1  # logged once a minute, not once per datagram


def test_a_total_beyond_the_files_is_read_by_a_walk_instead(disk, feed):
    data, files, seen = disk
    ours, theirs = feed
    engine = Analytics(60)
    t = AnalyticsThread(data, engine, threading.Event(), clock=lambda: T0 + 5, feed=ours)
    t.step()
    total = append(files[BTC], (T0 + 1, 100.0, 1.0, BUY))
    theirs.send(written((BTC, total + 1000)))  # (a writer bug: more rows than the files hold)
    assert t.step() == t.POLL_SECS and t.errors == 1 and t.named == {} and t.catch_up_due
    t.step()  # the walk reads what is really there
    assert trades_of(engine, BTC) == 1 and t.offsets[BTC] == 1 and seen["walks"] == 2


def test_a_failed_read_keeps_the_table_named_for_the_next_pass(disk, feed, monkeypatch):
    data, files, seen = disk
    ours, theirs = feed
    engine = Analytics(60)
    t = AnalyticsThread(data, engine, threading.Event(), clock=lambda: T0 + 5, feed=ours)
    t.step()
    total = append(files[BTC], (T0 + 1, 100.0, 1.0, BUY))
    theirs.send(written((BTC, total)))

    def unreadable(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(analytics, "read_columns", unreadable)
    assert t.step() >= t.POLL_SECS / 2 and t.failing and t.named == {BTC: 1} and t.errors == 1
    monkeypatch.setattr(analytics, "read_columns", read_columns)
    assert t.step() == t.POLL_SECS and trades_of(engine, BTC) == 1 and t.named == {} and not t.failing


def test_the_feed_ending_brings_one_walk_and_a_replacement_thread_counts_nothing_twice(disk, feed):
    data, files, seen = disk
    ours, theirs = feed
    engine = Analytics(60)
    first = AnalyticsThread(data, engine, threading.Event(), clock=lambda: T0 + 5, feed=ours)
    first.step()
    total = append(files[BTC], (T0 + 1, 100.0, 1.0, BUY))
    theirs.send(written((BTC, total)))
    append(files[BTC], (T0 + 2, 100.0, 1.0, BUY))  # written by the writer just before it died, never named
    theirs.close()  # the writer exited
    first.step()  # the datagram, the end, then one walk: the dead writer's last row
    assert first.feed is None and trades_of(engine, BTC) == 2 and seen["walks"] == 2
    first.step()  # and no more walks while no writer runs
    assert seen["walks"] == 2 and seen["read"] == [(BTC, 0, 2)]  # each row read once

    # The thread ends; its replacement takes its offsets and the next writer's feed: nothing is counted twice.
    with feed_pair() as (ours2, theirs2):
        first.set_feed(ours2)
        second = AnalyticsThread(data, engine, threading.Event(), clock=lambda: T0 + 5, offsets=first.offsets,
                                 feed=first.take_feed(), fed=True)
        total = append(files[BTC], (T0 + 3, 100.0, 1.0, BUY))
        theirs2.send(written((BTC, total)))
        second.step()
        assert trades_of(engine, BTC) == 3 and second.offsets[BTC] == 3 and second.feed is ours2


def test_a_new_day_follows_todays_tables_and_forgets_the_others(disk, feed):
    data, files, seen = disk
    ours, theirs = feed
    now = [T0 + 5]
    engine = Analytics(60)
    t = AnalyticsThread(data, engine, threading.Event(), clock=lambda: now[0], feed=ours)
    t.step()
    total = append(files[BTC], (T0 + 1, 100.0, 1.0, BUY))
    theirs.send(written((BTC, total)))
    t.step()
    assert t.offsets == {BTC: 1}
    now[0] = T0 + 86400 + 5  # the next UTC day
    tomorrow = TableKey("coinbase", "BTC-USD", rec.KIND_TRADES, rec.day_string(now[0]))
    late = append(files[BTC], (T0 + 86399, 100.0, 1.0, BUY))  # yesterday's table, written after midnight
    new = TableFiles(data, tomorrow)
    try:
        fresh = append(new, (T0 + 86401, 200.0, 1.0, SELL))
        theirs.send(written((BTC, late), (tomorrow, fresh)))
        seen["read"].clear()
        t.step()
    finally:
        new.close()
    assert seen["read"] == [(tomorrow, 0, 1)]  # today's tables only, as the walk does
    assert t.offsets == {tomorrow: 1}  # the old day's offsets are dropped


def test_a_stop_ends_the_thread_and_leaves_the_feed_open_for_a_draining_writer(tmp_path, feed):
    ours, theirs = feed
    stop = threading.Event()
    t = AnalyticsThread(str(tmp_path), Analytics(60), stop, feed=ours)
    t.start()
    wait_for(lambda: not t.catch_up_due, what="the first pass")
    stop.set()
    t.wake()
    t.join(10)
    assert not t.is_alive()
    theirs.send(written((BTC, 0)))  # the writer's last datagram, as it drains: no broken pipe
    t.close_feed()  # (the supervisor, once the writer has exited)
    assert ours.fileno() == -1 and t.feed is None
    t.wake()  # (after the end: nothing happens)


def test_parse_written():
    assert parse_written(written((BTC, 3), (ETH, 0))) == [(BTC, 3), (ETH, 0)]
    assert parse_written(b'{"op": "written", "tables": []}') == []
    assert parse_written(b'{"op": "written", "tables": [["coinbase", "BTC-USD", "%s", 1, 2]]}' % DAY.encode()) is None
