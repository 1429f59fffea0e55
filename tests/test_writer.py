"""The writer in-process: demultiplexing, day files, snapshot marks that survive restarts."""

from __future__ import annotations

import collections
import errno
import json
import os
import random
import socket
import struct

import pytest

from mdlogger import records as rec
from mdlogger import tables as tables_module
from mdlogger import writer as writer_module
from mdlogger.gaps import GapEngine
from mdlogger.reader import read_rows
from mdlogger.settings import load_settings
from mdlogger.stats import Block, writer_fields
from mdlogger.storage import TableKey, column_path, iter_tables
from mdlogger.tables import MIN_OPEN_TABLES, table_cache_size
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


# -- one pass: the files are what the per-row path writes ---------------------------------------------

SYMBOLS = (b"BTC-USDT", b"ETH-USDT", b"SOL-USDT")
NOW = DAY + 3600  # the writers' wall clock: the stream's gaps are within backfill reach


class Reference:
    """The writer as it was, written out independently: every record unpacked into a tuple, grouped by
    symbol, the gap engine's per-row path (``GapEngine.trades``), each row into the table of its day
    (when the first and last row of a batch share a day, all of it goes there), and each column packed
    with ``struct`` at the end."""

    def __init__(self, exchange: str, consecutive: bool):
        self.tables = collections.defaultdict(list)  # (symbol, kind, day number) -> row tuples, symbol dropped
        self.requests, self.gaps = [], []
        self.engine = GapEngine(exchange, consecutive, emit=self._emit, request=self.requests.append,
                                record=lambda g: self.gaps.append(_gap_facts(g)), load_mark=lambda s: [],
                                wall=lambda: NOW)

    def frame(self, kind: int, records: bytes) -> None:
        rows = list(rec.WIRE[kind].iter_unpack(records))
        if kind == rec.KIND_MD:
            for row in rows:
                self.tables[(row[0].rstrip(b"\0"), rec.KIND_MD, row[1] // 86400)].append(row[1:])
            return
        by_symbol = collections.defaultdict(list)
        for row in rows:
            by_symbol[row[0].rstrip(b"\0")].append(row)
        for symbol, mine in by_symbol.items():
            if kind == rec.KIND_RESUME:
                self.engine.resume(symbol, "restart" if mine[-1][1] == 1 else "reconnect")
            else:
                self.engine.trades(symbol, mine, kind == rec.KIND_SNAPSHOT)

    def _emit(self, symbol: bytes, rows: list) -> None:
        day = rows[0][2] // 86400
        if rows[-1][2] // 86400 == day:
            self.tables[(symbol, rec.KIND_TRADES, day)].extend(r[1:] for r in rows)
            return
        for row in rows:
            if row[2] // 86400 != day:
                day = row[2] // 86400
            self.tables[(symbol, rec.KIND_TRADES, day)].append(row[1:])

    def files(self) -> dict:
        """(exchange-less) ``{(symbol, table, day string, column): bytes}``."""
        out = {}
        for (symbol, kind, day), rows in self.tables.items():
            for column, values in zip(rec.COLUMNS[kind], zip(*rows)):
                data = b"".join(values) if column.code == "16s" else struct.pack("<%d%s" % (len(values), column.code),
                                                                                  *values)
                out[(symbol.decode(), rec.TABLE_NAMES[kind], rec.day_string(day * 86400), column.name)] = data
        return out


def _gap_facts(gap) -> tuple:
    return (gap.symbol, gap.from_id, gap.from_sec, gap.from_nanos, gap.to_id, gap.to_sec, gap.to_nanos, gap.why,
            gap.fate, gap.trades, gap.missing)


def _mark_facts(engine: GapEngine) -> dict:
    return {s: (t.mark_id, t.mark_sec, t.mark_nanos, t.known, sorted(t.edge.items(), key=repr))
            for s, t in engine.tracks.items()}


def recorded_stream(exchange: str, seed: int, events: int = 600) -> list:
    """Frames as a worker sends them, with the real wire layout: mixed and single-symbol frames, days
    across midnight, snapshots that overlap what was stored, resume markers (restart, reconnect),
    live duplicates, ids that jump, rows at one time, times that go back a little, tickers."""
    rnd = random.Random(seed)
    ids = exchange != "kraken"
    step = (lambda: 1) if exchange == "binance" else (lambda: rnd.randint(1, 50))
    state = {s: {"id": 1000 * (i + 1), "sec": DAY - 40, "nanos": 0, "sent": []} for i, s in enumerate(SYMBOLS)}
    frames, trades, snapshot, md = [], [], [], []

    def seal(which, kind, size=48):
        while which:
            frames.append((kind, b"".join(which[:size])))
            del which[:size]

    def trade_record(s, st, tid):
        if rnd.random() < 0.7:  # most rows at a later time; some at the same time (an edge), a few earlier
            st["nanos"] += rnd.choice((1, 1000, 1_000_000, 250_000_000))
        elif rnd.random() < 0.1:
            st["nanos"] = max(0, st["nanos"] - 5000)
        while st["nanos"] >= 1_000_000_000:
            st["nanos"] -= 1_000_000_000
            st["sec"] += 1
        price = rnd.choice((100.0, 100.5, 101.25, 99.75, 1 / 3))
        maker = rnd.randbytes(16) if exchange == "binance" and rnd.random() < 0.3 else rec.ZERO_ID
        return rec.TRADE_WIRE.pack(s, tid if ids else 0, st["sec"], st["nanos"], price, rnd.choice((0.5, 1.0, 0.1)),
                                   rnd.choice((1, 2)), maker, rec.ZERO_ID)

    for n in range(events):
        s = rnd.choice(SYMBOLS)
        st = state[s]
        if n == events // 2:  # midnight: the clock moves to the next day
            for other in state.values():
                other["sec"] = DAY + 86400 - 1
        roll = rnd.random()
        if roll < 0.6:  # live trades
            if snapshot:
                seal(snapshot, rec.KIND_SNAPSHOT)
            for _ in range(rnd.choice((1, 1, 2, 3, 5, 12, 30))):
                st["id"] += step()
                r = trade_record(s, st, st["id"])
                st["sent"].append(r)
                trades.append(r)
                if len(trades) == 48:
                    seal(trades, rec.KIND_TRADES)
        elif roll < 0.63:  # ids jump: trades the exchange made and we never saw
            st["id"] += rnd.randint(2, 6)
        elif roll < 0.65:  # rows out of order: the first and the last id of the batch are where they belong
            batch = []
            for _ in range(rnd.randint(3, 6)):
                st["id"] += step()
                batch.append(trade_record(s, st, st["id"]))
            batch[1], batch[2] = batch[2], batch[1]
            st["sent"].extend(batch)
            seal(trades, rec.KIND_TRADES)
            trades.extend(batch)
            seal(trades, rec.KIND_TRADES)
        elif roll < 0.7 and st["sent"]:  # live duplicates
            trades.extend(st["sent"][-rnd.randint(1, 3):])
            seal(trades, rec.KIND_TRADES)
        elif roll < 0.77:  # a replay on subscribe: older rows (stored) and newer ones
            seal(trades, rec.KIND_TRADES)
            snapshot.extend(st["sent"][-rnd.randint(0, 4):])
            for _ in range(rnd.randint(0, 3)):
                st["id"] += step()
                r = trade_record(s, st, st["id"])
                st["sent"].append(r)
                snapshot.append(r)
            seal(snapshot, rec.KIND_SNAPSHOT)
        elif roll < 0.82:  # a (re)connect
            seal(trades, rec.KIND_TRADES)
            seal(snapshot, rec.KIND_SNAPSHOT)
            frames.append((rec.KIND_RESUME, rec.TRADE_WIRE.pack(s, rnd.choice((0, 1)), st["sec"], st["nanos"], 0.0,
                                                                0.0, 0, rec.ZERO_ID, rec.ZERO_ID)))
        else:  # tickers, of any symbol, their own batches
            for _ in range(rnd.randint(1, 20)):
                other = rnd.choice(SYMBOLS)
                sec = state[other]["sec"] + rnd.choice((0, 0, -1))
                md.append(rec.MD_WIRE.pack(other, sec, rnd.randrange(10**9), 100.0, float("nan"), 0, 99.5, 100.5))
            if rnd.random() < 0.5:
                seal(md, rec.KIND_MD, 78)
        if rnd.random() < 0.2:  # a batch sealed early (the worker's batch delay)
            seal(trades, rec.KIND_TRADES)
    seal(snapshot, rec.KIND_SNAPSHOT)
    seal(trades, rec.KIND_TRADES)
    seal(md, rec.KIND_MD, 78)
    return frames


def _backfill(og) -> list:
    """What the exchange's history holds for a gap: the ids between its edges, or rows at its edges' times."""
    (a_id, a_sec, a_nanos), (b_id, b_sec, b_nanos) = og.after, og.before
    if a_id and b_id:
        return [(b"", i, a_sec, a_nanos, 42.0, 1.0, 1, rec.ZERO_ID, rec.ZERO_ID) for i in range(a_id + 1, b_id)]
    return [(b"", 0, a_sec, a_nanos, 42.0, 1.0, 1, rec.ZERO_ID, rec.ZERO_ID),
            (b"", 0, b_sec, b_nanos, 43.0, 1.0, 2, rec.ZERO_ID, rec.ZERO_ID)]


def _settle(engine: GapEngine, requests: list, done: list) -> None:
    """Answer the gaps asked for so far, in order: every other one filled, the others failed."""
    while len(done) < len(requests):
        og = requests[len(done)]
        if len(done) % 2 == 0:
            engine.filled(og.gap.gap, _backfill(og))
        else:
            engine.failed(og.gap.gap, "REST: down")
        done.append(og)


def files_on_disk(data_path: str, exchange: str) -> dict:
    out = {}
    for key in iter_tables(data_path, exchanges=[exchange]):
        for column in rec.COLUMNS[key.kind]:
            with open(column_path(data_path, key, column), "rb") as fh:
                out[(key.symbol, key.table, key.day, column.name)] = fh.read()
    return out


@pytest.mark.parametrize("exchange", ["binance", "bitfinex", "kraken"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_pass_writes_exactly_what_the_per_row_path_writes(tmp_path, exchange, seed):
    frames = recorded_stream(exchange, seed)
    w = make_writer(tmp_path, clock=lambda: NOW)
    got_gaps, got_requests, got_done = [], [], []
    w._record_gap = lambda g: got_gaps.append(_gap_facts(g))  # (before the engine exists: it takes this one)
    w.backfiller.submit = lambda x, og: got_requests.append(og)
    ref = Reference(exchange, exchange == "binance")
    ref_done = []
    for i, (kind, records) in enumerate(frames):
        w.take_frame(kind, exchange, records)
        ref.frame(kind, records)
        _settle(w.engines[exchange], got_requests, got_done) if exchange in w.engines else None
        _settle(ref.engine, ref.requests, ref_done)
        if i % 7 == 0:
            w.flush_all()
    w.flush_all()
    engine = w.engines[exchange]
    assert engine.fast_blocks > 0 and engine.counts["detected"] > 0  # both paths were taken
    if exchange != "kraken":
        assert engine.counts["duplicates"] > 0
    want = ref.files()
    got = files_on_disk(str(tmp_path), exchange)
    assert sorted(got) == sorted(want)
    for name in sorted(want):
        assert got[name] == want[name], name
    assert {day for _, _, day, _ in want} == {"23.11.26", "24.11.26", "25.11.26"}  # across midnight
    assert got_gaps == ref.gaps
    assert _mark_facts(engine) == _mark_facts(ref.engine)


# -- open files: evictions without fsync, fsync on the interval ---------------------------------------


def count_fsyncs(monkeypatch) -> list:
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


def test_an_evicted_table_is_closed_without_fsync_and_fsynced_at_the_interval(tmp_path, monkeypatch):
    fsyncs = count_fsyncs(monkeypatch)
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY + 3600, max_open_tables=2)
    for sym in (b"BTC-USD", b"ETH-USD", b"SOL-USD"):  # three tables through a cache of two
        feed(w, rec.KIND_TRADES, [trade(sym, 1, DAY + 10)])
        w.flush_all()
    assert fsyncs == [] and w.stats.get("evictions") == 1 and len(w.tables.files) == 2
    evicted = TableKey("coinbase", "BTC-USD", rec.KIND_TRADES, "24.11.26")
    assert evicted not in w.tables.files and w.tables.to_sync == {evicted}
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 2, DAY + 11)])  # opened again: another one goes
    w.flush_all()
    assert w.stats.get("reopened_tables") == 1 and w.stats.get("evictions") == 2 and w.stats.get("table_opens") == 4
    assert fsyncs == []
    w.fsync_all()
    # every column of all three tables once: two open ones by their descriptors (BTC-USD's rows
    # before its eviction included), the closed one by opening its columns
    assert len(fsyncs) == 3 * 8 == w.stats.get("fsyncs")
    assert w.tables.to_sync == set()
    w.fsync_all()
    assert len(fsyncs) == 24  # nothing written since: nothing to fsync
    assert ids(tmp_path) == [1, 2]


