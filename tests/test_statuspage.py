"""The status page at ``GET /``.

The main test runs the real service against loopback fake exchanges and looks
at the page in headless Chromium, as a person would: the text on screen, the
colours, and that it keeps itself up to date without a reload. The others
check escaping and formatting on pages rendered from a ``ServiceView`` built
here, from real counter blocks, as the supervisor publishes it.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import pytest

from mdlogger import statuspage
from mdlogger.analytics import Analytics
from mdlogger.stats import WORKER_FIELDS, WRITER_FIELDS, Block, Note
from mdlogger.view import ExchangeView, ServiceView, SlotView, WriterView
from mdlogger.web import build_app

from helpers import fast_logger, fast_section, service, wait_for
from helpers.browser import Chromium, find_chromium

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# -- a published view, as the supervisor builds it -------------------------------------------


def service_view(slots=(), exchanges=(), now=None):
    now = time.time() if now is None else now
    writer_stats = Block(WRITER_FIELDS)
    writer_stats.set("pid", 4242)
    writer_stats.set("rows", 1234567)
    writer_stats.set("bytes_written", 3 * 1024 * 1024)
    writer_stats.set("last_flush", now - 0.5)
    return ServiceView(started=now - 3725, pid=4321, stall_timeout_secs=10.0, slots=tuple(slots),
                       writer=WriterView("running", 0, "", 0, writer_stats), exchanges=tuple(exchanges))


def slot(exchange, shard, symbols, state="running", connected=True, note=""):
    stats = Block(WORKER_FIELDS)
    stats.set("pid", 1000 + shard)
    stats.set("connected", 1.0 if connected else 0.0)
    stats.set("last_message", time.time() - 0.2)
    stats.set("rate", 12.345)
    stats.set("reconnects", 2)
    n = Note()
    n.set(note)
    names = tuple("S%d-X" % i for i in range(symbols))
    return SlotView(slot=shard, exchange=exchange, shard=shard, symbol_names=names, state=state, restarts=1,
                    reason="", stats=stats, note=n)


def exchange(name, symbols, state="running", error=""):
    return ExchangeView(name=name, state=state, error=error, symbols=symbols, uncovered_symbols=0,
                        refused_symbols=())


def test_page_headers_and_structure():
    view = service_view([slot("okx", 0, 4, connected=False), slot("binance", 1, 1, state="backoff", connected=False),
                         slot("binance", 0, 2)],
                        [exchange("binance", 3), exchange("okx", 4)])
    resp = build_app(lambda: view, Analytics(60)).test_client().get("/")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    page = resp.get_data(as_text=True)
    assert page.startswith("<!doctype html>")
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in page
    assert page.count("<main>") == 1 and page.count("</main>") == 1
    # nothing outside the page itself: no src or href attributes, no URL in the markup or style
    assert not re.search(r"\b(src|href)\s*=", page) and "http://" not in page and "https://" not in page
    assert page.count('<tr class="shard"') == 3
    assert re.findall(r'<tr class="shard" data-exchange="(\w+)" data-shard="(\d+)">', page) == [
        ("binance", "0"), ("binance", "1"), ("okx", "0")]
    assert '<td class="state warn">backoff</td>' in page
    assert '<td class="state good">running</td>' in page
    assert '<td class="state warn">running (disconnected)</td>' in page  # amber, not green
    assert 'id="writer"' in page and "1,234,567" in page and "3.0 MiB" in page
    assert "up 1h 02m" in page
    assert "no trades in the last complete interval yet" in page


def test_every_dynamic_string_is_escaped():
    evil = '<img src=x onerror="alert(1)">'
    engine = Analytics(60)
    now = time.time()
    t = int(now) - 60  # the last complete interval
    engine.add("x&y", evil, [(t, 0, 87012.345, 0.5, 1), (t, 0, 87013.0, 0.25, 2)])
    view = service_view([slot("x&y", 0, 2, note=evil)],
                        [exchange("x&y", 2), exchange("kraken", 0, state="fatal", error=evil)], now=now)
    page = statuspage.status_page(view, now, engine.report(now))
    assert evil not in page and "<img" not in page
    assert html_escaped(evil) in page
    assert 'data-exchange="x&amp;y"' in page and ">x&amp;y<" in page
    assert '<td class="state bad">fatal (%s)</td>' % html_escaped(evil) in page  # an exchange with no shard
    assert "refused: %s" % html_escaped(evil) in page
    assert '<tr class="symbol" data-exchange="x&amp;y" data-symbol="%s">' % html_escaped(evil) in page
    assert "87,013.00" in page  # last price
    assert "87,012.56" in page  # VWAP: (87012.345 * 0.5 + 87013 * 0.25) / 0.75


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


@pytest.mark.parametrize("value, text", [(None, "\u2014"), (0, "0s"), (59.9, "59s"), (61, "1m 01s"),
                                         (3600 * 5 + 60 * 7, "5h 07m"), (86400 * 3 + 3600 * 4, "3d 04h")])
def test_durations(value, text):
    assert statuspage.fmt_duration(value) == text


@pytest.mark.parametrize("value, text", [(None, "\u2014"), (float("nan"), "\u2014"), (87012.3456, "87,012.35"),
                                         (3101.28701, "3,101.29"), (140.123456, "140.1235"),
                                         (0.160423456, "0.160423"), (0.0000123456, "1.23456e-05")])
def test_prices(value, text):
    assert statuspage.fmt_price(value) == text


def test_intervals():
    assert [statuspage.fmt_interval(x) for x in (2, 60, 90, 300, 3600)] == ["2 s", "1 min", "90 s", "5 min", "1 h"]


def test_bytes_and_ages():
    assert statuspage.fmt_bytes(0) == "0 B"
    assert statuspage.fmt_bytes(1536) == "1.5 KiB"
    assert statuspage.fmt_bytes(5 * 1024 ** 4) == "5.0 TiB"
    assert statuspage.fmt_age(None) == "\u2014"
    assert statuspage.fmt_age(0.26) == "0.3 s"
    assert statuspage.fmt_age(125) == "2m 05s"


# -- the real service, seen in a browser ------------------------------------------------------

BINANCE_SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
COINBASE_SYMBOLS = ["BTC-USD", "ETH-USD"]

# What a person sees, gathered in the page: the text on screen and the rows of each table.
SEEN = """(() => {
  const cells = tr => Array.from(tr.cells, td => td.innerText.trim());
  const running = document.querySelector('#shards td.state.good');
  return {
    text: document.body.innerText,
    updated: (document.getElementById('updated') || {}).textContent,
    status: (document.getElementById('status') || {}).textContent,
    shards: Array.from(document.querySelectorAll('tr.shard'),
                       tr => ({exchange: tr.dataset.exchange, shard: tr.dataset.shard, cells: cells(tr)})),
    writer: Array.from(document.querySelectorAll('tr.writer'), cells),
    active: Array.from(document.querySelectorAll('tr.symbol'),
                       tr => ({exchange: tr.dataset.exchange, symbol: tr.dataset.symbol, cells: cells(tr)})),
    runningColor: running ? getComputedStyle(running).color : null,
    sameDocument: window.__sameDocument === true,
    stale: document.body.classList.contains('stale'),
    resources: performance.getEntriesByType('resource').map(e => e.name),
  };
})()"""

# shard row: exchange, shard, symbols, state, msgs/s, since last msg, reconnects, restarts, symbol names
STATE, RATE, SINCE, NAMES = 3, 4, 5, 8
# most active row: exchange, symbol, last price, VWAP, trades, trades today
LAST_PRICE, TODAY = 2, 5


def number(text: str) -> float:
    return float(text.replace(",", ""))


def complete(seen: dict) -> bool:
    """Every shard running and receiving, the writer running, and trades in the most-active table."""
    return (len(seen["shards"]) == 3
            and all(s["cells"][STATE] == "running" and s["cells"][SINCE] != "\u2014" for s in seen["shards"])
            and len(seen["writer"]) == 1 and seen["writer"][0][0] == "running"
            and len(seen["active"]) >= 1)


@pytest.fixture
def chromium_path():
    path = find_chromium()
    if not path:
        pytest.skip("chromium is not installed: run scripts/install-test-deps (or set MDLOGGER_CHROMIUM)")
    return path


@pytest.fixture
def fakes():
    from mdlogger.fakes.binance import FakeBinance
    from mdlogger.fakes.coinbase import FakeCoinbase

    started = [FakeBinance(symbols=BINANCE_SYMBOLS, mode="steady", rate=8, ping_interval=1.0),
               FakeCoinbase(symbols=COINBASE_SYMBOLS, mode="steady", rate=8)]
    try:
        for fake in started:
            fake.start()
        yield started
    finally:
        for fake in started:
            fake.stop()


@pytest.mark.slow
def test_status_page_in_a_browser(tmp_path, chromium_path, fakes):
    binance, coinbase = fakes
    data = os.path.join(str(tmp_path), "data")
    config = {
        # a 2 s analytics interval, so the most-active table fills within the test
        "logger": fast_logger(data, analytics_interval_secs=2),
        "exchanges": {
            "binance": fast_section(binance, BINANCE_SYMBOLS, symbols_per_connection=2),
            "coinbase": fast_section(coinbase, COINBASE_SYMBOLS),
        },
    }
    with service(tmp_path, config) as svc:
        with Chromium(chromium_path, width=1200, height=900) as browser:
            svc.wait_all_connected(3, timeout=30)
            url = "http://127.0.0.1:%d/" % svc.health_port()
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
                assert resp.headers["Cache-Control"] == "no-store"

            browser.navigate(url)
            browser.evaluate("window.__sameDocument = true")  # gone if the page were reloaded
            first = browser.evaluate(SEEN)
            assert first["text"].startswith("mdlogger")

            # The page fills in and keeps itself current, without a reload by the test.
            def filled_in_and_refreshed():
                seen = browser.evaluate(SEEN)
                return seen if complete(seen) and seen["updated"] != first["updated"] else None

            seen = wait_for(filled_in_and_refreshed, timeout=15, interval=0.2, what="the page to fill in and refresh",
                            explain=lambda: "the page: %r\nservice log:\n%s" % (
                                {k: v for k, v in browser.evaluate(SEEN).items() if k != "text"}, svc.log_text()[-3000:]))
            assert seen["sameDocument"], "the page was reloaded instead of updated in place"
            assert not seen["stale"]

            text = seen["text"]
            assert re.search(r"updated \d\d:\d\d:\d\d UTC", text)
            assert seen["status"] == "ok"
            assert {(s["exchange"], s["shard"]) for s in seen["shards"]} == {
                ("binance", "0"), ("binance", "1"), ("coinbase", "0")}
            for s in seen["shards"]:
                assert s["cells"][0] == s["exchange"] and s["cells"][0] in text
                assert re.fullmatch(r"\d+\.\d", s["cells"][RATE])  # a rate (msgs/s), not a dash
            assert sorted(s["cells"][2] for s in seen["shards"]) == ["1", "2", "2"]
            names = sorted(n for s in seen["shards"] for n in s["cells"][NAMES].split(", "))
            assert names == sorted(BINANCE_SYMBOLS + COINBASE_SYMBOLS)
            assert seen["runningColor"] == "rgb(26, 127, 55)"  # green
            writer = seen["writer"][0]
            assert writer[0] == "running" and int(writer[1]) > 0 and number(writer[2]) > 0
            for row in seen["active"]:
                assert row["symbol"] in BINANCE_SYMBOLS + COINBASE_SYMBOLS and row["symbol"] in text
                assert number(row["cells"][LAST_PRICE]) > 0 and number(row["cells"][TODAY]) >= 1
            # it fetched itself again, and everything it loaded came from the service
            assert url in seen["resources"] and all(r.startswith(url) for r in seen["resources"]), seen["resources"]

            # A figure on screen changes too, again in place.
            rows_before = writer[2]
            browser.wait_until("document.querySelector('tr.writer td:nth-child(3)').innerText !== %s"
                               % json.dumps(rows_before), timeout=8, what="rows written to change")
            assert browser.evaluate("window.__sameDocument === true")

            png = browser.screenshot()

            # With the service gone, the page says its figures are not current (and keeps the last ones).
            assert svc.stop() == 0
            browser.wait_until("document.body.classList.contains('stale')", timeout=10, what="the stale banner")
            text = browser.evaluate("document.body.innerText")
            assert "cannot reach the service" in text and "binance" in text
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width >= 800 and height >= 300
        (tmp_path / "status-page.png").write_bytes(png)
        if os.environ.get("MDLOGGER_SCREENSHOT"):
            with open(os.environ["MDLOGGER_SCREENSHOT"], "wb") as fh:
                fh.write(png)


def test_many_symbols_are_shortened_on_the_page():
    from mdlogger.statuspage import names_text

    assert names_text({"symbol_names": ["A-X", "B-X"]}) == "A-X, B-X"
    assert names_text({"symbol_names": ["S%d-X" % i for i in range(200)]}) == (
        "S0-X, S1-X, S2-X, S3-X, S4-X, S5-X +194 more")
    assert names_text({}) == ""
