"""The real service (supervisor, workers, writer) against the loopback fake Binance.

Every test here runs real processes, real sockets and real files, and kills
things for real. Timers are shortened through the configuration.
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from mdlogger import records as rec
from mdlogger.fakes.binance import FakeBinance
from mdlogger.reader import read_rows
from mdlogger.storage import iter_tables

from helpers import assert_tables_whole, binance_md, binance_trade, f32, service_for, today, wait_for

pytestmark = pytest.mark.slow

SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]


@pytest.fixture
def fake():
    with FakeBinance(symbols=SYMBOLS + ["DOGE-USDT"], mode="script", ping_interval=1.0) as server:
        yield server


def two_shards(tmp_path, fake, **kw):
    """The service on SYMBOLS, two per connection: two shards."""
    kw.setdefault("symbols_per_connection", 2)
    return service_for(tmp_path, fake, SYMBOLS, **kw)


@pytest.fixture
def running(tmp_path, fake):
    with two_shards(tmp_path, fake) as svc:
        svc.wait_all_connected(2)
        yield svc


def normalized(exchange_symbol: str) -> str:
    for s in SYMBOLS + ["DOGE-USDT"]:
        if s.replace("-", "") == exchange_symbol:
            return s
    raise KeyError(exchange_symbol)


def test_rows_on_disk_equal_what_the_fake_sent(running, fake):
    doc = running.health()[1]
    assert [s["symbols"] for s in doc["shards"]] == [2, 1]
    assert all(s["state"] == "running" and s["connected"] for s in doc["shards"])
    wait_for(lambda: fake.subscribed_streams() >= {"%s@trade" % s.replace("-", "").lower() for s in SYMBOLS},
             what="subscriptions")
    for i in range(40):
        for sym in SYMBOLS:
            fake.push_trade(sym)
        if i % 10 == 0:
            for sym in SYMBOLS:
                fake.push_ticker(sym)
    sent_trades = list(fake.sent_trades)
    sent_tickers = list(fake.sent_tickers)
    total = len(sent_trades) + len(sent_tickers)
    wait_for(lambda: running.records() == total, what="all records received")
    assert running.stop() == 0
    for sym in SYMBOLS:
        want = [binance_trade(t) for t in sent_trades if normalized(t["s"]) == sym]
        got = read_rows(running.data_path, "binance", sym, "TRADES", today())
        assert got == want
        want_md = [binance_md(d) for d in sent_tickers if normalized(d["s"]) == sym]
        got_md = read_rows(running.data_path, "binance", sym, "MD", today())
        assert len(want_md) == 4 and got_md == want_md
    # DOGE was listed but not configured: nothing of it on disk.
    assert not os.path.exists(os.path.join(running.data_path, "binance", "DOGE-USDT"))
    assert "supervisor stopped" in running.log_text()


def test_sigterm_keeps_everything_received(running, fake):
    wait_for(lambda: len(fake.subscribed_streams()) >= 6, what="subscriptions")
    for _ in range(500):
        for sym in SYMBOLS:
            fake.push_trade(sym)
    wait_for(lambda: running.records() == 1500, what="records received")
    assert running.stop(signal.SIGTERM) == 0
    log = running.log_text()
    assert "supervisor stopped" in log and "did not stop in time" not in log  # nobody had to be killed
    total = sum(len(read_rows(running.data_path, "binance", s, "TRADES", today())) for s in SYMBOLS)
    assert total == 1500
    assert_tables_whole(running.data_path)


def test_sigint_to_the_whole_group_is_a_clean_stop(running, fake):
    """Ctrl-C reaches every process of the group; workers and writer leave it to the supervisor."""
    wait_for(lambda: len(fake.subscribed_streams()) >= 6, what="subscriptions")
    for _ in range(100):
        fake.push_trade("BTC-USDT")
    wait_for(lambda: running.records() == 100, what="records received")
    os.killpg(running.proc.pid, signal.SIGINT)
    assert running.proc.wait(20) == 0
    assert len(read_rows(running.data_path, "binance", "BTC-USDT", "TRADES", today())) == 100


def test_killed_worker_is_restarted_and_others_keep_writing(tmp_path):
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=50, ping_interval=1.0) as fake, \
            two_shards(tmp_path, fake) as svc:
        svc.wait_all_connected(2)
        before = {s["shard"]: s for s in svc.shards()}
        victim = before[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        other_records = before[1]["records"]

        def restarted():
            s = {x["shard"]: x for x in svc.shards()}
            return s[0]["pid"] not in (None, victim) and s[0]["restarts"] == 1 and s[0]["connected"] and s

        shards = wait_for(restarted, timeout=15, what="shard 0 restarted")
        assert shards[1]["records"] > other_records  # the other shard never stopped
        assert shards[1]["restarts"] == 0
        assert "killed by SIGKILL" in svc.log_text()
        wait_for(lambda: svc.health()[0] == 200, what="healthy again")
        assert svc.stop() == 0
        assert_tables_whole(svc.data_path)


def test_killed_writer_is_restarted_and_no_table_is_torn(tmp_path):
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=200, ping_interval=1.0) as fake, \
            two_shards(tmp_path, fake) as svc:
        svc.wait_all_connected(2)
        wait_for(lambda: svc.writer()["rows_written"] > 200, what="rows written")
        writer = svc.writer()["pid"]
        os.kill(writer, signal.SIGKILL)
        doc = wait_for(lambda: (lambda w: w if w["pid"] not in (None, writer) else None)(svc.writer()),
                       what="a new writer")
        assert doc["restarts"] == 1
        rows_before = assert_tables_whole(svc.data_path)
        wait_for(lambda: svc.writer()["rows_written"] > 100, what="new writer writing")
        assert svc.stop() == 0
        assert assert_tables_whole(svc.data_path) > rows_before


def test_whole_tree_killed_then_restarted_repairs_torn_tables(tmp_path):
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=300, ping_interval=1.0) as fake:
        with two_shards(tmp_path, fake) as svc:
            try:
                svc.wait_all_connected(2)
                wait_for(lambda: svc.writer()["rows_written"] > 500, what="rows written")
            finally:
                svc.kill_tree()
        # Make sure a table is torn, as a power cut in the middle of a flush would leave it.
        key = next(k for k in iter_tables(svc.data_path) if k.kind == rec.KIND_TRADES)
        path = os.path.join(svc.data_path, "binance", key.symbol, "TRADES", "price.%s.bin" % key.day)
        with open(path, "ab") as fh:
            fh.write(b"\x01\x02\x03\x04\x05\x06")
        os.makedirs(os.path.join(str(tmp_path), "second"), exist_ok=True)
        with two_shards(os.path.join(str(tmp_path), "second"), fake, data=svc.data_path) as again:
            wait_for(lambda: "repaired torn table" in again.log_text(), what="the repair log line")
            assert "cut price 6 bytes" in again.log_text()
            again.wait_healthy()
            assert again.stop() == 0
        assert_tables_whole(svc.data_path)


def test_worker_killed_while_the_writer_is_stalled_does_not_stall_others(tmp_path):
    """Pitfall 2: a producer SIGKILLed with full pipes must not block anyone else."""
    with FakeBinance(symbols=SYMBOLS, mode="firehose", ping_interval=1.0) as fake, \
            two_shards(tmp_path, fake, logger={"worker_buffer_bytes": 256 * 1024}) as svc:
        svc.wait_all_connected(2)
        writer = psutil.Process(svc.writer()["pid"])
        writer.suspend()  # the writer is "slow": pipes and worker buffers fill
        wait_for(lambda: all(s["dropped_records"] > 0 for s in svc.shards()), timeout=30,
                 what="every worker's buffer full (records dropped)")
        victim = psutil.Process({s["shard"]: s for s in svc.shards()}[0]["pid"])
        victim.kill()
        wait_for(lambda: not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE,
                 what="the worker dead, its pipe still full")
        writer.resume()
        wait_for(lambda: {s["shard"]: s for s in svc.shards()}[0]["restarts"] == 1, what="restart")
        rows = svc.writer()["rows_written"]
        wait_for(lambda: svc.writer()["rows_written"] > rows + 10000, what="writing resumed")
        doc = svc.health()[1]
        assert all(s["connected"] for s in doc["shards"])
        assert sum(s["dropped_records"] for s in doc["shards"]) > 0  # counted, not silent
        assert svc.stop() == 0
        assert_tables_whole(svc.data_path)


def pongs_per_connection(fake) -> list[int]:
    """Matched pongs of each open connection of the fake."""
    return [len(c["pongs"]) for c in fake.connections_info()["connections"] if c["open"]]


def test_silent_connection_is_reconnected(tmp_path):
    with FakeBinance(symbols=SYMBOLS, mode="idle", ping_interval=0.5) as fake, \
            two_shards(tmp_path, fake, silence_timeout_secs=1.5) as svc:
        svc.wait_all_connected(2)
        # idle but pinged: a quiet symbol is normal, no reconnect, though five pings (2.5 s) outlast the 1.5 s
        wait_for(lambda: len(fake.open_connections()) == 2 and min(pongs_per_connection(fake)) >= 5,
                 what="five pings answered on each connection")
        assert all(s["reconnects"] == 0 for s in svc.shards())
        fake.go_silent(4.0)
        wait_for(lambda: all(s["reconnects"] >= 1 for s in svc.shards()), timeout=15, what="reconnects")
        assert "silent for" in svc.log_text()
        wait_for(lambda: all(s["connected"] for s in svc.shards()), what="connected again")
        assert svc.stop() == 0


def test_pongs_echo_and_client_stays_within_five_messages_per_second(running, fake):
    wait_for(lambda: len(fake.open_connections()) == 2 and min(pongs_per_connection(fake)) >= 2,
             what="two pongs on each connection")
    wait_for(lambda: fake.pongs_matched() >= 4, timeout=5, what="those pongs echoing the fake's pings")
    assert fake.violations == []


def test_server_shutdown_rotates_without_gap_or_duplicate(tmp_path):
    """serverShutdown: the next connection opens before the old one closes; ids stay consecutive."""
    with FakeBinance(symbols=SYMBOLS, mode="steady", rate=100, ping_interval=1.0) as fake:
        with two_shards(tmp_path, fake) as svc:
            svc.wait_all_connected(2)
            wait_for(lambda: svc.records() >= 100, what="trades before the notice")
            fake.send_server_shutdown(close_after=1.5)
            wait_for(lambda: all(s["reconnects"] == 1 and s["connected"] for s in svc.shards()), what="rotation")
            wait_for(lambda: "switched to the new connection" in svc.log_text(), what="the switch")
            switched = svc.records()
            wait_for(lambda: svc.records() >= switched + 100, what="trades on the new connections")
            assert svc.stop() == 0
        sent = {}
        for t in fake.sent_trades:
            sent.setdefault(normalized(t["s"]), []).append(t["t"])
        for sym in SYMBOLS:
            got = [r[0] for r in read_rows(svc.data_path, "binance", sym, "TRADES", today())]
            assert len(got) == len(set(got)), "duplicates in %s" % sym
            assert got == sorted(got)
            assert got == list(range(got[0], got[-1] + 1)), "gap in %s" % sym
            assert set(got) <= set(sent[sym])


def test_bad_input_is_counted_by_reason_and_never_stored(running, fake):
    from mdlogger.fakes.wsserver import OP_BINARY, encode_frame

    wait_for(lambda: len(fake.subscribed_streams()) >= 6, what="subscriptions")
    fake.push_raw("{not json")
    fake.push_raw('{"stream":"btcusdt@depth","data":{"e":"depthUpdate"}}')
    fake.push_raw('{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTCUSDT"}}')
    for conn in fake.open_connections():
        conn.send_frames(encode_frame(OP_BINARY, b"\x00\x01binary"))
    fake.push_trade("BTC-USDT", p="NaN")
    fake.push_trade("ETH-USDT", q="-1")
    fake.push_trade("SOL-USDT", s="../../X")
    fake.push_trade("BTC-USDT", T=1000)
    fake.push_trade("BTC-USDT")  # one good trade after all that
    for conn in fake.open_connections():  # last: a frame over 1 MiB closes its connection (1009), which reopens
        conn.send_frames(encode_frame(1, b'{"pad":"' + b"x" * (1 << 20) + b'"}'))

    def reasons():
        out = {}
        for s in running.shards():
            for r, n in s["parse_errors_by_reason"].items():
                out[r] = out.get(r, 0) + n
        return out

    want = {"json", "unknown_type", "missing_field", "binary", "oversized", "bad_price", "bad_size",
            "unknown_symbol", "bad_time"}
    wait_for(lambda: want <= set(reasons()), what="every reason counted")
    doc = running.health()[1]
    assert doc["exchanges"]["binance"]["refused_by_reason"]["oversized"] == 2  # one per connection
    assert [s["frame_closes"]["oversized"] for s in doc["shards"]] == [1, 1]
    wait_for(lambda: all(s["restarts"] == 0 and s["connected"] for s in running.shards()), what="reconnected")
    wait_for(lambda: running.records() == 1, what="the good trade")
    assert running.stop() == 0
    assert len(read_rows(running.data_path, "binance", "BTC-USDT", "TRADES", today())) == 1
    assert not os.path.exists(os.path.join(running.data_path, "X"))
    log = running.log_text()
    assert "first message refused as oversized" in log and "first message refused as json" in log


def test_metrics_in_the_prometheus_format(running, fake):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    wait_for(lambda: len(fake.subscribed_streams()) >= 6, what="subscriptions")
    for _ in range(30):
        fake.push_trade("BTC-USDT")
    fake.push_raw("{broken")
    wait_for(lambda: running.records() == 30, what="records")
    wait_for(lambda: running.writer()["rows_trades"] == 30, what="rows")
    url = "http://127.0.0.1:%d/metrics" % running.health_port()
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    assert sum(v for labels, v in samples["mdlogger_records_total"] if labels["kind"] == "trades") == 30
    assert sum(v for labels, v in samples["mdlogger_refused_messages_total"] if labels["reason"] == "json") == 2
    assert [v for labels, v in samples["mdlogger_writer_rows_total"] if labels["table"] == "TRADES"] == [30]
    assert sorted(labels["shard"] for labels, v in samples["mdlogger_connected"] if v == 1) == ["0", "1"]
    assert {labels["process"] for labels, _ in samples["mdlogger_process_resident_memory_bytes"]} == {
        "supervisor", "writer", "binance#0", "binance#1"}
    assert all(v == 0 for _, v in samples["mdlogger_restarts_total"])


def test_analytics_endpoint_reports_what_was_stored(running, fake):
    import json
    import urllib.request

    wait_for(lambda: len(fake.subscribed_streams()) >= 6, what="subscriptions")
    for _ in range(20):
        fake.push_trade("ETH-USDT")
    sent = [t for t in fake.sent_trades if t["s"] == "ETHUSDT"]
    wait_for(lambda: running.writer()["rows_trades"] == 20, what="rows on disk")
    url = "http://127.0.0.1:%d/analytics" % running.health_port()

    def today_figures():
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.loads(resp.read())
        return doc["exchanges"].get("binance", {}).get("ETH-USDT", {}).get("today", {}).get("trades") == 20 and doc

    doc = wait_for(today_figures, what="analytics of the stored trades")
    day = doc["exchanges"]["binance"]["ETH-USDT"]["today"]
    prices = [f32(float(t["p"])) for t in sent]
    sizes = [f32(float(t["q"])) for t in sent]
    assert day["high"] == max(prices) and day["low"] == min(prices)
    assert day["vwap"] == pytest.approx(sum(p * s for p, s in zip(prices, sizes)) / sum(sizes))
    assert day["buy_volume"] == pytest.approx(sum(s for t, s in zip(sent, sizes) if not t["m"]))
