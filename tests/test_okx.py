"""The OKX adapter against real messages, and the OKX fake over a real WebSocket."""

import json
import math
import time

import orjson
import pytest
import websocket

from mdlogger import records as rec
from mdlogger.exchanges import okx
from mdlogger.exchanges.base import Refused, Reconnect, SymbolInfo
from mdlogger.exchanges.okx import Okx
from mdlogger.fakes.okx import FakeOkx
from mdlogger.settings import load_settings

from helpers import FakeRest, ListSink, okx_trade, service, service_config, today, wait_for
from helpers.captures import received_frames, rest_body

# Real messages (docs/PROTOCOLS.md, "OKX: WebSocket v5 public"): the recorded ticker, trade and ack;
# the documented error and notice shapes.
REAL_TICKER = '{"arg":{"channel":"tickers","instId":"BTC-USDT"},"data":[{"instType":"SPOT","instId":"BTC-USDT","last":"30236","lastSz":"0.0002","askPx":"30228.7","askSz":"1.55896972","bidPx":"30228.6","bidSz":"0.23393","open24h":"29700.4","high24h":"31073","low24h":"28020.3","vol24h":"17602.13085371","ts":"1652459224956"}]}'
REAL_TRADE = '{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","tradeId":"338476307","px":"30236","sz":"0.0002","side":"buy","ts":"1652459224818"}]}'
REAL_ACK = '{"event":"subscribe","arg":{"channel":"tickers","instId":"BTC-USDT"}}'
REAL_ERROR = '{"event":"error","code":"60012","msg":"Invalid request: {\\"op\\": \\"subscribe\\"}","connId":"a4d3ae55"}'
REAL_NOTICE = '{"event":"notice","code":"64008","msg":"The connection will soon be closed for a service upgrade. Please reconnect."}'
ERROR_60018 = ('{"event":"error","code":"60018","msg":"Wrong URL or channel:trades,instId:BTC-USDT doesn\'t exist. '
               'Please use the correct URL, channel and parameters referring to API document.","connId":"a4d3ae55"}')


def okx_sink() -> ListSink:
    """A sink whose trades all end with their snapshot flag and whose errors are ``(text, symbol)``."""
    return ListSink(flag_every_trade=True, error_symbols=True)


@pytest.fixture
def adapter():
    settings = load_settings(None, {}, {"exchanges.okx.enabled": True}, check_resources=False)
    return Okx(settings.exchange("okx"))


def session_for(adapter, names):
    syms = [SymbolInfo(s, e, s.split("-")[0], s.split("-")[1]) for s, e in names]
    sink = okx_sink()
    return adapter.new_session(syms, sink), sink


def now_ms():
    return int(time.time() * 1000)


def expected_ticker(sym, d):
    vol = rec.NAN if d["lastSz"] == "0" else float(d["lastSz"])
    sec, nanos = rec.from_millis(d["ts"])
    return (sym, sec, nanos, float(d["last"]), vol, rec.SIDE_UNKNOWN, float(d["bidPx"]), float(d["askPx"]))


def same(a, b):
    return len(a) == len(b) and all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
                                    for x, y in zip(a, b))


# -- real messages ----------------------------------------------------------------------------------
def test_real_trade_and_ticker_map_every_field(adapter, old_times):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    session.on_message(REAL_ACK.encode(), 0)
    session.on_message(REAL_TRADE.encode(), 0)
    session.on_message(REAL_TRADE.replace("338476307", "338476308").encode(), 0)
    session.on_message(REAL_TICKER.encode(), 0)
    first = (b"BTC-USDT", 338476307, 1652459224, 818000000, 30236.0, 0.0002, rec.SIDE_BUY)
    assert sink.trades == [first + (True,), first[:1] + (338476308,) + first[2:] + (False,)]
    assert sink.tickers == [(b"BTC-USDT", 1652459224, 956000000, 30236.0, 0.0002, 0, 30228.6, 30228.7)]


