"""Read one table of one symbol and day, memory-mapped.

>>> with open_table("/var/lib/mdlogger", "binance", "BTC-USDT", "TRADES", "2026-11-24") as t:
...     t.rows, t["price"][0], t["maker_order_id"][0]

Columns come back typed without copying: ``memoryview`` casts (``'I'``,
``'Q'``, ``'f'``) and a sequence of 16-byte ``bytes`` for order ids, or numpy
arrays when numpy is installed and ``numpy=True`` (the default when it is).
``rows`` is the row count every column holds whole; a longer column (a writer
killed mid-flush, before its repair at the next start) is cut to it.
:func:`read_rows` copies the values out instead, through the storage's one
column reader (``storage.read_columns``).
"""

from __future__ import annotations

import csv
import math
import mmap
import os
import struct
import sys
from typing import IO

from . import records as rec
from .storage import KIND_BY_TABLE, TableKey, column_path, read_columns, whole_rows

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - depends on the environment
    _np = None

_NUMPY_DTYPES = {"I": "<u4", "Q": "<u8", "f": "<f4"}


class FixedBytes:
    """A read-only sequence of fixed-width byte strings over a buffer."""

    def __init__(self, view: memoryview, width: int, rows: int):
        self._view = view
        self._width = width
        self._rows = rows

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, i: int) -> bytes:
        if i < 0:
            i += self._rows
        if not 0 <= i < self._rows:
            raise IndexError(i)
        w = self._width
        return bytes(self._view[i * w : (i + 1) * w])

    def __iter__(self):
        for i in range(self._rows):
            yield self[i]


def table_key(exchange: str, symbol: str, table: str, day: str) -> TableKey:
    """The key of a table named as users name it: ``MD``/``TRADES``, day as DD.MM.YY or YYYY-MM-DD."""
    kind = KIND_BY_TABLE.get(table.upper())
    if kind is None:
        raise ValueError("table must be MD or TRADES, got %r" % (table,))
    if "-" in day and len(day) == 10:
        day = rec.date_to_day_string(day)
    return TableKey(exchange, symbol, kind, day)


def _rows(data_path: str, key: TableKey) -> int:
    """Whole rows of a table every column file of which exists (FileNotFoundError otherwise)."""
    for column in rec.COLUMNS[key.kind]:
        path = column_path(data_path, key, column)
        if not os.path.exists(path):
            raise FileNotFoundError("no such column file: %s" % path)
    return whole_rows(data_path, key)


class Table:
    """The mapped columns of one table-day. Use as a context manager."""

    def __init__(self, data_path: str, exchange: str, symbol: str, table: str, day: str, numpy: bool | None = None):
        self.key = table_key(exchange, symbol, table, day)
        self.columns_spec = rec.COLUMNS[self.key.kind]
        use_numpy = (_np is not None) if numpy is None else numpy
        if use_numpy and _np is None:
            raise RuntimeError("numpy is not installed")
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self.rows = _rows(data_path, self.key)
        self.columns: dict[str, object] = {}
        for column in self.columns_spec:
            self.columns[column.name] = self._map(data_path, column, use_numpy)

    def _map(self, data_path: str, column: rec.Column, use_numpy: bool):
        nbytes = self.rows * column.width
        if nbytes == 0:
            view = memoryview(b"")
        else:
            with open(column_path(data_path, self.key, column), "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mm)
            view = memoryview(mm)[:nbytes]
            self._views.append(view)
        if use_numpy:
            if column.code == "16s":
                return _np.frombuffer(view, dtype=_np.uint8).reshape(self.rows, 16)
            return _np.frombuffer(view, dtype=_NUMPY_DTYPES[column.code], count=self.rows)
        if column.code == "16s":
            return FixedBytes(view, 16, self.rows)
        if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts here
            import array

            arr = array.array(column.code, bytes(view))
            arr.byteswap()
            return arr
        return view.cast(column.code)

    def __getitem__(self, name: str):
        return self.columns[name]

    def __len__(self) -> int:
        return self.rows

    def close(self) -> None:
        self.columns.clear()
        for view in self._views:
            view.release()
        self._views.clear()
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a numpy array still refers to it
                pass
        self._maps.clear()

    def __enter__(self) -> "Table":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_table(data_path: str, exchange: str, symbol: str, table: str, day: str, numpy: bool | None = None) -> Table:
    return Table(data_path, exchange, symbol, table, day, numpy=numpy)


def read_rows(data_path: str, exchange: str, symbol: str, table: str, day: str) -> list[tuple]:
    """Every row as a tuple of Python values (column order of the format)."""
    key = table_key(exchange, symbol, table, day)
    names = [c.name for c in rec.COLUMNS[key.kind]]
    return list(zip(*read_columns(data_path, key, names, 0, _rows(data_path, key))))


def dump_csv(data_path: str, exchange: str, symbol: str, table: str, day: str, out: IO[str]) -> int:
    """Write a table as CSV (header first); returns the row count."""
    with open_table(data_path, exchange, symbol, table, day, numpy=False) as t:
        names = [c.name for c in t.columns_spec]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        cols = [t[n] for n in names]
        for i in range(t.rows):
            writer.writerow([_fmt(col[i]) for col in cols])
        return t.rows


def _fmt(value) -> str:
    if isinstance(value, bytes):
        return value.hex() if any(value) else ""
    if isinstance(value, float):  # every float column is a float32
        return float32_text(value)
    return str(value)


def float32_text(value: float) -> str:
    """The shortest decimal that reads back as the same float32: 0.2104, not 0.21040000021457672.

    ``value`` is a float32 widened to a Python float. Tries 1..9 significant
    digits (9 always round-trips a float32) and prints the first that does,
    as Python prints that decimal (``87014.55``, ``100000.0``, ``1e-05``).
    """
    if value != value:
        return "nan"
    if value in (math.inf, -math.inf):
        return repr(value)
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        text = "%.*g" % (digits, value)
        try:
            if struct.pack("<f", float(text)) == packed:
                return repr(float(text))
        except OverflowError:  # rounded past the largest float32
            continue
    return repr(value)  # not reached for a float32
