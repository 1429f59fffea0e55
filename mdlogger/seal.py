"""Sealing a UTC day: a manifest of every table, file and gap of one exchange's day.

    {data_path}/{exchange}/manifest.{DD.MM.YY}.json

The writer seals a day once it has ended plus a grace period
(:func:`days_to_seal`), after flushing and fsyncing that day's tables; from
then on it refuses rows for that day. The manifest is written atomically
(temp file in the same directory, fsync, rename, fsync of the directory), so
a manifest that exists is complete. ``verify`` checks the files against it.
docs/FORMAT.md ("Sealed days and manifests") is the contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time

from .ledger import iso_nanos, normalize_day, read_gaps
from .exchanges.registry import is_exchange
from .records import COLUMNS, KIND_TRADES, day_index, day_string
from .storage import TableKey, column_path, file_mode, iter_tables, make_dirs

MANIFEST_FORMAT = 1
DEFAULT_GRACE_SECS = 600
_CHUNK = 1 << 20


def manifest_path(data_path: str, exchange: str, day: str) -> str:
    if not is_exchange(exchange):
        raise ValueError("unknown exchange %r" % (exchange,))
    return os.path.join(data_path, exchange, "manifest.%s.json" % normalize_day(day))


def is_sealed(data_path: str, exchange: str, day: str) -> bool:
    """True when the day's manifest exists (it is renamed into place whole)."""
    return os.path.exists(manifest_path(data_path, exchange, day))


def load_manifest(data_path: str, exchange: str, day: str) -> dict | None:
    """The manifest of a sealed day, or None when the day is not sealed (ValueError if unreadable)."""
    try:
        with open(manifest_path(data_path, exchange, day), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), list):
        raise ValueError("not a manifest (no list of tables)")
    return doc


def file_sha256(path: str) -> tuple[int, str]:
    """``(bytes, sha256 hex)`` of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


def _edge_values(path: str, code: str, width: int, rows: int) -> tuple:
    """The first and last values of a column's ``rows`` whole rows."""
    with open(path, "rb") as fh:
        first = struct.unpack("<" + code, fh.read(width))[0]
        fh.seek((rows - 1) * width)
        last = struct.unpack("<" + code, fh.read(width))[0]
    return first, last


def describe_table(data_path: str, key: TableKey) -> dict:
    """A table's manifest entry: rows, first/last edge, and every column file present."""
    entry: dict = {"symbol": key.symbol, "table": key.table}
    files = []
    counts = []
    for column in COLUMNS[key.kind]:
        path = column_path(data_path, key, column)
        try:
            size, digest = file_sha256(path)
        except FileNotFoundError:
            counts.append(0)
            continue
        counts.append(size // column.width)
        files.append({"name": os.path.basename(path), "bytes": size, "sha256": digest})
    rows = min(counts)
    entry["rows"] = rows
    widths = {c.name: c for c in COLUMNS[key.kind]}
    if key.kind == KIND_TRADES:
        names = ("id", "time", "nanos")
    else:
        names = ("time", "nanos")
    edges = {}
    for name in names:
        column = widths[name]
        if rows:
            edges[name] = _edge_values(column_path(data_path, key, column), column.code, column.width, rows)
        else:
            edges[name] = (None, None)
    for i, end in enumerate(("first", "last")):
        if key.kind == KIND_TRADES:
            entry["%s_id" % end] = edges["id"][i]
        sec, nanos = edges["time"][i], edges["nanos"][i]
        entry["%s_time" % end] = iso_nanos(sec, nanos) if rows else None
        entry["%s_sec" % end] = sec
        entry["%s_nanos" % end] = nanos
    entry["files"] = files
    return entry


def build_manifest(data_path: str, exchange: str, day: str, now: float | None = None) -> dict:
    day = normalize_day(day)
    tables = [
        describe_table(data_path, key)
        for key in sorted(iter_tables(data_path, {day}), key=lambda k: (k.symbol, k.kind))
        if key.exchange == exchange
    ]
    return {
        "format": MANIFEST_FORMAT,
        "exchange": exchange,
        "day": day,
        "sealed_at": time.time() if now is None else now,
        "tables": tables,
        "gaps": read_gaps(data_path, exchange, day),
    }


def seal_day(data_path: str, exchange: str, day: str, now: float | None = None) -> str:
    """Write the day's manifest atomically and return its path (an existing one is replaced).

    The caller must have flushed and fsynced that day's tables (and the gap
    ledger) first, and must refuse rows for the day afterwards.
    """
    path = manifest_path(data_path, exchange, day)
    doc = build_manifest(data_path, exchange, day, now)
    data = (json.dumps(doc, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")
    directory = os.path.dirname(path)
    make_dirs(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".%s." % os.path.basename(path), suffix=".tmp")
    try:
        try:
            os.fchmod(fd, file_mode())
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return path


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def days_to_seal(data_path: str, now: float, grace_secs: float = DEFAULT_GRACE_SECS, days_back: int = 7) -> list[tuple[str, str]]:
    """``(exchange, DD.MM.YY)`` of every day that should be sealed by ``now``, oldest first per exchange.

    Such a day is one of the ``days_back`` days before today (UTC), has at
    least one column file, has no manifest, and ended at least
    ``grace_secs`` before ``now``.
    """
    today = int(now // 86400)
    candidates = {}
    for d in range(today - days_back, today):
        if now >= (d + 1) * 86400 + grace_secs:
            candidates[day_string(d * 86400)] = d
    if not candidates:
        return []
    found = set()
    for key in iter_tables(data_path, set(candidates)):
        found.add((key.exchange, key.day))
    return sorted(
        (pair for pair in found if not is_sealed(data_path, *pair)),
        key=lambda pair: (pair[0], day_index(pair[1])),
    )