def test_a_seal_fsyncs_the_days_closed_tables_too(tmp_path, monkeypatch):
    now = [DAY + 3600]
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: now[0], max_open_tables=1)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 1, DAY + 10)])
    w.flush_all()
    feed(w, rec.KIND_TRADES, [trade(b"ETH-USD", 1, DAY + 10)])
    w.flush_all()  # BTC-USD evicted, not fsynced
    fsyncs = count_fsyncs(monkeypatch)
    now[0] = DAY + 86400 + 600
    assert w.seal_due() == [("coinbase", "24.11.26")]
    assert len(fsyncs) >= 16 and w.tables.to_sync == set() and w.tables.files == {}


def test_the_table_cache_follows_the_descriptor_limit():
    assert table_cache_size(65536) == (65536 - 512) // 8
    assert table_cache_size(1024) == (1024 - 256) // 8  # a quarter of a small limit stays free
    assert table_cache_size(64) == MIN_OPEN_TABLES


def test_the_writer_raises_its_descriptor_limit_to_the_hard_limit():
    import resource
    import subprocess
    import sys

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    code = ("import resource; from mdlogger.tables import raise_nofile_limit; "
            "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))).stdout.split()
    want = hard if hard != resource.RLIM_INFINITY else int(out[0])
    assert [int(x) for x in out] == [want, want]


def test_out_of_descriptors_shrinks_the_cache_instead_of_failing(tmp_path, monkeypatch):
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY + 3600, max_open_tables=100)
    for n, sym in enumerate((b"A-USD", b"B-USD", b"C-USD", b"D-USD")):
        feed(w, rec.KIND_TRADES, [trade(sym, 1, DAY + 10)])
        w.flush_all()
    real = tables_module.TableFiles
    fail = [True]

    def table_files(*a):
        if fail[0]:
            fail[0] = False
            raise OSError(errno.EMFILE, "Too many open files")
        return real(*a)

    monkeypatch.setattr(tables_module, "TableFiles", table_files)
    feed(w, rec.KIND_TRADES, [trade(b"E-USD", 1, DAY + 10)])
    w.flush_all()
    assert w.tables.max_open == 3 and len(w.tables.files) == 3 and w.stats.get("table_cache") == 3
    assert w.pending == {} and ids(tmp_path, "E-USD") == [1]


