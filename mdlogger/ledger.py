"""The gap ledger: every gap in a symbol's trades and what became of it, durably.

One file per exchange and UTC day (docs/FORMAT.md, "The gap ledger")::

    {data_path}/{exchange}/gaps.{DD.MM.YY}.jsonl

``DD.MM.YY`` is the UTC day of the gap's START (its ``from`` edge), so a gap
and all its later states stay in one file even when it is filled the next
day. Each line is one JSON object, the whole state of one gap; a gap is
recorded again on every change of fate and the later line supersedes the
earlier ones. A line is written with one ``os.write`` on an ``O_APPEND``
descriptor, so a crash leaves at most a torn LAST line, which readers skip.

The writer owns the ledger (one :class:`GapLedger` in the writer process);
``seal``, ``verify`` and the ``gaps`` command only read it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

from .exchanges.registry import is_exchange
from .records import date_to_day_string, day_string
from .storage import make_dirs, open_created

log = logging.getLogger("mdlogger.ledger")

WHYS = ("reconnect", "restart", "writer_restart", "id_jump")
FATES = ("pending", "filled", "empty", "unrecoverable")
MAX_OPEN_FILES = 8  # (exchange, day) files kept open; older days are fsynced and closed


def iso_nanos(sec: int, nanos: int) -> str:
    """``(1795478400, 123456789)`` -> ``2026-11-24T00:00:00.123456789Z`` (UTC, exact)."""
    return "%s.%09dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(sec))), int(nanos))


def new_gap_id() -> str:
    """A fresh unique gap id (32 hex digits)."""
    return uuid.uuid4().hex


def normalize_day(day: str) -> str:
    """``2026-11-24`` or ``24.11.26`` -> ``24.11.26``."""
    if len(day) == 10 and day[4] == "-" and day[7] == "-":
        return date_to_day_string(day)
    return day


def ledger_path(data_path: str, exchange: str, day: str) -> str:
    if not is_exchange(exchange):
        raise ValueError("unknown exchange %r" % (exchange,))
    return os.path.join(data_path, exchange, "gaps.%s.jsonl" % normalize_day(day))


@dataclass
class Gap:
    """One gap of one symbol's trades: from the last trade stored before it to the first after it.

    ``from_*`` is the edge (id, sec, nanos) of the newest trade stored before
    the gap, ``to_*`` the first trade seen after it; ids are 0 when the
    exchange has none. ``trades``: rows backfilled into the gap; ``missing``:
    ids known to be still missing (None when unknown, e.g. no ids).
    """

    gap: str
    exchange: str
    symbol: str
    from_id: int
    from_sec: int
    from_nanos: int
    to_id: int
    to_sec: int
    to_nanos: int
    why: str
    detected_at: float
    fate: str = "pending"
    trades: int = 0
    missing: int | None = None
    detail: str = ""
    updated_at: float = 0.0

    @property
    def day(self) -> str:
        """``DD.MM.YY`` of the gap's start: the ledger file it belongs to."""
        return day_string(self.from_sec)

    def check(self) -> None:
        if not is_exchange(self.exchange):
            raise ValueError("gap %s: unknown exchange %r" % (self.gap, self.exchange))
        if self.why not in WHYS:
            raise ValueError("gap %s: why must be one of %s, got %r" % (self.gap, ", ".join(WHYS), self.why))
        if self.fate not in FATES:
            raise ValueError("gap %s: fate must be one of %s, got %r" % (self.gap, ", ".join(FATES), self.fate))
        if not self.gap or "\n" in self.gap:
            raise ValueError("gap id must be non-empty text on one line, got %r" % (self.gap,))

    def to_dict(self) -> dict:
        """The JSON object of one ledger line (field order is the file's)."""
        d = asdict(self)
        out = {}
        for key, value in d.items():
            if key == "from_id":
                out["from"] = iso_nanos(self.from_sec, self.from_nanos)
            elif key == "to_id":
                out["to"] = iso_nanos(self.to_sec, self.to_nanos)
            out[key] = value
        return out

    def to_json(self) -> str:
        """One line, no trailing newline."""
        return json.dumps(self.to_dict(), ensure_ascii=True, separators=(", ", ": "), allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Gap":
        """Back from a ledger line (the ISO ``from``/``to`` texts are ignored: sec/nanos are exact)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _release(fd: int, dirty: bool, _torn: bool) -> None:
    """Close one ledger file, fsyncing it first when it was written since the last sync."""
    try:
        if dirty:
            os.fsync(fd)
    finally:
        os.close(fd)


class GapLedger:
    """Appends gap states to the ledger files of one data path. Thread-safe.

    ``record(gap)`` appends the gap's line as given (the caller sets
    ``updated_at`` on each change; when it is 0 it is stamped with
    ``clock()``); nothing is fsynced until ``sync()`` (call it with the
    writer's fsync) or ``close()``.
    """

    def __init__(self, data_path: str, clock=time.time):
        self.data_path = data_path
        self.clock = clock
        self._lock = threading.Lock()
        # (exchange, day) -> [fd, dirty, torn tail]; most recently used last
        self._files: OrderedDict[tuple[str, str], list] = OrderedDict()

    def record(self, gap: Gap) -> None:
        gap.check()
        if not gap.updated_at:
            gap.updated_at = self.clock()
        line = (gap.to_json() + "\n").encode("ascii")
        with self._lock:
            entry = self._open(gap.exchange, gap.day)
            fd = entry[0]
            if entry[2]:  # the file ends in a torn line: start ours on a line of its own
                line = b"\n" + line
            entry[1] = True
            n = os.write(fd, line)
            if n != len(line):
                # A short write to a regular file means the disk is full or
                # similar: the tail is torn; the next line starts on its own.
                entry[2] = True
                raise OSError(errno.ENOSPC, "short write to the gap ledger (%d of %d bytes)" % (n, len(line)))
            entry[2] = False

    def _open(self, exchange: str, day: str) -> list:
        key = (exchange, day)
        entry = self._files.get(key)
        if entry is not None:
            self._files.move_to_end(key)
            return entry
        path = ledger_path(self.data_path, exchange, day)
        make_dirs(os.path.dirname(path))
        fd = open_created(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        entry = [fd, False, _ends_torn(path)]
        self._files[key] = entry
        while len(self._files) > MAX_OPEN_FILES:
            _release(*self._files.popitem(last=False)[1])
        return entry

    def sync(self) -> None:
        """fsync every file written since the last sync."""
        with self._lock:
            for entry in self._files.values():
                if entry[1]:
                    os.fsync(entry[0])
                    entry[1] = False

    def close(self) -> None:
        with self._lock:
            while self._files:
                _release(*self._files.popitem(last=False)[1])

    def __enter__(self) -> "GapLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_torn(path: str) -> bool:
    """True when the file is non-empty and its last byte is not a newline (a crash mid-line)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return False
        fh.seek(size - 1)
        return fh.read(1) != b"\n"


def read_gaps(data_path: str, exchange: str, day: str) -> list[dict]:
    """The latest state of every gap of one exchange and day, in order of first appearance.

    ``day``: ``DD.MM.YY`` (or ``YYYY-MM-DD``). A missing file gives ``[]``.
    A line that is not a whole JSON object with a ``gap`` key (a torn last
    line after a crash) is skipped.
    """
    path = ledger_path(data_path, exchange, day)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    latest: dict[str, dict] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            log.warning("%s line %d: not a whole JSON line (torn by a crash?), skipped", path, number)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("gap"), str):
            log.warning("%s line %d: not a gap record, skipped", path, number)
            continue
        latest[obj["gap"]] = obj  # a dict keeps the position of the first insertion
    return list(latest.values())
