"""Kraken v1: the adapter against the real recordings; XBT/XDG names; the fake."""

from __future__ import annotations

import json
import time

import orjson
import pytest
import websocket

from mdlogger import records as rec
from mdlogger.exchanges.base import Pause, Refused, SymbolInfo
from mdlogger.fakes.kraken import FakeKraken

from helpers import FakeRest, ListSink, make_adapter, normalized_session, wait_for
from helpers.captures import received_frames, rest_body


@pytest.fixture
def adapter():
    return make_adapter("kraken")


def session(adapter, names):
    sink = ListSink()
    return normalized_session(adapter, names, sink), sink


def pairs_in(frames):
    return sorted({f[-1] for f in frames if isinstance(f, list)} | {f["pair"] for f in frames if isinstance(f, dict) and "pair" in f})


def test_normalization(adapter):
    assert adapter.normalize("XBT/USD") == "BTC-USD"
    assert adapter.normalize("XDG/EUR") == "DOGE-EUR"
    assert adapter.normalize("ETH/XBT") == "ETH-BTC"


def test_replays_the_trade_capture(adapter, old_times):
    frames = [orjson.loads(t) for _, t in received_frames("KRAKEN.ws.48.0")]
    s, sink = session(adapter, pairs_in(frames))
    expected = []
    seen = set()
    for f in frames:
        s.on_message(orjson.dumps(f), 0)  # acks, heartbeats and trades: nothing refused
        if isinstance(f, list) and f[-2] == "trade":
            first = f[-1] not in seen
            seen.add(f[-1])
            rows = []
            for px, vol, when, side, _type, _misc in f[1]:
                sec, nanos = rec.from_decimal_seconds(when)
                rows.append((adapter.normalize(f[-1]).encode(), 0, sec, nanos, float(px), float(vol),
                             {"b": 1, "s": 2}[side]) + ((True,) if first else ()))
            expected.extend(sorted(rows, key=lambda r: r[2:4]) if first else rows)
    assert len(sink.trades) == len(expected) > 0
    assert sink.trades == expected


def test_replays_the_ticker_capture_with_receive_time(adapter, old_times):
    frames = [orjson.loads(t) for _, t in received_frames("KRAKEN.ws.49.0")]
    s, sink = session(adapter, pairs_in(frames))
    tickers = [f for f in frames if isinstance(f, list) and f[-2] == "ticker"]
    for i, f in enumerate(frames):
        s.on_message(orjson.dumps(f), 1_700_000_000_123_456_789 + i)
    assert len(sink.tickers) == len(tickers) > 0
    for got, f in zip(sink.tickers, tickers):
        t = f[1]
        assert got[0] == adapter.normalize(f[-1]).encode()
        assert got[1] == 1_700_000_000 and 0 <= got[2] < 10**9
        assert got[3:] == (float(t["c"][0]), float(t["c"][1]), 0, float(t["b"][0]), float(t["a"][0]))


@pytest.mark.parametrize("msg,reason", [
    (b"[1,[[\"NaN\",\"1\",\"NOW.1\",\"b\",\"m\",\"\"]],\"trade\",\"XBT/USD\"]", "bad_price"),
    (b"[1,[[\"5\",\"0\",\"NOW.1\",\"b\",\"m\",\"\"]],\"trade\",\"XBT/USD\"]", "bad_size"),
    (b"[1,[[\"5\",\"1\",\"12.1\",\"b\",\"m\",\"\"]],\"trade\",\"XBT/USD\"]", "bad_time"),
    (b"[1,[[\"5\",\"1\",\"NOW.1\",\"x\",\"m\",\"\"]],\"trade\",\"XBT/USD\"]", "missing_field"),
    (b"[1,[[\"5\"]],\"trade\",\"XBT/USD\"]", "missing_field"),
    (b"[1,[[\"5\",\"1\",\"NOW.1\",\"b\",\"m\",\"\"]],\"trade\",\"../../x\"]", "unknown_symbol"),
    (b"[1,{\"c\":[\"-1\",\"1\"],\"a\":[\"1\"],\"b\":[\"1\"]},\"ticker\",\"XBT/USD\"]", "bad_price"),
    (b"[1,{\"a\":[\"1\"]},\"ticker\",\"XBT/USD\"]", "missing_field"),
    (b"{\"event\":\"whatever\"}", "unknown_type"),
    (b"not json", "json"),
])
def test_bad_messages_are_refused(adapter, msg, reason):
    s, sink = session(adapter, ["XBT/USD"])
    msg = msg.replace(b"NOW", b"%d" % int(time.time()))  # ids must not depend on the clock (xdist collects twice)
    with pytest.raises(Refused) as info:
        s.on_message(msg, time.time_ns())
    assert info.value.reason == reason and not sink.trades and not sink.tickers