def test_captured_stream_replays(adapter, old_times):
    """Every tickers/trades item of the real recording stored exactly; books refused."""
    names = {"BTC-USDT": "BTC-USDT", "UNI-USD-SWAP": "UNI-USDSWAP", "BTC-USD-220527": "BTC-USD220527"}
    session, sink = session_for(adapter, [(v, k) for k, v in names.items()])
    frames = [orjson.loads(t) for _, t in received_frames("OKX.ws.1.0")]
    refused = {}
    for msg in frames:
        try:
            session.on_message(orjson.dumps(msg), 0)
        except Refused as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
    data = [m for m in frames if "data" in m]
    books = [m for m in data if m["arg"]["channel"] == "books"]
    assert refused == {"unknown_type": len(books)} and books
    seen, trades, tickers = set(), [], []
    for m in data:
        inst = m["arg"]["instId"]
        for d in m["data"]:
            sym = names[d.get("instId", inst)].encode()
            if m["arg"]["channel"] == "trades":
                sec, nanos = rec.from_millis(d["ts"])
                side = {"buy": 1, "sell": 2}[d["side"]]
                trades.append((sym, int(d["tradeId"]), sec, nanos, float(d["px"]), float(d["sz"]), side, inst not in seen))
            elif m["arg"]["channel"] == "tickers":
                tickers.append(expected_ticker(sym, d))
        if m["arg"]["channel"] == "trades":
            seen.add(inst)
    assert len(trades) > 10 and sink.trades == trades
    assert len(tickers) > 10 and all(same(a, b) for a, b in zip(sink.tickers, tickers))
    assert len(sink.tickers) == len(tickers)
    assert sink.errors == []


def test_several_trades_in_one_frame_are_all_stored(adapter):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    ms = now_ms()
    items = [{"instId": "BTC-USDT", "tradeId": str(10 + i), "px": "100.5", "sz": "0.1", "side": s, "ts": str(ms + i)}
             for i, s in enumerate(["sell", "buy", "sell"])]
    frame = {"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": items}
    session.on_message(orjson.dumps(frame), 0)  # the first frame is the subscribe snapshot
    session.on_message(orjson.dumps(frame), 0)
    assert [t[1] for t in sink.trades] == [10, 11, 12, 10, 11, 12]
    assert [t[6] for t in sink.trades[3:]] == [2, 1, 2] and [t[7] for t in sink.trades] == [True] * 3 + [False] * 3


def test_snapshot_trades_are_sorted_oldest_first(adapter):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    ms = now_ms()
    items = [{"instId": "BTC-USDT", "tradeId": str(20 - i), "px": "1", "sz": "1", "side": "buy", "ts": str(ms - i)}
             for i in range(3)]
    session.on_message(orjson.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": items}), 0)
    assert [t[1] for t in sink.trades] == [18, 19, 20]


def test_errors_notices_and_pong(adapter):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    session.on_message(b"pong", 0)
    session.on_message(REAL_ERROR.encode(), 0)
    session.on_message(ERROR_60018.encode(), 0)
    session.on_message(ERROR_60018.replace("BTC-USDT", "FOO-BAR").encode(), 0)
    assert sink.errors[0] == ('code 60012: Invalid request: {"op": "subscribe"} (connId a4d3ae55)', None)
    assert sink.errors[1][1] == "BTC-USDT" and "doesn't exist" in sink.errors[1][0]
    assert sink.errors[2][1] == "FOO-BAR"
    with pytest.raises(Reconnect):
        session.on_message(REAL_NOTICE.encode(), 0)
    assert "64008" in sink.errors[3][0] and "service upgrade" in sink.errors[3][0]


def test_keepalive_pings_once_until_something_arrives(adapter):
    session, _ = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    assert session.keepalive(10) is None
    assert session.keepalive(25) == "ping"
    assert session.keepalive(26) is None and session.keepalive(29) is None
    session.on_message(b"pong", 0)  # liveness: the worker's idle time starts again from 0
    assert session.keepalive(0.1) is None
    assert session.keepalive(25.5) == "ping"
    assert session.keepalive(1) is None  # something arrived (any frame counts)
    assert session.keepalive(25) == "ping"


# -- bad input ----------------------------------------------------------------------------------------
def fresh_trade():
    msg = orjson.loads(REAL_TRADE)
    msg["data"][0]["ts"] = str(now_ms())
    return msg


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda d: d.pop("px"), "missing_field"),
        (lambda d: d.pop("tradeId"), "missing_field"),
        (lambda d: d.update(px="NaN"), "bad_price"),
        (lambda d: d.update(px="0"), "bad_price"),
        (lambda d: d.update(px="-1"), "bad_price"),
        (lambda d: d.update(px="1e300"), "bad_price"),
        (lambda d: d.update(sz="0"), "bad_size"),
        (lambda d: d.update(sz="-2"), "bad_size"),
        (lambda d: d.update(sz="inf"), "bad_size"),
        (lambda d: d.update(ts="yesterday"), "bad_time"),
        (lambda d: d.update(ts="99999999999999"), "bad_time"),
        (lambda d: d.update(ts="1652459224818"), "bad_time"),
        (lambda d: d.update(instId="XXX-YYY"), "unknown_symbol"),
        (lambda d: d.update(instId=["BTC-USDT"]), "bad_symbol"),
        (lambda d: d.update(side="up"), "missing_field"),
        (lambda d: d.update(side=["buy"]), "missing_field"),
        (lambda d: d.update(tradeId="-5"), "missing_field"),
        (lambda d: d.update(tradeId="abc"), "missing_field"),
    ],
)
def test_bad_trade_fields_are_refused(adapter, mutate, reason):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    msg = fresh_trade()
    mutate(msg["data"][0])
    with pytest.raises(Refused) as info:
        session.on_message(orjson.dumps(msg), 0)
    assert info.value.reason == reason
    assert sink.trades == []


