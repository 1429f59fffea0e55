"""Record layouts and exact time arithmetic.

Two layouts live here:

* the **wire records** a worker packs and the writer unpacks: fixed-size
  ``struct`` records that carry the normalized symbol with every row, so a
  batch needs no side table to be understood;
* the **table columns** of the on-disk format (docs/FORMAT.md): the name, the
  ``struct`` code and the width of every column of the MD and TRADES tables.

Times are kept as ``(seconds, nanoseconds)`` pairs of integers and are derived
from the exchange's own text without ever going through a float, so
``"1795544258.898149"`` gives ``(1795544258, 898149000)``.
"""

from __future__ import annotations

import math
import re
import struct
from typing import NamedTuple

KIND_MD = 1
KIND_TRADES = 2
# Trades the exchange replays on subscribe (history, not live). Same layout as
# TRADES; the writer stores one only if it is newer than the last stored trade
# of its symbol (by id, or by time when the exchange has no ids).
KIND_SNAPSHOT = 3
# A connection for the record's symbol was (re)established: the writer checks
# whether trades were missed since the last stored one (mdlogger/gaps.py). Same
# layout as TRADES; ``id`` is 1 on a worker's first connection (a restart),
# 0 on a reconnect; ``time``/``nanos`` the moment of connecting; the rest zero.
KIND_RESUME = 4
TABLE_NAMES = {KIND_MD: "MD", KIND_TRADES: "TRADES"}

SIDE_UNKNOWN = 0
SIDE_BUY = 1  # the taker bought
SIDE_SELL = 2  # the taker sold

NAN = float("nan")
ZERO_ID = b"\x00" * 16

# An exchange's name (its adapter's ``name``) names its directory and appears in
# environment variables (LOGGER_EXCHANGES_<NAME>_<KEY>): lowercase letters and
# digits only, so it never clashes with a symbol directory (always a '-') or a
# day file, and never splits at an underscore.
EXCHANGE_NAME_MAX = 32
EXCHANGE_NAME_RE = re.compile(r"[a-z][a-z0-9]*", re.ASCII)

SYMBOL_FIELD = 24  # bytes reserved for the normalized symbol in a wire record
# Matched whole (fullmatch: "$" would accept a trailing newline), ASCII only.
SYMBOL_RE = re.compile(r"[A-Z0-9]+-[A-Z0-9]+", re.ASCII)
_SYMBOL_BYTES_RE = re.compile(rb"[A-Z0-9]+-[A-Z0-9]+")


class Column(NamedTuple):
    name: str
    code: str  # struct code, little-endian implied

    @property
    def width(self) -> int:
        return struct.calcsize("<" + self.code)


MD_COLUMNS = (
    Column("time", "I"),
    Column("nanos", "I"),
    Column("price", "f"),
    Column("volume", "f"),
    Column("side", "I"),
    Column("best_bid", "f"),
    Column("best_ask", "f"),
)

TRADE_COLUMNS = (
    Column("id", "Q"),
    Column("time", "I"),
    Column("nanos", "I"),
    Column("price", "f"),
    Column("size", "f"),
    Column("side", "I"),
    Column("maker_order_id", "16s"),
    Column("taker_order_id", "16s"),
)

COLUMNS = {KIND_MD: MD_COLUMNS, KIND_TRADES: TRADE_COLUMNS}

# Wire layouts: symbol first, then the table's columns in file order.
MD_WIRE = struct.Struct("<%ds" % SYMBOL_FIELD + "".join(c.code for c in MD_COLUMNS))
TRADE_WIRE = struct.Struct("<%ds" % SYMBOL_FIELD + "".join(c.code for c in TRADE_COLUMNS))
WIRE = {KIND_MD: MD_WIRE, KIND_TRADES: TRADE_WIRE, KIND_SNAPSHOT: TRADE_WIRE, KIND_RESUME: TRADE_WIRE}

# Index of the ``time`` field inside an unpacked wire tuple (symbol is 0).
TIME_INDEX = {KIND_MD: 1, KIND_TRADES: 2, KIND_SNAPSHOT: 2, KIND_RESUME: 2}

FLOAT32_MAX = 3.4028234663852886e38


