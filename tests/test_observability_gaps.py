"""Gap and clock figures on /health, /metrics and the status page, and the clock sampler.

Everything runs in process: a ``ServiceView`` built here carries real stats
blocks (the ones the workers and the writer fill in), so the documents are
rendered by the same code as in the service.
"""

from __future__ import annotations

import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mdlogger import clock, statuspage
from mdlogger.analytics import Analytics
from mdlogger.clock import ClockSampler, clock_note, combine, quantile
from mdlogger.exchanges.base import MAX_FUTURE_SECS, MAX_PAST_SECS
from mdlogger.health import health_document
from mdlogger.metrics import render_metrics
from mdlogger.stats import GAP_EXCHANGES, WORKER_FIELDS, WRITER_FIELDS, Block, Note, gap_field
from mdlogger.view import ExchangeView, ServiceView, SlotView, WriterView
from mdlogger.web import build_app

NS = 1_000_000_000
T0 = 1_760_000_000  # a fixed wall-clock second for the sampler tests


# -- the sampler ---------------------------------------------------------------------------


def test_offsets_are_receive_minus_event_time_in_seconds():
    s = ClockSampler(min_interval_secs=0.0)
    assert s.sample(T0 * NS + 250_000_000, T0, 0)  # received 0.25 s after the trade
    assert s.sample(T0 * NS + 300_000_000, T0, 800_000_000)  # 0.5 s before it: a clock behind the exchange's
    assert s.figures(now_ns=T0 * NS + 300_000_000)[2] == 2
    assert sorted(o for _t, o in s._samples) == [pytest.approx(-0.5), pytest.approx(0.25)]


def test_at_most_one_sample_per_interval():
    s = ClockSampler(window_secs=60, min_interval_secs=0.01)
    t = T0 * NS
    taken = [s.sample(t + i * 1_000_000, T0, 0) for i in range(100)]  # a trade every ms for 0.1 s
    assert taken.count(True) == 10 and taken[0] and taken[10] and not any(taken[1:10])
    assert s.figures(now_ns=t + 100_000_000)[2] == 10


def test_samples_older_than_the_window_are_forgotten():
    s = ClockSampler(window_secs=60, min_interval_secs=0.0)
    for i in range(120):  # one per second for two minutes, offset i ms
        s.sample((T0 + i) * NS + i * 1_000_000, T0 + i, 0)
    p50, p99, n = s.figures(now_ns=(T0 + 119) * NS)
    assert n == 61  # seconds 59..119
    assert p50 == pytest.approx(0.089)
    assert s.figures(now_ns=(T0 + 1000) * NS) == (0.0, 0.0, 0)  # nothing traded for a while


def test_the_window_is_bounded():
    s = ClockSampler(window_secs=60, min_interval_secs=0.0, max_samples=50)
    for i in range(1000):
        s.sample(T0 * NS + i, T0, 0)
    assert s.figures(now_ns=T0 * NS + 1000)[2] == 50
    assert ClockSampler(window_secs=60, min_interval_secs=0.01)._samples.maxlen == 6001


def test_a_clock_stepped_back_starts_a_new_window():
    s = ClockSampler(min_interval_secs=0.01)
    s.sample((T0 + 10) * NS, T0, 0)  # 10 s ahead
    assert s.sample(T0 * NS + 1000, T0, 0)  # clock stepped back by 10 s: taken at once
    assert s.figures(now_ns=T0 * NS + 1000) == (pytest.approx(1e-6), pytest.approx(1e-6), 1)