# -- the "written" feed ---------------------------------------------------------------------------------


def feed_pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return ours, theirs


def datagrams(sock) -> list:
    sock.setblocking(False)
    out = []
    while True:
        try:
            data = sock.recv(1 << 17)
        except BlockingIOError:
            return out
        assert len(data) <= 60 * 1024
        out.append(json.loads(data))


def test_written_names_each_trades_table_appended_with_its_rows_on_disk(tmp_path):
    ours, theirs = feed_pair()
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY + 3600, feed=theirs)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 1, DAY - 1), trade(b"BTC-USD", 2, DAY), trade(b"ETH-USD", 7, DAY)])
    w.take_frame(rec.KIND_MD, "coinbase", rec.MD_WIRE.pack(b"BTC-USD", DAY, 0, 1.0, 1.0, 0, 1.0, 1.0))  # not TRADES
    w.flush_all()
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 3, DAY + 1)])
    w.flush_all()
    assert w.send_written() == 1
    got = datagrams(ours)
    assert got == [{"op": "written", "tables": [["coinbase", "BTC-USD", "23.11.26", 1],
                                                ["coinbase", "BTC-USD", "24.11.26", 2],
                                                ["coinbase", "ETH-USD", "24.11.26", 1]]}]
    assert w.send_written() == 0 and datagrams(ours) == []  # nothing written since


