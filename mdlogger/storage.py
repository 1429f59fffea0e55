"""The columnar files: where they live, how rows are appended, how a torn table is repaired.

Layout (docs/FORMAT.md is the contract)::

    {data_path}/{exchange}/{symbol}/{MD|TRADES}/{column}.{DD}.{MM}.{YY}.bin

One file per column per UTC day; every column of a table holds the same
number of rows, row i of each being the same event. Only the writer process
opens files for writing; this module is shared with the reader.

Modes: data files are created 0640 and directories 0750 (whatever the
umask), or as ``logger.file_mode`` says: the writer calls
:func:`set_file_mode` at its start; directories get x where the file mode has
r (:func:`dir_mode_for`). The gap ledger and the manifests use the same modes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
from array import array
from typing import Iterable, NamedTuple

from .exchanges.registry import exchange_names, is_exchange
from .records import (
    COLUMNS,
    KIND_MD,
    KIND_TRADES,
    SYMBOL_FIELD,
    TABLE_NAMES,
    WIRE,
    Column,
    day_index,
    valid_symbol,
)

log = logging.getLogger("mdlogger.storage")

KIND_BY_TABLE = {name: kind for kind, name in TABLE_NAMES.items()}
DEFAULT_FILE_MODE = 0o640
_FILE_RE = re.compile(r"^([a-z_]+)\.(\d{2}\.\d{2}\.\d{2})\.bin$")


class TableKey(NamedTuple):
    """One table-day. A named tuple: the writer looks one up for every block of rows, and a tuple's hash
    and equality run in C."""

    exchange: str
    symbol: str
    kind: int
    day: str  # DD.MM.YY

    @property
    def table(self) -> str:
        return TABLE_NAMES[self.kind]


def table_dir(data_path: str, exchange: str, symbol: str, kind: int) -> str:
    if not is_exchange(exchange):
        raise ValueError("unknown exchange %r" % (exchange,))
    if not valid_symbol(symbol):
        raise ValueError("symbol %r may not be used in a path" % (symbol,))
    return os.path.join(data_path, exchange, symbol, TABLE_NAMES[kind])


def dir_mode_for(file_mode: int) -> int:
    """The directory mode for a file mode: x added wherever r is set (0640 -> 0750, 0644 -> 0755)."""
    return file_mode | ((file_mode & 0o444) >> 2)


def check_file_mode(file_mode: int) -> None:
    """ValueError unless ``file_mode`` is rw for the owner and has no bits beyond rw (no x, no setuid/sticky)."""
    if not isinstance(file_mode, int) or file_mode & ~0o666 or file_mode & 0o600 != 0o600:
        raise ValueError("file mode %r: expected read and write for the owner and no bits but r and w" % (file_mode,))


_file_mode = DEFAULT_FILE_MODE


def set_file_mode(file_mode: int) -> None:
    """The mode of the data files, ledger and manifests this process creates from now on (its directories follow)."""
    global _file_mode
    check_file_mode(file_mode)
    _file_mode = file_mode


def file_mode() -> int:
    return _file_mode


def make_dirs(path: str) -> None:
    """``os.makedirs`` with every directory it creates set to the directory mode, whatever the umask."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_dirs(parent)
    try:
        os.mkdir(path, dir_mode_for(_file_mode))
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, dir_mode_for(_file_mode))  # mkdir's mode is filtered by the umask


