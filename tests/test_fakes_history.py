"""The fakes' market keeps trading, keeps its history, and serves it like the real REST APIs.

Per exchange: trades are made while nobody is subscribed, subscribe snapshots
come from that history, paging through the REST trade-history endpoint with
its documented cursors returns exactly the made trades in the documented
order, and the rate-limit answers come at the documented thresholds (small
knobs keep it fast). Then the faults: drop_after, refuse_upgrades, silence,
and the command-line options. Real sockets on 127.0.0.1; websocket-client and
requests as the clients; waits are on facts (wait_for), never on sleeps.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time

import pytest
import requests
import websocket
from websocket import ABNF

from mdlogger.fakes import fake_class
from mdlogger.fakes.__main__ import fake_kwargs, parse_args
from mdlogger.fakes.binance import FakeBinance
from mdlogger.fakes.bitfinex import FakeBitfinex, pair_of
from mdlogger.fakes.coinbase import FakeCoinbase
from mdlogger.fakes.kraken import FakeKraken, micros, wsname
from mdlogger.fakes.okx import INSTRUMENTS, FakeOkx

from helpers import wait_for

SYMBOL = {"binance": "BTC-USDT", "coinbase": "BTC-USD", "okx": "BTC-USDT", "bitfinex": "BTC-USD", "kraken": "BTC-USD"}
EXCHANGES = sorted(SYMBOL)  # the fakes this module has expectations for (each found by fake_class)
SNAPSHOT_SIZE = {"binance": 0, "coinbase": 1, "okx": 1, "bitfinex": 30, "kraken": 50}


def get(fake, path, **params):
    return requests.get(fake.url_http + path, params=params, timeout=5)


def ticking(start_ns=1_750_000_000_000_000_000, step_ns=1000):
    """A deterministic wall clock for trade times: ``step_ns`` later at every call."""
    counter = itertools.count(start_ns, step_ns)
    return lambda: next(counter)


def keys(fake, events):
    return [fake.trade_key(e) for e in events]


# -- a tiny client per exchange: subscribe to one symbol's trades, read (kind, trade key) pairs -----------------

def subscribe(name, fake, symbol):
    if name == "binance":
        st = fake.symbols[symbol]
        return websocket.create_connection("%s/stream?streams=%s@trade" % (fake.url_ws, (st.base + st.quote).lower()),
                                           timeout=5)
    ws = websocket.create_connection(fake.ws_endpoint, timeout=5)
    ws.send(json.dumps({
        "coinbase": {"type": "subscribe", "product_ids": [symbol], "channels": ["matches"]},
        "okx": {"op": "subscribe", "args": [{"channel": "trades", "instId": symbol}]},
        "bitfinex": {"event": "subscribe", "channel": "trades", "symbol": "t" + pair_of(symbol)},
        "kraken": {"event": "subscribe", "pair": [wsname(symbol)], "subscription": {"name": "trade"}},
    }[name]))
    return ws


class Reader:
    """Turns one connection's frames into ``(kind, key)`` pairs, kind 'snapshot' or 'live', oldest first."""

    def __init__(self, name, fake, symbol, ws):
        self.name, self.fake, self.symbol, self.ws = name, fake, symbol, ws
        self.first = True  # OKX and Kraken snapshots look like live frames: the first one is the snapshot

    def next(self) -> list:
        doc = json.loads(self.ws.recv())
        name = self.name
        if name == "binance":
            return [("live", doc["data"]["t"])]
        if name == "coinbase":
            kind = {"last_match": "snapshot", "match": "live"}.get(doc.get("type"))
            return [(kind, doc["trade_id"])] if kind else []
        if name == "okx":
            if "data" not in doc:
                return []
            kind, self.first = ("snapshot" if self.first else "live"), False
            return [(kind, int(d["tradeId"])) for d in doc["data"]]
        if name == "bitfinex":
            if not isinstance(doc, list):
                return []
            if doc[1] == "te":
                return [("live", doc[2][0])]
            if isinstance(doc[1], list):
                return [("snapshot", t[0]) for t in reversed(doc[1])]  # sent newest first
            return []
        if isinstance(doc, list) and doc[2] == "trade":  # kraken: no id on the wire, find it in the history
            ids = {tuple(e["trade"]): e["trade_id"] for e in self.fake.made_trades(self.symbol)}
            kind, self.first = ("snapshot" if self.first else "live"), False
            return [(kind, ids[tuple(t)]) for t in doc[1]]
        return []


