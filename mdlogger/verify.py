"""``verify``: check one UTC day of stored data against the format's promises.

For every table of the day on every exchange:

* every column file holds a whole number of rows, and all columns of a table
  hold the same number (a missing column file counts as 0 rows);
* TRADES rows are in exchange order: by id when the table has ids (> 0),
  else by (time, nanos); no id appears twice;
* where the exchange's ids are consecutive, every id jump (including the one
  from the previous day's last row) lies inside a gap recorded in the ledger
  for that symbol;
* when the day is sealed, the files on disk are exactly the manifest's, with
  its sizes and sha256 digests.

Each problem is one line starting with the file (relative to the data path).
Columns are read into ``array`` objects and scanned with C-level iterators;
no Python object is kept per row.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from operator import add, eq, gt, lt, mul
from typing import Mapping

from .exchanges import ADAPTERS, exchange_names
from .ledger import normalize_day, read_gaps
from .records import COLUMNS, KIND_TRADES, TRADE_COLUMNS, day_index, day_string
from .seal import file_sha256, load_manifest, manifest_path
from .storage import TableKey, column_path, column_sizes, iter_tables, last_trades, table_rows

LEDGER_DAYS_BACK = 7  # a gap covering a jump may have started up to this many days earlier
MAX_JUMP_LINES = 5  # uncovered id jumps reported one by one per table; the rest are counted
_NS = 1_000_000_000
_TRADE = {c.name: c for c in TRADE_COLUMNS}

assert array("Q").itemsize == 8 and array("I").itemsize == 4


def consecutive_ids_by_exchange() -> dict[str, bool]:
    """Whether each registered exchange's trade ids are consecutive per symbol, as its adapter declares."""
    return {name: bool(cls.history.consecutive_ids) for name, cls in sorted(ADAPTERS.items())}


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    tables: int = 0
    exchanges: int = 0


def verify_day(data_path: str, day: str, consecutive_ids: Mapping[str, bool]) -> list[str]:
    """Every problem found in one UTC day (``DD.MM.YY``), one line each; [] when all is well."""
    return check_day(data_path, day, consecutive_ids).problems


def check_day(data_path: str, day: str, consecutive_ids: Mapping[str, bool]) -> Report:
    """As :func:`verify_day`, also counting the tables and exchanges checked."""
    day = normalize_day(day)
    report = Report()
    by_exchange: dict[str, list[TableKey]] = defaultdict(list)
    for key in iter_tables(data_path, {day}):
        by_exchange[key.exchange].append(key)
    for exchange in exchange_names():
        keys = by_exchange.get(exchange, [])
        mrel = os.path.relpath(manifest_path(data_path, exchange, day), data_path)
        manifest = None
        manifest_bad = False
        try:
            manifest = load_manifest(data_path, exchange, day)
        except (ValueError, OSError) as exc:
            report.problems.append("%s: unreadable manifest: %s" % (mrel, exc))
            manifest_bad = True
        if not keys and manifest is None and not manifest_bad:
            continue
        report.exchanges += 1
        gaps = _GapIndex(data_path, exchange, day)
        for key in keys:
            report.problems.extend(_check_table(data_path, key, bool(consecutive_ids.get(exchange)), gaps))
        names = {(k.symbol, k.table) for k in keys}
        if manifest is not None:
            report.problems.extend(_check_manifest(data_path, exchange, day, manifest, keys, mrel))
            names |= {(t.get("symbol"), t.get("table")) for t in manifest["tables"] if isinstance(t, dict)}
        report.tables += len(names)
    return report


# --------------------------------------------------------------------------
# One table


def _rel(data_path: str, path: str) -> str:
    return os.path.relpath(path, data_path)


def _read_array(path: str, code: str, rows: int) -> array:
    arr = array(code)
    if rows:
        with open(path, "rb") as fh:
            arr.fromfile(fh, rows)
        if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts here
            arr.byteswap()
    return arr


