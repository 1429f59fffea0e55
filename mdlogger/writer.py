"""The writer process: the only process that opens data files.

::

    slot pipes (one per worker slot)          control socket (SEQPACKET)
          |  frames of packed records               |  add (fd, exchange, symbols) / remove slot, drain
          v                                         v
    FrameReader.fill -> frames_ready -> Writer.take_frame
          MD rows ------------------------------------------------+
          trades, snapshot trades, resume markers                  |
             -> GapEngine (one per exchange, mdlogger/gaps.py):    |
                dedupe against the mark, detect gaps, hold rows    |
                behind an open gap  --request--> backfill threads  |
                (REST, mdlogger/backfill.py) --filled/failed--+    |
                <-- wake-up pipe + results queue -------------+    |
             -> rows in exchange order ----------------------------+-> pending wire records per table-day
                                                              |
                           every flush_interval_secs (20 ms by default), or when a table
                           holds buffer_size bytes: the records are cut into column files
                           in C (storage.record_columns) and TableFiles.append writes them
                           (all columns of the table, all or nothing) -- rows reach the OS
                           promptly, so a writer crash loses nothing a worker handed over
                           (held rows excepted: their gap is detected again at the next
                           start and fetched)
                                                              |
                 every fsync_interval_secs, at a seal and at exit: fsync (data and the gap ledger)
                 every 30 s: seal finished days (mdlogger/seal.py) whose gaps are settled
                 at most once a second: the "written" feed names the TRADES tables appended to

**One pass.** A frame's records stay bytes from the pipe to the file. Its
symbols are looked at with one unpack (one bytes object per record, none per
field); a frame of one symbol, the usual case, goes on whole, another is cut
into one block per symbol. The gap engine passes a block in the steady state
after a look at its ids and last rows (``GapEngine.trades_block``); anything
else (a gap, a resume, a snapshot, a duplicate) is unpacked and takes the
per-row path, the reference. A table-day's pending rows are its wire records
concatenated, sliced into columns at flush (no tuple per row, no ``struct.pack``
per column): the files are byte for byte what the per-row path writes
(tests/test_writer.py replays a recorded stream through both).

**Open files**: mdlogger/tables.py (a cache sized from the descriptor limit; no fsync on eviction).

On start-up it repairs torn tables of the last days (a previous writer or the
whole tree may have been killed mid-flush). On ``drain`` (the supervisor has
stopped every worker) or when the supervisor disappears, it reads every pipe
dry, gives open gaps a moment to be filled, flushes, fsyncs and exits 0.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import queue
import select
import selectors
import signal
import socket
import struct
import time

from setproctitle import setproctitle

from . import records as rec
from . import seal
from .backfill import Backfiller
from .exchanges import adapter_class
from .exchanges.base import SymbolInfo
from .gaps import GapEngine
from .ledger import Gap, GapLedger, read_gaps
from .logs import configure_child
from .polling import readable
from .settings import Settings
from .stats import Block, gap_field, writer_fields
from .storage import TableKey, expired_days, last_trades, record_columns, repair_all, set_file_mode
from .tables import TableCache, raise_nofile_limit, table_cache_size
from .transport import FrameReader

log = logging.getLogger("mdlogger.writer")

FEED_INTERVAL_SECS = 1.0  # the "written" feed: at most one round of datagrams a second
FEED_MAX_BYTES = 60 * 1024  # largest datagram
MARK_TAIL_ROWS = 256  # rows read from the end of a day's trades to recover the mark
REPAIR_DAYS_BACK = 3
SEAL_CHECK_SECS = 30.0  # how often the writer looks for days to seal
FSYNC_SPREAD_SECS = 1.0  # the interval's fsync is spread over this long (Writer.start_fsync_round)
FSYNC_MIN_SHARE = 64  # tables fsynced per wake-up at least (a small service fsyncs in one go)
ROUND_BUSY_BYTES = 1 << 18  # a read round that took this much starts the next one without sleeping
STOP_WAIT_SECS = 2.0  # at a stop, open gaps get this long to be filled before their held rows go out
EXIT_OK = 0
CONTROL_MAX = 1 << 20  # largest control message: an "add" lists the slot's symbols
_MARK_COLUMNS = ("id", "time", "nanos", "price", "size", "side")


def writer_main(settings: Settings, control: socket.socket, stats_array, log_conn, log_level: int,
                feed: socket.socket | None = None) -> None:
    """Entry point of the writer process (arguments are explicit; nothing inherited).

    ``feed``: the writer's end of the "written" feed (a SEQPACKET socket), or None.
    """
    setproctitle("mdlogger: writer")  # what ps and top show
    set_file_mode(settings.logger.file_mode)  # data files, ledger and manifests (logger.file_mode)
    configure_child(log_conn.fileno(), log_level, "writer")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the supervisor decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drained on command, after the workers stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stats = Block(writer_fields(), stats_array)
    stats.set("pid", os.getpid())
    stats.set("started", time.time())
    stats.set("heartbeat", time.monotonic())
    limit = raise_nofile_limit()
    writer = Writer(settings, stats, max_open_tables=table_cache_size(limit), feed=feed)
    log.info("descriptor limit %d: up to %d tables open", limit, writer.tables.max_open)
    writer.repair()
    writer.serve(control)
    os._exit(EXIT_OK)


class Writer:
    def __init__(self, settings: Settings, stats: Block, clock=time.time, max_open_tables: int | None = None,
                 feed: socket.socket | None = None):
        self.settings = settings
        self.data_path = settings.logger.data_path
        self.buffer_size = settings.logger.buffer_size
        self.stats = stats
        self.clock = clock
        self.pending: dict[TableKey, bytearray] = {}  # wire records of each table-day, concatenated
        self.pending_total = 0
        self.max_pending = max(settings.logger.worker_buffer_bytes, 4 * self.buffer_size)
        self.tables = TableCache(self.data_path, stats, max_open_tables)
        self._keys: dict[tuple, TableKey] = {}  # (exchange, symbol field, kind, day number) -> key
        self._symbols: dict[bytes, bytes] = {}  # valid symbol fields -> symbol
        self.unsealed: set[TableKey] = set()  # tables whose day is known not to be sealed
        self._days_checked = (-1, 0.0)  # (day, monotonic time) old days' tables were last closed
        self.feed = feed
        if feed is not None:
            feed.setblocking(False)
        self.written: dict[TableKey, int] = {}  # TRADES tables appended to since the last datagram -> rows
        self.last_feed = time.monotonic()
        self.readers: dict[int, FrameReader] = {}  # slot -> reader
        self.retention_done_for = -1  # the day index retention last ran on
        self.selector = selectors.DefaultSelector()
        self.last_flush = time.monotonic()
        self.last_fsync = time.monotonic()
        self.fsync_due: collections.deque[TableKey] = collections.deque()  # the spread fsync's tables to go
        self.fsync_share = FSYNC_MIN_SHARE
        self._io_error_logged = 0.0
        self.slot_exchange: dict[int, str] = {}
        self.engines: dict[str, GapEngine] = {}
        self._orphan_book: dict[str, dict[str, list]] = {}
        self.ledger = GapLedger(self.data_path)
        self.sealed: dict[tuple[str, str], bool] = {}  # (exchange, day) -> sealed
        self.seal_grace = settings.logger.seal_grace_secs
        self.last_seal_check = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.backfiller = Backfiller(settings, self._wake_w)

    # -- start-up ---------------------------------------------------------
    def repair(self) -> None:
        today = int(self.clock()) // 86400
        days = {rec.day_string((today + d) * 86400) for d in range(-REPAIR_DAYS_BACK, 2)}
        for key, cut in repair_all(self.data_path, days):
            self.stats.add("repaired_tables")
            log.warning(
                "repaired torn table %s/%s/%s day %s: cut %s",
                key.exchange,
                key.symbol,
                key.table,
                key.day,
                ", ".join("%s %d bytes" % item for item in sorted(cut.items())),
            )

    # -- the loop ----------------------------------------------------------
    def serve(self, control: socket.socket) -> None:
        """The loop. Idle, it watches every pipe; once rows flow, it reads the pipes once per flush.

        Reading a pipe as soon as a frame lands cost a wake-up per frame: at real
        rates (a worker seals a frame every few ms per message) that was most of
        the writer's CPU. So while frames keep coming the pipes are not watched:
        the loop sleeps until the next flush (waking only for the control socket
        and backfill results), then reads every pipe dry, takes the frames and
        flushes. A row waits at most ``flush_interval_secs`` either way, in the
        pipe instead of in memory. A round that reads nothing returns the loop to
        watching the pipes, so the first rows after a quiet spell go out at once;
        a round that read a lot (a firehose) starts the next one without sleeping.
        """
        control.setblocking(False)
        self.selector.register(control, selectors.EVENT_READ, "control")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "backfill")
        # Between rounds, and while too much waits for the disk, the pipes are not
        # watched: they fill, and workers count what they must drop.
        quiet = selectors.DefaultSelector()
        quiet.register(control, selectors.EVENT_READ, "control")
        quiet.register(self._wake_r, selectors.EVENT_READ, "backfill")
        interval = self.settings.logger.flush_interval_secs
        flowing = False  # rows came in the last round: read the pipes by the clock, not by wake-ups
        busy = False  # the last round read a lot: the next one starts at once
        while True:
            now = time.monotonic()
            due = self.last_flush + interval
            if busy:
                events = quiet.select(0)
            elif flowing or self.pending_total >= self.max_pending:
                events = quiet.select(max(0.0, min(0.25, due - now)))
            else:
                events = self.selector.select(0.25 if not self.pending_total else max(0.0, min(0.25, due - now)))
            woken = False
            for key, _ in events:
                if key.data == "control":
                    if not self._on_control(control):
                        self.drain_and_close()
                        return
                elif key.data == "backfill":
                    self.take_backfills()
                else:
                    woken = True  # a pipe has frames (it is read below, with every other pipe)
            if woken or busy or (flowing and time.monotonic() >= due):
                got = self.read_round()
                flowing, busy = got > 0, got >= ROUND_BUSY_BYTES
            self._tick()

    def read_round(self) -> int:
        """Read every slot's pipe once (unless too much waits for the disk); returns the bytes read."""
        got = 0
        for slot in list(self.readers):
            if self.pending_total >= self.max_pending:
                break
            if slot in self.readers:  # (a slot removed meanwhile is skipped)
                got += self._read_slot(slot)
        return got

    def apply_retention(self) -> list[str]:
        """Once a day: remove day files older than ``retention_days`` (never today's or yesterday's)."""
        days = self.settings.logger.retention_days
        today = int(self.clock()) // 86400
        if not days or today == self.retention_done_for:
            return []
        self.retention_done_for = today
        keep_from = today - max(days, 1)  # yesterday at the earliest
        removed, gone = [], set()
        for path, day in expired_days(self.data_path, keep_from):
            try:
                os.unlink(path)
            except OSError as exc:
                log.error("retention: cannot remove %s: %s", path, exc)
                continue
            removed.append(path)
            gone.add(day)
        if removed:
            log.info("retention (%d days): removed %d files of days %s", days, len(removed),
                     ", ".join(sorted(gone, key=rec.day_index)))
        return removed

    def _tick(self) -> None:
        """After every wake-up of the loop. What does not have to run that often (retention, gap
        holds, the counters on /health) runs with the flush, every ``flush_interval_secs``: at
        real rates the loop wakes for nearly every frame, and publishing the gap counters of
        every exchange each time cost more than the rows."""
        now = time.monotonic()
        self.stats.set("heartbeat", now)
        if now - self.last_flush >= self.settings.logger.flush_interval_secs:
            self.apply_retention()
            for engine in self.engines.values():
                engine.expire()
            self.flush_all()  # (publishes the gap counters)
            self.stats.set("pending_rows", self.pending_rows())
            self.stats.set("open_tables", len(self.tables))
        if now - self.last_fsync >= self.settings.logger.fsync_interval_secs:
            self.start_fsync_round(now)
        if self.fsync_due:
            self.fsync_some()
        if now - self.last_seal_check >= SEAL_CHECK_SECS:
            self.last_seal_check = now
            self.seal_due()
        if self.written and now - self.last_feed >= FEED_INTERVAL_SECS:
            self.send_written(now)

    # -- the "written" feed -------------------------------------------------------
    def send_written(self, now: float | None = None) -> int:
        """Name the TRADES tables appended to since the last datagram, with their rows on disk.

        The contract (docs/ARCHITECTURE.md, "Analytics"): datagrams
        ``{"op": "written", "tables": [[exchange, symbol, "DD.MM.YY", rows], ...]}``
        of at most ``FEED_MAX_BYTES``, at most one round a second (the caller's
        tick), never blocking. A full socket leaves the tables not sent queued
        for the next round (they carry totals, so nothing is lost); a broken
        one ends the feed (logged once). Returns the datagrams sent.
        """
        self.last_feed = time.monotonic() if now is None else now
        if self.feed is None:
            self.written.clear()
            return 0
        sent = 0
        for datagram, keys in _written_datagrams(self.written):
            try:
                self.feed.send(datagram)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("the written feed is broken (%s): no more datagrams from this writer", exc)
                self.feed = None
                self.written.clear()
                break
            sent += 1
            for key in keys:
                del self.written[key]
        return sent

    def _publish_gaps(self) -> None:
        held = 0
        for name, engine in self.engines.items():
            held += engine.held_rows()
            if gap_field("gaps_detected", name) not in self.stats:
                continue  # an exchange the block has no counters for
            c = engine.counts
            for field, value in (("gaps_detected", c["detected"]), ("gaps_filled", c["filled"]),
                                 ("gaps_empty", c["empty"]), ("gaps_unrecoverable", c["unrecoverable"]),
                                 ("gaps_pending", engine.pending()), ("trades_backfilled", c["backfilled"]),
                                 ("rest_calls", self.backfiller.calls.get(name, 0)),
                                 ("oldest_pending_gap", engine.oldest_pending())):
                self.stats.set(gap_field(field, name), value)
        self.stats.set("held_rows", held)
        self.stats.set("duplicates", sum(e.counts["duplicates"] for e in self.engines.values()))

    def _on_control(self, control: socket.socket) -> bool:
        """Handle control messages; False when the writer must drain and exit."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, CONTROL_MAX, 4)
            except BlockingIOError:
                return True
            except ConnectionError:
                return False
            if not data:
                for fd in fds:
                    os.close(fd)
                log.warning("supervisor went away: draining and exiting")
                return False
            msg = json.loads(data)
            op = msg["op"]
            if op == "add":
                self.add_slot(msg["slot"], fds[0], msg["exchange"], msg.get("symbols", ()))
            elif op == "remove":
                self.remove_slot(msg["slot"])
            elif op == "drain":
                log.info("drain requested: reading every pipe dry")
                return False
            else:
                log.error("unknown control message %r", msg)

    def add_slot(self, slot: int, fd: int, exchange: str, symbols=()) -> None:
        """Read a slot's pipe from now on. Its frames are the ``exchange``'s: a pipe carries one slot."""
        if slot in self.readers:
            self.remove_slot(slot)
        self.slot_exchange[slot] = exchange
        self.backfiller.know(exchange, [SymbolInfo(sym, name, *sym.split("-", 1)) for sym, name in symbols])
        reader = FrameReader(fd)
        self.readers[slot] = reader
        self.selector.register(fd, selectors.EVENT_READ, slot)
        log.debug("reading slot %d on fd %d", slot, fd)

    def remove_slot(self, slot: int) -> None:
        reader = self.readers.pop(slot, None)
        if reader is None:
            return
        self._read_slot(slot, reader)
        self.selector.unregister(reader.fd)
        os.close(reader.fd)

    def _read_slot(self, slot: int, reader: FrameReader | None = None) -> int:
        reader = reader or self.readers[slot]
        got = reader.fill()
        before = reader.corrupt_bytes
        exchange = self.slot_exchange[slot]
        for kind, records in reader.frames_ready():
            self.take_frame(kind, exchange, records)
        if reader.corrupt_bytes != before:
            self.stats.add("corrupt_bytes", reader.corrupt_bytes - before)
            log.warning("slot %d: skipped %d corrupt bytes while resyncing", slot, reader.corrupt_bytes - before)
        return got

    # -- rows ---------------------------------------------------------------
    def take_frame(self, kind: int, exchange: str, records) -> None:
        """One frame of a slot whose exchange is ``exchange``: its records, concatenated wire records."""
        if kind == rec.KIND_MD:
            self._take_md(exchange, records)
            return
        engine = self.engine(exchange)
        for field, blob, count in _by_symbol(records, _TRADE_SIZE):
            symbol = self._symbol(field, count)
            if symbol is None:
                continue
            if kind == rec.KIND_RESUME:
                last_id = _ID.unpack_from(blob, len(blob) - _TRADE_SIZE + rec.SYMBOL_FIELD)[0]
                engine.resume(symbol, "restart" if last_id == 1 else "reconnect")
            else:
                engine.trades_block(symbol, blob, kind == rec.KIND_SNAPSHOT)

    def _take_md(self, exchange: str, records) -> None:
        """Tickers have no gap engine: each row goes to the table of its symbol and of its own day."""
        for field, day_no, blob, count in _md_groups(records):
            symbol = self._symbol(field, count)
            if symbol is None:
                continue
            self._pend(self._key(exchange, symbol, rec.KIND_MD, day_no), blob)

    def _symbol(self, field: bytes, rows: int):
        """The symbol of a wire record's symbol field, or None (its ``rows`` counted as refused).

        Symbols are validated where they enter (the adapters' discovery) and
        frames are CRC-checked, so a worker's records always pass. The writer
        checks once all the same, here, because the symbol is about to name a
        directory: a frame that is well formed yet wrong (a worker bug, or a CRC
        that matches by chance after a resync) costs its rows, counted, where
        storage.table_dir's own guard would raise out of the writer's loop.
        """
        symbol = self._symbols.get(field)
        if symbol is not None:
            return symbol
        symbol = field.rstrip(b"\0")
        if rec.valid_symbol_bytes(symbol):
            if len(self._symbols) >= 1 << 16:
                self._symbols.clear()
            self._symbols[field] = symbol
            return symbol
        self.stats.add("refused_records", rows)
        return None

    def _key(self, exchange: str, symbol: bytes, kind: int, day_no: int) -> TableKey:
        """The key of a table-day, made once (a key is looked up for every block of rows)."""
        ident = (exchange, symbol, kind, day_no)
        key = self._keys.get(ident)
        if key is None:
            if len(self._keys) >= 1 << 16:
                self._keys.clear()
            key = self._keys[ident] = TableKey(exchange, symbol.decode("ascii"), kind, rec.day_string(day_no * 86400))
        return key

    def _store_trades(self, exchange: str, symbol: bytes, rows: list) -> None:
        """Rows (tuples) the gap engine let through by the per-row path, or backfilled, in order."""
        pack = rec.TRADE_WIRE.pack
        self._store_block(exchange, symbol, b"".join([pack(*row) for row in rows]))

    def _store_block(self, exchange: str, symbol: bytes, blob) -> None:
        """Wire records the gap engine let through, in order: into the table of each row's day.

        When the first and the last row are of one day, every row goes there
        (as it always has: a row of another day between two of the same day
        keeps the table in arrival order); otherwise the block is cut where the
        day changes from the day of the run's first row.
        """
        size = _TRADE_SIZE
        end = len(blob) - size
        day_no = _TIME.unpack_from(blob, _TIME_AT)[0] // 86400
        if _TIME.unpack_from(blob, end + _TIME_AT)[0] // 86400 == day_no:
            self._pend(self._key(exchange, symbol, rec.KIND_TRADES, day_no), blob)
            return
        start = 0
        for i in range(size, end + size + 1, size):
            day = _TIME.unpack_from(blob, i + _TIME_AT)[0] // 86400 if i <= end else None
            if day != day_no:
                self._pend(self._key(exchange, symbol, rec.KIND_TRADES, day_no), blob[start:i])
                start, day_no = i, day

    def _pend(self, key: TableKey, blob) -> None:
        if key not in self.unsealed:
            if self._is_sealed(key.exchange, key.day):
                rows = len(blob) // rec.WIRE[key.kind].size
                self.stats.add("late_rows", rows)
                log.error("%s/%s/%s: %d rows for day %s, which is sealed: refused", key.exchange, key.symbol,
                          key.table, rows, key.day)
                return
            self.unsealed.add(key)
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = bytearray()
        pending += blob
        self.pending_total += len(blob)
        if len(pending) >= self.buffer_size:
            self.flush_table(key)

    def pending_rows(self) -> int:
        return sum(len(buf) // rec.WIRE[key.kind].size for key, buf in self.pending.items())

    # -- gaps ------------------------------------------------------------------
    def engine(self, exchange: str) -> GapEngine:
        engine = self.engines.get(exchange)
        if engine is None:
            xs = self.settings.exchange(exchange)
            engine = self.engines[exchange] = GapEngine(
                exchange,
                consecutive_ids=adapter_class(exchange).history.consecutive_ids,
                emit=lambda symbol, rows, x=exchange: self._store_trades(x, symbol, rows),
                emit_block=functools.partial(self._store_block, exchange),
                request=lambda og, x=exchange: self.backfiller.submit(x, og),
                record=self._record_gap,
                load_mark=lambda symbol, x=exchange: self._mark_rows(x, symbol),
                load_orphans=lambda symbol, x=exchange: self._orphans(x, symbol),
                hold_secs=xs.backfill_hold_secs,
                max_lookback_secs=xs.backfill_max_secs,
                wall=self.clock,
            )
        return engine

    def _record_gap(self, gap) -> None:
        try:
            self.ledger.record(gap)
        except OSError as exc:
            self.stats.add("io_errors")
            log.error("gap ledger: cannot record %s %s: %s", gap.exchange, gap.symbol, exc)
        level = logging.INFO if gap.fate in ("pending", "filled", "empty") else logging.WARNING
        log.log(level, "%s %s: gap after id %d / %d.%09d (%s): %s%s%s", gap.exchange, gap.symbol, gap.from_id,
                gap.from_sec, gap.from_nanos, gap.why, gap.fate,
                " (%d trades)" % gap.trades if gap.fate == "filled" else "",
                ": " + gap.detail if gap.detail else "")

    def take_backfills(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                outcome, exchange, gap_id, payload = self.backfiller.results.get_nowait()
            except queue.Empty:
                return
            engine = self.engines.get(exchange)
            if engine is None:
                continue
            if outcome == "filled":
                engine.filled(gap_id, payload)
            elif outcome == "partial":
                engine.filled(gap_id, payload[0], partial=payload[1])
            else:
                engine.failed(gap_id, payload)

    def _orphans(self, exchange: str, symbol: str) -> list:
        """Gaps of a symbol that an earlier writer recorded as pending and never settled (it was killed)."""
        book = self._orphan_book.get(exchange)
        if book is None:
            book = self._orphan_book[exchange] = {}
            today = int(self.clock()) // 86400
            for d in (-1, 0):
                try:
                    entries = read_gaps(self.data_path, exchange, rec.day_string((today + d) * 86400))
                except OSError as exc:
                    log.error("gap ledger of %s: %s", exchange, exc)
                    continue
                for entry in entries:
                    if entry.get("fate") == "pending":
                        book.setdefault(entry["symbol"], []).append(Gap.from_dict(entry))
        return book.pop(symbol, [])

    def _mark_rows(self, exchange: str, symbol: str) -> list:
        """The last stored trades of a symbol (yesterday's, today's and tomorrow's files), oldest first."""
        today = int(self.clock()) // 86400
        rows = []
        for d in (-1, 0, 1):
            key = TableKey(exchange, symbol, rec.KIND_TRADES, rec.day_string((today + d) * 86400))
            rows.extend(last_trades(self.data_path, key, MARK_TAIL_ROWS, _MARK_COLUMNS))
        return rows

    # -- sealed days -------------------------------------------------------------
    def _is_sealed(self, exchange: str, day: str) -> bool:
        known = self.sealed.get((exchange, day))
        if known is None:
            known = self.sealed[(exchange, day)] = seal.is_sealed(self.data_path, exchange, day)
        return known

    def seal_due(self) -> list:
        """Seal every finished day (plus grace) whose gaps are all settled."""
        done = []
        try:
            due = seal.days_to_seal(self.data_path, self.clock(), self.seal_grace)
        except OSError as exc:
            log.error("cannot look for days to seal: %s", exc)
            return done
        for exchange, day in due:
            engine = self.engines.get(exchange)
            day_end = (rec.day_index(day) + 1) * 86400
            if engine is not None and engine.pending_since(day_end):
                continue  # a gap of that day is still being filled
            for key in [k for k in self.pending if k.exchange == exchange and k.day == day]:
                self.flush_table(key)
            self.tables.sync(lambda k: k.exchange == exchange and k.day == day, self._io_error, close=True)
            try:
                self.ledger.sync()
                path = seal.seal_day(self.data_path, exchange, day)
            except OSError as exc:
                self.stats.add("io_errors")
                log.error("cannot seal %s day %s: %s", exchange, day, exc)
                continue
            self.sealed[(exchange, day)] = True
            self.unsealed = {k for k in self.unsealed if not (k.exchange == exchange and k.day == day)}
            self.stats.add("sealed_days")
            log.info("sealed %s day %s: %s", exchange, day, path)
            done.append((exchange, day))
        return done

    # -- files --------------------------------------------------------------
    def flush_table(self, key: TableKey) -> bool:
        records = self.pending.get(key)
        if not records:
            return True
        rows = len(records) // rec.WIRE[key.kind].size
        try:
            files = self.tables.get(key)
            written = files.append(record_columns(key.kind, records), rows)
        except OSError as exc:
            self._io_error(key, exc)
            return False
        self.stats.add("bytes_written", written)
        self.stats.add("rows", rows)
        self.stats.add("rows_md" if key.kind == rec.KIND_MD else "rows_trades", rows)
        if key.kind == rec.KIND_TRADES and self.feed is not None:
            self.written[key] = files.rows
        self.pending_total -= len(records)
        del self.pending[key]
        return True

    def _io_error(self, key: TableKey, exc: OSError) -> None:
        self.stats.add("io_errors")
        now = time.monotonic()
        if now - self._io_error_logged > 10:
            self._io_error_logged = now
            log.error(
                "cannot write %s/%s/%s %s: %s (rows kept in memory and retried; %d bytes pending)",
                key.exchange, key.symbol, key.table, key.day, exc, self.pending_total,
            )
        self.tables.drop(key)

    def flush_all(self) -> None:
        started = time.monotonic()
        for key in list(self.pending):
            self.flush_table(key)
        self.last_flush = time.monotonic()
        self.stats.set("last_flush", time.time())
        self.stats.set("flush_seconds", self.last_flush - started)
        self._close_old_days()
        self._publish_gaps()

    def _close_old_days(self) -> None:
        """Close the tables of days before yesterday (and after tomorrow): when the day changes, and
        once a minute for a table a late row opened (not every flush: 8,000 open tables are 8,000
        looks)."""
        today = int(self.clock()) // 86400
        now = time.monotonic()
        if today == self._days_checked[0] and now - self._days_checked[1] < 60.0:
            return
        self._days_checked = (today, now)
        keep = {rec.day_string((today + d) * 86400) for d in (-1, 0, 1)}
        self.tables.close_days_but(keep, self.pending)
        if len(self.unsealed) > 4 * len(self.tables) + 1024:
            self.unsealed = {k for k in self.unsealed if k.day in keep}

    def _settle_gaps(self) -> None:
        """At a stop: give open gaps a moment, then let their held rows out (the gaps stay recorded)."""
        deadline = time.monotonic() + STOP_WAIT_SECS
        while any(e.pending() for e in self.engines.values()) and time.monotonic() < deadline:
            readable([self._wake_r], 0.05)
            self.take_backfills()
        for engine in self.engines.values():
            for gap_id in list(engine.open):
                engine.failed(gap_id, "the service stopped before it was filled")
        self.backfiller.close()

    def start_fsync_round(self, now: float) -> None:
        """The interval's fsync, spread: every table written since its last fsync is queued, and
        :meth:`fsync_some` takes a share at each wake-up, so that all are done within
        ``FSYNC_SPREAD_SECS``. In one go, 8,000 tables are some 60,000 fsyncs: seconds on a real disk
        during which no pipe would be read. At a seal and at stop, :meth:`fsync_all` does all at once."""
        self.last_fsync = now
        self.fsync_due.extend(self.tables.dirty())
        rounds = max(1.0, FSYNC_SPREAD_SECS / max(self.settings.logger.flush_interval_secs, 0.001))
        self.fsync_share = max(FSYNC_MIN_SHARE, int(len(self.fsync_due) / rounds) + 1)

    def fsync_some(self) -> None:
        """The next share of the spread fsync; the gap ledger is fsynced with the last one."""
        due = self.fsync_due
        batch = [due.popleft() for _ in range(min(self.fsync_share, len(due)))]
        self.tables.sync_keys(batch, self._io_error)
        if not due:
            try:
                self.ledger.sync()
            except OSError as exc:
                log.error("gap ledger: fsync failed: %s", exc)

    def fsync_all(self) -> None:
        """fsync every table written since its last fsync, open or closed since, and the gap ledger."""
        self.fsync_due.clear()
        self.tables.sync(lambda key: True, self._io_error)
        try:
            self.ledger.sync()
        except OSError as exc:
            log.error("gap ledger: fsync failed: %s", exc)
        self.last_fsync = time.monotonic()

    def drain_and_close(self) -> None:
        """Read every pipe dry, settle open gaps, write everything, fsync, close."""
        while True:
            got = 0
            for slot in list(self.readers):
                got += self._read_slot(slot)
                if self.pending_total >= self.max_pending:
                    self.flush_all()
            if not got:
                break
        self._settle_gaps()
        self.flush_all()
        self.fsync_all()
        self.ledger.sync()
        self.ledger.close()
        if self.pending_total:
            self.stats.add("dropped_records", self.pending_rows())
            log.error("exiting with %d rows that could not be written", self.pending_rows())
        self.tables.close_all()
        log.info(
            "writer done: %d rows written, %d I/O errors",
            int(self.stats.get("rows")),
            int(self.stats.get("io_errors")),
        )


# -- frames to blocks -------------------------------------------------------------------------------

_TRADE_SIZE = rec.TRADE_WIRE.size
_MD_SIZE = rec.MD_WIRE.size
_ID = struct.Struct("<Q")
_TIME = struct.Struct("<I")
_TIME_AT = rec.SYMBOL_FIELD + 8  # a TRADE_WIRE record: symbol, id, time, ...
_FIELDS: dict[tuple[str, int], struct.Struct] = {}
_FIELDS_MAX = 128  # frames hold at most 78 records; longer inputs are unpacked record by record


def _fields(fmt: str, data, n: int) -> tuple:
    """The fields ``fmt`` picks from each of the ``n`` records of ``data``, flat: one unpack in C."""
    if n > _FIELDS_MAX:
        one = struct.Struct("<" + fmt)
        return tuple(v for item in one.iter_unpack(data) for v in item)
    unpack = _FIELDS.get((fmt, n))
    if unpack is None:
        unpack = _FIELDS[(fmt, n)] = struct.Struct("<" + fmt * n)
    return unpack.unpack(data)


_TRADE_SYMBOL = "%ds%dx" % (rec.SYMBOL_FIELD, _TRADE_SIZE - rec.SYMBOL_FIELD)
_MD_SYMBOL_TIME = "%dsI%dx" % (rec.SYMBOL_FIELD, _MD_SIZE - rec.SYMBOL_FIELD - 4)


def _by_symbol(records, size: int) -> list:
    """``[(symbol field, records of that symbol, count)]`` of concatenated wire records, in order of
    first appearance, each symbol's records in their order. A frame of one symbol is one block as it
    came; the symbols are read with one unpack (one bytes object per record, none per other field)."""
    n = len(records) // size
    if n <= 1:
        return [(bytes(records[: rec.SYMBOL_FIELD]), records, n)] if n else []
    syms = _fields(_TRADE_SYMBOL, records, n)
    first = syms[0]
    if syms.count(first) == n:
        return [(first, records, n)]
    runs: dict[bytes, list] = {}
    start, prev = 0, first
    for i, sym in enumerate(syms):
        if sym != prev:
            runs.setdefault(prev, []).append(records[start * size : i * size])
            start, prev = i, sym
    runs.setdefault(prev, []).append(records[start * size :])
    out = []
    for sym, parts in runs.items():
        blob = parts[0] if len(parts) == 1 else b"".join(parts)
        out.append((sym, blob, len(blob) // size))
    return out


def _md_groups(records) -> list:
    """``[(symbol field, day number, records, count)]`` of concatenated MD wire records: grouped by
    symbol and by each row's own day, in order of first appearance, rows in order."""
    size = _MD_SIZE
    n = len(records) // size
    if not n:
        return []
    f = _fields(_MD_SYMBOL_TIME, records, n)
    syms, secs = f[0::2], f[1::2]
    first = syms[0]
    day_no = secs[0] // 86400
    if syms.count(first) == n and min(secs) // 86400 == day_no == max(secs) // 86400:
        return [(first, day_no, records, n)]
    groups: dict[tuple, list] = {}
    for i in range(n):
        gk = (syms[i], secs[i] // 86400)
        part = records[i * size : (i + 1) * size]
        bucket = groups.get(gk)
        if bucket is None:
            groups[gk] = [part]
        else:
            bucket.append(part)
    return [(sym, day, b"".join(parts), len(parts)) for (sym, day), parts in groups.items()]


def _written_datagrams(written: dict) -> list[tuple[bytes, list]]:
    """The "written" datagrams naming ``written`` (key -> rows), each at most ``FEED_MAX_BYTES``, with
    the keys each one names."""
    head, tail = b'{"op":"written","tables":[', b"]}"
    out, entries, keys = [], [], []
    size = len(head) + len(tail)
    for key, rows in written.items():
        entry = json.dumps([key.exchange, key.symbol, key.day, rows], separators=(",", ":")).encode("ascii")
        if entries and size + len(entry) + 1 > FEED_MAX_BYTES:
            out.append((head + b",".join(entries) + tail, keys))
            entries, keys = [], []
            size = len(head) + len(tail)
        entries.append(entry)
        keys.append(key)
        size += len(entry) + 1
    if entries:
        out.append((head + b",".join(entries) + tail, keys))
    return out
