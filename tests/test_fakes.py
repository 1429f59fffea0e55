"""Tests of the loopback fakes themselves: the generic WebSocket server and fake Binance.

Real sockets on 127.0.0.1, websocket-client and requests as the clients.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests
import websocket
from websocket import ABNF

from mdlogger.fakes.binance import FakeBinance
from mdlogger.fakes.wsserver import OP_BINARY, OP_PING, OP_TEXT, FakeServer, encode_frame

from helpers import recv_close, wait_for

TRADE_KEYS = ["e", "E", "s", "t", "p", "q", "T", "m", "M"]
TICKER_KEYS = {"e", "E", "s", "p", "P", "w", "x", "c", "Q", "b", "B", "a", "A", "o", "h", "l", "v", "q",
               "O", "C", "F", "L", "n"}
EIGHT_DECIMALS = re.compile(r"^\d+\.\d{8}$")


def connect(fake, streams=(), timeout=2.0, **kw):
    """A websocket-client connection to a fake's /stream, optionally with ?streams=."""
    url = fake.url_ws + "/stream" + ("?streams=" + "/".join(streams) if streams else "")
    return websocket.create_connection(url, timeout=timeout, **kw)


def recv_json(ws):
    return json.loads(ws.recv())


def now_ms() -> int:
    """The wall clock in milliseconds, as the fake's times (taken around a request, they bound its times)."""
    return time.time_ns() // 1_000_000


def request(ws, method, params=None, rid=1):
    ws.send(json.dumps({"method": method, "params": params or [], "id": rid}))
    return recv_json(ws)


@pytest.fixture
def script_fake():
    with FakeBinance(mode="script", ping_interval=60, seed=7) as fake:
        yield fake


# -- wsserver -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_encode_frame_round_trips_through_websocket_client(size):
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    data = encode_frame(OP_BINARY, payload) + encode_frame(OP_TEXT, b"tail")
    pos = 0

    def recv_fn(n):
        nonlocal pos
        chunk = data[pos:pos + n]
        pos += len(chunk)
        return chunk

    buf = websocket._abnf.frame_buffer(recv_fn, True)
    frame = buf.recv_frame()
    assert (frame.fin, frame.opcode, frame.mask_value, bytes(frame.data)) == (1, OP_BINARY, 0, payload)
    assert buf.recv_frame().data == b"tail"
    assert pos == len(data)


class EchoServer(FakeServer):
    """Echoes messages, answers HTTP with the request it saw."""

    def on_ws(self, conn):
        while True:
            opcode, payload = conn.recv()
            if opcode in (OP_TEXT, OP_BINARY):
                conn.send_frames(encode_frame(opcode, payload))

    def on_http(self, method, path, query, headers):
        return 200, {"X-Test": "1"}, json.dumps([method, path, query]).encode()


def test_wsserver_echo_fragments_pings_http_and_stop():
    with EchoServer() as server:
        r = requests.get(server.url_http + "/a/b?x=1&y=2", timeout=2)
        assert r.status_code == 200 and r.headers["X-Test"] == "1"
        assert r.json() == ["GET", "/a/b", {"x": "1", "y": "2"}]
        ws = websocket.create_connection(server.url_ws + "/echo?k=v", timeout=2)
        ws.send("x" * 70_000)
        assert ws.recv() == "x" * 70_000
        ws.send_frame(ABNF.create_frame("hel", ABNF.OPCODE_TEXT, fin=0))
        ws.ping(b"mid")  # a control frame between fragments
        ws.send_frame(ABNF.create_frame("lo", ABNF.OPCODE_CONT, fin=1))
        assert ws.recv_data(control_frame=True) == (ABNF.OPCODE_PONG, b"mid")  # automatic pong
        assert ws.recv() == "hello"
        conn = server.open_connections()[0]
        assert (conn.path, conn.query) == ("/echo", {"k": "v"})
        assert [op for _, op, _ in conn.received] == [OP_TEXT, OP_TEXT, OP_PING, 0]
        ws.close()
        wait_for(lambda: not server.open_connections(), timeout=2, what="the close handshake")
        server.stop()
        server.stop()  # idempotent
    with pytest.raises(OSError):
        websocket.create_connection(server.url_ws, timeout=1)


def test_wsserver_rejects_unmasked_client_frames():
    import socket

    with EchoServer() as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # the RFC 6455 example
        sock.sendall(encode_frame(OP_TEXT, b"unmasked"))
        reply = sock.recv(100)
        assert reply[0] == 0x88 and struct.unpack("!H", reply[2:4])[0] == 1002
        sock.close()