# -- the market keeps trading ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXCHANGES)
def test_trades_are_made_while_nobody_is_subscribed_and_snapshots_come_from_them(name):
    sym = SYMBOL[name]
    with fake_class(name)(symbols=[sym], mode="steady", rate=300, seed=5) as fake:
        wait_for(lambda: len(fake.made_trades(sym)) >= 80, timeout=10, what="trades made with nobody listening")
        assert fake.sent_trades == [] and fake.sent_counts[sym] == 0
        assert fake.undelivered(sym) == fake.made_trades(sym)[:len(fake.undelivered(sym))]
        ws = subscribe(name, fake, sym)
        reader = Reader(name, fake, sym, ws)
        got = []
        while sum(1 for kind, _ in got if kind == "live") < 10:
            got += reader.next()
        ws.close()
        snapshot = [k for kind, k in got if kind == "snapshot"]
        live = [k for kind, k in got if kind == "live"]
        made = keys(fake, fake.made_trades(sym))
        assert len(snapshot) == SNAPSHOT_SIZE[name]
        assert got[:len(snapshot)] == [("snapshot", k) for k in snapshot]  # the snapshot comes first
        start = made.index((snapshot + live)[0])
        assert made[start:start + len(got)] == snapshot + live  # made order, nothing lost between snapshot and live
        assert start >= 80 - len(snapshot) > 0  # the snapshot holds trades made while nobody listened
        assert all(fake.delivered(sym, k) and not fake.delivered(sym, k, snapshots=False) for k in snapshot)
        assert all(fake.delivered(sym, k, snapshots=False) for k in live)
        assert not any(fake.delivered(sym, k) for k in made[:start])
        assert keys(fake, fake.undelivered(sym))[:start] == made[:start]
        assert keys(fake, fake.sent_trades)[:len(live)] == live  # sent_trades: delivered live only


@pytest.mark.parametrize("name", EXCHANGES)
def test_ids_and_times_at_the_exchanges_granularity(name):
    sym = SYMBOL[name]
    with fake_class(name)(symbols=[sym], mode="steady", rate=300, seed=9) as fake:
        wait_for(lambda: len(fake.made_trades(sym)) >= 60, timeout=10, what="trades made")
        made = fake.made_trades(sym)
        ids = keys(fake, made)
        steps = {b - a for a, b in zip(ids, ids[1:])}
        if name == "bitfinex":
            assert steps <= {1, 2, 3, 4} and len(steps) > 1  # rising, not consecutive
            assert all(isinstance(e["trade"][1], int) for e in made)
        else:
            assert steps == {1}
        if name == "binance":
            assert all(isinstance(e["T"], int) and e["T"] == e["E"] for e in made)
        elif name == "okx":
            assert all(e["ts"].isdigit() and len(e["ts"]) == 13 for e in made)
        elif name == "coinbase":
            assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["time"]) for e in made)
        elif name == "kraken":
            assert all(re.fullmatch(r"\d{10}\.\d{6}", e["trade"][2]) for e in made)
            assert "trade_id" not in json.dumps([e["trade"] for e in made])  # WS v1 never shows it


def test_with_trade_when_unsubscribed_false_only_subscribed_symbols_trade():
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT"], mode="steady", rate=300, trade_when_unsubscribed=False) as fake:
        ws = subscribe("binance", fake, "BTC-USDT")
        wait_for(lambda: len(fake.made_trades("BTC-USDT")) >= 20, timeout=10, what="BTC trades")
        assert fake.made_trades("ETH-USDT") == []
        ws.close()


def test_silence_keeps_the_market_trading_and_nothing_reaches_the_client():
    sym = "BTC-USDT"
    with FakeBinance(symbols=[sym], mode="steady", rate=300, ping_interval=3600) as fake:
        ws = subscribe("binance", fake, sym)
        first = json.loads(ws.recv())["data"]["t"]
        fake.go_silent(3600)
        mark = keys(fake, fake.made_trades(sym))[-1]
        wait_for(lambda: keys(fake, fake.made_trades(sym))[-1] >= mark + 10, timeout=10, what="trades during silence")
        silent = [e for e in fake.made_trades(sym) if mark < e["t"] <= mark + 10]
        assert len(silent) == 10 and not any(fake.delivered(sym, e) for e in silent)
        fake.go_silent(0)
        seen = [first]
        while seen[-1] <= mark + 10:
            seen.append(json.loads(ws.recv())["data"]["t"])
        assert not set(range(mark + 1, mark + 11)) & set(seen)  # a gap the client must backfill
        ws.close()


