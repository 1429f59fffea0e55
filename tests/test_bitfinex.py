"""Bitfinex v2: the adapter against the real recording (with sequence numbers), te/tu, info codes; the fake."""

from __future__ import annotations

import json
import time

import orjson
import pytest
import websocket

from mdlogger import records as rec
from mdlogger.exchanges.base import Pause, Reconnect, Refused, SymbolInfo
from mdlogger.fakes.bitfinex import FakeBitfinex

from helpers import FakeRest, ListSink, make_adapter, normalized_session, wait_for
from helpers.captures import received_frames, rest_body


@pytest.fixture
def adapter():
    return make_adapter("bitfinex")


def session(adapter, names):
    sink = ListSink()
    return normalized_session(adapter, names, sink), sink


@pytest.mark.parametrize("name,symbol", [("tBTCUSD", "BTC-USD"), ("tTESTBTC:TESTUSD", "TESTBTC-TESTUSD"),
                                         ("tBTCUST", "BTC-USDT"), ("tBCHN:USD", "BCH-USD"), ("tAVAX:UST", "AVAX-USDT")])
def test_normalization(adapter, name, symbol):
    assert adapter.normalize(name) == symbol


@pytest.mark.parametrize("bad", ["BTCUSD", "t../../x", "t", "tABCDEFG", "tÄBCUSD"])
def test_pairs_that_do_not_normalize(adapter, bad):
    with pytest.raises(ValueError):
        adapter.normalize(bad)


def test_replays_the_capture(adapter, old_times):
    frames = [orjson.loads(t) for _, t in received_frames("BITFINEX.ws.11.0")]
    acks = {f["chanId"]: f for f in frames if isinstance(f, dict) and f.get("event") == "subscribed"}
    s, sink = session(adapter, sorted({a["symbol"] for a in acks.values()}))
    refused = {}
    tickers, trades = [], []
    for f in frames:
        try:
            s.on_message(orjson.dumps(f), 1_700_000_000_000_000_000)
        except Refused as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
            continue
        if isinstance(f, list) and f[0] in acks and f[1] != "hb":
            channel = acks[f[0]]["channel"]
            if channel == "ticker":
                tickers.append((acks[f[0]]["symbol"], f[1]))
            elif channel == "trades":
                snap = sorted(f[1], key=lambda t: (t[1], t[0]))
                trades.extend((acks[f[0]]["symbol"], t) for t in snap)
    assert len(sink.tickers) == len(tickers) > 0 and len(sink.trades) == len(trades) > 0
    for got, (name, t) in zip(sink.tickers, tickers):
        assert got[0] == adapter.normalize(name).encode()
        assert got[1:3] == (1_700_000_000, 0)  # no time in a Bitfinex ticker: the receive time
        assert got[3] == t[6] and got[4] != got[4] and got[5] == 0 and (got[6], got[7]) == (t[0], t[2])
    for got, (name, t) in zip(sink.trades, trades):
        sec, nanos = rec.from_millis(t[1])
        assert got == (adapter.normalize(name).encode(), t[0], sec, nanos, float(t[3]), abs(t[2]),
                       1 if t[2] > 0 else 2, True)
    assert set(refused) == {"unknown_type"}  # book channels and channels acked before the recording


def test_te_then_tu_is_stored_once(adapter):
    s, sink = session(adapter, ["tBTCUSD"])
    s.on_message(b'{"event":"subscribed","channel":"trades","chanId":89,"symbol":"tBTCUSD","pair":"BTCUSD"}', 0)
    now = int(time.time() * 1000)
    s.on_message(('[89,"te",[382489563,%d,0.00705845,10087.98969503],18,%d]' % (now, now)).encode(), 0)
    s.on_message(('[89,"tu",[382489563,%d,0.00705845,10087.98969503],19,%d]' % (now, now)).encode(), 0)
    s.on_message(('[89,"tu",[382489564,%d,-2,10088],20]' % now).encode(), 0)  # its te was missed: kept
    assert [(t[1], t[6], t[5]) for t in sink.trades] == [(382489563, 1, 0.00705845), (382489564, 2, 2.0)]
    s.on_message(b'[89,"hb"]', 0)


def test_te_tu_dedupe_is_per_symbol(adapter):
    """Ids are not known to be unique across pairs: one id on two pairs is two trades."""
    s, sink = session(adapter, ["tBTCUSD", "tETHUSD"])
    s.on_message(b'{"event":"subscribed","channel":"trades","chanId":89,"symbol":"tBTCUSD","pair":"BTCUSD"}', 0)
    s.on_message(b'{"event":"subscribed","channel":"trades","chanId":90,"symbol":"tETHUSD","pair":"ETHUSD"}', 0)
    now = int(time.time() * 1000)
    for chan, kind in ((89, "te"), (90, "te"), (89, "tu"), (90, "tu")):
        s.on_message(('[%d,"%s",[555,%d,1,100]]' % (chan, kind, now)).encode(), 0)
    s.on_message(('[90,[[556,%d,-1,101]]]' % now).encode(), 0)  # a snapshot row remembered for its own pair
    s.on_message(('[89,"te",[556,%d,1,100]]' % now).encode(), 0)  # the same id on the other pair: kept
    s.on_message(('[90,"tu",[556,%d,-1,101]]' % now).encode(), 0)  # its own pair's copy: dropped
    assert [(t[0], t[1]) for t in sink.trades] == [(b"BTC-USD", 555), (b"ETH-USD", 555), (b"ETH-USD", 556),
                                                  (b"BTC-USD", 556)]


