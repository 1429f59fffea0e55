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
             -> rows in exchange order ----------------------------+-> pending rows per table-day
                                                              |
                           every flush_interval_secs (50 ms by default), or when a table
                           holds buffer_size bytes: TableFiles.append (all columns of the
                           table, all or nothing) -- rows reach the OS promptly, so a writer
                           crash loses nothing a worker handed over (held rows excepted:
                           their gap is detected again at the next start and fetched)
                                                              |
                 every fsync_interval_secs and at exit: fsync (data and the gap ledger)
                 every 30 s: seal finished days (mdlogger/seal.py) whose gaps are settled

On start-up it repairs torn tables of the last days (a previous writer or the
whole tree may have been killed mid-flush). On ``drain`` (the supervisor has
stopped every worker) or when the supervisor disappears, it reads every pipe
dry, gives open gaps a moment to be filled, flushes, fsyncs and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import selectors
import signal
import socket
import time
from collections import OrderedDict

from setproctitle import setproctitle

from . import records as rec
from . import seal
from .backfill import Backfiller
from .exchanges import adapter_class
from .exchanges.base import SymbolInfo
from .gaps import GapEngine
from .ledger import Gap, GapLedger, read_gaps
from .logs import configure_child
from .settings import Settings
from .stats import Block, gap_field, writer_fields
from .storage import TableFiles, TableKey, expired_days, last_trades, pack_column, repair_all, set_file_mode
from .transport import FrameReader

log = logging.getLogger("mdlogger.writer")

MAX_OPEN_TABLES = 256
MARK_TAIL_ROWS = 256  # rows read from the end of a day's trades to recover the mark
REPAIR_DAYS_BACK = 3
SEAL_CHECK_SECS = 30.0  # how often the writer looks for days to seal
STOP_WAIT_SECS = 2.0  # at a stop, open gaps get this long to be filled before their held rows go out
EXIT_OK = 0
CONTROL_MAX = 1 << 20  # largest control message: an "add" lists the slot's symbols
_MARK_COLUMNS = ("id", "time", "nanos", "price", "size", "side")


def writer_main(settings: Settings, control: socket.socket, stats_array, log_conn, log_level: int) -> None:
    """Entry point of the writer process (arguments are explicit; nothing inherited)."""
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
    writer = Writer(settings, stats)
    writer.repair()
    writer.serve(control)
    os._exit(EXIT_OK)


