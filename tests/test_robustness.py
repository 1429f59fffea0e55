"""Issue 10, the supervisor's side: threads that never silently go, discovery that survives any listing
and says why it fails, ASCII-only symbols, logs and /health that cannot be flooded or forged, and a
/health that says "degraded" (and why) when the disk is full or a configured symbol is refused.

Each test names the reproduction it stands for. Everything runs in this process (threads are run a
step at a time, clocks are given) except the last test, which runs the real service.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from mdlogger import listing, planning
from mdlogger import records as rec
from mdlogger.analytics import Analytics, AnalyticsThread, Window, format_table, ratio
from mdlogger.health import LIST_SHOWN, health_document
from mdlogger.logs import PipeHandler, Throttle
from mdlogger.metrics import render_metrics
from mdlogger.planning import DiscoveryThread, ExchangeState, ExchangeStatus, resolve_symbols, take_discoveries
from mdlogger.rest import RestClient, RestError, cause_of
from mdlogger.stats import WORKER_FIELDS, WRITER_FIELDS, Block, Note
from mdlogger.storage import TableFiles, TableKey
from mdlogger.view import ExchangeView, ServiceView, SlotView, WriterView
from mdlogger.web import build_app
from mdlogger.worker import WorkerSink

from helpers import FakeRest, make_adapter, service, service_config, wait_for

T0 = 1_700_000_000
BUY, SELL = rec.SIDE_BUY, rec.SIDE_SELL


# -- views as the supervisor publishes them -------------------------------------------------------------


def slot_view(exchange="binance", shard=0, note="", receiving=True, refused_count=0):
    stats = Block(WORKER_FIELDS)
    stats.set("pid", 1000 + shard)
    stats.set("connected", 1.0 if receiving else 0.0)
    stats.set("last_message", time.time())
    stats.set("refused_symbols", refused_count)
    n = Note()
    n.set(note)
    return SlotView(slot=shard, exchange=exchange, shard=shard, symbol_names=("BTC-USDT",), state="running",
                    restarts=0, reason="", stats=stats, note=n)


def writer_view(state="running", **kw):
    stats = Block(WRITER_FIELDS)
    stats.set("pid", 4242)
    for key, value in kw.pop("stats", {}).items():
        stats.set(key, value)
    return WriterView(state, 0, "", 0, stats, **kw)


def service_view(slots=(), exchanges=None, writer=None, threads=()):
    if exchanges is None:
        exchanges = [ExchangeView("binance", "running", "", 1, 0, ())]
    return ServiceView(started=time.time() - 60, pid=4321, stall_timeout_secs=10.0,
                       slots=tuple(slots) if slots else (slot_view(),), writer=writer or writer_view(),
                       exchanges=tuple(exchanges), threads=tuple(threads))


def metric_lines(view, prefix):
    text = render_metrics(view, time.time()).decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]


# == 1. supervisor threads never silently gone; divisions guarded ========================================


def test_a_zero_row_stored_before_the_fixes_cannot_break_analytics_or_the_page():
    """A size of 1e-50 was stored as 0.0: the VWAP divided by a zero volume, and / and /analytics answered 500."""
    engine = Analytics(60)
    now = time.time()
    t = int(now) - 60
    engine.add_columns("binance", "BTC-USDT", [t, t], [0.0, 87000.0], [0.0, 0.0], [BUY, SELL])  # fast path
    engine.add("binance", "ETH-USDT", [(t, 0, 3000.0, 0.0, BUY), (t, 0, float("nan"), 1.0, SELL),
                                      (t, 0, float("inf"), 1.0, SELL)])  # row by row
    engine.add_columns("okx", "BTC-USDT", [t, t, t], [100.0, 0.0, 102.0], [1.0, 2.0, 1.0], [BUY, SELL, SELL])
    assert engine.unusable_rows == 6
    report = engine.report(now)
    okx = report["exchanges"]["okx"]["BTC-USDT"]["interval"]
    assert okx["trades"] == 2 and okx["vwap"] == 101.0 and okx["buy_sell_ratio"] == 1.0
    view = service_view()
    client = build_app(lambda: view, engine).test_client()
    assert client.get("/analytics").status_code == 200
    assert client.get("/").status_code == 200


def test_every_division_of_the_figures_is_guarded():
    w = Window(T0)
    w.add(T0, 0.0, 0.0, SELL, False)  # what such a row did before it was left out
    f = w.figures()
    assert f["trades"] == 1 and f["vwap"] is None and f["buy_sell_ratio"] is None
    assert ratio(1.0, 0.0) is None and ratio(float("inf"), 1.0) is None and ratio(1e308, 1e-308) is None
    assert ratio(3.0, 2.0) == 1.5
    table = format_table([("binance", "BTC-USDT", f | {"high": 0.0, "low": 0.0})])
    assert "BTC-USDT" in table and " - " in table
    assert Analytics(0).interval == 1  # (a report divides by the interval)


def write_trades(data_path, key, rows):
    files = TableFiles(str(data_path), key)
    cols = list(zip(*rows))
    files.append([struct.pack("<%d%s" % (len(v), c.code), *v) if c.code != "16s" else b"".join(v)
                  for c, v in zip(rec.TRADE_COLUMNS, cols)], len(rows))
    files.close()


class BrokenEngine(Analytics):
    def add_columns(self, *args):
        raise ZeroDivisionError("what a guard missed")


def test_the_analytics_thread_logs_counts_and_goes_on_after_any_failure(tmp_path, caplog):
    key = TableKey("coinbase", "BTC-USD", rec.KIND_TRADES, rec.day_string(T0))
    write_trades(tmp_path, key, [(1, T0 + 1, 0, 100.0, 2.0, BUY, rec.ZERO_ID, rec.ZERO_ID)])
    thread = AnalyticsThread(str(tmp_path), BrokenEngine(60), threading.Event(), clock=lambda: T0 + 5)
    with caplog.at_level(logging.WARNING, "mdlogger.analytics"):
        assert thread.step() == thread.POLL_SECS  # the rows the engine fails on are left out, counted
        assert thread.step() == thread.POLL_SECS  # ... and not read again
    assert thread.errors == 1 and thread.skipped_rows == 1 and thread.offsets[key] == 1
    assert len([r for r in caplog.records if "ZeroDivisionError" in r.getMessage()]) == 1
    assert caplog.records[0].exc_info is not None  # the traceback, once

    def unreadable(*args):
        raise PermissionError(13, "Permission denied")

    caplog.clear()
    thread.poll = unreadable
    with caplog.at_level(logging.WARNING, "mdlogger.analytics"):
        delays = [thread.step() for _ in range(6)]
    assert delays[0] >= thread.POLL_SECS / 2 and delays[-1] > delays[0]  # a capped backoff
    assert max(delays) <= thread.MAX_RETRY_SECS and thread.errors == 7
    assert len(caplog.records) == 1 and "Permission denied" in caplog.records[0].getMessage()  # once a minute
    thread.poll = lambda: 0
    assert thread.step() == thread.POLL_SECS  # back to normal


@pytest.fixture
def supervisor(tmp_path):
    from mdlogger.settings import load_settings
    from mdlogger.supervisor import Supervisor

    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    sup = Supervisor(settings)
    yield sup
    sup.stop_threads.set()
    for status in sup.exchanges.values():
        status.discovery_stop.set()
    if sup.analytics_thread is not None:
        sup.analytics_thread.join(5)


def test_the_supervisor_restarts_a_dead_analytics_thread_where_it_stopped(supervisor, caplog):
    sup = supervisor
    dead = AnalyticsThread(sup.settings.logger.data_path, sup.analytics, sup.stop_threads)
    dead.offsets[TableKey("binance", "BTC-USDT", rec.KIND_TRADES, "01.01.24")] = 7
    dead.errors = 2
    dead.run = lambda: None  # (a thread that ended)
    dead.start()
    dead.join()
    sup.analytics_thread = dead
    with caplog.at_level(logging.ERROR, "mdlogger.supervisor"):
        sup._check_threads()
    fresh = sup.analytics_thread
    assert fresh is not dead and fresh.is_alive() and fresh.offsets == dead.offsets  # no row counted twice
    assert sup.thread_restarts["analytics"] == 1
    assert any("analytics thread ended" in r.getMessage() for r in caplog.records)
    sup._check_threads()
    assert sup.thread_restarts["analytics"] == 1  # a live thread is left alone
    sup._publish_view()
    code, doc = health_document(sup.view, time.time())
    assert doc["thread_restarts"] == 1
    assert doc["threads"]["analytics"] == {"alive": True, "restarts": 1, "errors": 2}
    assert 'mdlogger_thread_restarts_total{thread="analytics"} 1.0' in metric_lines(sup.view, "mdlogger_thread")


def test_the_supervisor_restarts_a_discovery_thread_that_died_without_an_answer(supervisor, monkeypatch):
    sup = supervisor
    rounds = []

    def rounds_(thread):
        rounds.append(thread)
        if len(rounds) == 1:
            raise SystemExit("killed by something no except clause takes")  # (threading ignores SystemExit)
        thread.answered = True
        thread.results.put((thread.xsettings.name, thread.generation, [], ""))

    monkeypatch.setattr(DiscoveryThread, "_rounds", rounds_)
    status = sup.exchanges["binance"]
    sup._discover("binance")
    status.thread.join(5)
    assert status.thread.died_of.startswith("SystemExit: killed")
    sup._check_threads()
    status.thread.join(5)
    assert len(rounds) == 2 and rounds[1].generation == rounds[0].generation and status.thread_restarts == 1
    assert take_discoveries(sup.discovered, sup.exchanges) == [("binance", [])]
    sup._check_threads()
    assert len(rounds) == 2  # answered: nothing to restart
    sup._publish_view()
    assert health_document(sup.view, time.time())[1]["threads"]["discovery"]["restarts"] == 1


# == 2. discovery: any listing, any failure; the cause said once; down since ===========================


def discovery_settings(name="binance"):
    return SimpleNamespace(name=name, reconnect_delay_secs=1.0, max_reconnect_delay_secs=8.0, rest_timeout_secs=1.0,
                           rest_retries=0)


class ScriptedAdapter:
    history = SimpleNamespace(discovery_cost=1.0)

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)

    def discover(self, rest):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def run_discovery(monkeypatch, adapter):
    monkeypatch.setattr(planning, "adapter_for", lambda xs: adapter)
    monkeypatch.setattr(planning, "rest_bucket", lambda path, adapter: SimpleNamespace(close=lambda: None))
    results, waits = queue.Queue(), []
    thread = DiscoveryThread(discovery_settings(), 1, results, lambda: None, threading.Event(), "/nonexistent")
    thread.wait = waits.append  # (the backoff, without waiting)
    thread.run()  # in this thread: it returns with an answer
    out = []
    while not results.empty():
        out.append(results.get_nowait())
    return thread, out, waits


def test_discovery_survives_every_kind_of_failure_and_backs_off(monkeypatch, caplog):
    """A pair_decimals of 2**31 raised OverflowError, which the discovery loop did not catch: the thread died
    and the exchange stayed "discovering" with an empty error."""
    good = listing.Listing([])
    adapter = ScriptedAdapter(OverflowError("cannot fit 'int' into an index-sized integer"),
                              RuntimeError("a bug\nCRITICAL forged"), RestError("GET x: HTTP 503 after 1 attempts"),
                              RuntimeError("again"), good)
    with caplog.at_level(logging.ERROR, "mdlogger.supervisor"):
        thread, results, waits = run_discovery(monkeypatch, adapter)
    assert thread.answered and [r[2] for r in results] == [None, None, None, None, good]
    errors = [r[3] for r in results[:4]]
    assert errors[0] == "OverflowError: cannot fit 'int' into an index-sized integer"
    assert errors[1] == "unexpected RuntimeError: a bug\\nCRITICAL forged"  # escaped: one line
    assert errors[2] == "GET x: HTTP 503 after 1 attempts"
    assert len(waits) == 4 and waits[-1] > waits[0]  # jittered, growing
    lines = [r for r in caplog.records if "symbol discovery failed" in r.getMessage()]
    assert len(lines) == 4 and all("\n" not in r.getMessage() for r in lines)  # one line per round
    # a traceback for the unexpected only, and once a minute per kind
    assert [r.exc_info is not None for r in lines] == [False, True, False, False]
    status = ExchangeStatus("binance", generation=1)
    q = queue.Queue()
    for r in results[:4]:
        q.put(r)
    assert take_discoveries(q, {"binance": status}) == []
    assert status.discovery_errors == 4 and status.error == "unexpected RuntimeError: again"


def test_a_discovery_error_says_its_cause():
    """"ConnectionError after 4 attempts" hid what requests said: Failed to resolve 'api.binance.com'."""
    from urllib3.exceptions import MaxRetryError, NameResolutionError

    reason = NameResolutionError("api.binance.com", "HTTPSConnection(host='api.binance.com', port=443)",
                                 socket.gaierror(-2, "Name or service not known"))
    exc = requests.ConnectionError(MaxRetryError(None, "/api/v3/exchangeInfo", reason))
    assert cause_of(exc) == "Failed to resolve 'api.binance.com' ([Errno -2] Name or service not known)"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RestClient(timeout=2.0, retries=1, sleep=lambda s: None)
    with pytest.raises(RestError) as info:
        client.get_json("http://127.0.0.1:%d/api/v3/exchangeInfo" % port)
    assert str(info.value).endswith("ConnectionError after 2 attempts: " + info.value.cause)
    assert "Connection refused" in info.value.cause and "HTTPConnection" not in info.value.cause


def test_health_shows_since_when_an_exchange_is_discovering_and_why():
    since = time.time() - 90
    error = "GET https://api.binance.com/api/v3/exchangeInfo: ConnectionError after 4 attempts: Failed to resolve"
    view = service_view(slots=[slot_view("okx")],
                        exchanges=[ExchangeView("binance", "discovering", error, 0, 0, (), down_since=since,
                                                discovery_errors=3),
                                   ExchangeView("okx", "running", "", 1, 0, ())])
    code, doc = health_document(view, time.time())
    b = doc["exchanges"]["binance"]
    assert code == 503 and b["down_since"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    assert b["discovery_errors"] == 3 and doc["exchanges"]["okx"]["down_since"] is None
    [reason] = doc["reasons"]
    assert reason["reason"] == "exchange_not_receiving" and reason["exchange"] == "binance" and reason["critical"]
    assert "since %s" % b["down_since"] in reason["detail"] and "Failed to resolve" in reason["detail"]
    page = build_app(lambda: view, Analytics(60)).test_client().get("/").get_data(as_text=True)
    assert "discovering (down since %s; GET" % b["down_since"] in page
    assert any(line.startswith('mdlogger_exchange_down_seconds{exchange="binance"} 9')
               for line in metric_lines(view, "mdlogger_exchange_down_seconds"))


def test_status_down_since_follows_the_plan():
    status = ExchangeStatus("x")
    assert status.state is ExchangeState.DISCOVERING and status.down_since > 0
    adapter = make_adapter("okx")
    info = listing.Listing()
    info.take(lambda i: adapter._symbol_info(i, info), {"instId": "BTC-USDT", "baseCcy": "BTC", "quoteCcy": "USDT",
                                                         "state": "live"})
    status.take(planning.plan_shards(adapter, info, ["BTC-USDT"], [], 10, 1), 10, 1)
    assert status.state is ExchangeState.RUNNING and status.down_since == 0.0


HOSTILE_NUMBERS = [2 ** 31, 10 ** 8, 1e8, -1, True, 1e400, float("nan"), "1e999", "١٠", " 7 ", "1_0", [1] * 5,
                   {"a": 1}, "9" * 5000, 10 ** 5000]


def test_kraken_pair_decimals_and_other_listing_numbers_are_bounded():
    """pair_decimals = 1e8 on five pairs cost 588 MB; 2**31 raised OverflowError."""
    adapter = make_adapter("kraken")
    good = {"wsname": "XBT/USD", "pair_decimals": 1, "ordermin": "0.0001", "status": "online"}
    pairs = {"P%d" % i: dict(good, wsname="C%d/USD" % i, pair_decimals=v, ordermin=v)
             for i, v in enumerate(HOSTILE_NUMBERS)}
    pairs["GOOD"] = good
    out = adapter.discover(FakeRest({"error": [], "result": pairs}))
    assert len(out) == len(HOSTILE_NUMBERS) + 1 and not out.skipped  # bad numbers cost the field, not the pair
    by_name = {s.exchange_name: s for s in out}
    assert by_name["XBT/USD"].tick_size == "0.1" and by_name["XBT/USD"].min_size == "0.0001"
    assert all(s.tick_size == "" for s in out if s.exchange_name != "XBT/USD")
    # as a minimum size, 2**31, 10**8 and 1e8 are bounded numbers (shown as they are); the rest are not
    assert [s.min_size for s in out][:4] == ["2147483648", "100000000", "100000000.0", ""]
    assert out.cleared["tick_size"] == len(HOSTILE_NUMBERS) and out.cleared["min_size"] == len(HOSTILE_NUMBERS) - 3
    assert "fields left empty" in out.summary()


def hostile_listings():
    """(exchange, reply, number of good entries) with every kind of bad entry mixed in."""
    bad_codes = ["US\u017fD", "\u0131NCH", "USD\n", "", 5, None, ["USD"], "US D"]
    binance_ok = {"symbol": "BTCUSDT", "baseAsset": "BTC", "quoteAsset": "USDT", "status": "TRADING",
                  "filters": [{"filterType": "PRICE_FILTER", "tickSize": "0.01"},
                              {"filterType": "LOT_SIZE", "minQty": "0.0001"}]}
    binance = [binance_ok, "junk", [1], {"symbol": "ETHUSDT"},
               dict(binance_ok, symbol="BTCUSDT\n", baseAsset="ETH"),
               dict(binance_ok, symbol="BTC/USDT", baseAsset="XRP"),
               dict(binance_ok, symbol="SOLUSDT", baseAsset="SOL", filters=[{"filterType": []}, "x", None]),
               dict(binance_ok, symbol="ADAUSDT", baseAsset="ADA",
                    filters=[{"filterType": "PRICE_FILTER", "tickSize": 1e400}])]
    binance += [dict(binance_ok, symbol="X%dUSDT" % i, baseAsset=c) for i, c in enumerate(bad_codes)]
    coinbase_ok = {"id": "BTC-USD", "base_currency": "BTC", "quote_currency": "USD", "status": "online",
                   "quote_increment": "0.01", "base_min_size": "0.0001"}
    coinbase = [coinbase_ok, 7, {"id": ["x"]}, dict(coinbase_ok, id="SOL-US\u017fD", base_currency="SOL",
                                                    quote_currency="US\u017fD"),
                dict(coinbase_ok, id="ETH-USD", base_currency="ETH", quote_increment=[0] * 1000)]
    coinbase += [dict(coinbase_ok, id="X%d-USD" % i, base_currency=c) for i, c in enumerate(bad_codes)]
    okx_ok = {"instId": "BTC-USDT", "baseCcy": "BTC", "quoteCcy": "USDT", "state": "live", "instType": "SPOT",
              "tickSz": "0.1", "minSz": "0.00001"}
    okx = [okx_ok, None, dict(okx_ok, instId="SOL-USDT\n", baseCcy="SOL"), dict(okx_ok, instId=""),
           dict(okx_ok, instId="ETH-USDT", baseCcy="ETH", tickSz="1" * 100)]
    okx += [dict(okx_ok, instId="X%d-USDT" % i, baseCcy=c) for i, c in enumerate(bad_codes)]
    bitfinex = [["BTCUSD", "ETHUSD", "SOLUS\u017fD", "BTC:US\u017fDT", 7, None, ["x"], "AB", "ABCDEFG", "BTCUSD",
                 "X Y:USD"]]
    return [("binance", {"symbols": binance}, 3), ("coinbase", coinbase, 2), ("okx", {"code": "0", "data": okx}, 2),
            ("bitfinex", bitfinex, 2)]


@pytest.mark.parametrize("name, reply, good", hostile_listings(), ids=lambda x: x if isinstance(x, str) else "")
def test_discovery_keeps_only_checked_ascii_symbols_and_counts_the_rest(name, reply, good):
    """A quote of US\u017fD became SOL-USSD after upper-casing; a listing entry BTC-USD\\n made a directory."""
    out = make_adapter(name).discover(FakeRest(reply))
    assert len(out) == good, out
    for info in out:
        assert rec.valid_symbol(info.symbol) and info.symbol == "%s-%s" % (info.base, info.quote)
        assert info.symbol.isascii() and info.exchange_name.isascii() and "\n" not in info.exchange_name
        assert len(info.tick_size) <= listing.MAX_AMOUNT_TEXT and len(info.min_size) <= listing.MAX_AMOUNT_TEXT
    assert "USSD" not in {info.quote for info in out}
    assert sum(out.skipped.values()) > 0 and out.summary()


@pytest.mark.parametrize("name, reply", [("binance", []), ("binance", {"symbols": {}}), ("coinbase", {}),
                                         ("kraken", []), ("kraken", {"error": [], "result": []}),
                                         ("kraken", {"error": ["EGeneral:\n" * 400]}), ("bitfinex", {}),
                                         ("okx", {"code": "0", "data": "x"}), ("okx", {"code": 5, "msg": ["x"] * 999})])
def test_a_listing_of_the_wrong_shape_is_one_clear_error(name, reply):
    with pytest.raises(ValueError) as info:
        make_adapter(name).discover(FakeRest(reply))
    assert len(str(info.value)) < 1200


# == 3. normalize only ASCII ================================================================================


def test_normalize_refuses_names_that_are_not_ascii_before_upper_casing():
    assert "SOL-US\u017fD".upper() == "SOL-USSD"  # the trap
    assert make_adapter("coinbase").normalize("SOL-US\u017fD") == ""
    assert make_adapter("coinbase").normalize("sol-usd") == "SOL-USD"
    assert make_adapter("kraken").normalize("SOL/US\u017fD") == ""
    assert make_adapter("kraken").normalize("XBT/USD") == "BTC-USD"
    for name, bad in (("bitfinex", "tSOLUS\u017fD"), ("okx", "SOL-US\u017fD"), ("okx", "\u0131NCH-USDT")):
        with pytest.raises(ValueError):
            make_adapter(name).normalize(bad)
    listed = [planning.SymbolInfo("SOL-USSD", "SOL-USSD", "SOL", "USSD")]
    assert resolve_symbols(make_adapter("coinbase"), listed, ["sol-us\u017fd"]) == ([], [("sol-us\u017fd",
                                                                                            "unknown")])


# == 4. logs and /health not floodable, not forgeable ===========================================================


class CountingSender:
    trades_added = md_added = 0
    add_md = add_snapshot = add_trade = staticmethod(lambda record: None)


def test_twenty_thousand_errors_naming_distinct_symbols_write_a_bounded_number_of_lines(caplog):
    """20,000 error frames naming distinct symbols wrote 20,000 ERROR lines and made /health list them all."""
    stats, note = Block(WORKER_FIELDS), Note()
    sink = WorkerSink(CountingSender(), stats, "coinbase#0", note)
    now = [100.0]
    sink._error_lines = Throttle(60.0, 20, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, "mdlogger.worker"):
        for i in range(20_000):
            sink.exchange_error("Failed to subscribe: S%dX-USD is not a valid product (id %d)" % (i, i),
                                symbol="S%dX-USD" % i)
    assert stats.get("drop_exchange_error") == 20_000
    assert len(caplog.records) == 1  # the symbol and numbers do not make a new kind
    caplog.clear()
    with caplog.at_level(logging.ERROR, "mdlogger.worker"):
        for i in range(5_000):  # kinds that differ in their words: 20 kinds (the one above too), then one more
            sink.exchange_error("unheard-of error %s" % "".join(chr(97 + int(d)) for d in str(i)))
        assert len(caplog.records) == 19 + 1
        now[0] += 61
        sink.exchange_error("Failed to subscribe: Q1-USD is not a valid product (id 1)", symbol="Q1-USD")
    assert "and 19999 more errors like it in the last 61 s" in caplog.records[-1].getMessage()
    view = service_view(slots=[SlotView(slot=0, exchange="binance", shard=0, symbol_names=("BTC-USDT",),
                                        state="running", restarts=0, reason="", stats=stats, note=note)])
    stats.set("connected", 1.0)
    stats.set("last_message", time.time())
    _code, doc = health_document(view, time.time())
    shard = doc["shards"][0]
    assert len(shard["refused_symbols"]) == LIST_SHOWN and shard["refused_symbols_count"] == 200
    x = doc["exchanges"]["binance"]
    assert len(x["refused_by_exchange"]) == LIST_SHOWN and x["refused_by_exchange_count"] == 200
    assert len(json.dumps(doc)) < 20_000


def test_an_exchange_error_cannot_forge_a_log_line(caplog):
    sink = WorkerSink(CountingSender(), Block(WORKER_FIELDS), "kraken#0", Note())
    with caplog.at_level(logging.ERROR, "mdlogger.worker"):
        sink.exchange_error("bad pair\n2024-01-01 00:00:00 CRITICAL supervisor: \x1b[31mforged\x1b[0m\r",
                            symbol="BAD\nSYM")
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and "\x1b" not in line and "\r" not in line and "\\n2024-01-01" in line
    assert sink.refused_symbols == set()  # not a symbol: not on /health either


def test_a_child_log_line_is_one_line_whatever_it_quotes():
    """Text from an exchange (a refused frame's sample, a REST error body, a history error) is logged by a
    child; its pipe handler escapes control characters, so no child line can forge another."""
    r, w = os.pipe()
    try:
        handler = PipeHandler(w)
        record = logging.makeLogRecord({"name": "mdlogger.writer", "levelno": logging.WARNING,
                                        "msg": "backfill failed: %s", "args": ("HTTP 500: \n\x1b[2Jfake CRITICAL",)})
        handler.emit(record)
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            handler.emit(logging.makeLogRecord({"name": "x", "levelno": logging.ERROR, "msg": "a\nb",
                                                "exc_info": sys.exc_info()}))
        lines = os.read(r, 65536).decode().splitlines()
    finally:
        os.close(r)
        os.close(w)
    first, second = (json.loads(line)["m"] for line in lines)
    assert first == "backfill failed: HTTP 500: \\n\\x1b[2Jfake CRITICAL"
    assert second.startswith("a\\nb\nTraceback") and "ValueError: boom" in second  # a traceback keeps its lines


def test_throttle_bounds_lines_and_keys():
    now = [0.0]
    t = Throttle(60.0, 3, clock=lambda: now[0])
    assert [t.admit(k) for k in "abc"] == [(0, 0.0)] * 3
    assert t.admit("a") is None and t.admit("d") == (0, 0.0) and t.admit("e") is None  # d, e share OTHER
    now[0] = 61.0
    assert t.admit("a") == (1, 61.0)
    assert t.admit(Throttle.OTHER) == (1, 61.0)
    assert t.admit("f") == (0, 0.0)  # b and c had nothing held back: their places are free again


def test_configured_symbols_refused_at_discovery_are_listed_with_a_count():
    refused = tuple("S%d-X (unknown)" % i for i in range(100))
    view = service_view(exchanges=[ExchangeView("binance", "running", "", 1, 0, refused)])
    code, doc = health_document(view, time.time())
    x = doc["exchanges"]["binance"]
    assert len(x["refused_symbols"]) == LIST_SHOWN and x["refused_symbols_count"] == 100
    assert code == 200 and doc["status"] == "degraded"
    [reason] = doc["reasons"]
    assert reason["reason"] == "symbols_refused" and not reason["critical"]
    assert reason["detail"].startswith("100 configured symbols refused: S0-X (unknown), ") and reason[
        "detail"].endswith(" ...")


# == 5. /health degraded on a full disk and on refused symbols; which answers 503 =============================


def test_io_errors_make_health_degraded_but_200():
    """The disk was full (129 I/O errors, 7,275 rows in memory) and /health said "ok"."""
    now = time.time()
    view = service_view(writer=writer_view(stats={"io_errors": 129, "pending_rows": 7275, "rows": 10},
                                           last_io_error=now - 3))
    code, doc = health_document(view, now)
    assert code == 200 and doc["status"] == "degraded"
    assert doc["reasons"] == [{"reason": "writer_io_errors", "critical": False,
                               "detail": "129 I/O errors, the last 3 s ago; 7275 rows held in memory"}]
    lines = metric_lines(view, "mdlogger_health_degraded")
    assert 'mdlogger_health_degraded{critical="false",reason="writer_io_errors"} 1.0' in lines
    assert 'mdlogger_health_degraded{critical="true",reason="writer_not_writing"} 0.0' in lines
    old = service_view(writer=writer_view(stats={"io_errors": 129}, last_io_error=now - 301))
    assert health_document(old, now)[1]["status"] == "ok"  # errors long past: ok again
    page = build_app(lambda: view, Analytics(60)).test_client().get("/").get_data(as_text=True)
    assert '<li class="warn">writer_io_errors: 129 I/O errors' in page


def test_a_writer_that_stopped_writing_answers_503():
    now = time.time()
    view = service_view(writer=writer_view(stats={"io_errors": 500, "pending_rows": 9000}, last_io_error=now,
                                           stalled_since=now - 61, stall_limit_secs=60.0))
    code, doc = health_document(view, now)
    assert code == 503 and [r["reason"] for r in doc["reasons"]] == ["writer_not_writing", "writer_io_errors"]
    assert doc["reasons"][0]["detail"] == "9000 rows waiting, none written for 61 s"
    assert health_document(service_view(writer=writer_view(state="backoff")), now)[0] == 503
    ok = service_view(writer=writer_view(stats={"pending_rows": 10}, stalled_since=now - 5))
    assert health_document(ok, now)[0] == 200 and health_document(ok, now)[1]["status"] == "ok"


def test_the_supervisor_notes_io_errors_and_a_stalled_writer(supervisor, monkeypatch):
    sup = supervisor
    clock = [1000.0]
    monkeypatch.setattr("mdlogger.supervisor.time.time", lambda: clock[0])
    stats = sup.writer.stats
    stats.set("pending_rows", 5)
    sup._watch_writer()
    assert sup.last_io_error == 0.0 and sup.write_stalled_since == 1000.0  # rows waiting, none written yet
    stats.set("rows", 5)
    stats.set("pending_rows", 0)
    clock[0] = 1001.0
    sup._watch_writer()
    assert sup.write_stalled_since == 0.0
    stats.set("io_errors", 3)
    stats.set("pending_rows", 70)
    clock[0] = 1002.0
    sup._watch_writer()
    clock[0] = 1100.0
    sup._watch_writer()
    assert sup.last_io_error == 1002.0 and sup.write_stalled_since == 1002.0
    sup._publish_view()
    assert sup.view.writer.last_io_error == 1002.0 and sup.view.writer.stalled_since == 1002.0


def test_the_service_says_degraded_for_a_refused_symbol_and_why_an_exchange_is_down(tmp_path):
    """Against the real service: a configured symbol the exchange does not list gives 200 "degraded" with the
    reason; an exchange whose REST endpoint refuses connections gives 503, "down since" and the cause."""
    from mdlogger.fakes.binance import FakeBinance

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with FakeBinance(symbols=["BTC-USDT"], mode="steady", rate=5) as fake:
        config = service_config(os.path.join(str(tmp_path), "data"), [fake], symbols=["BTC-USDT", "NOPE-USDT"])
        with service(tmp_path, config) as svc:
            doc = wait_for(lambda: (lambda c, d: d if d["exchanges"]["binance"]["healthy"] else None)(*svc.health()),
                           30, 0.1, "binance receiving")
            code, doc = svc.health()
            assert code == 200 and doc["status"] == "degraded"
            assert [(r["reason"], r["exchange"]) for r in doc["reasons"]] == [("symbols_refused", "binance")]
            assert "NOPE-USDT (unknown)" in doc["reasons"][0]["detail"]
            assert svc.stop() == 0
        config["exchanges"]["okx"] = {"enabled": True, "rest_endpoint": "http://127.0.0.1:%d" % closed,
                                      "ws_endpoint": "ws://127.0.0.1:%d" % closed, "symbols": ["BTC-USDT"],
                                      "rest_retries": 0, "reconnect_delay_secs": 0.1,
                                      "max_reconnect_delay_secs": 0.5}
        config["exchanges"]["binance"]["symbols"] = ["BTC-USDT"]
        with service(tmp_path, config) as svc:
            def okx_failed():
                code, doc = svc.health()
                return (code, doc) if doc["exchanges"]["okx"]["error"] else None

            code, doc = wait_for(okx_failed, 30, 0.1, "the okx discovery error on /health")
            okx = doc["exchanges"]["okx"]
            assert code == 503 and okx["state"] == "discovering" and okx["down_since"]
            assert "Connection refused" in okx["error"] and "after 1 attempts: " in okx["error"]
            reasons = [r for r in doc["reasons"] if r["reason"] == "exchange_not_receiving"]
            assert [r["exchange"] for r in reasons if "okx" == r["exchange"]] == ["okx"]
            assert svc.stop() == 0
            assert svc.log_text().count("okx: symbol discovery failed") >= 1
