"""The writer in-process: demultiplexing, day files, snapshot marks that survive restarts."""

from __future__ import annotations

import os

from mdlogger import records as rec
from mdlogger.reader import read_rows
from mdlogger.settings import load_settings
from mdlogger.stats import Block, writer_fields
from mdlogger.transport import encode_frame
from mdlogger.writer import Writer

DAY = 1795478400  # 2026-11-24T00:00:00Z


def make_writer(tmp_path, clock=lambda: DAY + 3600):
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    return Writer(settings, Block(writer_fields()), clock=clock)


def trade(sym, tid, sec, nanos=0, price=1.0):
    return rec.TRADE_WIRE.pack(sym, tid, sec, nanos, price, 1.0, 1, rec.ZERO_ID, rec.ZERO_ID)


def feed(writer, kind, records, exchange="coinbase"):
    writer.take_frame(kind, exchange, b"".join(records))


def ids(tmp_path, sym="BTC-USD", exchange="coinbase", day="24.11.26"):
    return [r[0] for r in read_rows(str(tmp_path), exchange, sym, "TRADES", day)]


def test_rows_go_to_the_day_of_their_own_time(tmp_path):
    w = make_writer(tmp_path)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 1, DAY - 1, 999999999), trade(b"BTC-USD", 2, DAY), trade(b"ETH-USD", 3, DAY + 5)])
    w.flush_all()
    assert ids(tmp_path, day="23.11.26") == [1]
    assert ids(tmp_path) == [2]
    assert ids(tmp_path, "ETH-USD") == [3]
    assert w.stats.get("rows") == 3


def test_invalid_symbols_never_reach_a_path(tmp_path):
    w = make_writer(tmp_path)
    feed(w, rec.KIND_TRADES, [trade(b"../../x", 1, DAY), trade(b"btc-usd", 2, DAY), trade(b"", 3, DAY)])
    w.flush_all()
    assert w.stats.get("refused_records") == 3
    assert list(tmp_path.iterdir()) == []


def test_snapshot_trades_only_when_newer_by_id(tmp_path):
    w = make_writer(tmp_path)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", i, DAY + i) for i in (10, 11, 12)])
    feed(w, rec.KIND_SNAPSHOT, [trade(b"BTC-USD", i, DAY + i) for i in (8, 9, 10, 11, 12, 13, 14)])
    w.flush_all()
    assert ids(tmp_path) == [10, 11, 12, 13, 14]
    assert w.stats.get("duplicates") == 5


def test_snapshot_without_ids_uses_time(tmp_path):
    w = make_writer(tmp_path)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 0, DAY + 100, 5)], "kraken")
    feed(w, rec.KIND_SNAPSHOT, [trade(b"BTC-USD", 0, DAY + 100, 5), trade(b"BTC-USD", 0, DAY + 100, 6)], "kraken")
    w.flush_all()
    rows = read_rows(str(tmp_path), "kraken", "BTC-USD", "TRADES", "24.11.26")
    assert [(r[1], r[2]) for r in rows] == [(DAY + 100, 5), (DAY + 100, 6)]


def test_the_mark_survives_a_writer_restart(tmp_path):
    w = make_writer(tmp_path)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", i, DAY + i) for i in range(100, 120)])
    w.flush_all()
    w.drain_and_close()
    again = make_writer(tmp_path)  # a new writer process: nothing in memory
    feed(again, rec.KIND_SNAPSHOT, [trade(b"BTC-USD", i, DAY + i) for i in range(110, 125)])
    again.flush_all()
    assert ids(tmp_path) == list(range(100, 125))


def test_live_trades_are_never_filtered(tmp_path):
    w = make_writer(tmp_path)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 0, DAY + 1)] * 3, "kraken")  # same time, no ids: all kept
    w.flush_all()
    assert len(read_rows(str(tmp_path), "kraken", "BTC-USD", "TRADES", "24.11.26")) == 3


def test_big_tables_flush_at_buffer_size(tmp_path):
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True,
                                        "logger.buffer_size": 6000}, check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", i, DAY) for i in range(48)])
    assert w.stats.get("rows") == 0
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", i, DAY) for i in range(48, 96)])
    assert w.stats.get("rows") == 96  # 96 * 84 bytes >= buffer_size: written without waiting for the interval