# -- Binance -------------------------------------------------------------------------------------------------------

def test_binance_historical_trades_pages_oldest_first_from_an_inclusive_from_id():
    with FakeBinance(symbols=["BTC-USDT"], mode="script", weight_window=3600, weight_phase=time.time()) as fake:
        for _ in range(2300):
            fake.push_trade("BTC-USDT")
        made = fake.made_trades("BTC-USDT")
        ids = keys(fake, made)
        got, from_id, weights = [], ids[0], []
        while True:
            r = get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT", fromId=from_id, limit=1000)
            assert r.status_code == 200
            weights.append(int(r.headers["X-MBX-USED-WEIGHT-1M"]))
            got += r.json()
            if len(r.json()) < 1000:
                break
            from_id = r.json()[-1]["id"] + 1
        assert [row["id"] for row in got] == ids
        assert weights == [25, 50, 75]
        e = made[7]
        quote = "%.8f" % (float(e["p"]) * float(e["q"]))
        assert got[7] == {"id": e["t"], "price": e["p"], "qty": e["q"], "quoteQty": quote, "time": e["T"],
                          "isBuyerMaker": e["m"], "isBestMatch": True}
        assert list(got[7]) == ["id", "price", "qty", "quoteQty", "time", "isBuyerMaker", "isBestMatch"]
        page = get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT", fromId=ids[500], limit=3).json()
        assert [row["id"] for row in page] == ids[500:503]  # fromId is inclusive
        page = get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT").json()
        assert [row["id"] for row in page] == ids[-500:]  # no fromId: the latest 500, oldest first
        assert get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT", fromId=ids[-1] + 1).json() == []
        r = get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT", limit=1001)
        assert r.status_code == 400 and r.json()["code"] == -1100
        r = get(fake, "/api/v3/historicalTrades", symbol="NOPEUSDT")
        assert r.status_code == 400 and r.json() == {"code": -1121, "msg": "Invalid symbol."}
        r = get(fake, "/api/v3/historicalTrades")
        assert r.status_code == 400 and r.json()["code"] == -1102
        assert [s for _, _, s in fake.rest_log] == [200] * 6 + [400] * 3
        assert all(p == "/api/v3/historicalTrades" for _, p, _ in fake.rest_log)
        assert int(r.headers["X-MBX-USED-WEIGHT-1M"]) == 9 * 25


def test_binance_weight_limit_429_then_418_for_asking_again():
    with FakeBinance(symbols=["BTC-USDT"], mode="script", weight_limit=100, weight_window=3600,
                     weight_phase=time.time()) as fake:
        fake.push_trade("BTC-USDT")
        for i in range(4):
            r = get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT", limit=1000)
            assert r.status_code == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == str(25 * (i + 1))
        r = get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT", limit=1000)
        assert r.status_code == 429 and r.json()["code"] == -1003
        assert 1 <= int(r.headers["Retry-After"]) <= 3600 and r.headers["X-MBX-USED-WEIGHT-1M"] == "125"
        assert fake.violations == []
        r = get(fake, "/api/v3/exchangeInfo")  # anything before Retry-After ran out
        assert r.status_code == 418 and int(r.headers["Retry-After"]) >= 1 and "X-MBX-USED-WEIGHT-1M" in r.headers
        assert fake.violations == ["request after 429"]
        assert get(fake, "/api/v3/exchangeInfo").status_code == 418
        assert fake.violations == ["request after 429", "request during a 418 ban"]
        assert [s for _, _, s in fake.rest_log] == [200] * 4 + [429, 418, 418]


def test_binance_after_retry_after_the_window_is_fresh():
    with FakeBinance(symbols=["BTC-USDT"], mode="script", weight_limit=50, weight_window=1.0) as fake:
        for _ in range(20):  # two calls fit a window; which call is refused depends on where the windows turn
            r = get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT")
            used = int(r.headers["X-MBX-USED-WEIGHT-1M"])
            if r.status_code == 429:
                break
            assert r.status_code == 200 and used <= 50
        assert r.status_code == 429 and used > 50
        refused_at, wait = fake.rest_log[-1][0], int(r.headers["Retry-After"])
        # a client honouring Retry-After: nothing until that many seconds after the refusal (the fake's clock)
        wait_for(lambda: time.monotonic() >= refused_at + wait, timeout=wait + 5, what="Retry-After to run out")
        r = get(fake, "/api/v3/historicalTrades", symbol="BTCUSDT")
        assert r.status_code == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == "25"
        assert fake.violations == []