class Writer:
    def __init__(self, settings: Settings, stats: Block, clock=time.time):
        self.settings = settings
        self.data_path = settings.logger.data_path
        self.buffer_size = settings.logger.buffer_size
        self.stats = stats
        self.clock = clock
        self.pending: dict[TableKey, list[tuple]] = {}
        self.pending_bytes: dict[TableKey, int] = {}
        self.pending_total = 0
        self.max_pending = max(settings.logger.worker_buffer_bytes, 4 * self.buffer_size)
        self.files: OrderedDict[TableKey, TableFiles] = OrderedDict()
        self.readers: dict[int, FrameReader] = {}  # slot -> reader
        self.retention_done_for = -1  # the day index retention last ran on
        self.selector = selectors.DefaultSelector()
        self.last_flush = time.monotonic()
        self.last_fsync = time.monotonic()
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
        control.setblocking(False)
        self.selector.register(control, selectors.EVENT_READ, "control")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "backfill")
        # While too much waits for the disk, only the control socket is
        # watched: the pipes fill, and workers count what they must drop.
        control_only = selectors.DefaultSelector()
        control_only.register(control, selectors.EVENT_READ, "control")
        interval = self.settings.logger.flush_interval_secs
        while True:
            now = time.monotonic()
            timeout = max(0.0, min(0.25, self.last_flush + interval - now))
            full = self.pending_total >= self.max_pending
            events = (control_only if full else self.selector).select(timeout)
            for key, _ in events:
                if key.data == "control":
                    if not self._on_control(control):
                        self.drain_and_close()
                        return
                elif key.data == "backfill":
                    self.take_backfills()
                elif key.data in self.readers and self.pending_total < self.max_pending:
                    self._read_slot(key.data)  # (a slot removed earlier in this batch is skipped)
            self._tick()

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
        now = time.monotonic()
        self.apply_retention()
        self.stats.set("heartbeat", now)
        for engine in self.engines.values():
            engine.expire()
        if now - self.last_flush >= self.settings.logger.flush_interval_secs:
            self.flush_all()
        if now - self.last_fsync >= self.settings.logger.fsync_interval_secs:
            self.fsync_all()
        if now - self.last_seal_check >= SEAL_CHECK_SECS:
            self.last_seal_check = now
            self.seal_due()
        self.stats.set("pending_rows", sum(len(rows) for rows in self.pending.values()))
        self.stats.set("open_tables", len(self.files))
        self._publish_gaps()

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
    def take_frame(self, kind: int, exchange: str, records: bytes) -> None:
        """One frame of a slot whose exchange is ``exchange``."""
        wire = rec.WIRE[kind]
        if kind == rec.KIND_MD:
            self._take_md(exchange, records)
            return
        by_symbol: dict[bytes, list] = {}
        for row in wire.iter_unpack(records):
            bucket = by_symbol.get(row[0])
            if bucket is None:
                bucket = by_symbol[row[0]] = []
            bucket.append(row)
        engine = self.engine(exchange)
        for sym, rows in by_symbol.items():
            symbol = self._symbol(sym, len(rows))
            if symbol is None:
                continue
            if symbol != sym:
                rows = [(symbol,) + row[1:] for row in rows]
            if kind == rec.KIND_RESUME:
                engine.resume(symbol, "restart" if rows[-1][1] == 1 else "reconnect")
            else:
                engine.trades(symbol, rows, kind == rec.KIND_SNAPSHOT)

    def _take_md(self, exchange: str, records: bytes) -> None:
        groups: dict[tuple, list] = {}
        for row in rec.MD_WIRE.iter_unpack(records):
            gk = (row[0], row[1] // 86400)
            bucket = groups.get(gk)
            if bucket is None:
                bucket = groups[gk] = []
            bucket.append(row)
        for (sym, day_no), rows in groups.items():
            symbol = self._symbol(sym, len(rows))
            if symbol is None:
                continue
            self._pend(TableKey(exchange, symbol.decode("ascii"), rec.KIND_MD, rec.day_string(day_no * 86400)),
                       rows, rec.MD_WIRE.size)

    def _symbol(self, field: bytes, rows: int):
        """The symbol of a wire record's symbol field, or None (its ``rows`` counted as refused).

        Symbols are validated where they enter (the adapters' discovery) and
        frames are CRC-checked, so a worker's records always pass. The writer
        checks once all the same, here, because the symbol is about to name a
        directory: a frame that is well formed yet wrong (a worker bug, or a CRC
        that matches by chance after a resync) costs its rows, counted, where
        storage.table_dir's own guard would raise out of the writer's loop.
        """
        symbol = field.rstrip(b"\0")
        if rec.valid_symbol_bytes(symbol):
            return symbol
        self.stats.add("refused_records", rows)
        return None

    def _store_trades(self, exchange: str, symbol: bytes, rows: list) -> None:
        """Rows the gap engine let through, in order: into the table of each row's day."""
        name = symbol.decode("ascii")
        day_no = rows[0][2] // 86400
        if rows[-1][2] // 86400 == day_no:
            self._pend(TableKey(exchange, name, rec.KIND_TRADES, rec.day_string(rows[0][2])), rows,
                       rec.TRADE_WIRE.size)
            return
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i][2] // 86400 != rows[start][2] // 86400:
                self._pend(TableKey(exchange, name, rec.KIND_TRADES, rec.day_string(rows[start][2])),
                           rows[start:i], rec.TRADE_WIRE.size)
                start = i

    def _pend(self, key: TableKey, rows: list, row_size: int) -> None:
        if self._is_sealed(key.exchange, key.day):
            self.stats.add("late_rows", len(rows))
            log.error("%s/%s/%s: %d rows for day %s, which is sealed: refused", key.exchange, key.symbol,
                      key.table, len(rows), key.day)
            return
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = []
            self.pending_bytes[key] = 0
        pending.extend(rows)
        added = len(rows) * row_size
        self.pending_bytes[key] += added
        self.pending_total += added
        if self.pending_bytes[key] >= self.buffer_size:
            self.flush_table(key)

    # -- gaps ------------------------------------------------------------------
    def engine(self, exchange: str) -> GapEngine:
        engine = self.engines.get(exchange)
        if engine is None:
            xs = self.settings.exchange(exchange)
            engine = self.engines[exchange] = GapEngine(
                exchange,
                consecutive_ids=adapter_class(exchange).history.consecutive_ids,
                emit=lambda symbol, rows, x=exchange: self._store_trades(x, symbol, rows),
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
            for key, files in list(self.files.items()):
                if key.exchange == exchange and key.day == day:
                    files.fsync()
                    files.close()
                    del self.files[key]
            try:
                self.ledger.sync()
                path = seal.seal_day(self.data_path, exchange, day)
            except OSError as exc:
                self.stats.add("io_errors")
                log.error("cannot seal %s day %s: %s", exchange, day, exc)
                continue
            self.sealed[(exchange, day)] = True
            self.stats.add("sealed_days")
            log.info("sealed %s day %s: %s", exchange, day, path)
            done.append((exchange, day))
        return done

    # -- files --------------------------------------------------------------
    def _table(self, key: TableKey) -> TableFiles:
        files = self.files.get(key)
        if files is None:
            while len(self.files) >= MAX_OPEN_TABLES:
                _, old = self.files.popitem(last=False)
                old.fsync()
                old.close()
            files = self.files[key] = TableFiles(self.data_path, key)
        else:
            self.files.move_to_end(key)
        return files

    def flush_table(self, key: TableKey) -> bool:
        rows = self.pending.get(key)
        if not rows:
            return True
        columns = rec.COLUMNS[key.kind]
        values = list(zip(*rows))[1:]  # drop the symbol field
        blobs = [pack_column(col, vals) for col, vals in zip(columns, values)]
        try:
            files = self._table(key)
            written = files.append(blobs, len(rows))
        except OSError as exc:
            self._io_error(key, exc)
            return False
        self.stats.add("bytes_written", written)
        self.stats.add("rows", len(rows))
        self.stats.add("rows_md" if key.kind == rec.KIND_MD else "rows_trades", len(rows))
        self.pending_total -= self.pending_bytes.pop(key)
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
        files = self.files.pop(key, None)
        if files is not None:
            files.close()

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
        today = int(self.clock()) // 86400
        keep = {rec.day_string((today + d) * 86400) for d in (-1, 0, 1)}
        for key in [k for k in self.files if k.day not in keep and k not in self.pending]:
            files = self.files.pop(key)
            files.fsync()
            files.close()

    def _settle_gaps(self) -> None:
        """At a stop: give open gaps a moment, then let their held rows out (the gaps stay recorded)."""
        deadline = time.monotonic() + STOP_WAIT_SECS
        while any(e.pending() for e in self.engines.values()) and time.monotonic() < deadline:
            select.select([self._wake_r], [], [], 0.05)
            self.take_backfills()
        for engine in self.engines.values():
            for gap_id in list(engine.open):
                engine.failed(gap_id, "the service stopped before it was filled")
        self.backfiller.close()

    def fsync_all(self) -> None:
        for files in self.files.values():
            try:
                files.fsync()
            except OSError as exc:
                self._io_error(files.key, exc)
                break
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
            self.stats.add("dropped_records", sum(len(r) for r in self.pending.values()))
            log.error("exiting with %d rows that could not be written", sum(len(r) for r in self.pending.values()))
        for files in self.files.values():
            files.close()
        self.files.clear()
        log.info(
            "writer done: %d rows written, %d I/O errors",
            int(self.stats.get("rows")),
            int(self.stats.get("io_errors")),
        )
