"""The writer process: the only process that opens data files.

::

    slot pipes (one per worker slot)          control socket (SEQPACKET)
          |  frames of packed records               |  add/remove slot (+ fd), drain
          v                                         v
    FrameReader.fill -> frames_ready -> Writer.take_frame -> pending rows per table-day
                                                              |
                           every flush_interval_secs, or when a table holds
                           buffer_size bytes: TableFiles.append (all columns
                           of the table, all or nothing)
                                                              |
                                           every fsync_interval_secs and at exit: fsync

On start-up it repairs torn tables of the last days (a previous writer or the
whole tree may have been killed mid-flush). On ``drain`` (the supervisor has
stopped every worker) or when the supervisor disappears, it reads every pipe
dry, flushes, fsyncs and exits 0.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import selectors
import signal
import socket
import time
from collections import OrderedDict

from . import records as rec
from .logs import configure_child
from .settings import Settings
from .stats import WRITER_FIELDS, Block
from .storage import TableFiles, TableKey, expired_days, last_trades, pack_column, repair_all
from .transport import FrameReader

log = logging.getLogger("mdlogger.writer")

MAX_OPEN_TABLES = 256
MARK_TAIL_ROWS = 256  # rows read from the end of a day's trades to recover the mark
REPAIR_DAYS_BACK = 3
EXIT_OK = 0


_BY_ID = operator.itemgetter(1)
_BY_TIME = operator.itemgetter(2, 3)


def _newer(row: tuple, mark: list) -> bool:
    """A trade row (symbol, id, sec, nanos, ...) is newer than the mark: by id when both have one."""
    if row[1] and mark[0]:
        return row[1] > mark[0]
    return (row[2], row[3]) > (mark[1], mark[2])


def writer_main(settings: Settings, control: socket.socket, stats_array, log_conn, log_level: int) -> None:
    """Entry point of the writer process (arguments are explicit; nothing inherited)."""
    configure_child(log_conn.fileno(), log_level, "writer")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the supervisor decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drained on command, after the workers stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stats = Block(WRITER_FIELDS, stats_array)
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
        self.marks: dict[tuple[str, str], list] = {}  # (exchange, symbol) -> [id, sec, nanos]
        self.retention_done_for = -1  # the day index retention last ran on
        self.selector = selectors.DefaultSelector()
        self.last_flush = time.monotonic()
        self.last_fsync = time.monotonic()
        self._io_error_logged = 0.0

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
        if now - self.last_flush >= self.settings.logger.flush_interval_secs:
            self.flush_all()
        if now - self.last_fsync >= self.settings.logger.fsync_interval_secs:
            self.fsync_all()
        self.stats.set("pending_rows", sum(len(rows) for rows in self.pending.values()))
        self.stats.set("open_tables", len(self.files))

    def _on_control(self, control: socket.socket) -> bool:
        """Handle control messages; False when the writer must drain and exit."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, 4096, 4)
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
                self.add_slot(msg["slot"], fds[0])
            elif op == "remove":
                self.remove_slot(msg["slot"])
            elif op == "drain":
                log.info("drain requested: reading every pipe dry")
                return False
            else:
                log.error("unknown control message %r", msg)

    def add_slot(self, slot: int, fd: int) -> None:
        if slot in self.readers:
            self.remove_slot(slot)
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
        for kind, _exchange, records in reader.frames_ready():
            self.take_frame(kind, _exchange, records)
        if reader.corrupt_bytes != before:
            self.stats.add("corrupt_bytes", reader.corrupt_bytes - before)
            log.warning("slot %d: skipped %d corrupt bytes while resyncing", slot, reader.corrupt_bytes - before)
        return got

    # -- rows ---------------------------------------------------------------
    def take_frame(self, kind: int, exchange_code: int, records: bytes) -> None:
        exchange = rec.EXCHANGE_NAMES.get(exchange_code)
        wire = rec.WIRE[kind]
        if exchange is None:
            self.stats.add("refused_records", len(records) // wire.size)
            return
        tindex = rec.TIME_INDEX[kind]
        row_size = wire.size
        day_string = rec.day_string
        groups: dict[tuple, list] = {}
        for row in wire.iter_unpack(records):
            gk = (row[0], row[tindex] // 86400)
            bucket = groups.get(gk)
            if bucket is None:
                bucket = groups[gk] = []
            bucket.append(row)
        table_kind = rec.KIND_MD if kind == rec.KIND_MD else rec.KIND_TRADES
        for (sym, day_no), rows in groups.items():
            symbol = sym.rstrip(b"\0")
            if not rec.valid_symbol_bytes(symbol):
                self.stats.add("refused_records", len(rows))
                continue
            name = symbol.decode("ascii")
            if table_kind == rec.KIND_TRADES:
                rows = self._apply_mark(exchange, name, rows, kind == rec.KIND_SNAPSHOT)
                if not rows:
                    continue
            key = TableKey(exchange, name, table_kind, day_string(day_no * 86400))
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

    # -- the last stored trade per symbol ---------------------------------------
    def _apply_mark(self, exchange: str, symbol: str, rows: list, snapshot: bool) -> list:
        """Keep snapshot trades newer than the symbol's last stored trade; move the mark.

        The mark is ``[id, sec, nanos]`` of the newest trade stored (or
        pending) for the symbol, recovered from the files the first time the
        symbol is seen, so it survives worker and writer restarts.
        """
        mark = self.marks.get((exchange, symbol))
        if mark is None:
            mark = self.marks[(exchange, symbol)] = self._mark_from_disk(exchange, symbol)
        if snapshot:
            kept = [r for r in rows if _newer(r, mark)]
            if len(kept) != len(rows):
                self.stats.add("duplicates", len(rows) - len(kept))
            rows = kept
        if rows:
            top_id = max(rows, key=_BY_ID)[1]
            newest = max(rows, key=_BY_TIME)
            if top_id > mark[0]:
                mark[0] = top_id
            if (newest[2], newest[3]) > (mark[1], mark[2]):
                mark[1], mark[2] = newest[2], newest[3]
        return rows

    def _mark_from_disk(self, exchange: str, symbol: str) -> list:
        today = int(self.clock()) // 86400
        mark = [0, 0, 0]
        for d in (-1, 0, 1):
            key = TableKey(exchange, symbol, rec.KIND_TRADES, rec.day_string((today + d) * 86400))
            last = last_trades(self.data_path, key, MARK_TAIL_ROWS)
            for tid, sec, nanos in last:
                mark[0] = max(mark[0], tid)
                if (sec, nanos) > (mark[1], mark[2]):
                    mark[1], mark[2] = sec, nanos
        return mark

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

    def _close_old_days(self) -> None:
        today = int(self.clock()) // 86400
        keep = {rec.day_string((today + d) * 86400) for d in (-1, 0, 1)}
        for key in [k for k in self.files if k.day not in keep and k not in self.pending]:
            files = self.files.pop(key)
            files.fsync()
            files.close()

    def fsync_all(self) -> None:
        for files in self.files.values():
            try:
                files.fsync()
            except OSError as exc:
                self._io_error(files.key, exc)
                break
        self.last_fsync = time.monotonic()

    def drain_and_close(self) -> None:
        """Read every pipe dry, write everything, fsync, close."""
        while True:
            got = 0
            for slot in list(self.readers):
                got += self._read_slot(slot)
                if self.pending_total >= self.max_pending:
                    self.flush_all()
            if not got:
                break
        self.flush_all()
        self.fsync_all()
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