def test_errors_and_maintenance(adapter):
    s, sink = session(adapter, ["XBT/USD"])
    s.on_message(b'{"errorMessage":"Currency pair not supported XYZ/USD","event":"subscriptionStatus","pair":"XYZ/USD","status":"error","subscription":{"name":"trade"}}', 0)
    assert sink.errors == ["Currency pair not supported XYZ/USD (pair XYZ/USD)"]
    s.on_message(b'{"event":"heartbeat"}', 0)
    with pytest.raises(Pause):
        s.on_message(b'{"connectionID":1,"event":"systemStatus","status":"maintenance","version":"1.8.3"}', 0)


def test_discovery_uses_wsnames(adapter):
    listed = adapter.discover(FakeRest(rest_body("KRAKEN.0", "AssetPairs"), "/0/public/AssetPairs"))
    raw = orjson.loads(rest_body("KRAKEN.0", "AssetPairs"))["result"]
    # every pair with a wsname, but ETH2.S/ETH, whose "ETH2.S" cannot name a directory
    assert len(listed) == sum(1 for p in raw.values() if "wsname" in p) - 1
    assert "ETH2.S/ETH" not in {s.exchange_name for s in listed}
    btc = next(s for s in listed if s.exchange_name == "XBT/USD")
    assert (btc.symbol, btc.base, btc.quote) == ("BTC-USD", "BTC", "USD")
    assert all(rec.valid_symbol(s.symbol) for s in listed)


def test_fake_speaks_the_protocol(adapter):
    with FakeKraken(symbols=["BTC-USD", "DOGE-EUR"], mode="script", heartbeat_interval=0.2) as fake:
        for _ in range(3):
            fake.push_trade("BTC-USD")  # history for the replay
        ws = websocket.create_connection(fake.ws_endpoint, timeout=5)
        assert json.loads(ws.recv())["event"] == "systemStatus"
        syms = [SymbolInfo("BTC-USD", "XBT/USD", "BTC", "USD"), SymbolInfo("DOGE-EUR", "XDG/EUR", "DOGE", "EUR")]
        for m in adapter.subscribe_messages(syms) + ['{"event":"subscribe","pair":["NOPE/USD"],"subscription":{"name":"trade"}}']:
            ws.send(m)
        s, sink = session(adapter, ["XBT/USD", "XDG/EUR"])

        def feed() -> bool:
            """Read one frame and hand it to the session."""
            s.on_message(ws.recv().encode(), time.time_ns())
            return True

        wait_for(lambda: feed() and sink.errors and len(sink.trades) >= 3, timeout=5, interval=0,
                 what="the refusal and the replay")
        assert sink.errors and "NOPE/USD" in sink.errors[0]
        assert [t[-1] for t in sink.trades[:3]] == [True, True, True]  # the replay is a snapshot
        fake.push_trade("BTC-USD")
        fake.push_ticker("BTC-USD")
        wait_for(lambda: feed() and sink.tickers and len(sink.trades) >= 4, timeout=5, interval=0,
                 what="the live trade and ticker")
        assert sink.trades[3][0] == b"BTC-USD" and len(sink.trades[3]) == 7  # live after the replay
        ws.close()