def test_one_bad_trade_does_not_lose_the_good_ones(adapter):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    msg = fresh_trade()
    msg["data"].append(dict(msg["data"][0], px="0"))
    msg["data"].append(dict(msg["data"][0], tradeId="338476309"))
    with pytest.raises(Refused) as info:
        session.on_message(orjson.dumps(msg), 0)
    assert info.value.reason == "bad_price" and [t[1] for t in sink.trades] == [338476307, 338476309]


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda d: d.pop("last"), "missing_field"),
        (lambda d: d.pop("ts"), "missing_field"),
        (lambda d: d.update(last=""), "bad_price"),
        (lambda d: d.update(bidPx="-1"), "bad_price"),
        (lambda d: d.update(askPx="nan"), "bad_price"),
        (lambda d: d.update(lastSz="-1"), "bad_size"),
        (lambda d: d.update(ts="1e12"), "bad_time"),
        (lambda d: d.update(instId="ETH-USDT"), "unknown_symbol"),
    ],
)
def test_bad_ticker_fields_are_refused(adapter, mutate, reason):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    msg = orjson.loads(REAL_TICKER)
    msg["data"][0]["ts"] = str(now_ms())
    mutate(msg["data"][0])
    with pytest.raises(Refused) as info:
        session.on_message(orjson.dumps(msg), 0)
    assert info.value.reason == reason and sink.tickers == []


def test_ticker_without_book_or_size_keeps_nan(adapter):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    msg = orjson.loads(REAL_TICKER)
    msg["data"][0].update(ts=str(now_ms()), bidPx="", askPx="", lastSz="0")
    session.on_message(orjson.dumps(msg), 0)
    (_, _, _, px, vol, _, bid, ask), = sink.tickers
    assert px == 30236.0 and math.isnan(vol) and math.isnan(bid) and math.isnan(ask)


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"{not json", "json"),
        (b"ping", "json"),
        (b"[1,2]", "unknown_type"),
        (b'{"foo":1}', "unknown_type"),
        (b'{"event":"login","code":"0"}', "unknown_type"),
        (b'{"arg":{"channel":"books","instId":"BTC-USDT"},"data":[]}', "unknown_type"),
        (b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":{}}', "unknown_type"),
        (b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[1]}', "unknown_type"),
        (b'{"arg":{"channel":"tickers","instId":"BTC-USDT"},"data":["x"]}', "unknown_type"),
    ],
)
def test_malformed_messages(adapter, payload, reason):
    session, _ = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    with pytest.raises(Refused) as info:
        session.on_message(payload, 0)
    assert info.value.reason == reason