# -- Coinbase --------------------------------------------------------------------------------------------------------

def test_coinbase_trades_pages_newest_first_with_after_cursors():
    with FakeCoinbase(symbols=["BTC-USD"], mode="script", rest_burst=1000) as fake:
        for _ in range(2300):
            fake.push_trade("BTC-USD")
        made = fake.made_trades("BTC-USD")
        ids = keys(fake, made)
        url = "/products/BTC-USD/trades"
        r = get(fake, url)
        pages = [r]
        while r.json():
            r = get(fake, url, after=r.headers["CB-AFTER"])
            pages.append(r)
        assert [len(p.json()) for p in pages] == [1000, 1000, 300, 0]
        assert [row["trade_id"] for p in pages for row in p.json()] == ids[::-1]
        first = pages[0]
        assert (first.headers["CB-BEFORE"], first.headers["CB-AFTER"]) == (str(ids[-1]), str(ids[-1000]))
        assert "CB-BEFORE" not in pages[-1].headers and "CB-AFTER" not in pages[-1].headers
        e = made[-1]
        assert first.json()[0] == {"time": e["time"], "trade_id": e["trade_id"], "price": e["price"], "size": e["size"],
                                   "side": e["side"]}  # the maker's side, as in match
        page = get(fake, url, before=ids[-4]).json()
        assert [row["trade_id"] for row in page] == ids[-1:-4:-1]
        page = get(fake, url, before=ids[0], limit=5)
        assert [row["trade_id"] for row in page.json()] == ids[-1:-6:-1]  # the NEWEST page, not the one after X
        assert page.headers["CB-BEFORE"] == str(ids[-1]) and page.headers["CB-AFTER"] == str(ids[-5])
        page = get(fake, url, after=ids[10], before=ids[5]).json()
        assert [row["trade_id"] for row in page] == ids[9:5:-1]
        assert get(fake, url, limit=1001).status_code == 400
        assert get(fake, url, after="x").status_code == 400
        r = get(fake, "/products/NOPE-USD/trades")
        assert r.status_code == 404 and r.json() == {"message": "NotFound"}


def test_coinbase_public_rate_limit_burst_15():
    with FakeCoinbase(symbols=["BTC-USD"], mode="script", rest_rate=0.001) as fake:
        fake.push_trade("BTC-USD")
        for _ in range(15):
            assert get(fake, "/products/BTC-USD/trades").status_code == 200
        r = get(fake, "/products/BTC-USD/trades")
        assert r.status_code == 429 and r.json() == {"message": "Public rate limit exceeded"}
        assert get(fake, "/products").status_code == 429  # every public request shares the bucket


# -- OKX ---------------------------------------------------------------------------------------------------------------

def test_okx_history_trades_pages_newest_first_with_after_cursors():
    with FakeOkx(symbols=["BTC-USDT"], mode="script", history_limit=1000) as fake:
        fake.wall_ns = ticking(step_ns=300_000)  # about three trades per ms
        for _ in range(350):
            fake.push_trade("BTC-USDT")
        made = fake.made_trades("BTC-USDT")
        ids = keys(fake, made)
        path = "/api/v5/market/history-trades"
        docs = [get(fake, path, instId="BTC-USDT").json()]
        while docs[-1]["data"]:
            docs.append(get(fake, path, instId="BTC-USDT", after=docs[-1]["data"][-1]["tradeId"]).json())
        assert all(d["code"] == "0" and d["msg"] == "" for d in docs)
        assert [len(d["data"]) for d in docs] == [100, 100, 100, 50, 0]
        assert [int(row["tradeId"]) for d in docs for row in d["data"]] == ids[::-1]
        e = made[-1]
        assert docs[0]["data"][0] == {"instId": "BTC-USDT", "tradeId": e["tradeId"], "px": e["px"], "sz": e["sz"],
                                      "side": e["side"], "source": "0", "ts": e["ts"]}
        data = get(fake, path, instId="BTC-USDT", before=ids[0]).json()["data"]
        assert [int(row["tradeId"]) for row in data] == ids[:-101:-1]  # before alone: the newest page
        data = get(fake, path, instId="BTC-USDT", after=ids[10], before=ids[5]).json()["data"]
        assert [int(row["tradeId"]) for row in data] == ids[9:5:-1]
        assert len(get(fake, path, instId="BTC-USDT", limit=500).json()["data"]) == 100
        cut = int(made[200]["ts"])
        data = get(fake, path, instId="BTC-USDT", type=2, after=cut).json()["data"]
        older = [int(e["tradeId"]) for e in made if int(e["ts"]) < cut]
        assert [int(row["tradeId"]) for row in data] == older[:-101:-1] and len(older) < 201
        doc = get(fake, path, instId="NOPE-USDT").json()
        assert doc == {"code": "51001", "msg": "Instrument ID does not exist.", "data": []}
        r = get(fake, path)
        assert r.status_code == 400 and r.json()["code"] == "50014"
        assert get(fake, path, instId="BTC-USDT", after="x").json()["code"] == "51000"


