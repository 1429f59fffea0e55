"""Checks on an exchange's symbol listing, made before anything in it is used.

A listing (Binance exchangeInfo, Coinbase products, Kraken AssetPairs,
Bitfinex's pair list, OKX instruments) comes from outside like any frame:
each adapter's ``discover()`` builds its :class:`SymbolInfo` only from
fields that passed these checks, entry by entry, and returns a
:class:`Listing` that says what it left out:

* names: a currency code must be ASCII *before* it is upper-cased (Python
  upper-cases ``"US\\u017fD"`` to ``"USSD"``, and ``"\\u0131"`` to ``"I"``), an
  exchange's own spelling of a pair is short ASCII text; the normalized symbol
  must be ``BASE-QUOTE`` (``records.valid_symbol``). An entry that fails is
  skipped and counted (``skipped``);
* numbers: a tick size, a minimum size or a count of decimals is bounded
  before any arithmetic or formatting (a ``pair_decimals`` of 2**31 raised
  OverflowError in ``"%.*f"``, one of 1e8 built a 100 MB string per pair).
  These fields are only shown (``tools``), so a bad one is left empty and
  counted (``cleared``), and the symbol is kept;
* an entry of the wrong shape (a list where an object was expected, a key
  missing) is skipped as ``malformed``; a second entry for a symbol already
  listed is skipped as ``duplicate`` (the first one is kept).
"""

from __future__ import annotations

import collections
import math
import re
from typing import Callable

from . import records as rec
from .exchanges.base import SymbolInfo

MAX_DECIMALS = 18  # more decimals than any tick has (1e-18)
MAX_AMOUNT = 1e15  # a tick or minimum size this big is garbage
MAX_AMOUNT_TEXT = 40  # characters of a tick or minimum size given as text
# An exchange's own spelling of a pair: BTCUSDT, BTC-USD, XBT/USD, tBTCUSD, tTESTBTC:TESTUSD.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class Skip(Exception):
    """This listing entry is not used; ``reason`` is what it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Listing(list):
    """``discover()``'s answer: the :class:`SymbolInfo` of the usable entries, plus
    ``skipped`` (entries left out, by reason) and ``cleared`` (fields left empty, by field)."""

    def __init__(self, items=()):
        super().__init__(items)
        self.skipped: collections.Counter = collections.Counter()
        self.cleared: collections.Counter = collections.Counter()
        self._symbols: set[str] = set()

    def take(self, parse: Callable, item) -> SymbolInfo | None:
        """``parse(item)`` -> a SymbolInfo (or None: not wanted, e.g. a dark pool pair), added
        after the last checks; an entry that fails any of them is counted in ``skipped``."""
        try:
            info = parse(item)
            if info is None:
                return None
            check(info)
        except Skip as exc:
            self.skipped[exc.reason] += 1
            return None
        except Exception:  # noqa: BLE001 - a listing entry of any shape must not stop discovery
            self.skipped["malformed"] += 1
            return None
        if info.symbol in self._symbols:
            self.skipped["duplicate"] += 1
            return None
        self._symbols.add(info.symbol)
        self.append(info)
        return info

    def summary(self) -> str:
        """What was left out, for one log line ("" when nothing was)."""
        parts = []
        if self.skipped:
            parts.append("%d entries skipped (%s)" % (sum(self.skipped.values()), _counts(self.skipped)))
        if self.cleared:
            parts.append("%d fields left empty (%s)" % (sum(self.cleared.values()), _counts(self.cleared)))
        return "; ".join(parts)

    # -- field checks that count what they clear -------------------------------------------------
    def amount(self, field: str, value) -> str:
        """A tick or minimum size as decimal text; "" when absent or unusable (counted)."""
        if value is None or value == "":
            return ""
        text = amount_text(value)
        if text is None:
            self.cleared[field] += 1
            return ""
        return text

    def tick_from_decimals(self, value) -> str:
        """The tick size of a price with ``value`` decimals (2 -> "0.01"); "" when absent or unusable."""
        if value is None:
            return ""
        if type(value) is not int or not 0 <= value <= MAX_DECIMALS:
            self.cleared["tick_size"] += 1
            return ""
        return "%.*f" % (value, 10.0 ** -value)


def _counts(counter) -> str:
    return ", ".join("%s: %d" % kv for kv in sorted(counter.items()))


def check(info: SymbolInfo) -> None:
    """The checks every SymbolInfo passes before discovery hands it on."""
    if not isinstance(info.symbol, str) or not rec.valid_symbol(info.symbol):
        raise Skip("bad_symbol")
    if info.symbol != "%s-%s" % (info.base, info.quote):
        raise Skip("bad_symbol")
    exchange_name(info.exchange_name)


def code(value) -> str:
    """A currency code upper-cased, ASCII checked first (``Skip("not_ascii")``)."""
    if type(value) is not str:
        raise Skip("malformed")
    if not value.isascii():
        raise Skip("not_ascii")
    return value.upper()


def exchange_name(value) -> str:
    """An exchange's own spelling of a pair: short ASCII (letters, digits, ``._:/-``)."""
    if type(value) is not str:
        raise Skip("malformed")
    if not value.isascii():
        raise Skip("not_ascii")
    if _NAME_RE.fullmatch(value) is None:
        raise Skip("bad_name")
    return value


def amount_text(value) -> str | None:
    """Decimal text of a positive finite amount below MAX_AMOUNT (a JSON number or ASCII
    decimal text), or None."""
    kind = type(value)
    if kind is int or kind is float:
        # (compared before any conversion: an int of 5,000 digits neither prints nor becomes a float)
        return repr(value) if 0 <= value < MAX_AMOUNT else None  # (NaN and inf fail too)
    if kind is not str or len(value) > MAX_AMOUNT_TEXT or _DECIMAL_TEXT.fullmatch(value) is None:
        return None
    try:
        x = float(value)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(x) and 0 <= x < MAX_AMOUNT else None