# -- discovery, subscribe --------------------------------------------------------------------------------
def test_discovery_from_the_real_instruments(adapter):
    body = rest_body("OKX.0", "instruments?instType=SPOT")
    rest = FakeRest(body)
    listed = adapter.discover(rest)
    assert rest.calls == [("https://www.okx.com/api/v5/public/instruments", {"instType": "SPOT"})]
    raw = orjson.loads(body)["data"]
    assert len(listed) == len(raw) > 100
    btc = next(s for s in listed if s.exchange_name == "BTC-USDT")
    assert btc == SymbolInfo("BTC-USDT", "BTC-USDT", "BTC", "USDT", True, "0.1", "0.00001")
    assert all(s.symbol == r["instId"] and s.active == (r["state"] == "live") for s, r in zip(listed, raw))


def test_discovery_skips_bad_names_and_marks_inactive(adapter):
    good = {"instId": "BTC-USDT", "instType": "SPOT", "baseCcy": "BTC", "quoteCcy": "USDT", "state": "live",
            "tickSz": "0.1", "minSz": "0.00001"}
    data = [good, dict(good, instId="OLD-USDT", baseCcy="OLD", state="suspend"),
            dict(good, instId="../../x", baseCcy="../../x"), dict(good, instId="", baseCcy=""),
            dict(good, instId="\u00e9-USDT", baseCcy="\u00e9"), dict(good, baseCcy=None), {"instId": "X-Y"}, "junk",
            dict(good, instId="BTC-USD-SWAP", instType="SWAP")]
    listed = adapter.discover(FakeRest({"code": "0", "data": data, "msg": ""}))
    assert [(s.symbol, s.active) for s in listed] == [("BTC-USDT", True), ("OLD-USDT", False)]


def test_discovery_error_code_raises(adapter):
    with pytest.raises(ValueError, match="Parameter instType error"):
        adapter.discover(FakeRest({"code": "51000", "data": [], "msg": "Parameter instType error"}))


def test_normalize(adapter):
    assert adapter.normalize("btc-usdt") == "BTC-USDT"
    for bad in ("../../x", "", "\u00e9-USDT", "BTC-USD-SWAP"):
        with pytest.raises(ValueError):
            adapter.normalize(bad)


def test_subscribe_messages_are_chunked(adapter):
    syms = [SymbolInfo("A%d-USDT" % i, "A%d-USDT" % i, "A%d" % i, "USDT") for i in range(120)]
    texts = adapter.subscribe_messages(syms)
    msgs = [orjson.loads(m) for m in texts]
    args = [a for m in msgs for a in m["args"]]
    assert len(args) == 240 == adapter.max_channels_per_connection
    assert args[:2] == [{"channel": "tickers", "instId": "A0-USDT"}, {"channel": "trades", "instId": "A0-USDT"}]
    assert all(m["op"] == "subscribe" and len(m["args"]) <= 100 for m in msgs)
    assert all(len(t) < 64 * 1024 for t in texts)
    assert adapter.ws_url(syms) == "wss://ws.okx.com:8443/ws/v5/public"


# -- the fake over a real websocket -----------------------------------------------------------------------
def connect(fake):
    ws = websocket.create_connection(fake.url_ws + "/ws/v5/public", timeout=3)
    return ws


def recv_json(ws, want):
    """The next frame for which ``want(doc)`` holds (others skipped)."""
    def matching():
        text = ws.recv()
        doc = text if text == "pong" else json.loads(text)
        return doc if want(doc) else None

    return wait_for(matching, timeout=3, interval=0, what="a matching frame")


