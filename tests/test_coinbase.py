"""Coinbase: the adapter against the real recording and the documented messages; the fake."""

from __future__ import annotations

import json
import time
import uuid

import orjson
import pytest
import websocket

from mdlogger import records as rec
from mdlogger.exchanges.base import Refused, SymbolInfo
from mdlogger.fakes.coinbase import FakeCoinbase

from helpers import FakeRest, ListSink, make_adapter, recv_close
from helpers.captures import received_frames, rest_body

REAL_TICKER = '{"type":"ticker","sequence":50978628538,"product_id":"BTC-USD","price":"17165.16","open_24h":"16437.94","volume_24h":"42492.05081975","low_24h":"16423.37","high_24h":"17259.37","volume_30d":"1093827.95195495","best_bid":"17165.15","best_bid_size":"0.61540890","best_ask":"17167.76","best_ask_size":"0.18528568","side":"sell","time":"2022-12-01T00:00:00.122581Z","trade_id":463751434,"last_size":"0.05"}'


@pytest.fixture
def adapter():
    return make_adapter("coinbase")


def session(adapter, products):
    syms = [SymbolInfo(p, p, *p.split("-")) for p in products]
    sink = ListSink()
    return adapter.new_session(syms, sink), sink


def test_replays_the_whole_capture(adapter, old_times):
    frames = [orjson.loads(t) for _, t in received_frames("COINBASE.ws.28.0")]
    products = sorted({f["product_id"] for f in frames if "product_id" in f})
    s, sink = session(adapter, products)
    refused = {}
    trades, tickers = [], []
    for f in frames:
        try:
            s.on_message(orjson.dumps(f), 0)
        except Refused as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
            continue
        if f["type"] in ("match", "last_match"):
            trades.append(f)
        elif f["type"] == "ticker":
            tickers.append(f)
    assert len(sink.trades) == len(trades) == 107 and len(sink.tickers) == len(tickers) == 107
    for got, m in zip(sink.trades, trades):
        sec, nanos = rec.from_iso8601(m["time"])
        side = rec.SIDE_BUY if m["side"] == "sell" else rec.SIDE_SELL  # the taker did the opposite of the maker
        assert got[:9] == (m["product_id"].encode(), m["trade_id"], sec, nanos, float(m["price"]), float(m["size"]),
                           side, uuid.UUID(m["maker_order_id"]).bytes, uuid.UUID(m["taker_order_id"]).bytes)
    for got, t in zip(sink.tickers, tickers):
        sec, nanos = rec.from_iso8601(t["time"])
        assert got == (t["product_id"].encode(), sec, nanos, float(t["price"]), float(t["last_size"]),
                       {"buy": 1, "sell": 2}[t["side"]], float(t["best_bid"]), float(t["best_ask"]))
    assert set(refused) == {"unknown_type"}  # level2 snapshot/l2update: not ours, counted
    assert refused["unknown_type"] == 9719 + 10


def test_ticker_side_is_the_opposite_of_its_match(adapter, old_times):
    """In the capture every ticker's side is the opposite of the match it follows (same trade_id)."""
    frames = [orjson.loads(t) for _, t in received_frames("COINBASE.ws.28.0")]
    matches = {f["trade_id"]: f for f in frames if f["type"] == "match"}
    pairs = [(matches[f["trade_id"]], f) for f in frames if f["type"] == "ticker" and f.get("trade_id") in matches]
    assert pairs
    s, sink = session(adapter, sorted({f["product_id"] for f in frames if "product_id" in f}))
    for m, t in pairs:
        s.on_message(orjson.dumps(m), 0)
        s.on_message(orjson.dumps(t), 0)
        assert sink.trades[-1][6] == sink.tickers[-1][5]  # both the taker's side


def test_real_ticker_and_last_match_snapshot(adapter, old_times):
    s, sink = session(adapter, ["BTC-USD", "BAND-GBP"])
    s.on_message(REAL_TICKER.encode(), 0)
    assert sink.tickers == [(b"BTC-USD", 1669852800, 122581000, 17165.16, 0.05, rec.SIDE_SELL, 17165.15, 17167.76)]
    s.on_message(b'{"type":"last_match","trade_id":881613,"maker_order_id":"27fff20b-af29-4f45-8744-56dd1ef57dc0",'
                 b'"taker_order_id":"1da6ce16-c8da-4732-9f71-6049f4c6aaf8","side":"sell","size":"0.04","price":"14.7775",'
                 b'"product_id":"BAND-GBP","sequence":333938798,"time":"2021-04-17T16:43:30.244075Z"}', 0)
    assert sink.trades[-1][-1] is True  # stored as a snapshot trade