# -- REST -------------------------------------------------------------------------------------------

def test_exchange_info_has_the_real_shape(script_fake):
    asked = now_ms()
    doc = requests.get(script_fake.url_http + "/api/v3/exchangeInfo", timeout=2).json()
    assert doc["timezone"] == "UTC" and asked <= doc["serverTime"] <= now_ms()  # the time it answered
    assert {r["rateLimitType"] for r in doc["rateLimits"]} >= {"REQUEST_WEIGHT", "RAW_REQUESTS"}
    by_name = {s["symbol"]: s for s in doc["symbols"]}
    trading = sorted(s["baseAsset"] + "-" + s["quoteAsset"] for s in doc["symbols"] if s["status"] == "TRADING")
    assert trading == sorted(script_fake.symbols)
    assert {s["status"] for s in doc["symbols"]} == {"TRADING", "BREAK", "HALT"}
    btc = by_name["BTCUSDT"]
    assert (btc["baseAsset"], btc["quoteAsset"], btc["permissions"]) == ("BTC", "USDT", ["SPOT"])
    filters = {f["filterType"]: f for f in btc["filters"]}
    assert filters["PRICE_FILTER"]["tickSize"] == "0.01000000"
    assert EIGHT_DECIMALS.match(filters["LOT_SIZE"]["minQty"]) and EIGHT_DECIMALS.match(filters["LOT_SIZE"]["stepSize"])
    doge_tick = {f["filterType"]: f for f in by_name["DOGEUSDT"]["filters"]}["PRICE_FILTER"]["tickSize"]
    assert doge_tick == "0.00001000"


def test_rest_failures_overrides_and_unknown_paths(script_fake):
    url = script_fake.url_http + "/api/v3/exchangeInfo"
    script_fake.rest_failures = 2
    for _ in range(2):
        r = requests.get(url, timeout=2)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["code"] == -1003
    assert requests.get(url, timeout=2).status_code == 200
    script_fake.rest_status_override = 503
    r = requests.get(url, timeout=2)
    assert r.status_code == 503 and r.reason == "Service Unavailable" and "msg" in r.json()
    script_fake.rest_status_override = None
    r = requests.get(script_fake.url_http + "/api/v3/nothing", timeout=2)
    assert r.status_code == 404 and r.json()["code"] == -1


# -- subscriptions ------------------------------------------------------------------------------------

def test_subscribe_by_query_and_live_with_acks(script_fake):
    ws = connect(script_fake, ["btcusdt@trade"])
    assert request(ws, "LIST_SUBSCRIPTIONS", rid=1) == {"result": ["btcusdt@trade"], "id": 1}
    assert request(ws, "SUBSCRIBE", ["ethusdt@trade", "ethusdt@ticker", "btcusdt@bookTicker"], rid=2) == \
        {"result": None, "id": 2}
    assert request(ws, "UNSUBSCRIBE", ["btcusdt@trade"], rid=3) == {"result": None, "id": 3}
    assert request(ws, "LIST_SUBSCRIPTIONS", rid=4)["result"] == ["btcusdt@bookTicker", "ethusdt@ticker", "ethusdt@trade"]
    assert script_fake.subscribed("trades") == {"ETH-USDT"}
    info = script_fake.connections_info()
    assert info["accepted"] == 1 and info["open"] == 1
    assert info["connections"][0]["streams"] == ["btcusdt@bookTicker", "ethusdt@ticker", "ethusdt@trade"]
    ws.close()


def test_invalid_requests_get_code_2(script_fake):
    script_fake.max_client_msgs = None
    ws = connect(script_fake)
    ws.send("{not json")
    assert recv_json(ws)["code"] == 2
    assert request(ws, "FLY", rid=5) == {"code": 2, "msg": "Invalid request: unknown method FLY", "id": 5}
    for bad in ["BTCUSDT@trade", "nopeusdt@trade", "btcusdt@nonsense", "btcusdt"]:
        reply = request(ws, "SUBSCRIBE", [bad], rid=6)
        assert reply["code"] == 2 and reply["id"] == 6 and reply["msg"].startswith("Invalid request: ")
    assert request(ws, "SUBSCRIBE", "btcusdt@trade", rid=7)["code"] == 2
    assert request(ws, "LIST_SUBSCRIPTIONS", rid=8)["result"] == []
    silent_kinds = ["btcusdt@kline_1m", "btcusdt@depth@100ms", "btcusdt@depth5", "btcusdt@aggTrade"]
    assert request(ws, "SUBSCRIBE", silent_kinds, rid=9)["result"] is None  # valid, accepted, never fed
    assert len(script_fake.errors_sent) == 7
    ws.close()


