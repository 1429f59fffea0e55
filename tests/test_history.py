"""REST trade history: parsing per exchange, paging, windows, rate-limit handling (HistoryClient)."""

from __future__ import annotations

import calendar
import dataclasses
import random
import threading
import time

import orjson
import pytest
import requests
from requests.structures import CaseInsensitiveDict

from mdlogger import history as hist
from mdlogger import records as rec
from mdlogger.budget import SharedBucket
from mdlogger.exchanges import ADAPTERS, base
from mdlogger.exchanges.base import HistoryRows, SymbolInfo, micro_seconds_float
from mdlogger.history import HistoryClient, HistoryDeadline, HistoryError, retry_after

from helpers import fake_settings, make_adapter

Z = rec.ZERO_ID
INFOS = {
    "binance": SymbolInfo("BTC-USDT", "BTCUSDT", "BTC", "USDT"),
    "coinbase": SymbolInfo("BTC-USD", "BTC-USD", "BTC", "USD"),
    "okx": SymbolInfo("BTC-USDT", "BTC-USDT", "BTC", "USDT"),
    "bitfinex": SymbolInfo("BTC-USD", "tBTCUSD", "BTC", "USD"),
    "kraken": SymbolInfo("BTC-USD", "XBT/USD", "BTC", "USD"),
}


# -- a scripted HTTP session ----------------------------------------------------------------------


class Resp:
    def __init__(self, status: int, body=b"", headers=None):
        self.status_code = status
        self.headers = CaseInsensitiveDict(headers or {})
        self.body = body if isinstance(body, bytes) else orjson.dumps(body)

    def iter_content(self, n):
        for i in range(0, len(self.body), n):
            yield self.body[i : i + n]

    def close(self):
        pass


class Script:
    """A requests-like session answering from ``handler(url, params) -> Resp`` (or raising)."""

    def __init__(self, handler):
        self.handler = handler
        self.requests: list[tuple[str, dict]] = []
        self.stamps: list[float] = []  # time.monotonic() of each request

    def get(self, url, params=None, timeout=None, stream=False):
        self.stamps.append(time.monotonic())
        self.requests.append((url, dict(params or {})))
        answer = self.handler(url, dict(params or {}))
        if isinstance(answer, Exception):
            raise answer
        return answer


def replies(*answers):
    """A handler giving ``answers`` in turn (the last one again when they run out)."""
    queue = list(answers)

    def handler(url, params):
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


@pytest.fixture
def bucket(tmp_path):
    b = SharedBucket(str(tmp_path / "x.rest"), rate=1000.0, burst=1000.0)
    yield b
    b.close()


def quick(name: str, pause: float = 0.05):
    """The adapter of ``name`` with a short default pause (the real ones are seconds to a minute)."""
    cls = ADAPTERS[name]
    sub = type("Quick" + cls.__name__, (cls,), {"history": dataclasses.replace(cls.history, default_pause=pause)})
    return sub(make_adapter(name).settings)


def client_for(adapter, bucket, handler, **kw):
    session = Script(handler)
    return HistoryClient(adapter, bucket, session=session, **kw), session


def ms(ms_: int) -> tuple[int, int]:
    return ms_ // 1000, ms_ % 1000 * 1_000_000


# -- parsing the documented (constructed) examples ------------------------------------------------------


def test_binance_example(old_times, bucket):
    ad = make_adapter("binance")
    page = [{"id": 4967312001, "price": "67012.35000000", "qty": "0.00150000", "quoteQty": "100.51852500",
             "time": 1717430400123, "isBuyerMaker": True, "isBestMatch": True},
            {"id": 4967312002, "price": "67012.36000000", "qty": "0.02000000", "quoteQty": "1340.24720000",
             "time": 1717430400187, "isBuyerMaker": False, "isBestMatch": True}]
    client, s = client_for(ad, bucket, replies(Resp(200, page)))
    rows = ad.fetch_history(client, INFOS["binance"], (4967312000, 1717430400, 0), (4967312003, 1717430401, 0), None)
    assert s.requests == [("https://api.binance.com/api/v3/historicalTrades",
                           {"symbol": "BTCUSDT", "fromId": 4967312001, "limit": 1000})]
    assert rows == [(b"BTC-USDT", 4967312001, 1717430400, 123_000_000, 67012.35, 0.0015, 2, Z, Z),
                    (b"BTC-USDT", 4967312002, 1717430400, 187_000_000, 67012.36, 0.02, 1, Z, Z)]
    assert isinstance(rows, HistoryRows) and not rows.skipped
    assert client.calls == 1