def test_fake_rest_lists_a_suspended_instrument(adapter):
    import requests

    with FakeOkx(mode="script") as fake:
        doc = requests.get(fake.url_http + "/api/v5/public/instruments", params={"instType": "SPOT"}, timeout=3).json()
        bad = requests.get(fake.url_http + "/api/v5/public/instruments", params={"instType": "X"}, timeout=3).json()
    listed = adapter.discover(FakeRest(doc))
    assert {s.symbol for s in listed if s.active} == set(fake.symbols)
    assert [s.symbol for s in listed if not s.active] == ["OLD-USDT"]
    assert bad["code"] != "0"


def test_fake_subscribe_ack_trade_ticker_ping_and_errors():
    with FakeOkx(symbols=["BTC-USDT"], mode="script") as fake:
        ws = connect(fake)
        ws.send('{"op":"subscribe","args":[{"channel":"tickers","instId":"BTC-USDT"},{"channel":"trades","instId":"BTC-USDT"},'
                '{"channel":"trades","instId":"NOPE-USDT"}]}')
        ack = recv_json(ws, lambda d: True)
        assert ack["event"] == "subscribe" and ack["arg"] == {"channel": "tickers", "instId": "BTC-USDT"}
        assert recv_json(ws, lambda d: True)["arg"] == {"channel": "trades", "instId": "BTC-USDT"}
        err = recv_json(ws, lambda d: True)
        assert err["event"] == "error" and err["code"] == "60018" and "instId:NOPE-USDT" in err["msg"]
        fake.push_trades("BTC-USDT", 3)
        frame = recv_json(ws, lambda d: True)
        assert frame["arg"] == {"channel": "trades", "instId": "BTC-USDT"} and frame["data"] == fake.sent_trades
        ids = [int(d["tradeId"]) for d in frame["data"]]
        assert ids == list(range(ids[0], ids[0] + 3))
        assert set(frame["data"][0]) == {"instId", "tradeId", "px", "sz", "side", "ts"}
        fake.push_ticker("BTC-USDT")
        tick = recv_json(ws, lambda d: True)
        assert tick["arg"]["channel"] == "tickers" and tick["data"] == fake.sent_tickers
        ws.send("ping")
        assert ws.recv() == "pong"
        ws.send("{bad")
        assert recv_json(ws, lambda d: True)["code"] == "60012"
        fake.send_error("60012", "Invalid request: x")
        assert recv_json(ws, lambda d: True)["msg"] == "Invalid request: x"
        fake.send_notice_64008()
        assert recv_json(ws, lambda d: True)["code"] == "64008"
        ws.close()


def test_fake_resubscribe_pushes_the_latest_trade():
    with FakeOkx(symbols=["BTC-USDT"], mode="script") as fake:
        fake.push_trade("BTC-USDT")  # nobody listens yet: history only
        ws = connect(fake)
        ws.send('{"op":"subscribe","args":[{"channel":"trades","instId":"BTC-USDT"}]}')
        recv_json(ws, lambda d: d.get("event") == "subscribe")
        frame = recv_json(ws, lambda d: True)
        assert frame["data"] == [fake.symbols["BTC-USDT"].history[-1]]
        ws.close()


def test_fake_closes_an_idle_connection_unless_pinged():
    with FakeOkx(symbols=["BTC-USDT"], mode="idle", idle_close_secs=0.4) as fake:
        quiet, pinging = connect(fake), connect(fake)

        def pinged_past_twice_the_idle_limit():
            pinging.send("ping")
            assert pinging.recv() == "pong"
            conns = fake.open_connections()
            return len(conns) == 1 and time.monotonic() - conns[0].opened > 2 * fake.idle_close_secs

        wait_for(pinged_past_twice_the_idle_limit, timeout=10, interval=0.15,
                 what="the quiet connection closed, the pinging one open for twice the idle limit")
        quiet.settimeout(1)
        frame = quiet.recv_frame()
        assert frame.opcode == websocket.ABNF.OPCODE_CLOSE and frame.data[:2] == (4004).to_bytes(2, "big")
        assert len(fake.open_connections()) == 1
        pinging.close()


