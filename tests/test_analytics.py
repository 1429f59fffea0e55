"""Analytics figures against values computed by hand from a known trade sequence."""

from __future__ import annotations

import math
import struct

import pytest

from mdlogger import records as rec
from mdlogger.analytics import Analytics, AnalyticsThread, format_table
from mdlogger.storage import TableFiles, TableKey

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
    import threading

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