def test_quantiles_and_publish():
    s = ClockSampler(min_interval_secs=0.0)
    for i in range(101):  # offsets 0.00 .. 1.00 s, shuffled order
        j = (i * 37) % 101
        s.sample(T0 * NS + i, T0, i - j * 10_000_000)
    block = Block(WORKER_FIELDS)
    assert s.publish(block, now_ns=T0 * NS + 101) == (pytest.approx(0.5), pytest.approx(0.99), 101)
    assert block.get("clock_offset_p50") == pytest.approx(0.5)
    assert block.get("clock_offset_p99") == pytest.approx(0.99)
    assert block.get("clock_samples") == 101
    empty = ClockSampler()
    empty.publish(block, now_ns=T0 * NS)
    assert (block.get("clock_offset_p50"), block.get("clock_offset_p99"), block.get("clock_samples")) == (0, 0, 0)
    assert quantile([1.0, 2.0], 0.5) == 1.5 and quantile([3.0], 0.99) == 3.0


def test_combine_over_shards():
    assert combine([]) == (None, None, 0)
    assert combine([(5.0, 9.0, 0)]) == (None, None, 0)  # a shard without samples does not count
    assert combine([(0.1, 0.3, 10), (0.2, 0.9, 5), (0.4, 0.5, 1), (99.0, 99.0, 0)]) == (0.2, 0.9, 16)


# -- the clock note ---------------------------------------------------------------------------


def test_no_note_for_a_sane_clock():
    assert clock_note(None, 0) is None
    assert clock_note(None, 12) is None  # refusals, but no offset to blame them on
    assert clock_note(0.0, 0) is None
    assert clock_note(0.35, 40) is None  # bad_time refusals with a good clock: the exchange's data
    assert clock_note(-2.0, 0) is None
    assert clock_note(float("nan"), 3) is None


def test_note_for_a_clock_behind():
    note = clock_note(-900.4, 42)
    assert "local clock" in note and "about 900 s behind" in note
    assert "refused as bad_time" in note and "42 refused" in note
    assert "%d s" % MAX_FUTURE_SECS in note
    soon = clock_note(-0.6 * MAX_FUTURE_SECS, 0)
    assert "about %d s behind" % (0.6 * MAX_FUTURE_SECS) in soon and "close to the" in soon
    assert "refused so far" not in soon
    assert clock_note(-0.4 * MAX_FUTURE_SECS, 0) is None


def test_note_for_a_clock_ahead():
    note = clock_note(MAX_PAST_SECS + 3600.0, 7)
    assert "about %d s ahead" % (MAX_PAST_SECS + 3600) in note and "in the past" in note and "7 refused" in note
    assert "about 100000 s ahead" in clock_note(100000.0, 0)  # past half the 2-day limit
    assert clock_note(3600.0, 0) is None  # an hour fast refuses nothing yet
    assert clock_note(30.0, 0, limit_past=40, limit_future=10) is not None  # limits are parameters


# -- /health, /metrics and the page from a published view ----------------------------------------


def worker_slot(exchange, shard, p50=0.0, p99=0.0, samples=0, bad_time=0):
    stats = Block(WORKER_FIELDS)
    stats.set("pid", 1000 + shard)
    stats.set("connected", 1.0)
    stats.set("last_message", time.time())
    stats.set("clock_offset_p50", p50)
    stats.set("clock_offset_p99", p99)
    stats.set("clock_samples", samples)
    stats.set("drop_bad_time", bad_time)
    return SlotView(slot=shard, exchange=exchange, shard=shard, symbol_names=("BTC-USD",), state="running",
                    restarts=0, reason="", stats=stats, note=Note())


def service_view(slots, exchanges, writer_stats):
    return ServiceView(started=time.time() - 60, pid=4321, stall_timeout_secs=10.0, slots=tuple(slots),
                       writer=WriterView("running", 0, "", 0, writer_stats),
                       exchanges=tuple(ExchangeView(x, "running", "", 1, 0, ()) for x in exchanges))


def app(view):
    return build_app(lambda: view, Analytics(60)).test_client()