def test_okx_history_trades_rate_limit_20_per_2_seconds():
    with FakeOkx(symbols=["BTC-USDT"], mode="script", history_window=3600) as fake:
        for _ in range(20):
            assert get(fake, "/api/v5/market/history-trades", instId="BTC-USDT").status_code == 200
        r = get(fake, "/api/v5/market/history-trades", instId="BTC-USDT")
        assert r.status_code == 429 and r.json() == {"code": "50011", "msg": "Too Many Requests", "data": []}
        assert get(fake, INSTRUMENTS, instType="SPOT").status_code == 200  # its own limit


# -- Bitfinex ------------------------------------------------------------------------------------------------------

def test_bitfinex_hist_pages_by_inclusive_time_with_sort():
    with FakeBitfinex(symbols=["BTC-USD"], mode="script", hist_limit=1000) as fake:
        fake.wall_ns = ticking(step_ns=400_000)  # two or three trades per ms, and sweeps sharing one ms
        for i in range(400):
            fake.sweep("BTC-USD", 3) if i % 7 == 0 else fake.push_trade("BTC-USD")
        made = fake.made_trades("BTC-USD")
        rows = [e["trade"] for e in made]
        path = "/v2/trades/tBTCUSD/hist"
        got, start = {}, rows[0][1]
        while True:  # by time, oldest first; the next start is the last MTS (overlap, deduped on ID)
            page = get(fake, path, start=start, end=rows[-1][1], sort=1).json()
            assert page == sorted(page, key=lambda t: (t[1], t[0]))
            got.update((t[0], t) for t in page)
            if len(page) < 125:
                break
            start = page[-1][1]
        assert sorted(got.values()) == rows
        newest = get(fake, path).json()  # defaults: sort -1, limit 125
        assert newest == rows[::-1][:125]
        mts = rows[200][1]
        same_ms = [t for t in rows if t[1] == mts]
        assert len(same_ms) >= 2 and get(fake, path, start=mts, end=mts, sort=1).json() == same_ms  # inclusive ends
        for _ in range(10_000):
            fake.push_trade("BTC-USD")
        assert len(get(fake, path, limit=20000).json()) == 10_000
        r = get(fake, "/v2/trades/tNOPEUSD/hist")
        assert r.status_code == 500 and r.json() == ["error", 10020, "symbol: invalid"]


def test_bitfinex_16th_request_in_a_minute_is_refused_and_blocks():
    with FakeBitfinex(symbols=["BTC-USD"], mode="script", hist_window=3600, block_secs=3600) as fake:
        for _ in range(15):
            assert get(fake, "/v2/trades/tBTCUSD/hist").status_code == 200
        r = get(fake, "/v2/trades/tBTCUSD/hist")
        assert r.status_code == 429 and r.json() == ["error", 11010, "ratelimit: error"]
        assert fake.violations == []
        r = get(fake, "/v2/conf/pub:list:pair:exchange")  # blocked: every request
        assert r.status_code == 429 and r.json() == ["error", 11010, "ratelimit: error"]
        assert fake.violations == ["request during the rate-limit block"]


