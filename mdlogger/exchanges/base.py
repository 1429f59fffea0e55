"""What every exchange adapter is made of.

An adapter is mostly declarative class data (endpoints' paths, channel names,
the exchange's limits, its keepalive rule) plus a few small hooks:

* ``discover(rest)``: the exchange's symbols over REST, as :class:`SymbolInfo`;
* ``normalize(name)`` / ``exchange_name(symbol)``: the exchange's form <-> ``BASE-QUOTE``;
* ``ws_url(symbols)`` and ``subscribe_messages(symbols)``;
* ``new_session(symbols, sink)``: a per-connection parser whose
  ``on_message(payload, recv_ns)`` turns one frame into records on the sink;
* ``history`` (a :class:`HistorySpec`) and ``fetch_history(client, info,
  after, before, deadline)``: the trades of a gap, from the exchange's REST
  trade history (through a :class:`mdlogger.history.HistoryClient`), with the
  hooks ``limited`` and ``after_reply`` that read rate-limit answers and
  ``fatal`` that spots answers not worth asking again.

The shared connection loop (mdlogger/worker.py) knows nothing of any
exchange: quirks live here, expressed through the hooks and through the three
exceptions below that a session may raise (``Reconnect``, its planned kind
``Rotate``, and ``Pause``). docs/PROTOCOLS.md has the protocol facts each
adapter relies on.
"""

from __future__ import annotations

import collections
import re
import reprlib
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import orjson

from .. import records as rec
from . import registry


@dataclass(frozen=True)
class SymbolInfo:
    """One tradable pair as the exchange lists it."""

    symbol: str  # normalized BASE-QUOTE
    exchange_name: str  # the exchange's own spelling (BTCUSDT, tBTCUSD, XBT/USD)
    base: str
    quote: str
    active: bool = True
    tick_size: str = ""
    min_size: str = ""


@dataclass(frozen=True)
class HistorySpec:
    """What the gap backfill needs to know about an exchange's REST trade history.

    * ``consecutive_ids``: trade ids run +1 per symbol, so a jump in ids is a gap;
    * ``has_ids``: stored rows carry the exchange's trade id (False: id 0, gaps by time only);
    * ``rest_rate`` / ``rest_burst``: the REST token bucket shared by every process
      on this IP (units: requests, or the exchange's request weight where it counts
      weight; see each adapter's ``history_cost``);
    * ``default_pause``: seconds to stop every REST caller after a rate-limit answer
      that does not say how long (no usable ``Retry-After``);
    * ``page_limit``: rows asked for per request;
    * ``discovery_cost``: bucket tokens the symbol listing request costs (the same bucket).
    """

    consecutive_ids: bool
    has_ids: bool
    rest_rate: float
    rest_burst: float
    default_pause: float
    page_limit: int
    discovery_cost: float = 1.0


class HistoryRows(list):
    """The rows ``fetch_history`` returns (a list of ``TRADE_WIRE`` tuples, ascending),
    plus ``skipped``: rows the field checks refused, counted by reason."""

    def __init__(self, rows=()):
        super().__init__(rows)
        self.skipped: collections.Counter = collections.Counter()