def test_more_than_1024_streams_refused(script_fake):
    script_fake.max_client_msgs = None
    script_fake.by_stream.update({"s%dusdt" % i: script_fake.symbols["BTC-USDT"] for i in range(1100)})
    ws = connect(script_fake)
    names = ["s%dusdt@trade" % i for i in range(1100)]
    assert request(ws, "SUBSCRIBE", names[:1000], rid=1)["result"] is None
    reply = request(ws, "SUBSCRIBE", names[1000:], rid=2)
    assert reply["code"] == 2 and "too many streams" in reply["msg"]
    ws.close()


# -- events ---------------------------------------------------------------------------------------------

def test_steady_trades_and_tickers_have_the_real_shapes():
    started = now_ms()
    with FakeBinance(symbols=["BTC-USDT", "DOGE-USDT"], mode="steady", rate=40, seed=3) as fake:
        ws = connect(fake, ["btcusdt@trade", "btcusdt@ticker", "dogeusdt@trade"])
        last_trade, tickers = {}, 0
        while tickers < 1:  # a ticker comes every second (each read gives up after 2 s)
            msg = recv_json(ws)
            data = msg["data"]
            sym = data["s"]
            assert msg["stream"] == sym.lower() + ("@trade" if data["e"] == "trade" else "@ticker")
            if data["e"] == "trade":
                assert list(data) == TRADE_KEYS
                assert EIGHT_DECIMALS.match(data["p"]) and EIGHT_DECIMALS.match(data["q"])
                assert isinstance(data["t"], int) and isinstance(data["m"], bool) and data["M"] is True
                assert started <= data["T"] <= data["E"] <= now_ms()  # made while the test ran, sent after
                if sym in last_trade:
                    assert data["t"] == last_trade[sym]["t"] + 1
                last_trade[sym] = data
            else:
                tickers += 1
                assert set(data) == TICKER_KEYS and data["e"] == "24hrTicker" and sym == "BTCUSDT"
                assert data["c"] == last_trade[sym]["p"] and data["L"] == last_trade[sym]["t"]
                assert float(data["b"]) < float(data["c"]) < float(data["a"])
                assert float(data["l"]) <= float(data["c"]) <= float(data["h"])
        assert tickers == 1 and set(last_trade) == {"BTCUSDT", "DOGEUSDT"}
        ws.close()
        sent = [t["t"] for t in fake.sent_trades if t["s"] == "BTCUSDT"]
        assert sent == list(range(sent[0], sent[0] + len(sent)))
        assert fake.sent_counts["BTC-USDT"] == len(sent)


def test_same_seed_same_market():
    def first_trades(seed):
        with FakeBinance(mode="script", seed=seed) as fake:
            ws = connect(fake, ["ethusdt@trade"])
            wait_for(lambda: fake.subscribed("trades"), timeout=2, what="subscription")
            out = [(t["t"], t["p"], t["q"]) for t in (fake.push_trade("ETH-USDT") for _ in range(5))]
            ws.close()
            return out

    assert first_trades(11) == first_trades(11) != first_trades(12)


def test_script_mode_pushes_only_to_subscribers(script_fake):
    ws_trade = connect(script_fake, ["btcusdt@trade", "btcusdt@ticker"])
    ws_other = connect(script_fake, ["ethusdt@trade"])
    wait_for(lambda: len(script_fake.open_connections()) == 2 and len(script_fake.subscribed("trades")) == 2,
             timeout=2, what="two subscribed connections")
    script_fake.push_trade("BTC-USDT", p="123.45000000", m=True)
    script_fake.push_ticker("BTC-USDT", c="1.00000000")
    script_fake.push_raw('{"hello":1}')
    assert recv_json(ws_trade)["data"]["p"] == "123.45000000"
    assert recv_json(ws_trade)["data"]["c"] == "1.00000000"
    assert recv_json(ws_trade) == {"hello": 1}
    assert recv_json(ws_other) == {"hello": 1}  # no BTC trade for the ETH subscriber
    assert [t["p"] for t in script_fake.sent_trades] == ["123.45000000"]
    assert [t["c"] for t in script_fake.sent_tickers] == ["1.00000000"]
    script_fake.push_trade("SOL-USDT")  # nobody subscribed: not recorded as sent
    assert len(script_fake.sent_trades) == 1 and script_fake.sent_counts["SOL-USDT"] == 0
    ws_trade.close()
    ws_other.close()


