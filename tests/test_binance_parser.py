"""The Binance adapter against real messages: the captures and the documented examples."""


import orjson
import pytest

from mdlogger import records as rec
from mdlogger.exchanges import base
from mdlogger.exchanges.base import Refused, SymbolInfo
from mdlogger.exchanges.binance import Binance
from mdlogger.settings import load_settings

from helpers import FakeRest, ListSink
from helpers.captures import received_frames, rest_body

# docs/PROTOCOLS.md, "Binance: WebSocket streams": Binance's documented trade example and a recorded
# 24h ticker (published in tardis-node's tests).
REAL_TRADE = '{"stream":"bnbbtc@trade","data":{"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}}'
REAL_TICKER = '{"stream":"dogebnb@ticker","data":{"e":"24hrTicker","E":1569805259092,"s":"DOGEBNB","c":"0.00014360","Q":"51135.00000000","b":"0.00014365","B":"7080.00000000","a":"0.00014498","A":"275033.00000000","o":"0.00014069","h":"0.00014550","l":"0.00013851","v":"20014582.00000000","n":514}}'


@pytest.fixture
def adapter():
    settings = load_settings(None, {}, {"exchanges.binance.enabled": True}, check_resources=False)
    return Binance(settings.exchange("binance"))


def session_for(adapter, names):
    syms = [SymbolInfo(s, e, s.split("-")[0], s.split("-")[1]) for s, e in names]
    sink = ListSink()
    return adapter.new_session(syms, sink), sink


# Captured and documented messages are years old: accept their times (conftest.py's old_times).
pytestmark = pytest.mark.usefixtures("old_times")


def test_real_trade_maps_every_field(adapter):
    session, sink = session_for(adapter, [("BNB-BTC", "BNBBTC")])
    session.on_message(REAL_TRADE.encode(), 0)
    assert sink.trades == [(b"BNB-BTC", 12345, 1672515782, 136000000, 0.001, 100.0, rec.SIDE_SELL)]


def test_real_ticker_maps_every_field(adapter):
    session, sink = session_for(adapter, [("DOGE-BNB", "DOGEBNB")])
    session.on_message(REAL_TICKER.encode(), 0)
    (sym, sec, nanos, price, volume, side, bid, ask), = sink.tickers
    assert (sym, sec, nanos, side) == (b"DOGE-BNB", 1569805259, 92000000, rec.SIDE_UNKNOWN)
    assert (price, volume, bid, ask) == (0.0001436, 51135.0, 0.00014365, 0.00014498)


def test_captured_stream_replays(adapter):
    """Every frame of the real recording: aggTrades stored, other streams refused and counted."""
    frames = received_frames("BINANCE.ws.1.0")
    names = {}
    for _, text in frames:
        data = orjson.loads(text)["data"]
        if "s" in data:
            names[data["s"]] = data["s"]
    info = {"NKNUSDT": "NKN-USDT", "BLZETH": "BLZ-ETH", "LRCBTC": "LRC-BTC", "RUNEEUR": "RUNE-EUR"}
    session, sink = session_for(adapter, [(v, k) for k, v in info.items()])
    refused = {}
    for _, text in frames:
        try:
            session.on_message(text.encode(), 0)
        except Refused as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
    agg = [orjson.loads(t)["data"] for _, t in frames if '"e":"aggTrade"' in t]
    assert len(sink.trades) == len(agg) == 2
    for got, raw in zip(sink.trades, agg):
        sec, nanos = rec.from_millis(raw["T"])
        side = rec.SIDE_SELL if raw["m"] else rec.SIDE_BUY
        assert got == (info[raw["s"]].encode(), raw["a"], sec, nanos, float(raw["p"]), float(raw["q"]), side)
    assert refused == {"unknown_type": len(frames) - 2}


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda d: d.pop("p"), "missing_field"),
        (lambda d: d.update(p="NaN"), "bad_price"),
        (lambda d: d.update(p="0"), "bad_price"),
        (lambda d: d.update(p="-1"), "bad_price"),
        (lambda d: d.update(p="1e300"), "bad_price"),
        (lambda d: d.update(q="0"), "bad_size"),
        (lambda d: d.update(q="inf"), "bad_size"),
        (lambda d: d.update(T="yesterday"), "bad_time"),
        (lambda d: d.update(T=99999999999999), "bad_time"),
        (lambda d: d.update(s="XXXYYY"), "unknown_symbol"),
        (lambda d: d.update(m="yes"), "missing_field"),
        (lambda d: d.update(t=-5), "missing_field"),
    ],
)
def test_bad_fields_are_refused_with_their_reason(adapter, mutate, reason, monkeypatch):
    monkeypatch.setattr(base, "MAX_PAST_SECS", 2 * 86400)
    session, sink = session_for(adapter, [("BNB-BTC", "BNBBTC")])
    import time

    msg = orjson.loads(REAL_TRADE)
    msg["data"]["T"] = int(time.time() * 1000)
    mutate(msg["data"])
    with pytest.raises(Refused) as info:
        session.on_message(orjson.dumps(msg), 0)
    assert info.value.reason == reason
    assert sink.trades == []