class Refused(Exception):
    """A message or field that must not reach a file; ``reason`` is one of stats.DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


class Reconnect(Exception):
    """The exchange asked us to reconnect now (Bitfinex's restart and end-of-maintenance info)."""


class Rotate(Reconnect):
    """A planned reconnect with notice (Binance ``serverShutdown`` and 24 h limit, OKX notice 64008):
    open the next connection before this one goes."""


class Pause(Exception):
    """The exchange is in maintenance: wait ``seconds`` before reconnecting."""

    def __init__(self, seconds: float, detail: str = ""):
        super().__init__(detail)
        self.seconds = seconds


class Sink:
    """Where a session puts what it parsed (implemented by the worker).

    ``raw_trade``, when not None, takes one already packed ``TRADE_WIRE``
    record: a fast path for adapters whose common message needs no checks
    beyond a few comparisons (see the Binance adapter).
    """

    raw_trade = None

    def trade(self, symbol: bytes, trade_id: int, sec: int, nanos: int, price: float, size: float,
              side: int, maker: bytes = rec.ZERO_ID, taker: bytes = rec.ZERO_ID, snapshot: bool = False) -> None:
        """One trade. ``snapshot``: replayed history sent on subscribe, oldest first;
        stored only when newer than the last stored trade of the symbol."""
        raise NotImplementedError

    def ticker(self, symbol: bytes, sec: int, nanos: int, price: float, volume: float, side: int,
               bid: float, ask: float) -> None:
        raise NotImplementedError

    def refuse(self, reason: str, sample) -> None:
        raise NotImplementedError

    def exchange_error(self, text: str, symbol: str | None = None) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Field helpers shared by every parser: each either returns a clean value or
# raises Refused with the reason it is counted under.

MAX_PRICE = 1e12  # no traded price is near this; a bigger one is garbage
MAX_SIZE = 1e15
# Prices and sizes are stored as float32: a smaller magnitude than the smallest
# normal float32 (2**-126, ~1.2e-38) loses its precision there, and below ~1.4e-45
# it becomes 0.0. No traded price or size is near it, so such a value is refused.
# (The upper bounds above are far inside the float32 range, 3.4e38.)
MIN_VALUE = 2.0 ** -126
MAX_PAST_SECS = 2 * 86400  # older rows would land in days the writer no longer repairs
MAX_FUTURE_SECS = 600

# An exchange number given as text: ASCII digits with an optional sign, decimal
# point and exponent. float() alone would also take non-ASCII digits ("١٠٠"),
# underscores ("1_000"), surrounding blanks (" 7 "), "NaN" and "inf". (The
# Binance fast path takes the same texts by a cheaper test: keep the two alike.)
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

_SHOW = reprlib.Repr()
_SHOW.maxlevel = 3
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 80
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = 6


def shown(value) -> str:
    """``repr(value)`` cut short in length and depth, for a refusal's detail.

    Use it (never ``repr`` or ``%r``/``%s``) on anything taken from a frame: a
    frame may nest a thousand lists, whose full repr raises RecursionError.
    """
    try:
        return _SHOW.repr(value)
    except Exception:  # noqa: BLE001 - a detail must never be what fails
        return "<%s>" % type(value).__name__


def exchange_text(value, limit: int = 300) -> str:
    """Exchange text for a message (an error text as the exchange sent it, cut at ``limit``);
    anything but a string is shown as :func:`shown` does."""
    out = value if isinstance(value, str) else shown(value)
    return out if len(out) <= limit else out[:limit] + "..."


def number(value, reason: str, limit: float) -> float:
    """An exchange number -> float: a JSON number (not a boolean) or ASCII decimal text, whose
    value is at least MIN_VALUE and below ``limit``; otherwise Refused(``reason``)."""
    kind = type(value)
    if kind is str:
        if _DECIMAL_TEXT.fullmatch(value) is None:
            raise Refused(reason, shown(value))
    elif kind is not float and kind is not int:
        raise Refused(reason, shown(value))
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise Refused(reason, shown(value)) from None
    if not (MIN_VALUE <= x < limit):  # also refuses NaN
        raise Refused(reason, shown(value))
    return x


def price(value) -> float:
    return number(value, "bad_price", MAX_PRICE)


def size(value) -> float:
    return number(value, "bad_size", MAX_SIZE)


def optional_price(value) -> float:
    """A price the exchange may leave out: absent gives NaN, garbage is refused."""
    if value is None or value == "":
        return rec.NAN
    return price(value)


def optional_size(value) -> float:
    if value is None or value == "":
        return rec.NAN
    return size(value)


def check_time(sec_nanos: tuple[int, int], now: float | None = None) -> tuple[int, int]:
    sec = sec_nanos[0]
    now = time.time() if now is None else now
    if not (now - MAX_PAST_SECS <= sec <= now + MAX_FUTURE_SECS):
        raise Refused("bad_time", str(sec))
    return sec_nanos


def digits(value) -> bool:
    """True for a non-empty string of ASCII digits (``str.isdigit`` alone takes any script's digits)."""
    return type(value) is str and value.isascii() and value.isdigit()


def millis(value) -> tuple[int, int]:
    """Milliseconds since the epoch: a JSON integer or a string of ASCII digits."""
    if type(value) is not int and not digits(value):
        raise Refused("bad_time", shown(value))
    try:
        return check_time(rec.from_millis(value))
    except ValueError:  # (more digits than int() takes)
        raise Refused("bad_time", shown(value)) from None


def iso_time(value) -> tuple[int, int]:
    # ASCII only, and no trailing newline (which a "$" in a pattern lets through).
    if type(value) is not str or not value.isascii() or value[-1:] == "\n":
        raise Refused("bad_time", shown(value))
    try:
        return check_time(rec.from_iso8601(value))
    except ValueError:
        raise Refused("bad_time", shown(value)) from None


def decimal_seconds(value) -> tuple[int, int]:
    if type(value) is not str or not value.isascii():  # ASCII digits only
        raise Refused("bad_time", shown(value))
    try:
        return check_time(rec.from_decimal_seconds(value))
    except ValueError:
        raise Refused("bad_time", shown(value)) from None


def loads(payload: bytes):
    """Parse one frame's JSON; malformed text is refused as ``json``."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Refused("json", payload[:200]) from None


def receive_time(recv_ns: int) -> tuple[int, int]:
    return divmod(recv_ns, 1_000_000_000)


def micro_seconds_float(value) -> tuple[int, int]:
    """A time given as a JSON float of seconds (Kraken REST) -> (sec, nanos) to the microsecond.

    ``round(t * 1e6)`` is exact for every time with whole microseconds (a double
    near 1.7e9 is within 1.2e-7 s of the decimal it was written as); digits past
    the microsecond are not kept by a double anyway.
    """
    if isinstance(value, str):
        return decimal_seconds(value)
    kind = type(value)
    if (kind is not float and kind is not int) or not 0 <= value < 1e12:  # (NaN and 1e308 too: no overflow)
        raise Refused("bad_time", shown(value))
    return check_time(rec.from_micros(round(value * 1e6)))


def edge_millis(edge: tuple) -> int:
    """The millisecond of an edge ``(id, sec, nanos)`` (rounded down)."""
    return edge[1] * 1000 + edge[2] // 1_000_000


def edge_nanos(edge: tuple) -> int:
    return edge[1] * 1_000_000_000 + edge[2]


def history_row(rows: HistoryRows, parse: Callable, item):
    """``parse(item)`` -> one row tuple, or None (counted in ``rows.skipped``) when refused."""
    try:
        return parse(item)
    except Refused as exc:
        rows.skipped[exc.reason] += 1
        return None
    except (KeyError, IndexError, TypeError, AttributeError):
        rows.skipped["missing_field"] += 1
        return None
    except Exception:  # noqa: BLE001 - as in the receive loop: a row never stops a backfill
        rows.skipped["parser_error"] += 1
        return None


def raw_id(item, key):
    """The trade id under ``key`` of a row, even one the field checks refused (for paging); None if unusable."""
    try:
        return trade_id(item[key])
    except (Refused, KeyError, TypeError, IndexError):
        return None


def scan_newest_first(rows: HistoryRows, items, parse: Callable, id_key: str, after_id: int, before_id: int):
    """One page of a newest-first history (Coinbase, OKX): keep the rows with ids strictly between
    the gap's edges; return the lowest id the page holds (refused rows included), the next cursor,
    or None when no row had a usable id."""
    lowest = None
    for item in items:
        row = history_row(rows, parse, item)
        tid = row[1] if row is not None else raw_id(item, id_key)
        if tid is not None and (lowest is None or tid < lowest):
            lowest = tid
        if row is not None and after_id < tid < before_id:
            rows.append(row)
    return lowest


def ascending_by_id(rows: HistoryRows) -> HistoryRows:
    """``rows`` sorted by trade id, each id once; keeps ``skipped``."""
    out = HistoryRows(sorted({r[1]: r for r in rows}.values(), key=lambda r: r[1]))
    out.skipped = rows.skipped
    return out


def trade_id(value) -> int:
    """A trade id: a JSON integer, or a string of ASCII digits (where the exchange sends text);
    never a float (1.5 is not an id), a boolean or signed or padded text; below 2**64."""
    if type(value) is int:
        x = value
    elif digits(value):
        try:
            x = int(value)
        except ValueError:  # more digits than int() takes
            raise Refused("missing_field", "trade id %s" % (shown(value),)) from None
    else:
        raise Refused("missing_field", "trade id %s" % (shown(value),))
    if not 0 <= x < 1 << 64:
        raise Refused("missing_field", "trade id %s" % (shown(value),))
    return x


class Session:
    """Per-connection parsing state. Subclasses implement :meth:`on_message`."""

    # Client keepalive: send ``ping_text`` once when nothing was received for
    # ``ping_after_secs`` (None: the exchange needs no client ping).
    ping_after_secs: ClassVar[float | None] = None
    ping_text: ClassVar[str] = ""

    def __init__(self, adapter: "Exchange", symbols: Sequence[SymbolInfo], sink: Sink):
        self.adapter = adapter
        self.sink = sink
        self.symbols = list(symbols)
        # exchange spelling -> wire bytes of the normalized symbol
        self.by_name = {s.exchange_name: rec.symbol_bytes(s.symbol) for s in symbols}
        self._pinged = False  # a ping is out and nothing came back yet
        self._replayed: set = set()  # symbols whose replay of recent trades has arrived

    def first_trades(self, name) -> bool:
        """True for a symbol's first trade message on this connection: the exchange's
        replay of recent trades sent on subscribe, to be stored as snapshot trades."""
        if name in self._replayed:
            return False
        self._replayed.add(name)
        return True

    def expect_replay(self, name) -> None:
        """A (re)subscription was acknowledged: its next trade message is a replay again.
        (``name`` comes from the ack: anything but one of our symbols is ignored.)"""
        if isinstance(name, str):
            self._replayed.discard(name)

    def symbol(self, name) -> bytes:
        if not isinstance(name, str):
            raise Refused("bad_symbol", shown(name))
        sym = self.by_name.get(name)
        if sym is None:
            raise Refused("unknown_symbol", shown(name))
        return sym

    def on_message(self, payload: bytes, recv_ns: int) -> None:
        raise NotImplementedError

    def rebind(self, sink: Sink) -> None:
        """Send records to another sink from now on (after a connection overlap)."""
        self.sink = sink

    def keepalive(self, idle_secs: float) -> str | None:
        """A text to send when nothing was received for ``idle_secs`` (None: nothing)."""
        if self.ping_after_secs is None:
            return None
        if idle_secs < self.ping_after_secs:
            self._pinged = False  # something arrived since the last ping
            return None
        if self._pinged:
            return None
        self._pinged = True
        return self.ping_text


class Exchange:
    """Declarative description of one exchange plus its hooks.

    A subclass that sets ``name`` is registered under it when the class is
    created (mdlogger/exchanges/registry.py); the registry refuses one that
    leaves out any class data below without a default.
    """

    name: ClassVar[str]  # a-z, 0-9: names the exchange's directory, settings section and /health entries
    default_ws_endpoint: ClassVar[str]  # the defaults of exchanges.<name>.ws_endpoint / rest_endpoint
    default_rest_endpoint: ClassVar[str]
    # Other defaults of exchanges.<name>.<key> for this exchange (checked like the configuration file).
    default_settings: ClassVar[Mapping[str, Any]] = {}
    channels: ClassVar[tuple[str, ...]]  # subscribed per symbol
    max_channels_per_connection: ClassVar[int]
    connect_rate: ClassVar[float]  # new connections per second allowed per IP
    send_rate: ClassVar[float]  # our budget of outgoing messages per second per connection
    max_frame_bytes: ClassVar[int] = 1 << 20
    max_connection_age: ClassVar[float | None] = None  # reconnect before the exchange closes us
    session_class: ClassVar[type[Session]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # an exchange, not a shared intermediate class
            registry.register_adapter(cls)

    def __init__(self, settings):  # settings.ExchangeSettings (not imported: settings reads the adapters)
        self.settings = settings

    # -- symbols ----------------------------------------------------------
    def discover(self, rest) -> list[SymbolInfo]:
        raise NotImplementedError

    def normalize(self, name: str) -> str:
        """The exchange's spelling -> BASE-QUOTE (may need discovered data)."""
        raise NotImplementedError

    def max_symbols_per_connection(self) -> int:
        by_exchange = self.max_channels_per_connection // len(self.channels)
        return max(1, min(self.settings.symbols_per_connection, by_exchange))

    # -- connection -------------------------------------------------------
    def ws_url(self, symbols: Sequence[SymbolInfo]) -> str:
        return self.settings.ws_endpoint

    def subscribe_messages(self, symbols: Sequence[SymbolInfo]) -> list[str]:
        raise NotImplementedError

    def new_session(self, symbols: Sequence[SymbolInfo], sink: Sink) -> Session:
        return self.session_class(self, symbols, sink)

    # -- REST trade history (gap backfill) ----------------------------------------------------
    history: ClassVar[HistorySpec]
    history_cost: ClassVar[float] = 1.0  # bucket tokens one history request costs

    def rest_url(self, path: str) -> str:
        return self.settings.rest_endpoint.rstrip("/") + path

    def fetch_history(self, client, info: SymbolInfo, after: tuple, before: tuple,
                      deadline: float | None) -> HistoryRows:
        """The trades of ``info`` between two edges ``(id, sec, nanos)``: ``after`` is the
        last stored trade, ``before`` the first trade after the gap.

        Returns ``TRADE_WIRE``-ordered tuples ``(symbol_bytes, id, sec, nanos, price,
        size, side, maker16, taker16)``, ascending. With ids (``history.has_ids``):
        exactly the ids strictly between ``after`` and ``before``. Without: every trade
        whose time t has ``after <= t <= before`` (the caller drops the edges' own
        rows). Rows the field checks refuse are skipped and counted in
        ``.skipped``. ``client`` is a :class:`mdlogger.history.HistoryClient`;
        ``deadline`` a ``time.monotonic()`` stamp (None: none). Raises
        ``HistoryError`` (a reply that cannot be used) or ``HistoryDeadline``
        (whose ``rows`` holds what was fetched so far, see mdlogger/history.py).
        """
        raise NotImplementedError("%s has no REST trade history" % (self.name,))

    @classmethod
    def limited(cls, status: int, doc, headers) -> float | None:
        """Seconds to pause every REST caller when this reply is a rate-limit answer
        the status alone does not show (HTTP 200 with an error code, special bodies);
        None: not one."""
        return None

    @classmethod
    def fatal(cls, status: int, doc) -> str | None:
        """A reason when this reply (whatever its status, 5xx included) is an answer that
        asking again cannot change (unknown symbol, bad parameter); None: not one."""
        return None

    @classmethod
    def after_reply(cls, headers) -> float | None:
        """Seconds to pause every REST caller after any reply (usage headers); None: no pause."""
        return None