def test_bitfinex_block_ends():
    with FakeBitfinex(symbols=["BTC-USD"], mode="script", hist_limit=1, hist_window=3600, block_secs=0.2) as fake:
        assert get(fake, "/v2/trades/tBTCUSD/hist").status_code == 200
        assert get(fake, "/v2/trades/tBTCUSD/hist").status_code == 429
        blocked_at = fake.rest_log[-1][0]  # a client sitting the block out (0.2 s, the fake's clock)
        wait_for(lambda: time.monotonic() >= blocked_at + 0.2, timeout=5, what="the block to end")
        assert get(fake, "/v2/conf/pub:list:pair:exchange").status_code == 200
        assert fake.violations == []


# -- Kraken ----------------------------------------------------------------------------------------------------------

def test_kraken_trades_pages_oldest_first_strictly_after_since():
    with FakeKraken(symbols=["BTC-USD"], mode="script", rest_burst=1000) as fake:
        fake.wall_ns = ticking(step_ns=1000)  # one microsecond per trade, a sweep shares one
        for _ in range(999):
            fake.push_trade("BTC-USD")
        fake.sweep("BTC-USD", 3)  # made[999:1002] share one time
        for _ in range(1300):
            fake.push_trade("BTC-USD")
        made = fake.made_trades("BTC-USD")
        ids = keys(fake, made)

        def page(**params):
            r = get(fake, "/0/public/Trades", **params)
            assert r.status_code == 200
            doc = r.json()
            assert doc["error"] == [] and list(doc["result"]) == ["XXBTZUSD", "last"]
            return r.text, doc["result"]["XXBTZUSD"], doc["result"]["last"]

        text, rows, last = page(pair="XBTUSD", since=0)
        assert [row[6] for row in rows] == ids[:1000]
        assert last == str(micros(made[999]["trade"][2]) * 1000)  # ns of the last row
        e, row = made[0], rows[0]
        assert row[:6] == e["trade"][:2] + [row[2]] + e["trade"][3:6]
        times = re.findall(r',(\d+\.\d+),"[bs]"', text)
        assert times == [e["trade"][2] for e in made[:1000]]  # the very WS time string: 6 decimals
        assert row[2] == micros(e["trade"][2]) / 1e6
        _, rows, _ = page(pair="XBTUSD", since=last)
        assert rows[0][6] == ids[1002]  # strictly after: the rest of the sweep is skipped
        got, since = {}, 0
        while True:  # the careful way: since = last - 1, dedupe on trade_id
            _, rows, last = page(pair="XBTUSD", since=since)
            got.update((row[6], row) for row in rows)
            if len(rows) < 1000:
                break
            since = int(last) - 1
        assert sorted(got) == ids
        _, rows, _ = page(pair="XXBTZUSD")  # no since: the latest count trades, oldest first
        assert [row[6] for row in rows] == ids[-1000:]
        _, rows, _ = page(pair="XBTUSD", since=since, count=5000)
        assert len(rows) <= 1000
        _, rows, last = page(pair="XBTUSD", since=micros(made[-1]["trade"][2]) * 1000)
        assert rows == [] and last == str(micros(made[-1]["trade"][2]) * 1000)
        for pair in ("BTCUSD", "XBT/USD", "NOPE"):
            assert get(fake, "/0/public/Trades", pair=pair).json() == {"error": ["EQuery:Unknown asset pair"]}


def test_kraken_public_rate_limit_answers_200_with_an_error():
    with FakeKraken(symbols=["BTC-USD"], mode="script", rest_rate=0.001) as fake:
        for _ in range(2):
            assert get(fake, "/0/public/Trades", pair="XBTUSD").json()["error"] == []
        r = get(fake, "/0/public/AssetPairs")
        assert r.status_code == 200 and r.json() == {"error": ["EGeneral:Too many requests"]}


# -- every fake: injected failures in the exchange's shape, the log --------------------------------------------------

@pytest.mark.parametrize("name,path,params,status,body", [
    ("binance", "/api/v3/exchangeInfo", {}, 429, None),
    ("coinbase", "/products", {}, 429, {"message": "Public rate limit exceeded"}),
    ("okx", INSTRUMENTS, {"instType": "SPOT"}, 429, {"code": "50011", "msg": "Too Many Requests", "data": []}),
    ("bitfinex", "/v2/conf/pub:list:pair:exchange", {}, 429, ["error", 11010, "ratelimit: error"]),
    ("kraken", "/0/public/AssetPairs", {}, 200, {"error": ["EGeneral:Too many requests"]}),
])
def test_rest_failures_answer_like_the_exchange(name, path, params, status, body):
    with fake_class(name)(mode="script") as fake:
        fake.rest_failures = 1
        r = get(fake, path, **params)
        assert r.status_code == status
        if body is None:
            assert r.json()["code"] == -1003 and r.headers["Retry-After"] == "1"
        else:
            assert r.json() == body
        assert get(fake, path, **params).status_code == 200
        (t1, p1, s1), (t2, p2, s2) = fake.rest_log
        assert t1 <= t2 and (p1, s1, p2, s2) == (path, status, path, 200)