@pytest.mark.parametrize("mutate,reason", [
    (lambda m: m.pop("price"), "missing_field"),
    (lambda m: m.update(price="NaN"), "bad_price"),
    (lambda m: m.update(price="-3"), "bad_price"),
    (lambda m: m.update(size="0"), "bad_size"),
    (lambda m: m.update(time="2001-01-01T00:00:00Z"), "bad_time"),
    (lambda m: m.update(time="soon"), "bad_time"),
    (lambda m: m.update(side="up"), "missing_field"),
    (lambda m: m.update(maker_order_id="not-a-uuid"), "missing_field"),
    (lambda m: m.update(product_id="../../x"), "unknown_symbol"),
])
def test_bad_matches_are_refused(adapter, mutate, reason):
    s, sink = session(adapter, ["BTC-USD"])
    m = {"type": "match", "trade_id": 1, "maker_order_id": str(uuid.uuid4()), "taker_order_id": str(uuid.uuid4()),
         "side": "sell", "size": "1", "price": "100", "product_id": "BTC-USD", "sequence": 1,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S.000001Z", time.gmtime())}
    mutate(m)
    with pytest.raises(Refused) as info:
        s.on_message(orjson.dumps(m), 0)
    assert info.value.reason == reason and not sink.trades


def test_error_names_the_refused_product(adapter):
    s, sink = session(adapter, ["BTC-USD"])
    s.on_message(b'{"type":"error","message":"Failed to subscribe","reason":"BTC-USDX is not a valid product"}', 0)
    assert sink.errors == ["Failed to subscribe: BTC-USDX is not a valid product"]


def test_discovery_skips_disabled_and_offline_products(adapter):
    body = rest_body("COINBASE.0", "/products")
    raw = orjson.loads(body)
    raw.append({"id": "../../X-Y", "base_currency": "X", "quote_currency": "Y", "status": "online"})
    raw.append({"id": "ÄB-CD", "base_currency": "ÄB", "quote_currency": "CD", "status": "online"})
    listed = adapter.discover(FakeRest(orjson.dumps(raw), "/products"))
    assert {s.symbol for s in listed} == {p["id"] for p in orjson.loads(body)}
    for s in listed:
        p = next(p for p in raw if p["id"] == s.exchange_name)
        assert s.active == (not p["trading_disabled"] and p["status"] == "online")


def test_fake_speaks_the_protocol(adapter):
    with FakeCoinbase(symbols=["BTC-USD", "ETH-USD"], mode="script", heartbeat_interval=0.2, subscribe_timeout=1.0) as fake:
        quiet = websocket.create_connection(fake.ws_endpoint, timeout=5)
        ws = websocket.create_connection(fake.ws_endpoint, timeout=5)
        ws.send(adapter.subscribe_messages([SymbolInfo("BTC-USD", "BTC-USD", "BTC", "USD"),
                                            SymbolInfo("NOPE-USD", "NOPE-USD", "NOPE", "USD")])[0])
        docs = [json.loads(ws.recv()) for _ in range(2)]
        assert docs[0] == {"type": "error", "message": "Failed to subscribe", "reason": "NOPE-USD is not a valid product"}
        assert docs[1]["type"] == "subscriptions"
        assert json.loads(ws.recv())["type"] == "heartbeat"
        fake.push_trade("BTC-USD")
        fake.push_ticker("BTC-USD")
        s, sink = session(adapter, ["BTC-USD"])
        while len(sink.trades) + len(sink.tickers) < 2:
            s.on_message(ws.recv().encode(), time.time_ns())
        match, ticker = fake.sent_trades[0], fake.sent_tickers[0]
        assert sink.trades[0][1] == match["trade_id"] and ticker["side"] != match["side"]
        assert sink.trades[0][6] == sink.tickers[0][5]
        assert recv_close(quiet) == (1008, "no subscribe within 1 s")  # closed: no subscribe within the timeout
        ws.close()