def test_fake_steady_frames_end_to_end(adapter):
    """Frames from the fake, parsed by the session, give exactly what the fake sent."""
    with FakeOkx(symbols=["BTC-USDT", "ETH-BTC"], mode="steady", rate=200, multi_trade_prob=0.5) as fake:
        syms = adapter.discover(FakeRest(fake.instruments({"instType": "SPOT"})[1]))
        active = [s for s in syms if s.active]
        sink = okx_sink()
        session = adapter.new_session(active, sink)
        ws = connect(fake)
        for text in adapter.subscribe_messages(active):
            ws.send(text)
        ws.settimeout(3)
        multi = 0

        def enough():
            nonlocal multi
            text = ws.recv()
            multi += text.count('"tradeId"') > 1
            session.on_message(text.encode(), time.time_ns())
            return multi > 0 and len(sink.trades) > 50 and sink.tickers

        wait_for(enough, timeout=10, interval=0, what="a frame of several trades, 50 trades and a ticker")
        ws.close()
        wait_for(lambda: not fake.open_connections(), timeout=5, what="the fake to see the close (no more sends)")
    assert multi > 0
    with fake.lock:
        sent_trades, sent_tickers = list(fake.sent_trades), list(fake.sent_tickers)
    got = {(t[0], t[1]): t for t in sink.trades}
    assert len(got) == len(sink.trades) > 50
    for d in sent_trades:
        key = (d["instId"].encode(), int(d["tradeId"]))
        if key not in got:
            continue  # sent after we stopped reading
        sec, nanos = rec.from_millis(d["ts"])
        assert got[key][2:7] == (sec, nanos, float(d["px"]), float(d["sz"]), {"buy": 1, "sell": 2}[d["side"]])
    assert len(got) >= len(sent_trades) - 20
    assert set(got) <= {(d["instId"].encode(), int(d["tradeId"])) for d in sent_trades}
    assert [expected_ticker(d["instId"].encode(), d) for d in sent_tickers[: len(sink.tickers)]] == sink.tickers
    assert sink.errors == []


def test_adapter_limits_and_keepalive_constants(adapter):
    assert adapter.connect_rate <= 3.0 and adapter.send_rate <= 480 / 3600 * 10
    assert okx.PING_AFTER_SECS < 30


# -- merged fills ---------------------------------------------------------------------------------------------
def merged_frame(count=None, **fields):
    msg = fresh_trade()
    if count is not None:
        msg["data"][0]["count"] = count
    msg["data"][0].update(fields)
    return msg


@pytest.mark.parametrize("count", ["2", "3", 17, "0100"])
def test_a_row_of_merged_fills_is_refused_as_merged(adapter, count):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    with pytest.raises(Refused) as info:
        session.on_message(orjson.dumps(merged_frame(count)), 0)
    assert info.value.reason == "merged" and "338476307" in info.value.detail
    assert sink.trades == []


def test_merged_rows_go_but_the_single_fills_of_the_frame_stay(adapter):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    msg = merged_frame("1")
    row = msg["data"][0]
    msg["data"] += [dict(row, tradeId="338476310", count="3", sz="0.9"), dict(row, tradeId="338476311"),
                    dict(row, tradeId="338476313", count=2)]
    with pytest.raises(Refused) as info:
        session.on_message(orjson.dumps(msg), 0)
    assert info.value.reason == "merged"
    assert [t[1] for t in sink.trades] == [338476307, 338476311]


@pytest.mark.parametrize("count", ["1", 1, None])
def test_one_fill_is_stored_with_or_without_count_and_seqid_is_ignored(adapter, count):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    msg = merged_frame(count, seqId=123456789)
    session.on_message(orjson.dumps(msg), 0)
    d = msg["data"][0]
    sec, nanos = rec.from_millis(d["ts"])
    assert sink.trades == [(b"BTC-USDT", 338476307, sec, nanos, 30236.0, 0.0002, rec.SIDE_BUY, True)]


@pytest.mark.parametrize("count", ["0", 0, "-2", -1, "", "abc", "2.0", 2.0, " 2", "\u0663", True, False, [2],
                                   {"n": 2}, "null"])