def open_created(path: str, flags: int) -> int:
    """``os.open(path, flags | O_CREAT)``; a file it creates gets the file mode, whatever the umask."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, _file_mode)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, _file_mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def column_path(data_path: str, key: TableKey, column: Column) -> str:
    return os.path.join(
        table_dir(data_path, key.exchange, key.symbol, key.kind),
        "%s.%s.bin" % (column.name, key.day),
    )


def row_width(kind: int) -> int:
    return sum(c.width for c in COLUMNS[kind])


def column_sizes(data_path: str, key: TableKey) -> dict[str, int | None]:
    """Bytes in each column file of a table (None: the file is missing), in column order."""
    out = {}
    for column in COLUMNS[key.kind]:
        try:
            out[column.name] = os.stat(column_path(data_path, key, column)).st_size
        except FileNotFoundError:
            out[column.name] = None
    return out


def table_rows(data_path: str, key: TableKey) -> dict[str, int]:
    """Whole rows per column file on disk (missing file = 0)."""
    sizes = column_sizes(data_path, key)
    return {c.name: (sizes[c.name] or 0) // c.width for c in COLUMNS[key.kind]}


def repair_table(data_path: str, key: TableKey) -> dict[str, int]:
    """Truncate every column to the row count all of them hold whole.

    Returns ``{column: bytes cut}`` for the columns that were cut (empty when
    the table was whole). A column file that is missing counts as zero rows.
    """
    sizes = column_sizes(data_path, key)
    keep = min((sizes[c.name] or 0) // c.width for c in COLUMNS[key.kind])
    cut = {}
    for column in COLUMNS[key.kind]:
        size = sizes[column.name]
        if size is None:
            continue
        want = keep * column.width
        if size != want:
            with open(column_path(data_path, key, column), "r+b") as fh:
                fh.truncate(want)
                os.fsync(fh.fileno())
            cut[column.name] = size - want
    return cut


def _exchanges(exchanges: Iterable[str] | None) -> list[str]:
    """The exchange directories to look in: the given names, else every registered exchange."""
    return sorted(exchange_names() if exchanges is None else exchanges)


def iter_tables(data_path: str, days: set[str] | None = None, exchanges: Iterable[str] | None = None):
    """Every table (exchange, symbol, kind, day) that has at least one file, of the given exchanges
    (default: every registered one)."""
    for exchange in _exchanges(exchanges):
        edir = os.path.join(data_path, exchange)
        try:
            symbols = sorted(os.listdir(edir))
        except FileNotFoundError:
            continue
        for symbol in symbols:
            if not valid_symbol(symbol):
                continue
            for kind in (KIND_MD, KIND_TRADES):
                tdir = os.path.join(edir, symbol, TABLE_NAMES[kind])
                try:
                    names = os.listdir(tdir)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                found = set()
                for name in names:
                    m = _FILE_RE.match(name)
                    if m and (days is None or m.group(2) in days):
                        found.add(m.group(2))
                for day in sorted(found, key=day_index):
                    yield TableKey(exchange, symbol, kind, day)


_DAY_FILE_RE = re.compile(r"^(?:gaps|manifest)\.(\d\d\.\d\d\.\d\d)\.(?:jsonl|json)$")


def expired_days(data_path: str, before_day: int, exchanges: Iterable[str] | None = None):
    """``(path, day)`` of every column file, gap ledger and manifest whose day index is before ``before_day``
    (of the given exchanges; default: every registered one)."""
    for exchange in _exchanges(exchanges):
        edir = os.path.join(data_path, exchange)
        try:
            symbols = os.listdir(edir)
        except FileNotFoundError:
            continue
        for name in sorted(symbols):  # the exchange's gap ledger and day manifests go with their day
            m = _DAY_FILE_RE.match(name)
            if m and day_index(m.group(1)) < before_day:
                yield os.path.join(edir, name), m.group(1)
        for symbol in sorted(symbols):
            if not valid_symbol(symbol):
                continue
            for table in TABLE_NAMES.values():
                tdir = os.path.join(edir, symbol, table)
                try:
                    names = os.listdir(tdir)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for name in sorted(names):
                    m = _FILE_RE.match(name)
                    if m and day_index(m.group(2)) < before_day:
                        yield os.path.join(tdir, name), m.group(2)


def repair_all(data_path: str, days: set[str] | None = None) -> list[tuple[TableKey, dict]]:
    """Repair every torn table (of the given days); returns what was cut."""
    repaired = []
    for key in iter_tables(data_path, days):
        cut = repair_table(data_path, key)
        if cut:
            repaired.append((key, cut))
    return repaired


def whole_rows(data_path: str, key: TableKey) -> int:
    """Rows every column of a table holds whole (a missing column holds none)."""
    return min(table_rows(data_path, key).values())


def read_columns(data_path: str, key: TableKey, names, start: int, stop: int) -> list[tuple]:
    """The one column reader: columns ``names`` of rows ``start..stop`` of a table, one tuple of values each.

    One ``pread`` per column (three system calls with its open and close, where
    a Python file object took seven); values are Python ints, floats (float32 widened) and
    16-byte strings, as the format stores them. Used by the writer (its mark),
    ``verify``, the reader's ``read_rows`` and analytics; ``reader.Table`` maps
    the same files instead, for zero-copy views.
    """
    columns = {c.name: c for c in COLUMNS[key.kind]}
    count = max(0, stop - start)
    values = []
    for name in names:
        column = columns[name]
        fd = os.open(column_path(data_path, key, column), os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, count * column.width, start * column.width)
        finally:
            os.close(fd)
        if column.code.endswith("s"):  # order ids: "<316s" would be one string, not three
            w = column.width
            values.append(tuple(data[i : i + w] for i in range(0, count * w, w)))
        else:
            values.append(struct.unpack("<%d%s" % (count, column.code), data))
    return values


def last_trades(data_path: str, key: TableKey, n: int, names=("id", "time", "nanos")) -> list[tuple]:
    """The ``names`` columns of up to the last ``n`` whole rows of a TRADES table, as rows, oldest first."""
    rows = whole_rows(data_path, key)
    take = min(rows, n)
    if take == 0:
        return []
    return list(zip(*read_columns(data_path, key, names, rows - take, rows)))


class TableFiles:
    """Open append-only descriptors for the columns of one table-day."""

    def __init__(self, data_path: str, key: TableKey):
        self.key = key
        self.columns = COLUMNS[key.kind]
        directory = table_dir(data_path, key.exchange, key.symbol, key.kind)
        make_dirs(directory)
        self.paths = [column_path(data_path, key, c) for c in self.columns]
        self.fds = []
        try:
            for path in self.paths:
                self.fds.append(open_created(path, os.O_WRONLY | os.O_APPEND))
        except OSError:
            self.close()
            raise
        # Rows already on disk, as repair left them: every column agrees.
        self.rows = os.fstat(self.fds[0]).st_size // self.columns[0].width
        self.dirty = False

    def append(self, blobs: list, nrows: int) -> int:
        """Append one block of rows to every column; all or nothing.

        On an OSError the columns already written in this call are truncated
        back, so the table never holds a partial block, and the error is
        re-raised. Returns the bytes written.
        """
        written = 0
        try:
            for fd, blob in zip(self.fds, blobs):
                written += _write_all(fd, blob)
        except OSError:
            self._truncate_to_rows(self.rows)
            raise
        self.rows += nrows
        self.dirty = True
        return written

    def _truncate_to_rows(self, rows: int) -> None:
        for fd, column in zip(self.fds, self.columns):
            try:
                os.ftruncate(fd, rows * column.width)
            except OSError as exc:  # pragma: no cover - repaired at next start-up
                log.error("could not roll back %s: %s", self.key, exc)

    def fsync(self, force: bool = False) -> int:
        """fsync every column if rows were appended since the last fsync (or ``force``); returns the fsyncs made."""
        if not (self.dirty or force):
            return 0
        for fd in self.fds:
            os.fsync(fd)
        self.dirty = False
        return len(self.fds)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def sync_closed_table(data_path: str, key: TableKey) -> int:
    """fsync the column files of a table the writer has closed; returns the fsyncs made.

    Each column is opened read-only for its fsync and closed again. On Linux
    fsync writes back every dirty page of the file, whichever descriptor wrote
    it, and a write-back error not yet reported to anyone is reported to a
    descriptor opened after it (``errseq``), so this is as good as an fsync of
    the descriptor that wrote. A column that is gone (retention) is skipped.
    """
    done = 0
    for column in COLUMNS[key.kind]:
        try:
            fd = os.open(column_path(data_path, key, column), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
            done += 1
        finally:
            os.close(fd)
    return done


def _write_all(fd: int, data) -> int:
    """Write all of ``data`` (any bytes-like object); returns its length in bytes."""
    view = memoryview(data).cast("B")  # lengths in bytes, whatever the exporter's item size
    size = len(view)
    n = os.write(fd, view)  # (nearly always all of it, in one call; os.write retries EINTR itself)
    while n < len(view):
        if n == 0:
            raise OSError(errno.ENOSPC, "short write")
        view = view[n:]
        n = os.write(fd, view)
    return size


def pack_column(column: Column, values) -> bytes:
    if column.code == "16s":
        return b"".join(values)
    return struct.pack("<%d%s" % (len(values), column.code), *values)


# -- wire records to column files, in C ------------------------------------------------------------
#
# A wire record (records.WIRE) is the symbol field followed by the table's
# columns in file order, each already in its file encoding (little-endian,
# float32, 16-byte order ids). So the file bytes of a column of n records are
# the column's bytes of each record, one after the other: a strided gather.
# Every width and offset is a multiple of 4 bytes, so the records are viewed
# as 32-bit words (``array("I")``: the bits are copied, never interpreted) and
# each word of a column is one strided slice, a loop in C: 7 slices for MD (7
# one-word columns) and 15 for TRADES (the 8-byte id is 2 words, each order id
# 4; a column of several words is then interleaved by as many slice
# assignments). No Python object is made per row or per field.

def _word_layout(kind: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    offset = SYMBOL_FIELD
    layout = []
    for column in COLUMNS[kind]:
        assert offset % 4 == 0 and column.width % 4 == 0, "records are gathered in 32-bit words"
        layout.append((offset // 4, column.width // 4))
        offset += column.width
    assert offset == WIRE[kind].size
    return offset // 4, tuple(layout)


_LAYOUT = {kind: _word_layout(kind) for kind in COLUMNS}
_BYTE_LAYOUT = {kind: tuple((o * 4, (o + w) * 4) for o, w in layout) for kind, (_, layout) in _LAYOUT.items()}
assert array("I").itemsize == 4


def record_columns(kind: int, records) -> list:
    """The file bytes of each column (``COLUMNS[kind]`` order) of ``records``, concatenated wire records
    of one table (``records.WIRE[kind]``, the symbol field ignored); bytes-like objects, one per column.

    Byte for byte what :func:`pack_column` makes of the unpacked rows.
    """
    words, layout = _LAYOUT[kind]
    n = len(records) // (words * 4)
    if n * words * 4 != len(records):
        raise ValueError("%d bytes are not whole %s records" % (len(records), TABLE_NAMES[kind]))
    if n == 1:  # one row: each column is a slice of (a copy of) the record: the caller's buffer is not held
        view = memoryview(bytes(records))
        return [view[a:b] for a, b in _BYTE_LAYOUT[kind]]
    source = array("I")
    source.frombytes(records)
    out = []
    for offset, width in layout:
        if width == 1:
            out.append(source[offset::words])
        else:
            column = array("I", bytes(4 * width * n))
            for j in range(width):
                column[j::width] = source[offset + j::words]
            out.append(column)
    return out