@pytest.fixture
def view():
    w = Block(WRITER_FIELDS)
    w.set("pid", 4242)
    w.set("held_rows", 17)
    w.set("sealed_days", 3)
    w.set("late_rows", 2)
    for field, value in (("gaps_detected", 5), ("gaps_filled", 3), ("gaps_empty", 1), ("gaps_unrecoverable", 0),
                         ("gaps_pending", 1), ("trades_backfilled", 1234), ("rest_calls", 9)):
        w.set(gap_field(field, "binance"), value)
    w.set(gap_field("oldest_pending_gap", "binance"), time.time() - 30)
    w.set(gap_field("gaps_detected", "okx"), 2)
    w.set(gap_field("gaps_unrecoverable", "okx"), 2)
    slots = [
        worker_slot("binance", 0, p50=0.010, p99=0.050, samples=600),
        worker_slot("binance", 1, p50=0.030, p99=0.200, samples=300),
        worker_slot("binance", 2, p50=0.020, p99=0.080, samples=100),
        worker_slot("binance", 3, p50=50.0, p99=60.0, samples=0),  # stale figures without samples: ignored
        worker_slot("okx", 0, p50=-905.0, p99=-899.0, samples=500, bad_time=30),  # a clock 15 min behind
        worker_slot("okx", 1, p50=-910.0, p99=-900.5, samples=400, bad_time=12),
        worker_slot("weird-x", 0),
    ]
    return service_view(slots, ["binance", "okx", "weird-x"], w)


def test_health_gaps_per_exchange(view):
    assert "weird-x" not in GAP_EXCHANGES  # an exchange the writer keeps no counters for
    code, doc = health_document(view, time.time())
    g = doc["exchanges"]["binance"]["gaps"]
    assert set(g) == {"detected", "filled", "empty", "unrecoverable", "pending", "trades_backfilled", "rest_calls",
                      "oldest_pending_gap_seconds"}
    assert {k: v for k, v in g.items() if k != "oldest_pending_gap_seconds"} == {
        "detected": 5, "filled": 3, "empty": 1, "unrecoverable": 0, "pending": 1, "trades_backfilled": 1234,
        "rest_calls": 9}
    assert 30 <= g["oldest_pending_gap_seconds"] < 30 + 600
    assert doc["exchanges"]["okx"]["gaps"]["unrecoverable"] == 2
    assert doc["exchanges"]["okx"]["gaps"]["oldest_pending_gap_seconds"] is None
    assert doc["exchanges"]["weird-x"]["gaps"] == {
        "detected": 0, "filled": 0, "empty": 0, "unrecoverable": 0, "pending": 0, "trades_backfilled": 0,
        "rest_calls": 0, "oldest_pending_gap_seconds": None}
    w = doc["writer"]
    assert (w["held_rows"], w["sealed_days"], w["late_rows"]) == (17, 3, 2)


def test_health_clock_per_exchange(view):
    _code, doc = health_document(view, time.time())
    c = doc["exchanges"]["binance"]["clock"]
    assert c == {"offset_p50_secs": 0.02, "offset_p99_secs": 0.2, "samples": 1000, "note": None}
    okx = doc["exchanges"]["okx"]["clock"]
    assert okx["offset_p50_secs"] == -907.5 and okx["offset_p99_secs"] == -899.0 and okx["samples"] == 900
    assert "local clock" in okx["note"] and "about 908 s behind" in okx["note"]
    assert "42 refused" in okx["note"]  # bad_time refusals summed over the exchange's shards
    assert doc["exchanges"]["weird-x"]["clock"] == {"offset_p50_secs": None, "offset_p99_secs": None,
                                                    "samples": 0, "note": None}
    shard = next(s for s in doc["shards"] if s["exchange"] == "binance" and s["shard"] == 1)
    assert shard["clock"] == {"offset_p50_secs": 0.03, "offset_p99_secs": 0.2, "samples": 300}
    idle = next(s for s in doc["shards"] if s["exchange"] == "binance" and s["shard"] == 3)
    assert idle["clock"] == {"offset_p50_secs": None, "offset_p99_secs": None, "samples": 0}