def test_coinbase_example_side_is_the_makers(old_times, bucket):
    ad = make_adapter("coinbase")
    newest = [{"time": "2024-06-03T16:00:01.512334Z", "trade_id": 612345700, "price": "67010.01",
               "size": "0.00420000", "side": "sell"},
              {"time": "2024-06-03T16:00:01.498120Z", "trade_id": 612345699, "price": "67010.00",
               "size": "0.15000000", "side": "buy"}]
    older = [{"time": "2024-06-03T16:00:01.400000Z", "trade_id": 612345698, "price": "67009",
              "size": "1", "side": "buy"},
             {"time": "2024-06-03T16:00:01.300000Z", "trade_id": 612345697, "price": "67008",
              "size": "1", "side": "sell"}]

    def handler(url, params):
        return Resp(200, newest, {"CB-BEFORE": "612345700", "CB-AFTER": "612345699"}) if params["after"] == 612345701 \
            else Resp(200, older, {"CB-BEFORE": "612345698", "CB-AFTER": "612345697"})

    client, s = client_for(ad, bucket, handler)
    rows = ad.fetch_history(client, INFOS["coinbase"], (612345697, 0, 0), (612345701, 0, 0), None)
    url = "https://api.exchange.coinbase.com/products/BTC-USD/trades"
    assert s.requests == [(url, {"limit": 1000, "after": 612345701}), (url, {"limit": 1000, "after": 612345699})]
    client, s = client_for(ad, bucket, handler)
    ad.fetch_history(client, INFOS["coinbase"], (612345698, 0, 0), (612345701, 0, 0), None)
    assert len(s.requests) == 1  # the first page reached the id after 612345698: nothing older is asked for
    sec = calendar.timegm((2024, 6, 3, 16, 0, 1))
    assert rows == [(b"BTC-USD", 612345698, sec, 400_000_000, 67009.0, 1.0, 2, Z, Z),
                    (b"BTC-USD", 612345699, sec, 498_120_000, 67010.0, 0.15, 2, Z, Z),  # maker bought: taker sold
                    (b"BTC-USD", 612345700, sec, 512_334_000, 67010.01, 0.0042, 1, Z, Z)]


def test_okx_example(old_times, bucket):
    ad = make_adapter("okx")
    doc = {"code": "0", "msg": "", "data": [
        {"instId": "BTC-USDT", "tradeId": "518200100", "px": "67005.1", "sz": "0.0125", "side": "buy", "source": "0",
         "ts": "1717430401512"},
        {"instId": "BTC-USDT", "tradeId": "518200099", "px": "67005", "sz": "0.3", "side": "sell", "source": "0",
         "ts": "1717430401498"}]}
    client, s = client_for(ad, bucket, replies(Resp(200, doc)))
    rows = ad.fetch_history(client, INFOS["okx"], (518200098, 0, 0), (518200101, 0, 0), None)
    assert s.requests == [("https://www.okx.com/api/v5/market/history-trades",
                           {"instId": "BTC-USDT", "type": "1", "after": 518200101, "limit": 100})]
    assert rows == [(b"BTC-USDT", 518200099, 1717430401, 498_000_000, 67005.0, 0.3, 2, Z, Z),
                    (b"BTC-USDT", 518200100, 1717430401, 512_000_000, 67005.1, 0.0125, 1, Z, Z)]


def test_bitfinex_example(old_times, bucket):
    ad = make_adapter("bitfinex")
    page = [[1608862001, 1717430400215, 0.0042, 67015], [1608862005, 1717430400390, -0.25, 67014]]
    client, s = client_for(ad, bucket, replies(Resp(200, page)))
    after, before = (1608862000, 1717430400, 100_000_000), (1608862010, 1717430401, 0)
    rows = ad.fetch_history(client, INFOS["bitfinex"], after, before, None)
    assert s.requests == [("https://api-pub.bitfinex.com/v2/trades/tBTCUSD/hist",
                           {"start": 1717430400100, "end": 1717430401000, "limit": 10000, "sort": 1})]
    assert rows == [(b"BTC-USD", 1608862001, 1717430400, 215_000_000, 67015.0, 0.0042, 1, Z, Z),
                    (b"BTC-USD", 1608862005, 1717430400, 390_000_000, 67014.0, 0.25, 2, Z, Z)]