@pytest.mark.parametrize("payload,reason", [(b"{not json", "json"), (b"[1,2]", "unknown_type"), (b'{"foo":1}', "unknown_type")])
def test_malformed_messages(adapter, payload, reason):
    session, _ = session_for(adapter, [("BNB-BTC", "BNBBTC")])
    with pytest.raises(Refused) as info:
        session.on_message(payload, 0)
    assert info.value.reason == reason


def test_error_replies_and_acks(adapter):
    session, sink = session_for(adapter, [("BNB-BTC", "BNBBTC")])
    session.on_message(b'{"result":null,"id":1}', 0)
    session.on_message(b'{"code":2,"msg":"Invalid request: unknown stream","id":3}', 0)
    session.on_message(b'{"error":{"code":2,"msg":"Invalid request"},"id":4}', 0)
    assert len(sink.errors) == 2 and "unknown stream" in sink.errors[0]


def test_server_shutdown_asks_for_reconnect(adapter):
    session, _ = session_for(adapter, [("BNB-BTC", "BNBBTC")])
    with pytest.raises(base.Reconnect):
        session.on_message(b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}', 0)


def test_discovery_from_the_real_exchange_info(adapter):
    listed = adapter.discover(FakeRest(rest_body("BINANCE.0", "exchangeInfo"), "/api/v3/exchangeInfo"))
    raw = orjson.loads(rest_body("BINANCE.0", "exchangeInfo"))["symbols"]
    assert len(listed) == len(raw)
    eth = next(s for s in listed if s.exchange_name == "ETHBTC")
    assert (eth.symbol, eth.base, eth.quote, eth.active, eth.tick_size) == ("ETH-BTC", "ETH", "BTC", True, "0.00000100")
    assert {s.active for s in listed} == {True, False}
    assert all(s.active == (r["status"] == "TRADING") for s, r in zip(listed, raw))


def test_subscribe_messages_are_chunked_lowercase(adapter):
    syms = [SymbolInfo("A%d-USDT" % i, "A%dUSDT" % i, "A%d" % i, "USDT") for i in range(120)]
    msgs = [orjson.loads(m) for m in adapter.subscribe_messages(syms)]
    params = [p for m in msgs for p in m["params"]]
    assert len(params) == 240 and params[0] == "a0usdt@trade" and params[1] == "a0usdt@ticker"
    assert all(m["method"] == "SUBSCRIBE" and len(m["params"]) <= 100 for m in msgs)
    assert len({m["id"] for m in msgs}) == len(msgs)


def test_fast_path_packs_exactly_what_the_careful_path_does(adapter, monkeypatch):
    """The worker's sink takes the fast path; its records equal the validated ones."""
    import os
    import time

    from mdlogger.stats import WORKER_FIELDS, Block
    from mdlogger.transport import FrameReader, FrameSender
    from mdlogger.worker import WorkerSink

    monkeypatch.setattr(base, "MAX_PAST_SECS", 2 * 86400)
    r, w = os.pipe()
    sender = FrameSender(w, 1 << 20)
    sink = WorkerSink(sender, Block(WORKER_FIELDS), "binance#0")
    fast = adapter.new_session([SymbolInfo("BNB-BTC", "BNBBTC", "BNB", "BTC")], sink)
    slow, slow_sink = session_for(adapter, [("BNB-BTC", "BNBBTC")])
    now_ms = int(time.time() * 1000)
    for i, maker in enumerate([True, False, True]):
        msg = orjson.loads(REAL_TRADE)
        msg["data"].update(T=now_ms + i, t=12345 + i, m=maker, p="%.8f" % (0.001 + i), q="7.5")
        fast.on_message(orjson.dumps(msg), now_ms * 1_000_000)
        slow.on_message(orjson.dumps(msg), now_ms * 1_000_000)
    sender.seal()
    reader = FrameReader(r)
    reader.fill()
    rows = [row for _, recs in reader.frames_ready() for row in rec.TRADE_WIRE.iter_unpack(recs)]
    expected = [rec.TRADE_WIRE.unpack(rec.TRADE_WIRE.pack(*t, rec.ZERO_ID, rec.ZERO_ID)) for t in slow_sink.trades]
    assert rows == expected and len(rows) == 3
    assert sink.trades == 3