def test_firehose_delivers_many_frames_with_consecutive_ids():
    started = now_ms()
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT"], mode="firehose") as fake:
        ws = connect(fake, ["btcusdt@trade", "ethusdt@trade"], skip_utf8_validation=True)
        last, n = {}, 0
        while n < 30_000:
            data = recv_json(ws)["data"]
            if data["s"] in last:
                assert data["t"] == last[data["s"]] + 1
            last[data["s"]] = data["t"]
            n += 1
        assert started <= data["E"] <= now_ms()  # times of this run, not of some fixed blob
        assert fake.sent_trades == [] and sum(fake.sent_counts.values()) >= n
        ws.close()


def test_the_plain_firehose_of_the_other_fakes_counts_what_reached_the_socket():
    from mdlogger.fakes.okx import FakeOkx

    with FakeOkx(symbols=["BTC-USDT"], mode="firehose") as fake:
        ws = websocket.create_connection(fake.ws_endpoint, timeout=3, skip_utf8_validation=True)
        ws.send(json.dumps({"op": "subscribe", "args": [{"channel": "trades", "instId": "BTC-USDT"}]}))
        trades = 0
        while trades < 20_000:
            doc = json.loads(ws.recv())
            if doc.get("arg", {}).get("channel") == "trades" and "data" in doc:
                assert doc["data"][0]["instId"] == "BTC-USDT"
                trades += len(doc["data"])
        ws.close()
        assert fake.sent_counts["BTC-USDT"] >= trades


# -- keepalive and limits -----------------------------------------------------------------------------------

def test_server_pings_and_websocket_client_pongs_match():
    started = now_ms()
    with FakeBinance(mode="idle", ping_interval=0.15, pong_timeout=5) as fake:
        ws = connect(fake, ["btcusdt@trade"], timeout=0.1)

        def two_pongs():
            try:
                ws.recv()  # nothing but pings come; websocket-client answers them
            except websocket.WebSocketTimeoutException:
                pass
            return fake.pongs_matched() >= 2

        wait_for(two_pongs, timeout=5, interval=0, what="two pongs matching the fake's pings")
        assert all(ok for _, ok in fake.pongs)
        pongs = fake.connections_info()["connections"][0]["pongs"]
        assert pongs and all(p.isdigit() and started <= int(p) <= now_ms() for p in pongs)  # echoed ping times
        assert fake.violations == []
        ws.close()


def test_no_pong_closes_the_connection():
    with FakeBinance(mode="idle", ping_interval=0.1, pong_timeout=0.3) as fake:
        ws = connect(fake, ["btcusdt@trade"])
        # do not read: no pongs go out
        wait_for(lambda: any("no pong" in v for v in fake.violations), timeout=5, what="the fake to miss a pong")
        assert ws.recv_frame().opcode == ABNF.OPCODE_PING
        assert recv_close(ws)[0] == 1008


def test_more_than_five_client_messages_per_second_closes_with_1008(script_fake):
    ws = connect(script_fake)
    for i in range(5):
        assert request(ws, "LIST_SUBSCRIPTIONS", rid=i)["id"] == i
    assert script_fake.violations == []
    ws.ping(b"sixth")  # control frames count too
    assert recv_close(ws)[0] == 1008
    assert script_fake.violations == ["6 client messages within 1 s"]
    assert script_fake.connections_info()["connections"][0]["close_code"] == 1008


def test_five_per_second_spread_out_is_fine(script_fake):
    ws = connect(script_fake)
    for i in range(7):
        assert request(ws, "LIST_SUBSCRIPTIONS", rid=i)["id"] == i
        if i == 3:  # the first four leave the fake's one-second window before the next three come
            conn, = script_fake.open_connections()
            wait_for(lambda: time.monotonic() - conn.state["recent"][-1] > 1.0, timeout=5,
                     what="a second since the fake saw the fourth message")
    assert script_fake.violations == [] and len(script_fake.open_connections()) == 1
    ws.close()


# -- faults -------------------------------------------------------------------------------------------------