def test_kraken_example_times_exact_to_the_microsecond(old_times, bucket):
    ad = make_adapter("kraken")
    doc = {"error": [], "result": {"XXBTZUSD": [
        ["67010.10000", "0.01500000", 1717430400.123456, "b", "m", "", 71234501],
        ["67010.00000", "0.25000000", 1717430400.56789, "s", "l", "", 71234502]], "last": "1717430400567890000"}}
    client, s = client_for(ad, bucket, replies(Resp(200, doc)))
    after, before = (0, 1717430400, 0), (0, 1717430401, 0)
    rows = ad.fetch_history(client, INFOS["kraken"], after, before, None)
    assert s.requests == [("https://api.kraken.com/0/public/Trades",
                           {"pair": "XBTUSD", "since": 1717430400 * 10**9 - 1, "count": 1000})]
    assert rows == [(b"BTC-USD", 0, 1717430400, 123_456_000, 67010.1, 0.015, 1, Z, Z),
                    (b"BTC-USD", 0, 1717430400, 567_890_000, 67010.0, 0.25, 2, Z, Z)]


def test_kraken_float_times_to_the_microsecond(old_times):
    rng = random.Random(9)
    for _ in range(20000):
        text = "%d.%06d" % (rng.randrange(1_500_000_000, int(time.time())), rng.randrange(1_000_000))
        assert micro_seconds_float(orjson.loads(text)) == rec.from_decimal_seconds(text), text
    # the documented example has 7 digits: a double keeps about 7, we keep the nearest microsecond
    assert micro_seconds_float(1717430400.1234567) == (1717430400, 123_457_000)
    assert micro_seconds_float("1717430400.1234567") == (1717430400, 123_456_700)  # text stays exact
    for bad in (True, None, float("nan"), -1.0, [1]):
        with pytest.raises(base.Refused):
            micro_seconds_float(bad)


def test_rows_failing_the_field_checks_are_skipped_and_counted(bucket):
    ad = make_adapter("binance")
    now = int(time.time() * 1000)
    page = [{"id": 11, "price": "1.5", "qty": "2", "time": now, "isBuyerMaker": False},
            {"id": 12, "price": "-1", "qty": "2", "time": now, "isBuyerMaker": False},
            {"id": 13, "price": "1.5", "qty": "2", "time": 1000, "isBuyerMaker": False},
            {"id": 14, "price": "1.5", "time": now, "isBuyerMaker": False},
            {"id": 15, "price": "1.5", "qty": "2", "time": now, "isBuyerMaker": "yes"},
            {"id": 16, "price": "1.5", "qty": "2", "time": now, "isBuyerMaker": True}]
    client, _ = client_for(ad, bucket, replies(Resp(200, page)))
    rows = ad.fetch_history(client, INFOS["binance"], (10, 0, 0), (17, 0, 0), None)
    assert [r[1] for r in rows] == [11, 16]
    assert rows.skipped == {"bad_price": 1, "bad_time": 1, "missing_field": 2}


# -- windows and paging (scripted exchanges) -------------------------------------------------------------


def test_binance_pages_until_the_next_trade_and_keeps_the_window(bucket):
    ad = make_adapter("binance")
    now = int(time.time() * 1000)
    trades = {i: {"id": i, "price": "100", "qty": "1", "time": now, "isBuyerMaker": i % 2 == 0}
              for i in range(1000, 5000)}

    def handler(url, params):
        return Resp(200, [trades[i] for i in range(params["fromId"], params["fromId"] + params["limit"]) if i in trades])

    client, s = client_for(ad, bucket, handler)
    rows = ad.fetch_history(client, INFOS["binance"], (1100, 0, 0), (3300, 0, 0), None)
    assert [r[1] for r in rows] == list(range(1101, 3300))
    assert [p["fromId"] for _, p in s.requests] == [1101, 2101, 3101]
    client, s = client_for(ad, bucket, handler)
    assert ad.fetch_history(client, INFOS["binance"], (1100, 0, 0), (1101, 0, 0), None) == []
    assert s.requests == []  # no gap between consecutive ids: no request


def test_coinbase_stops_without_cb_after(old_times, bucket):
    ad = make_adapter("coinbase")
    page = [{"time": "2024-06-03T16:00:01Z", "trade_id": i, "price": "1", "size": "1", "side": "buy"}
            for i in range(109, 104, -1)]
    client, s = client_for(ad, bucket, replies(Resp(200, page)))  # no CB-AFTER header
    rows = ad.fetch_history(client, INFOS["coinbase"], (100, 0, 0), (110, 0, 0), None)
    assert [r[1] for r in rows] == [105, 106, 107, 108, 109] and len(s.requests) == 1