def test_written_at_most_once_a_second_from_the_loop(tmp_path, monkeypatch):
    ours, theirs = feed_pair()
    clock = [1000.0]
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: clock[0])
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY + 3600, feed=theirs)
    for i in range(30):  # 3 s of rows, a tick every 0.1 s
        feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", i + 1, DAY + i)])
        clock[0] += 0.1
        w._tick()
    got = datagrams(ours)
    assert 2 <= len(got) <= 3
    assert got[-1]["tables"][0][3] >= 20 and all(len(d["tables"]) == 1 for d in got)


def test_written_splits_long_lists_and_keeps_what_a_full_socket_refused(tmp_path):
    ours, theirs = feed_pair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 17)  # room for a few datagrams, not all
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY + 3600, feed=theirs)
    n = 20000  # about 900 KiB of table names
    for i in range(n):
        w.written[TableKey("coinbase", "S%d-USD" % i, rec.KIND_TRADES, "24.11.26")] = i
    named = {}
    rounds = []
    for _ in range(100):
        rounds.append(w.send_written())
        for d in datagrams(ours):
            for exchange, symbol, day, rows in d["tables"]:
                named[symbol] = rows
        if not w.written:
            break
    assert len(rounds) > 1 and rounds[0] > 1  # split, and the socket was full before the end
    assert len(named) == n and named["S19999-USD"] == 19999  # all of them, nothing lost to the full socket
    assert w.feed is theirs