def test_info_codes_and_errors(adapter):
    s, sink = session(adapter, ["tBTCUSD"])
    with pytest.raises(Reconnect):
        s.on_message(b'{"event":"info","code":20051,"msg":"Stopping. Please try to reconnect"}', 0)
    with pytest.raises(Pause) as info:
        s.on_message(b'{"event":"info","code":20060,"msg":"Entering in Maintenance mode"}', 0)
    assert info.value.seconds == 120
    with pytest.raises(Reconnect):
        s.on_message(b'{"event":"info","code":20061,"msg":"Maintenance ended"}', 0)
    s.on_message(b'{"event":"error","msg":"subscribe: symbol invalid","code":10001,"symbol":"tNOPEUSD"}', 0)
    s.on_message(b'{"event":"error","msg":"subscribe: limit","code":10305}', 0)
    assert sink.errors == ["code 10001: subscribe: symbol invalid", "code 10305: subscribe: limit"]


@pytest.mark.parametrize("frame,reason", [
    ('[89,"te",[1,%d,0,100]]', "bad_size"),
    ('[89,"te",[1,%d,1,"NaN"]]', "bad_price"),
    ('[89,"te",[1,%d,1,-5]]', "bad_price"),
    ('[89,"te",[1,%d,1e300,5]]', "bad_size"),
    ('[89,"te",[1,5,1,5]]', "bad_time"),
    ('[89,"te",[1]]', "missing_field"),
    ('[77,"te",[1,%d,1,5]]', "unknown_type"),
])
def test_bad_trades(adapter, frame, reason):
    s, sink = session(adapter, ["tBTCUSD"])
    s.on_message(b'{"event":"subscribed","channel":"trades","chanId":89,"symbol":"tBTCUSD","pair":"BTCUSD"}', 0)
    text = frame % int(time.time() * 1000) if "%d" in frame else frame
    with pytest.raises(Refused) as info:
        s.on_message(text.encode(), 0)
    assert info.value.reason == reason and not sink.trades


def test_discovery(adapter):
    listed = adapter.discover(FakeRest(rest_body("BITFINEX.0", "pub:list:pair:exchange"), "/v2/conf/pub:list:pair:exchange"))
    names = {s.exchange_name: s.symbol for s in listed}
    assert names["tBTCUSD"] == "BTC-USD" and names["tAAVE:USD"] == "AAVE-USD" and names["tBTCUST"] == "BTC-USDT"
    assert all(rec.valid_symbol(s.symbol) for s in listed)


def test_fake_speaks_the_protocol(adapter):
    with FakeBitfinex(symbols=["BTC-USD", "TESTBTC-TESTUSD"], mode="script", hb_interval=0.2) as fake:
        for _ in range(3):
            fake.push_trade("BTC-USD")
        ws = websocket.create_connection(fake.ws_endpoint, timeout=5)
        assert json.loads(ws.recv())["event"] == "info"
        syms = [SymbolInfo("BTC-USD", "tBTCUSD", "BTC", "USD"), SymbolInfo("TESTBTC-TESTUSD", "tTESTBTC:TESTUSD", "TESTBTC", "TESTUSD")]
        for m in adapter.subscribe_messages(syms) + ['{"event":"subscribe","channel":"trades","symbol":"tNOPEUSD"}']:
            ws.send(m)
        s, sink = session(adapter, ["tBTCUSD", "tTESTBTC:TESTUSD"])
        texts = []

        def feed() -> str:
            """Read one frame and hand it to the session."""
            texts.append(ws.recv())
            s.on_message(texts[-1].encode(), time.time_ns())
            return texts[-1]

        wait_for(lambda: feed() and sink.errors and len(sink.trades) >= 3
                 and any(t.endswith(',"hb"]') for t in texts), timeout=5, interval=0,
                 what="the refusal, the snapshot and a heartbeat")
        assert sink.errors == ["code 10001: subscribe: symbol invalid"]
        assert [t[1] for t in sink.trades] == [e["trade"][0] for e in fake.symbols["BTC-USD"].history]  # snapshot, oldest first
        assert all(t[-1] is True for t in sink.trades)
        fake.push_trade("TESTBTC-TESTUSD")
        wait_for(lambda: feed() and len(sink.trades) >= 4, timeout=5, interval=0, what="the live trade (te)")
        wait_for(lambda: '"tu"' in feed(), timeout=5, interval=0, what="its update (tu)")
        assert len(sink.trades) == 4 and sink.trades[3][0] == b"TESTBTC-TESTUSD"  # the tu was not stored again
        ws.close()