def test_okx_walks_back_with_the_oldest_id(bucket):
    ad = make_adapter("okx")
    now = str(int(time.time() * 1000))

    def handler(url, params):
        ids = range(params["after"] - 1, max(params["after"] - 1 - params["limit"], 0), -1)
        return Resp(200, {"code": "0", "msg": "", "data": [
            {"instId": "BTC-USDT", "tradeId": str(i), "px": "1", "sz": "1", "side": "buy", "ts": now} for i in ids]})

    client, s = client_for(ad, bucket, handler)
    rows = ad.fetch_history(client, INFOS["okx"], (1000, 0, 0), (1250, 0, 0), None)
    assert [r[1] for r in rows] == list(range(1001, 1250))
    assert [p["after"] for _, p in s.requests] == [1250, 1150, 1050]


def test_okx_error_code_is_an_error(bucket):
    ad = make_adapter("okx")
    client, _ = client_for(ad, bucket, replies(Resp(200, {"code": "51001", "msg": "Instrument ID does not exist",
                                                          "data": []})))
    with pytest.raises(HistoryError, match="51001"):
        ad.fetch_history(client, INFOS["okx"], (1000, 0, 0), (1250, 0, 0), None)


def test_bitfinex_pages_by_time_and_dedupes_the_overlap(bucket, monkeypatch):
    ad = make_adapter("bitfinex")
    monkeypatch.setattr(type(ad), "history", dataclasses.replace(ad.history, page_limit=4))
    t0 = int(time.time() * 1000) - 10_000
    trades = [[100 + i, t0 + i // 2, 1.0 if i % 2 else -1.0, 50.0] for i in range(20)]  # two trades per ms

    def handler(url, params):
        return Resp(200, [t for t in trades if params["start"] <= t[1] <= params["end"]][: params["limit"]])

    client, s = client_for(ad, bucket, handler)
    rows = ad.fetch_history(client, INFOS["bitfinex"], (101, *ms(t0)), (117, *ms(t0 + 8)), None)
    assert [r[1] for r in rows] == list(range(102, 117))
    assert [r[6] for r in rows] == [2 if i % 2 == 0 else 1 for i in range(102, 117)]
    assert s.requests[0][1]["start"] == t0 and s.requests[1][1]["start"] == t0 + 1


def test_bitfinex_a_full_page_in_one_millisecond_cannot_page(bucket, monkeypatch):
    ad = make_adapter("bitfinex")
    monkeypatch.setattr(type(ad), "history", dataclasses.replace(ad.history, page_limit=3))
    t0 = int(time.time() * 1000) - 10_000
    client, _ = client_for(ad, bucket, replies(Resp(200, [[100 + i, t0, 1.0, 5.0] for i in range(3)])))
    with pytest.raises(HistoryError, match="cannot page"):
        ad.fetch_history(client, INFOS["bitfinex"], (99, *ms(t0)), (200, *ms(t0 + 5)), None)


def test_kraken_pages_with_last_and_keeps_the_time_window(bucket, monkeypatch):
    ad = make_adapter("kraken")
    monkeypatch.setattr(type(ad), "history", dataclasses.replace(ad.history, page_limit=3))
    t0 = int(time.time()) - 100
    trades = [(t0 * 10**9 + i * 250_000_000, i) for i in range(12)]  # every 0.25 s

    def handler(url, params):
        page = [t for t in trades if t[0] > params["since"]][: params["count"]]
        rows = [["10.5", "2", t / 1e9, "b" if i % 2 else "s", "l", "", 500 + i] for t, i in page]
        return Resp(200, {"error": [], "result": {"XXBTZUSD": rows, "last": str(page[-1][0] if page else params["since"])}})

    client, s = client_for(ad, bucket, handler)
    after, before = (0, t0, 500_000_000), (0, t0 + 2, 0)  # trades 2..8 inclusive
    rows = ad.fetch_history(client, INFOS["kraken"], after, before, None)
    assert [(r[2], r[3]) for r in rows] == [divmod(t, 10**9) for t, i in trades if 2 <= i <= 8]
    assert all(r[1] == 0 for r in rows) and [r[6] for r in rows] == [2, 1, 2, 1, 2, 1, 2]
    # each next page starts just before the last row's time (trades may share a time)
    assert [p["since"] for _, p in s.requests] == [trades[2][0] - 1, trades[4][0] - 1, trades[6][0] - 1,
                                                   trades[8][0] - 1]


def test_kraken_stops_when_last_does_not_move(bucket, monkeypatch):
    ad = make_adapter("kraken")
    monkeypatch.setattr(type(ad), "history", dataclasses.replace(ad.history, page_limit=2))
    t = time.time() - 100
    since = int(t) * 10**9 - 1
    rows = [["1", "1", t, "b", "l", "", 1], ["1", "1", t, "b", "l", "", 2]]
    client, s = client_for(ad, bucket, replies(Resp(200, {"error": [], "result": {"XXBTZUSD": rows,
                                                                                  "last": str(since)}})))
    out = ad.fetch_history(client, INFOS["kraken"], (0, int(t), 0), (0, int(t) + 10, 0), None)
    assert len(s.requests) == 1 and len(out) == 2


# -- the client: limits, pauses, retries, errors ---------------------------------------------------------


def test_retry_after_values():
    assert retry_after({"Retry-After": "7"}) == 7.0
    assert retry_after({"Retry-After": "0.25"}) == 0.25
    assert retry_after({"Retry-After": "5000"}) == 300.0  # capped
    assert retry_after({"Retry-After": "-3"}) == 0.0
    assert retry_after({}) is None and retry_after({"Retry-After": "soon"}) is None
    assert retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now_wall=1445412480.0) == 10.0


@pytest.mark.parametrize("status", [429, 418])
def test_a_rate_limit_answer_pauses_until_retry_after(bucket, status):
    seen = {}

    def handler(url, params):
        if "limited_at" not in seen:
            seen["limited_at"] = time.monotonic()
            return Resp(status, {"code": -1003, "msg": "Too many requests"}, {"Retry-After": "0.3"})
        return Resp(200, [])

    client, s = client_for(make_adapter("binance"), bucket, handler)
    assert client.get("http://x/api/v3/historicalTrades")[0] == []
    assert s.stamps[1] >= seen["limited_at"] + 0.3  # no request before Retry-After ran out
    assert client.calls == 2 and client.pauses == 1


def test_the_pause_stops_other_callers(bucket):
    def handler(url, params):
        return Resp(429, {"message": "Public rate limit exceeded"}, {"Retry-After": "120"})

    client, _ = client_for(make_adapter("coinbase"), bucket, handler)
    with pytest.raises(HistoryDeadline):
        client.get("http://x/products/BTC-USD/trades", deadline=time.monotonic() + 60)  # 120 s > deadline: gives up
    other = SharedBucket(bucket.path, rate=1000.0, burst=1000.0)
    assert other.paused_for() > 100 and other.try_acquire() > 100
    other.close()


def test_without_retry_after_the_adapter_default_pause_applies(bucket):
    ad = quick("coinbase", pause=0.2)
    marks = {}

    def handler(url, params):
        if not marks:
            marks["at"] = time.monotonic()
            return Resp(429, {"message": "Public rate limit exceeded"})
        return Resp(200, [1])

    client, s = client_for(ad, bucket, handler)
    assert client.get("http://x")[0] == [1]
    assert s.stamps[1] >= marks["at"] + 0.2


@pytest.mark.parametrize("name,limited", [
    ("okx", (200, {"code": "50011", "msg": "Rate limit reached. Please refer to API documentation", "data": []})),
    ("okx", (429, {"code": "50011", "msg": "Too Many Requests", "data": []})),
    ("kraken", (200, {"error": ["EGeneral:Too many requests"]})),
    ("bitfinex", (429, ["error", 11010, "ratelimit: error"])),
    ("bitfinex", (200, ["error", 11010, "ratelimit: error"])),
])
def test_rate_limit_bodies_pause_then_retry(bucket, name, limited):
    ad = quick(name, pause=0.15)
    marks = {}

    def handler(url, params):
        if not marks:
            marks["at"] = time.monotonic()
            return Resp(*limited)
        return Resp(200, {"ok": 1})

    client, s = client_for(ad, bucket, handler)
    assert client.get("http://x")[0] == {"ok": 1}
    assert client.calls == 2 and client.pauses == 1
    assert s.stamps[1] >= marks["at"] + 0.15


def test_real_rate_limit_pauses_of_each_adapter():
    assert make_adapter("bitfinex").limited(429, ["error", 11010, "ratelimit: error"], {}) == 60.0
    assert make_adapter("bitfinex").limited(200, [[1, 2, 3, 4]], {}) is None
    assert make_adapter("kraken").limited(200, {"error": ["EGeneral:Too many requests"]}, {}) == 5.0
    assert make_adapter("kraken").limited(200, {"error": ["EQuery:Unknown asset pair"]}, {}) is None
    assert make_adapter("okx").limited(200, {"code": "50011"}, {}) == make_adapter("okx").history.default_pause
    assert make_adapter("okx").limited(200, {"code": "0", "data": []}, {}) is None
    assert make_adapter("coinbase").limited(429, {"message": "x"}, {}) is None


def test_binance_pauses_until_the_next_minute_past_80_percent_weight(monkeypatch):
    import types

    from mdlogger.exchanges import binance

    ad = make_adapter("binance")
    assert ad.after_reply(CaseInsensitiveDict({"X-MBX-USED-WEIGHT-1M": "4799"})) is None
    assert ad.after_reply(CaseInsensitiveDict({})) is None
    assert ad.after_reply(CaseInsensitiveDict({"X-MBX-USED-WEIGHT-1M": "junk"})) is None
    assert 1.0 < ad.after_reply(CaseInsensitiveDict({"x-mbx-used-weight-1m": "4800"})) <= 61.0
    for into_the_minute in (17.25, 0.0, 59.5):
        now = 60.0 * 28_333_333 + into_the_minute
        monkeypatch.setattr(binance, "time", types.SimpleNamespace(time=lambda: now))
        wait = ad.after_reply(CaseInsensitiveDict({"x-mbx-used-weight-1m": "4800"}))
        assert wait == 60.0 - into_the_minute + 1.0
        assert (now + wait) % 60.0 == 1.0  # one second into the next minute


def test_after_reply_pause_reaches_the_bucket(bucket):
    client, _ = client_for(make_adapter("binance"), bucket,
                           replies(Resp(200, [], {"X-MBX-USED-WEIGHT-1M": "5000"})))
    client.get("http://x")
    assert bucket.paused_for() > 0.5


def test_server_errors_and_connection_errors_are_retried(bucket, monkeypatch):
    monkeypatch.setattr(hist, "BACKOFF_BASE_SECS", 0.001)
    monkeypatch.setattr(hist, "BACKOFF_CAP_SECS", 0.004)
    answers = [Resp(502, b"<html>bad gateway</html>"), requests.ConnectionError("refused"),
               requests.Timeout("slow"), Resp(503, b""), Resp(200, {"ok": True})]
    client, _ = client_for(make_adapter("okx"), bucket, replies(*answers))
    assert client.get("http://x")[0] == {"ok": True}
    assert client.calls == 5 and client.pauses == 0


@pytest.mark.parametrize("status", [400, 403, 404])
def test_other_client_errors_are_not_retried(bucket, status):
    client, _ = client_for(make_adapter("binance"), bucket,
                           replies(Resp(status, b'{"code":-1121,"msg":"Invalid symbol.\xff\n"}')))
    with pytest.raises(HistoryError) as info:
        client.get("http://x")
    assert info.value.status == status and client.calls == 1
    assert "Invalid symbol" in info.value.body and "\\xff" in info.value.body and "\n" not in str(info.value)


def test_oversized_and_invalid_bodies_are_errors(bucket, monkeypatch):
    monkeypatch.setattr(hist, "MAX_BODY_BYTES", 1000)
    client, _ = client_for(make_adapter("binance"), bucket, replies(Resp(200, b"[" + b"1," * 600 + b"1]")))
    with pytest.raises(HistoryError, match="over 1000 bytes"):
        client.get("http://x")
    client, _ = client_for(make_adapter("binance"), bucket, replies(Resp(200, b"<html>")))
    with pytest.raises(HistoryError, match="invalid JSON"):
        client.get("http://x")
    client, _ = client_for(make_adapter("binance"), bucket, replies(Resp(200, b"null")))
    assert client.get("http://x")[0] is None  # JSON null is JSON: the adapter decides


def test_deadline_and_stop(bucket):
    client, s = client_for(make_adapter("binance"), bucket, replies(Resp(200, [])))
    with pytest.raises(HistoryDeadline):
        client.get("http://x", deadline=time.monotonic() - 1)
    stop = threading.Event()
    stop.set()
    client, s = client_for(make_adapter("binance"), bucket, replies(Resp(200, [])), stop=stop)
    with pytest.raises(HistoryDeadline) as info:
        client.get("http://x")
    assert info.value.stopped and s.requests == []


def test_the_bucket_is_paid_before_every_request(tmp_path):
    b = SharedBucket(str(tmp_path / "b.rest"), rate=0.001, burst=50.0)
    client, s = client_for(make_adapter("binance"), b, replies(Resp(200, [])))
    client.get("http://x", cost=25)
    client.get("http://x", cost=25)
    with pytest.raises(HistoryDeadline):
        client.get("http://x", cost=25, deadline=time.monotonic() + 0.05)
    assert len(s.requests) == 2 == client.calls
    b.close()


def test_a_deadline_during_paging_keeps_the_rows_fetched(bucket):
    ad = make_adapter("binance")
    now = int(time.time() * 1000)

    def handler(url, params):
        if params["fromId"] == 1:
            return Resp(200, [{"id": i, "price": "1", "qty": "1", "time": now, "isBuyerMaker": True}
                              for i in range(1, 1001)])
        return Resp(429, b'{"code":-1003}', {"Retry-After": "100"})

    client, _ = client_for(ad, bucket, handler)
    with pytest.raises(HistoryDeadline) as info:
        ad.fetch_history(client, INFOS["binance"], (0, 0, 0), (5000, 0, 0), time.monotonic() + 30)
    assert [r[1] for r in info.value.rows] == list(range(1, 1001)) and info.value.direction == "forward"


# -- against the loopback fakes (mdlogger/fakes) ----------------------------------------------------------

from mdlogger.fakes import fake_class  # noqa: E402

FAKE_INFOS = {
    "binance": SymbolInfo("BTC-USDT", "BTCUSDT", "BTC", "USDT"),
    "coinbase": SymbolInfo("BTC-USD", "BTC-USD", "BTC", "USD"),
    "okx": SymbolInfo("BTC-USDT", "BTC-USDT", "BTC", "USDT"),
    "bitfinex": SymbolInfo("BTC-USD", "tBTCUSD", "BTC", "USD"),
    "kraken": SymbolInfo("BTC-USD", "XBT/USD", "BTC", "USD"),
}
PAGES = {"binance": 100, "coinbase": 100, "okx": 100, "bitfinex": 50, "kraken": 100}  # several pages per gap


def expected_row(name: str, e) -> tuple:
    """What fetch_history must return for one trade the fake made (from the fake's own event)."""
    sym = rec.symbol_bytes(FAKE_INFOS[name].symbol)
    if name == "binance":
        return (sym, e["t"], *rec.from_millis(e["T"]), float(e["p"]), float(e["q"]), 2 if e["m"] else 1, Z, Z)
    if name == "coinbase":
        side = 1 if e["side"] == "sell" else 2  # the maker sold: the taker bought
        return (sym, e["trade_id"], *rec.from_iso8601(e["time"]), float(e["price"]), float(e["size"]), side, Z, Z)
    if name == "okx":
        return (sym, int(e["tradeId"]), *rec.from_millis(e["ts"]), float(e["px"]), float(e["sz"]),
                1 if e["side"] == "buy" else 2, Z, Z)
    if name == "bitfinex":
        t = e["trade"]
        return (sym, t[0], *rec.from_millis(t[1]), float(t[3]), abs(t[2]), 1 if t[2] > 0 else 2, Z, Z)
    t = e["trade"]
    return (sym, 0, *rec.from_decimal_seconds(t[2]), float(t[0]), float(t[1]), 1 if t[3] == "b" else 2, Z, Z)


def edge(name: str, e) -> tuple:
    row = expected_row(name, e)
    return (0 if name == "kraken" else row[1], row[2], row[3])


def fake_adapter(name: str, fake, pause: float | None = None, monkeypatch=None):
    settings = fake_settings(fake)
    cls = ADAPTERS[name]
    spec = dataclasses.replace(cls.history, page_limit=PAGES[name],
                               default_pause=cls.history.default_pause if pause is None else pause)
    return type("Test" + cls.__name__, (cls,), {"history": spec})(settings.exchange(name))


def make_history(fake, symbol: str, n: int, step_ns: int, per_instant: int = 1) -> list:
    """``n`` trades spaced ``step_ns`` apart (``per_instant`` sharing each time), ending a minute ago."""
    start = time.time_ns() - 60 * 10**9 - n * step_ns
    times = iter([start + (i // per_instant) * step_ns for i in range(n)])
    fake.clock_ns = lambda: next(times)
    fake.push_trades(symbol, n)
    del fake.clock_ns
    return fake.made_trades(symbol)


def started(name: str, **kw):
    return fake_class(name)(symbols=[FAKE_INFOS[name].symbol], mode="script", **kw).start()


STEP_NS = {"binance": 10**6, "coinbase": 1000, "okx": 10**6, "bitfinex": 10**6, "kraken": 10**6}
PER_INSTANT = {"binance": 2, "coinbase": 1, "okx": 3, "bitfinex": 3, "kraken": 1}


@pytest.mark.parametrize("name", sorted(FAKE_INFOS))
def test_exact_windows_against_the_fakes(name, bucket):
    with started(name, **({"rest_rate": 1000.0, "rest_burst": 1000} if name in ("coinbase", "kraken") else {})) as fake:
        made = make_history(fake, FAKE_INFOS[name].symbol, 450, STEP_NS[name], PER_INSTANT[name])
        ad = fake_adapter(name, fake)
        with HistoryClient(ad, bucket) as client:
            rows = ad.fetch_history(client, FAKE_INFOS[name], edge(name, made[37]), edge(name, made[411]),
                                    time.monotonic() + 60)
        window = made[37:412] if name == "kraken" else made[38:411]  # Kraken: by time, both edges included
        assert rows == [expected_row(name, e) for e in window]
        assert not rows.skipped
        assert client.calls >= 3 and all(status == 200 for _, _, status in fake.rest_log)


def _requests_after_limits(log, limited) -> list[float]:
    """Seconds between each rate-limited answer and the next request."""
    return [log[i + 1][0] - log[i][0] for i in range(len(log) - 1) if limited(log[i])]


def test_binance_429_is_honoured_and_never_becomes_418(bucket):
    with started("binance", weight_limit=100, weight_window=3.0) as fake:  # 4 history calls in 3 s
        made = make_history(fake, "BTC-USDT", 700, 10**6)
        ad = fake_adapter("binance", fake)
        with HistoryClient(ad, bucket) as client:
            rows = ad.fetch_history(client, FAKE_INFOS["binance"], edge("binance", made[0]),
                                    edge("binance", made[-1]), time.monotonic() + 60)
        assert [r[1] for r in rows] == [fake.trade_key(e) for e in made[1:-1]]
        statuses = [status for _, _, status in fake.rest_log]
        assert 429 in statuses and 418 not in statuses
        assert fake.violations == []  # the fake records any request before a 429's window ended
        assert client.pauses == statuses.count(429)


@pytest.mark.parametrize("name,limits,pause", [
    ("coinbase", {"rest_rate": 2.0, "rest_burst": 2}, 0.3),
    ("okx", {"history_limit": 2, "history_window": 0.3}, 0.35),
    ("bitfinex", {"hist_limit": 2, "hist_window": 0.3, "block_secs": 0.3}, 0.35),
])
def test_429_pauses_every_request_until_the_block_ends(name, limits, pause, bucket):
    with started(name, **limits) as fake:
        made = make_history(fake, FAKE_INFOS[name].symbol, 400, STEP_NS[name], PER_INSTANT[name])
        ad = fake_adapter(name, fake, pause=pause)
        with HistoryClient(ad, bucket) as client:
            rows = ad.fetch_history(client, FAKE_INFOS[name], edge(name, made[0]), edge(name, made[-1]),
                                    time.monotonic() + 60)
        assert rows == [expected_row(name, e) for e in made[1:-1]]
        gaps = _requests_after_limits(fake.rest_log, lambda entry: entry[2] == 429)
        assert gaps and client.pauses == len(gaps)
        assert min(gaps) >= pause  # nothing was sent before the pause ended
        assert getattr(fake, "violations", []) == []


def test_kraken_too_many_requests_under_http_200_pauses(bucket):
    with started("kraken", rest_rate=1000.0, rest_burst=1000) as fake:
        made = make_history(fake, "BTC-USD", 150, 10**6)
        fake.rest_failures = 1  # the first request is answered {"error":["EGeneral:Too many requests"]}
        ad = fake_adapter("kraken", fake, pause=0.3)
        with HistoryClient(ad, bucket) as client:
            rows = ad.fetch_history(client, FAKE_INFOS["kraken"], edge("kraken", made[0]), edge("kraken", made[-1]),
                                    time.monotonic() + 60)
        assert rows == [expected_row("kraken", e) for e in made]
        assert client.pauses == 1 and fake.rest_log[1][0] - fake.rest_log[0][0] >= 0.3


@pytest.mark.parametrize("name,unknown", [
    ("binance", SymbolInfo("NOPE-USDT", "NOPEUSDT", "NOPE", "USDT")),
    ("coinbase", SymbolInfo("NOPE-USD", "NOPE-USD", "NOPE", "USD")),
    ("okx", SymbolInfo("NOPE-USDT", "NOPE-USDT", "NOPE", "USDT")),
    ("bitfinex", SymbolInfo("NOPE-USD", "tNOPEUSD", "NOPE", "USD")),  # HTTP 500 ["error",10020,...]: not retried
    ("kraken", SymbolInfo("NOPE-USD", "NOPE/USD", "NOPE", "USD")),
])
def test_an_unknown_symbol_is_an_error_at_once(name, unknown, bucket):
    with started(name) as fake:
        ad = fake_adapter(name, fake)
        with HistoryClient(ad, bucket) as client:
            now = int(time.time()) - 60
            with pytest.raises(HistoryError):
                ad.fetch_history(client, unknown, (10, now, 0), (2000, now + 1, 0), time.monotonic() + 60)
        assert client.calls == 1