def _check_table(data_path: str, key: TableKey, consecutive: bool, gaps: "_GapIndex") -> list[str]:
    problems = []
    rows = {}
    sizes = column_sizes(data_path, key)
    for column in COLUMNS[key.kind]:
        size = sizes[column.name]
        if size is None:
            rows[column.name] = None
            continue
        path = column_path(data_path, key, column)
        rows[column.name] = size // column.width
        if size % column.width:
            problems.append("%s: %d bytes is not a whole number of %d-byte rows (%d rows and %d bytes over)"
                            % (_rel(data_path, path), size, column.width, size // column.width, size % column.width))
    longest = max(n or 0 for n in rows.values())
    if any((n or 0) != longest for n in rows.values()):
        for column in COLUMNS[key.kind]:
            n = rows[column.name]
            rel = _rel(data_path, column_path(data_path, key, column))
            if n is None:
                problems.append("%s: missing (counts as 0 rows); the table's longest column holds %d" % (rel, longest))
            elif n != longest:
                problems.append("%s: %d rows; the table's longest column holds %d" % (rel, n, longest))
    if key.kind == KIND_TRADES:
        n = min(rows["id"] or 0, rows["time"] or 0, rows["nanos"] or 0)
        if n:
            problems.extend(_check_trade_order(data_path, key, n, consecutive, gaps))
    return problems


def _check_trade_order(data_path: str, key: TableKey, n: int, consecutive: bool, gaps: "_GapIndex") -> list[str]:
    id_path = column_path(data_path, key, _TRADE["id"])
    ids = _read_array(id_path, "Q", n)
    if max(ids) == 0:
        return _check_time_order(data_path, key, n)
    problems = []
    rel = _rel(data_path, id_path)
    zeros = ids.count(0)
    if zeros:
        problems.append("%s: %d rows with id 0 among rows with ids (first at row %d)" % (rel, zeros, ids.index(0)))
    mv = memoryview(ids)
    before, after = mv[:-1], mv[1:]
    back = list(compress(count(1), map(gt, before, after)))
    if back:
        i = back[0]
        problems.append("%s: %d rows out of order by id (first: row %d, id %d after %d)" % (rel, len(back), i, ids[i], ids[i - 1]))
    if back or any(map(eq, before, after)):
        problems.extend(_duplicates(rel, ids))
    if consecutive:
        jumps = compress(count(1), map(lt, map(add, before, repeat(1)), after))
        edges = [(ids[i - 1], ids[i], "rows %d-%d" % (i - 1, i)) for i in jumps]
        prev = _previous_day_last_id(data_path, key)
        if prev is not None and ids[0] > prev + 1:
            edges.insert(0, (prev, ids[0], "row 0 after the last row of %s" % day_string((day_index(key.day) - 1) * 86400)))
        uncovered = [e for e in edges if not gaps.covers(key.symbol, e[0], e[1])]
        for a, b, where in uncovered[:MAX_JUMP_LINES]:
            problems.append("%s: ids %d..%d missing (%d ids, %s) and no gap in the ledger covers them"
                            % (rel, a + 1, b - 1, b - a - 1, where))
        if len(uncovered) > MAX_JUMP_LINES:
            problems.append("%s: %d more id jumps not covered by the ledger" % (rel, len(uncovered) - MAX_JUMP_LINES))
    return problems


def _duplicates(rel: str, ids: array) -> list[str]:
    """Only called when ids are not strictly increasing (a sorted copy is made)."""
    ordered = array("Q", sorted(ids))
    mv = memoryview(ordered)
    dup_at = list(compress(count(1), map(eq, mv[:-1], mv[1:])))
    if not dup_at:
        return []
    distinct = len({ordered[j] for j in dup_at})
    first = ordered[dup_at[0]]
    a = ids.index(first)
    b = ids.index(first, a + 1)
    return ["%s: %d duplicate ids (%d extra rows; e.g. id %d at rows %d and %d)" % (rel, distinct, len(dup_at), first, a, b)]


def _check_time_order(data_path: str, key: TableKey, n: int) -> list[str]:
    time_path = column_path(data_path, key, _TRADE["time"])
    secs = _read_array(time_path, "I", n)
    nanos = _read_array(column_path(data_path, key, _TRADE["nanos"]), "I", n)
    stamps = array("Q", map(add, map(mul, secs, repeat(_NS)), nanos))
    mv = memoryview(stamps)
    back = list(compress(count(1), map(gt, mv[:-1], mv[1:])))
    if not back:
        return []
    i = back[0]
    return ["%s: %d rows out of order by time (first: row %d, %d.%09d after %d.%09d)"
            % (_rel(data_path, time_path), len(back), i, secs[i], nanos[i], secs[i - 1], nanos[i - 1])]


def _previous_day_last_id(data_path: str, key: TableKey) -> int | None:
    prev = TableKey(key.exchange, key.symbol, key.kind, day_string((day_index(key.day) - 1) * 86400))
    if min(table_rows(data_path, prev).values()) == 0:
        return None
    return last_trades(data_path, prev, 1)[0][0] or None


class _GapIndex:
    """The ledger gaps (latest states) of one exchange that may cover a jump in a day, loaded on first use."""

    def __init__(self, data_path: str, exchange: str, day: str):
        self.data_path = data_path
        self.exchange = exchange
        self.day = day
        self._by_symbol: dict[str, list[tuple[int, int]]] | None = None

    def covers(self, symbol: str, prev_id: int, next_id: int) -> bool:
        if self._by_symbol is None:
            self._by_symbol = defaultdict(list)
            last = day_index(self.day)
            for d in range(last - LEDGER_DAYS_BACK, last + 1):
                for g in read_gaps(self.data_path, self.exchange, day_string(d * 86400)):
                    try:
                        self._by_symbol[g["symbol"]].append((int(g["from_id"]), int(g["to_id"])))
                    except (KeyError, TypeError, ValueError):
                        continue
        return any(lo <= prev_id and hi >= next_id for lo, hi in self._by_symbol.get(symbol, ()))


# --------------------------------------------------------------------------
# Sealed days


def _check_manifest(data_path: str, exchange: str, day: str, manifest: dict, keys: list[TableKey], mrel: str) -> list[str]:
    problems = []
    if manifest.get("exchange") != exchange or manifest.get("day") != day:
        problems.append("%s: names exchange %r and day %r" % (mrel, manifest.get("exchange"), manifest.get("day")))
    listed: dict[str, dict] = {}
    for t in manifest["tables"]:
        try:
            base = os.path.join(exchange, t["symbol"], t["table"])
            for f in t["files"]:
                listed[os.path.join(base, f["name"])] = f
        except (KeyError, TypeError):
            problems.append("%s: malformed table entry %r" % (mrel, t))
    on_disk = {}
    for key in keys:
        for column in COLUMNS[key.kind]:
            path = column_path(data_path, key, column)
            if os.path.exists(path):
                on_disk[_rel(data_path, path)] = path
    for rel in sorted(listed):
        entry = listed[rel]
        path = on_disk.get(rel)
        if path is None:
            problems.append("%s: listed in %s but not on disk" % (rel, mrel))
            continue
        size = os.stat(path).st_size
        if size != entry.get("bytes"):
            problems.append("%s: %d bytes, %s says %r" % (rel, size, mrel, entry.get("bytes")))
            continue
        if file_sha256(path)[1] != entry.get("sha256"):
            problems.append("%s: sha256 differs from %s (changed since the day was sealed)" % (rel, mrel))
    for rel in sorted(set(on_disk) - set(listed)):
        problems.append("%s: on disk but not in %s" % (rel, mrel))
    return problems
