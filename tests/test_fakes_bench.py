"""The fakes' benchmark knobs (bench/): a firehose of exactly N trades, aggTrade firehose frames for clients
that subscribe to them, the scheduled market clock (per-symbol rates, spread tickers, stop_market) and
generated symbol lists. Facts only: counts and shapes, no timing."""

from __future__ import annotations

import json

import websocket

from mdlogger.fakes.base import cut_frames, generated_symbols
from mdlogger.fakes.binance import FakeBinance
from mdlogger.fakes.wsserver import OP_TEXT, encode_frame

from helpers import wait_for


def read_n_then_nothing_more(ws, n: int) -> list[dict]:
    """``n`` data messages, then proof that no more followed: the answer to a request sent after them comes next."""
    ws.settimeout(30)
    out = [json.loads(ws.recv()) for _ in range(n)]
    ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 7}))
    assert json.loads(ws.recv()).get("id") == 7, "more than %d firehose frames" % n
    return out


def test_cut_frames_keeps_whole_frames_of_every_length_form():
    frames = [encode_frame(OP_TEXT, b"x" * n) for n in (3, 125, 126, 70_000, 0)]
    blob = b"".join(frames)
    for k in range(len(frames) + 2):
        assert cut_frames(blob, k) == b"".join(frames[:k])


def test_generated_symbols_are_distinct_valid_and_start_with_the_real_bases():
    syms = generated_symbols(800, "USDT")
    assert len(set(syms)) == 800
    assert syms[:2] == ["BTC-USDT", "ETH-USDT"]
    assert all(s.endswith("-USDT") and s.split("-")[0].isalpha() and s.split("-")[0].isupper() for s in syms)
    assert "USD-USD" not in generated_symbols(10, "USD", first=("USD", "BTC"))


def test_the_firehose_sends_exactly_n_trades_then_keeps_the_connection_open():
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT", "SOL-USDT"], mode="firehose") as fake:
        fake.firehose_trades = 10_001  # not a whole number of rounds: the last one is cut
        ws = websocket.create_connection("ws://127.0.0.1:%d/stream?streams=btcusdt@trade/ethusdt@trade/solusdt@trade"
                                         % fake.port, skip_utf8_validation=True)
        got = read_n_then_nothing_more(ws, 10_001)
        assert {m["data"]["e"] for m in got} == {"trade"}
        ids = {}
        for m in got:
            d = m["data"]
            assert ids.get(d["s"], d["t"] - 1) == d["t"] - 1  # consecutive per symbol
            ids[d["s"]] = d["t"]
        ws.close()


def test_a_connection_subscribed_to_aggtrade_gets_the_firehose_as_aggtrade_events():
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT"], mode="firehose") as fake:
        fake.firehose_trades = 500
        ws = websocket.create_connection("ws://127.0.0.1:%d/stream?streams=btcusdt@aggTrade" % fake.port)
        got = read_n_then_nothing_more(ws, 500)
        ws.close()
    assert {m["stream"] for m in got} == {"btcusdt@aggTrade"}
    d = got[-1]["data"]
    assert d["e"] == "aggTrade" and d["s"] == "BTCUSDT" and d["a"] == d["f"] == d["l"]
    assert [m["data"]["a"] for m in got] == list(range(got[0]["data"]["a"], got[0]["data"]["a"] + 500))


def test_the_scheduled_clock_trades_each_symbol_at_its_own_rate():
    fake = FakeBinance(symbols=["BTC-USDT", "ETH-USDT", "SOL-USDT"], mode="steady")  # not started: ticks by hand
    fake.rates = {"BTC-USDT": 200.0, "ETH-USDT": 20.0, "SOL-USDT": 0.0}
    fake._scheduled(1000.0, silent=False)
    fake._scheduled(1010.0, silent=False)  # ten seconds of market
    made = {s: len(fake.made_trades(s)) for s in fake.symbols}
    assert 1700 < made["BTC-USDT"] < 2300 and 120 < made["ETH-USDT"] < 280  # Poisson, seeded
    assert made["SOL-USDT"] == 0  # rate 0: never trades
    ids = [e["t"] for e in fake.made_trades("BTC-USDT")]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert not fake.sent_tickers  # nobody subscribed: no ticker


def test_stop_market_ends_the_steady_trading():
    fake = FakeBinance(symbols=["BTC-USDT"], mode="steady")
    fake.rates = {"BTC-USDT": 100.0}
    with fake:
        wait_for(lambda: len(fake.made_trades("BTC-USDT")) >= 3, what="trades")
        fake.stop_market()
    assert fake.trading is False