# -- faults --------------------------------------------------------------------------------------------------------

def frames_until_closed(ws) -> list:
    """Text payloads until the connection ends; it must end without a close frame."""
    out = []
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        while True:
            frame = ws.recv_frame()
            assert frame.opcode == ABNF.OPCODE_TEXT, "a close frame or other frame came: %r" % frame.opcode
            out.append(json.loads(frame.data))
    ws.close()
    return out


def test_drop_after_ends_connections_after_n_data_messages():
    sym = "BTC-USDT"
    with FakeBinance(symbols=[sym], mode="script", ping_interval=3600) as fake:
        fake.drop_after(5)
        for round_ in range(2):  # the limit applies to every new connection
            ws = subscribe("binance", fake, sym)
            wait_for(lambda: fake.subscribed("trades"), timeout=5, what="subscription")
            events = [fake.push_trade(sym) for _ in range(8)]
            assert [d["data"]["t"] for d in frames_until_closed(ws)] == keys(fake, events[:5])
            assert [fake.delivered(sym, e) for e in events] == [True] * 5 + [False] * 3
            assert fake.dropped == round_ + 1
        fake.drop_after(None)
        ws = subscribe("binance", fake, sym)
        wait_for(lambda: fake.subscribed("trades"), timeout=5, what="subscription")
        events = [fake.push_trade(sym) for _ in range(3)]
        assert [json.loads(ws.recv())["data"]["t"] for _ in range(3)] == keys(fake, events)
        fake.drop_after(2)  # an open connection already past the limit ends at once
        assert frames_until_closed(ws) == [] and fake.open_connections() == []


def test_refuse_upgrades_answers_503_while_rest_answers():
    with FakeOkx(symbols=["BTC-USDT"], mode="script") as fake:
        fake.refuse_upgrades(3600)
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(fake.ws_endpoint, timeout=5)
        assert info.value.status_code == 503
        assert get(fake, INSTRUMENTS, instType="SPOT").status_code == 200
        fake.refuse_upgrades(0)
        ws = websocket.create_connection(fake.ws_endpoint, timeout=5)
        ws.send("ping")
        assert ws.recv() == "pong"
        ws.close()
        assert [(p, s) for _, p, s in fake.upgrade_log] == [("/ws/v5/public", 503), ("/ws/v5/public", 101)]
        assert [(p, s) for _, p, s in fake.rest_log] == [(INSTRUMENTS, 200)]


def test_command_line_fault_options():
    args = parse_args(["kraken", "--quiet-when-unsubscribed", "--history-size", "10"])
    assert fake_kwargs(args)["trade_when_unsubscribed"] is False and fake_kwargs(args)["history_size"] == 10
    cmd = [sys.executable, "-m", "mdlogger.fakes", "binance", "--port", "0", "--mode", "steady", "--rate", "100",
           "--symbols", "BTC-USDT", "--drop-after", "3", "--weight-limit", "100"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True),
             subprocess.Popen(cmd[:6] + ["--refuse-upgrades", "3600"], stdout=subprocess.PIPE, text=True)]
    try:
        ports = [int(p.stdout.readline().split()[1]) for p in procs]
        ws = websocket.create_connection("ws://127.0.0.1:%d/stream?streams=btcusdt@trade" % ports[0], timeout=5)
        assert [d["data"]["s"] for d in frames_until_closed(ws)] == ["BTCUSDT"] * 3
        limits = requests.get("http://127.0.0.1:%d/api/v3/exchangeInfo" % ports[0], timeout=5).json()["rateLimits"]
        assert limits[0] == {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 100}
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection("ws://127.0.0.1:%d/stream" % ports[1], timeout=5)
        assert requests.get("http://127.0.0.1:%d/api/v3/exchangeInfo" % ports[1], timeout=5).status_code == 200
    finally:
        for p in procs:
            p.terminate()
            assert p.wait(10) == 0