def test_drop_all_aborts_every_connection(script_fake):
    clients = [connect(script_fake, ["btcusdt@trade"]) for _ in range(2)]
    wait_for(lambda: len(script_fake.open_connections()) == 2, timeout=2, what="two connections")
    script_fake.drop_all()
    for ws in clients:
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            ws.recv()
    assert script_fake.open_connections() == []
    ws = connect(script_fake)
    wait_for(lambda: script_fake.open_connections(), timeout=2, what="the third connection")
    script_fake.drop_all(abort=False)
    assert recv_close(ws)[0] == 1001
    assert script_fake.connections_info()["accepted"] == 3


def test_go_silent_stops_pings_but_keeps_tcp():
    with FakeBinance(mode="idle", ping_interval=0.05) as fake:
        ws = connect(fake, ["btcusdt@trade"], timeout=0.2)
        assert ws.recv_data_frame(control_frame=True)[0] == ABNF.OPCODE_PING
        fake.go_silent(1.0)
        while True:  # drain what was in flight, then nothing for a while
            try:
                ws.recv_data_frame(control_frame=True)
            except websocket.WebSocketTimeoutException:
                break
        with pytest.raises(websocket.WebSocketTimeoutException):
            ws.recv_data_frame(control_frame=True)
        ws.settimeout(1.5)
        assert ws.recv_data_frame(control_frame=True)[0] == ABNF.OPCODE_PING
        assert not fake.silent()  # the ping came once the silence was over
        assert len(fake.open_connections()) == 1
        ws.close()


def test_server_shutdown_notice_then_close(script_fake):
    ws = connect(script_fake, ["btcusdt@trade"])
    wait_for(lambda: script_fake.open_connections(), timeout=2, what="the connection")
    script_fake.send_server_shutdown(close_after=0.05)
    msg = recv_json(ws)
    assert msg["stream"] == "!serverShutdown" and msg["data"]["e"] == "serverShutdown"
    assert isinstance(msg["data"]["E"], int)
    assert recv_close(ws)[0] == 1001


def test_connection_age_limit():
    with FakeBinance(mode="idle", ping_interval=60, max_connection_age=0.3) as fake:
        ws = connect(fake, ["btcusdt@trade"])
        assert recv_close(ws) == (1000, "connection age limit")
        assert fake.open_connections() == []


def test_unknown_ws_path_is_closed(script_fake):
    ws = websocket.create_connection(script_fake.url_ws + "/nowhere", timeout=2)
    assert recv_close(ws)[0] == 1008


# -- command line ---------------------------------------------------------------------------------------------

def test_cli_prints_ready_and_exits_0_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "mdlogger.fakes", "binance", "--port", "0", "--mode", "steady",
                             "--rate", "20", "--symbols", "BTC-USDT,ETH-USDT", "--ping-interval", "5"],
                            stdout=subprocess.PIPE, text=True)
    try:
        words = proc.stdout.readline().split()
        assert words[0] == "READY" and int(words[1]) > 0
        ws = websocket.create_connection("ws://127.0.0.1:%s/stream?streams=ethusdt@trade" % words[1], timeout=2)
        assert json.loads(ws.recv())["data"]["s"] == "ETHUSDT"
        ws.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_clock_skips_a_connection_until_it_is_set_up():
    """A connection registered but still in on_open must not reach on_clock (a KeyError there ended the clock)."""
    from mdlogger.fakes.bitfinex import FakeBitfinex

    class SlowGreeting(FakeBitfinex):
        ticks = 0  # the clock's passes over the open connections

        def open_connections(self):
            if threading.current_thread().name.endswith("-clock"):
                self.ticks += 1
            return super().open_connections()

        def on_open(self, conn):
            # Greet only once the clock has passed over this connection (open, not set up) three times,
            # or has died trying.
            seen = self.ticks
            wait_for(lambda: self.ticks >= seen + 3 or not clock_alive(self), timeout=5,
                     what="three clock ticks during the greeting")
            return super().on_open(conn)

    def clock_alive(fake) -> bool:
        return all(t.is_alive() for t in fake._threads if t.name.endswith("-clock"))

    with SlowGreeting(symbols=["BTC-USD"], mode="script") as fake:
        ws = websocket.create_connection(fake.ws_endpoint, timeout=3)
        try:
            ws.recv()  # the info greeting
            greeted = fake.ticks
            assert [t for t in fake._threads if t.name.endswith("-clock")]
            wait_for(lambda: fake.ticks > greeted or not clock_alive(fake), timeout=5, what="the clock ticking on")
            assert clock_alive(fake)
        finally:
            ws.close()