def test_a_count_that_is_not_a_positive_integer_is_refused(adapter, count):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    with pytest.raises(Refused) as info:
        session.on_message(orjson.dumps(merged_frame(count)), 0)
    assert info.value.reason == "missing_field" and sink.trades == []


def test_a_null_count_is_refused(adapter):
    session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
    msg = fresh_trade()
    msg["data"][0]["count"] = None
    with pytest.raises(Refused) as info:
        session.on_message(orjson.dumps(msg), 0)
    assert info.value.reason == "missing_field" and sink.trades == []


def test_merged_is_a_drop_reason():
    from mdlogger.stats import DROP_REASONS, WORKER_FIELDS

    assert "merged" in DROP_REASONS and "drop_merged" in WORKER_FIELDS


def test_fake_push_merged_sends_one_row_and_keeps_the_fills(adapter):
    import requests

    with FakeOkx(symbols=["BTC-USDT"], mode="script") as fake:
        fake.push_trade("BTC-USDT")  # nobody listens yet
        ws = connect(fake)
        ws.send('{"op":"subscribe","args":[{"channel":"trades","instId":"BTC-USDT"}]}')
        recv_json(ws, lambda d: d.get("event") == "subscribe")
        recv_json(ws, lambda d: True)  # the snapshot: the latest (plain) trade
        row = fake.push_merged("BTC-USDT", 3)
        frame = recv_json(ws, lambda d: True)
        made = fake.made_trades("BTC-USDT")
        fills = made[-3:]
        assert frame["data"] == [row] and fake.sent_merged == [row] and fake.sent_trades == []
        assert [int(f["tradeId"]) for f in fills] == list(range(int(made[0]["tradeId"]) + 1,
                                                                 int(made[0]["tradeId"]) + 4))
        assert set(row) == {"instId", "tradeId", "px", "sz", "side", "ts", "count"} and row["count"] == "3"
        assert (row["instId"], row["tradeId"], row["px"]) == ("BTC-USDT", fills[-1]["tradeId"], fills[-1]["px"])
        assert math.isclose(float(row["sz"]), sum(float(f["sz"]) for f in fills), rel_tol=1e-9)
        assert {f["ts"] for f in fills} == {row["ts"]} and {f["side"] for f in fills} == {row["side"]}
        assert len({f["sz"] for f in fills} | {row["sz"]}) > 1
        assert not any(fake.delivered("BTC-USDT", f) for f in fills)
        # REST history lists the fills one by one
        doc = requests.get(fake.url_http + "/api/v5/market/history-trades",
                           params={"instId": "BTC-USDT", "after": int(row["tradeId"]) + 1}, timeout=3).json()
        assert [d["tradeId"] for d in doc["data"][:3]] == [f["tradeId"] for f in reversed(fills)]
        assert all("count" not in d for d in doc["data"])
        # a new subscriber gets the merged row as the latest trade, refused by the adapter
        again = connect(fake)
        again.send('{"op":"subscribe","args":[{"channel":"trades","instId":"BTC-USDT"}]}')
        recv_json(again, lambda d: d.get("event") == "subscribe")
        snap = recv_json(again, lambda d: True)
        assert snap["data"] == [row]
        session, sink = session_for(adapter, [("BTC-USDT", "BTC-USDT")])
        with pytest.raises(Refused) as info:
            session.on_message(json.dumps(snap).encode(), time.time_ns())
        assert info.value.reason == "merged" and sink.trades == []
        ws.close()
        again.close()