def test_frames_through_a_pipe(tmp_path):
    import os

    w = make_writer(tmp_path)
    r, wfd = os.pipe()
    w.add_slot(0, r, "coinbase")  # the supervisor's "add" names the slot's exchange; frames do not
    os.write(wfd, encode_frame(rec.KIND_TRADES, trade(b"BTC-USD", 7, DAY)))
    w._read_slot(0)
    w.flush_all()
    assert ids(tmp_path) == [7]
    w.remove_slot(0)
    assert w.readers == {}


def test_retention_removes_old_days_once_a_day_never_today_or_yesterday(tmp_path):
    now = [DAY + 3600]
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True,
                                        "logger.retention_days": 1}, check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: now[0])
    for back in range(5):  # today and the four days before
        feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 100 + back, DAY - back * 86400 + 10)])
    w.flush_all()
    days = lambda: sorted({p.name.split(".", 1)[1] for p in (tmp_path / "coinbase" / "BTC-USD" / "TRADES").iterdir()})
    assert days() == ["20.11.26.bin", "21.11.26.bin", "22.11.26.bin", "23.11.26.bin", "24.11.26.bin"]
    removed = w.apply_retention()
    assert len(removed) == 3 * 8  # three days of eight columns
    assert days() == ["23.11.26.bin", "24.11.26.bin"]  # yesterday is kept even with retention_days: 1
    assert w.apply_retention() == []  # once a day
    now[0] += 86400  # the next day
    assert len(w.apply_retention()) == 8
    assert days() == ["24.11.26.bin"]


def test_retention_off_by_default(tmp_path):
    w = make_writer(tmp_path)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 1, DAY - 30 * 86400)])
    w.flush_all()
    assert w.apply_retention() == []


def test_a_finished_day_is_sealed_after_the_grace_and_late_rows_are_refused(tmp_path):
    from mdlogger import seal
    from mdlogger.verify import verify_day

    now = [DAY + 3600]
    w = make_writer(tmp_path, clock=lambda: now[0])
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", i, DAY + i) for i in (1, 2, 3)])
    w.flush_all()
    now[0] = DAY + 86400 + 599  # the next day, within the grace
    assert w.seal_due() == []
    now[0] = DAY + 86400 + 600
    assert w.seal_due() == [("coinbase", "24.11.26")]
    manifest = seal.load_manifest(str(tmp_path), "coinbase", "24.11.26")
    assert [t["rows"] for t in manifest["tables"]] == [3]
    assert w.stats.get("sealed_days") == 1
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 4, DAY + 4)])  # a row for the sealed day
    w.flush_all()
    assert ids(tmp_path) == [1, 2, 3] and w.stats.get("late_rows") == 1
    assert verify_day(str(tmp_path), "24.11.26", {"coinbase": True}) == []


def test_a_day_with_an_open_gap_is_not_sealed_until_the_gap_is_settled(tmp_path):
    now = [DAY + 3600]
    w = make_writer(tmp_path, clock=lambda: now[0])
    w.backfiller.submit = lambda exchange, og: None  # no REST here: the gap stays open
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 1, DAY + 1), trade(b"BTC-USD", 5, DAY + 5)])
    w.flush_all()
    assert ids(tmp_path) == [1]  # id 5 waits behind the gap 2..4
    now[0] = DAY + 86400 + 700
    assert w.seal_due() == []
    engine = w.engines["coinbase"]
    engine.filled(next(iter(engine.open)), [(b"BTC-USD", i, DAY + i, 0, 1.0, 1.0, 1, rec.ZERO_ID, rec.ZERO_ID)
                                            for i in (2, 3, 4)])
    assert w.seal_due() == [("coinbase", "24.11.26")]
    assert ids(tmp_path) == [1, 2, 3, 4, 5]


def test_retention_takes_the_gap_ledger_and_manifests_of_expired_days(tmp_path):
    from mdlogger.storage import expired_days

    edir = tmp_path / "binance"
    edir.mkdir()
    for name in ("gaps.20.11.26.jsonl", "manifest.20.11.26.json", "gaps.24.11.26.jsonl", "notes.txt"):
        (edir / name).write_text("{}")
    old = sorted(os.path.basename(p) for p, _ in expired_days(str(tmp_path), rec.day_index("23.11.26")))
    assert old == ["gaps.20.11.26.jsonl", "manifest.20.11.26.json"]