def valid_symbol(symbol: str) -> bool:
    """True when ``symbol`` may name a directory: ``BASE-QUOTE``, A-Z and 0-9."""
    return len(symbol) <= SYMBOL_FIELD and SYMBOL_RE.fullmatch(symbol) is not None


def valid_exchange(name: str) -> bool:
    """True when ``name`` may name an exchange (and its directory): a-z then a-z, 0-9."""
    return isinstance(name, str) and len(name) <= EXCHANGE_NAME_MAX and EXCHANGE_NAME_RE.fullmatch(name) is not None


def valid_symbol_bytes(symbol: bytes) -> bool:
    return _SYMBOL_BYTES_RE.fullmatch(symbol) is not None


def symbol_bytes(symbol: str) -> bytes:
    """The wire form of a normalized symbol; ValueError if it may not be stored."""
    if not isinstance(symbol, str) or not valid_symbol(symbol):
        raise ValueError("symbol %r does not match BASE-QUOTE (A-Z, 0-9)" % (symbol,))
    return symbol.encode("ascii")


# --------------------------------------------------------------------------
# Exact times


def from_millis(ms: int) -> tuple[int, int]:
    """Milliseconds since the epoch (int or decimal string) -> (sec, nanos)."""
    ms = int(ms)
    sec, rem = divmod(ms, 1000)
    return sec, rem * 1_000_000


def from_micros(us: int) -> tuple[int, int]:
    us = int(us)
    sec, rem = divmod(us, 1_000_000)
    return sec, rem * 1000


def from_nanos(ns: int) -> tuple[int, int]:
    return divmod(int(ns), 1_000_000_000)


def from_decimal_seconds(text: str) -> tuple[int, int]:
    """``"1795544258.898149"`` -> (1795544258, 898149000), digit by digit."""
    if not isinstance(text, str):
        raise ValueError("decimal seconds must be text, got %r" % (text,))
    whole, dot, frac = text.partition(".")
    if not whole.isdigit() or (dot and not (frac.isdigit() or frac == "")):
        raise ValueError("not a decimal number of seconds: %r" % (text,))
    frac = (frac + "000000000")[:9]
    return int(whole), int(frac)


_ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?$"
)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def from_iso8601(text: str) -> tuple[int, int]:
    """``2022-12-01T00:00:00.122581Z`` -> (sec, nanos), fraction kept exactly."""
    m = _ISO_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("not an ISO-8601 UTC time: %r" % (text,))
    year, month, day, hh, mm, ss = (int(m.group(i)) for i in range(1, 7))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hh < 24 and mm < 60 and ss < 61):
        raise ValueError("not an ISO-8601 UTC time: %r" % (text,))
    frac = ((m.group(7) or "") + "000000000")[:9]
    sec = _days_from_civil(year, month, day) * 86400 + hh * 3600 + mm * 60 + ss
    tz = m.group(8)
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        sec -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return sec, int(frac)


def day_string(sec: int) -> str:
    """The ``DD.MM.YY`` of a Unix second, in UTC."""
    return _DAY_CACHE.get(sec // 86400) or _day_string_slow(sec // 86400)


_DAY_CACHE: dict[int, str] = {}


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return y + (m <= 2), m, d


def _day_string_slow(days: int) -> str:
    y, m, d = _civil_from_days(days)
    text = "%02d.%02d.%02d" % (d, m, y % 100)
    if len(_DAY_CACHE) > 4096:
        _DAY_CACHE.clear()
    _DAY_CACHE[days] = text
    return text


def day_index(text: str) -> int:
    """Inverse of :func:`day_string` for days in 2000..2099."""
    dd, mm, yy = (int(p) for p in text.split("."))
    return _days_from_civil(2000 + yy, mm, dd)


def date_to_day_string(iso_date: str) -> str:
    """``2026-11-24`` -> ``24.11.26``."""
    y, m, d = (int(p) for p in iso_date.split("-"))
    return "%02d.%02d.%02d" % (d, m, y % 100)


def is_finite_positive(x: float) -> bool:
    return x > 0.0 and x < FLOAT32_MAX and not math.isnan(x)