def test_fake_steady_merges_fills_with_merge_prob(adapter):
    """Every frame of a steady fake with merge_prob: merged rows refused, the others stored, each as made."""
    with FakeOkx(symbols=["BTC-USDT", "ETH-BTC"], mode="steady", rate=200, merge_prob=0.4) as fake:
        syms = [s for s in adapter.discover(FakeRest(fake.instruments({"instType": "SPOT"})[1])) if s.active]
        sink = okx_sink()
        session = adapter.new_session(syms, sink)
        ws = connect(fake)
        for text in adapter.subscribe_messages(syms):
            ws.send(text)
        ws.settimeout(3)
        rows, refused = [], []
        while sum(1 for r in rows if "count" in r) < 20 or len(sink.trades) < 20:
            text = ws.recv()
            doc = json.loads(text)
            if "data" in doc and doc["arg"]["channel"] == "trades":
                rows += doc["data"]
            try:
                session.on_message(text.encode(), time.time_ns())
            except Refused as exc:
                refused.append(exc.reason)
        ws.close()
        made = {(inst, int(e["tradeId"])): e for inst in fake.symbols for e in fake.made_trades(inst)}
    merged = [r for r in rows if "count" in r]
    assert set(refused) == {"merged"} and len(refused) == len(merged)
    assert all("count" not in made[k] for k in made)
    for r in merged:
        n, last = int(r["count"]), int(r["tradeId"])
        assert n in (2, 3)
        fills = [made[(r["instId"], i)] for i in range(last - n + 1, last + 1)]
        assert r["px"] == fills[-1]["px"] and r["ts"] == fills[0]["ts"] == fills[-1]["ts"]
        assert {f["side"] for f in fills} == {r["side"]}
        assert math.isclose(float(r["sz"]), sum(float(f["sz"]) for f in fills), rel_tol=1e-9)
    plain = [r for r in rows if "count" not in r]
    assert [(t[0].decode(), t[1]) for t in sink.trades] == [(r["instId"], int(r["tradeId"])) for r in plain]
    # the rows sent cover the made ids without a hole or an overlap (per instrument)
    for inst in fake.symbols:
        ids = []
        for r in rows:
            if r["instId"] == inst:
                last = int(r["tradeId"])
                ids += range(last - int(r.get("count", 1)) + 1, last + 1)
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # the subscribe snapshot included


@pytest.mark.slow
def test_merged_fills_reach_disk_fill_by_fill_through_the_service(tmp_path):
    """The real service against a fake that merges fills: every fill on disk exactly once, in order, as made."""
    import os

    from mdlogger.ledger import read_gaps
    from mdlogger.reader import read_rows

    symbols = ["BTC-USDT", "ETH-USDT"]
    data = os.path.join(str(tmp_path), "data")

    def stored(sym):
        try:
            return read_rows(data, "okx", sym, "TRADES", today())
        except OSError:
            return []

    def settled(svc):
        if sum(x["gaps"]["pending"] for x in svc.health()[1]["exchanges"].values()):
            return None
        got = {sym: stored(sym) for sym in symbols}
        return got if all(len(rows) >= 60 for rows in got.values()) else None

    with FakeOkx(symbols=symbols, mode="steady", rate=5.0, merge_prob=0.3, seed=7) as fake, \
            service(tmp_path, service_config(data, [fake], logger={"flush_interval_secs": 0.05},
                                             backfill_hold_secs=40.0)) as svc:
        svc.wait_all_connected(1, timeout=60)
        got = wait_for(lambda: settled(svc), timeout=90, what="60 trades per symbol stored and no gap pending")
        refused = svc.health()[1]["exchanges"]["okx"]["refused_by_reason"]
        assert svc.stop() == 0
    assert refused.get("merged", 0) > 0 and set(refused) == {"merged"}, refused
    for sym in symbols:
        made = [okx_trade(e) for e in fake.made_trades(sym)]
        rows = got[sym]
        start = next((i for i, m in enumerate(made) if m == rows[0]), None)
        assert start is not None, "%s: the first row stored %r was never made" % (sym, rows[0])
        assert rows == made[start:start + len(rows)], sym
        # the test is only worth something if merged rows were sent inside the stored span
        inside = [r for r in fake.sent_merged if r["instId"] == sym and rows[0][0] < int(r["tradeId"]) <= rows[-1][0]]
        assert inside, sym
    # every gap before the last row stored is an id jump, filled from REST (later ones may be cut by the stop)
    gaps = [g for g in read_gaps(data, "okx", rec.date_to_day_string(today())) if g["to_id"] <= got[g["symbol"]][-1][0]]
    assert gaps and all(g["why"] == "id_jump" and g["fate"] == "filled" and not g["missing"] for g in gaps), gaps
    assert not fake.violations