def test_health_endpoint_serves_it_as_json(view):
    resp = app(view).get("/health")
    doc = resp.get_json()
    assert doc["exchanges"]["okx"]["clock"]["note"].startswith("the local clock is likely wrong")
    assert doc["exchanges"]["binance"]["gaps"]["trades_backfilled"] == 1234


def samples_of(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics(view):
    text = render_metrics(view, time.time()).decode()
    m = samples_of(text)
    assert "# TYPE mdlogger_gaps_total counter" in text
    for fate, n in (("detected", 5), ("filled", 3), ("empty", 1), ("unrecoverable", 0)):
        assert m[("mdlogger_gaps_total", (("exchange", "binance"), ("fate", fate)))] == n
    assert m[("mdlogger_gaps_total", (("exchange", "okx"), ("fate", "unrecoverable")))] == 2
    assert m[("mdlogger_gaps_total", (("exchange", "weird-x"), ("fate", "detected")))] == 0
    assert m[("mdlogger_gaps_pending", (("exchange", "binance"),))] == 1
    assert m[("mdlogger_trades_backfilled_total", (("exchange", "binance"),))] == 1234
    assert m[("mdlogger_backfill_rest_calls_total", (("exchange", "binance"),))] == 9
    assert m[("mdlogger_oldest_pending_gap_seconds", (("exchange", "binance"),))] >= 30
    assert m[("mdlogger_oldest_pending_gap_seconds", (("exchange", "okx"),))] == 0
    assert m[("mdlogger_clock_offset_seconds", (("exchange", "binance"), ("quantile", "0.5")))] == pytest.approx(0.02)
    assert m[("mdlogger_clock_offset_seconds", (("exchange", "binance"), ("quantile", "0.99")))] == pytest.approx(0.2)
    assert m[("mdlogger_clock_offset_seconds", (("exchange", "okx"), ("quantile", "0.5")))] == -907.5
    assert not any(k[0] == "mdlogger_clock_offset_seconds" and ("exchange", "weird-x") in k[1] for k in m)
    assert m[("mdlogger_writer_held_rows", ())] == 17
    assert m[("mdlogger_sealed_days_total", ())] == 3
    assert m[("mdlogger_late_rows_total", ())] == 2


def test_status_page_shows_gaps_and_clock(view):
    page = statuspage.status_page(view, time.time(), Analytics(60).report())
    assert '<table id="gaps">' in page
    row = page.split('<tr class="gaps" data-exchange="binance">', 1)[1].split("</tr>", 1)[0]
    cells = [c.split(">", 1)[1] for c in row.split("</td>")[:-1]]
    assert cells[:5] + cells[6:] == ["binance", "5", "3", "1", "0", "1,234", "+0.020 s"]
    assert re.fullmatch(r"1 \(oldest 3\d\.\d s\)", cells[5])  # pending, with the oldest one's age
    assert '<td class="num warn">1 (oldest' in row
    okx = page.split('<tr class="gaps" data-exchange="okx">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num bad">2</td>' in okx and '<td class="num bad">-907.5 s</td>' in okx
    assert '<tr class="clock-note" data-exchange="okx">' in page
    assert "about 908 s behind" in page and page.count('class="clock-note"') == 1


def test_status_page_escapes_the_gap_rows():
    evil = '<img src=x onerror="alert(1)">'
    view = service_view([worker_slot(evil, 0, p50=-9999.0, p99=-9999.0, samples=5)], [evil], Block(WRITER_FIELDS))
    page = app(view).get("/").get_data(as_text=True)
    assert evil not in page and "<img" not in page
    assert '<tr class="gaps" data-exchange="&lt;img' in page


def test_offsets_on_the_page():
    assert [statuspage.fmt_offset(x) for x in (None, 0.0421, -12.54, 90000.0)] == [
        "\u2014", "+0.042 s", "-12.5 s", "+90,000 s"]
    assert clock.WARN_FRACTION == 0.5