def test_a_broken_feed_is_dropped_once(tmp_path, caplog):
    ours, theirs = feed_pair()
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY + 3600, feed=theirs)
    ours.close()
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 1, DAY)])
    w.flush_all()
    assert w.send_written() == 0 and w.feed is None and w.written == {}
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 2, DAY)])
    w.flush_all()
    assert w.written == {} and w.send_written() == 0
    assert sum("written feed is broken" in r.message for r in caplog.records) == 1
    assert ids(tmp_path) == [1, 2]  # the rows do not depend on the feed


def test_no_feed_nothing_kept(tmp_path):
    w = make_writer(tmp_path)
    feed(w, rec.KIND_TRADES, [trade(b"BTC-USD", 1, DAY)])
    w.flush_all()
    assert w.written == {}


def test_open_table_counters_on_health_and_metrics(tmp_path):
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from mdlogger.health import health_document
    from mdlogger.metrics import render_metrics
    from mdlogger.view import ServiceView, WriterView

    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY + 3600, max_open_tables=2)
    for sym, tid in ((b"BTC-USD", 1), (b"ETH-USD", 1), (b"SOL-USD", 1), (b"BTC-USD", 2)):  # two tables open at most
        feed(w, rec.KIND_TRADES, [trade(sym, tid, DAY + 10)])
        w.flush_all()
    w.fsync_all()
    w.stats.set("open_tables", len(w.tables.files))
    view = ServiceView(started=time.time(), pid=1, stall_timeout_secs=10.0, slots=(),
                       writer=WriterView("running", 0, "", 0, w.stats), exchanges=())
    _code, doc = health_document(view, time.time())
    assert {k: doc["writer"][k] for k in ("open_tables", "table_cache", "table_opens", "evictions",
                                          "reopened_tables", "fsyncs")} == {
        "open_tables": 2, "table_cache": 2, "table_opens": 4, "evictions": 2, "reopened_tables": 1, "fsyncs": 24}
    samples = {s.name: s.value for f in text_string_to_metric_families(render_metrics(view, time.time()).decode())
               for s in f.samples}
    assert samples["mdlogger_writer_evictions_total"] == 2 and samples["mdlogger_writer_reopened_tables_total"] == 1
    assert samples["mdlogger_writer_fsyncs_total"] == 24 and samples["mdlogger_writer_table_opens_total"] == 4
    assert samples["mdlogger_writer_open_tables"] == 2 and samples["mdlogger_writer_table_cache"] == 2


def test_the_interval_fsync_is_spread_over_wake_ups_and_misses_no_table(tmp_path, monkeypatch):
    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    w = Writer(settings, Block(writer_fields()), clock=lambda: DAY + 3600, max_open_tables=100)
    symbols = [("S%d-USD" % i).encode() for i in range(150)]  # 150 tables through a cache of 100
    for sym in symbols:
        feed(w, rec.KIND_TRADES, [trade(sym, 1, DAY + 10)])
    w.flush_all()
    assert w.stats.get("evictions") == 50 and len(w.tables.to_sync) == 50
    fsyncs = count_fsyncs(monkeypatch)
    w.start_fsync_round(0.0)
    assert len(w.fsync_due) == 150 and w.fsync_share == writer_module.FSYNC_MIN_SHARE
    shares = []
    while w.fsync_due:
        before = len(fsyncs)
        w.fsync_some()
        shares.append(len(fsyncs) - before)
    assert shares == [64 * 8, 64 * 8, 22 * 8]  # every column of every table once, in three wake-ups
    assert w.tables.to_sync == set() and w.tables.dirty() == []
    feed(w, rec.KIND_TRADES, [trade(symbols[0], 2, DAY + 11)])  # written after its fsync: due again
    w.flush_all()
    assert w.tables.dirty() == [TableKey("coinbase", "S0-USD", rec.KIND_TRADES, "24.11.26")]
    assert w.stats.get("rows_trades") == 151
