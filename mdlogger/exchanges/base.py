"""What every exchange adapter is made of.

An adapter is mostly declarative class data (endpoints' paths, channel names,
the exchange's limits, its keepalive rule) plus a few small hooks:

* ``discover(rest)``: the exchange's symbols over REST, as :class:`SymbolInfo`;
* ``normalize(name)`` / ``exchange_name(symbol)``: the exchange's form <-> ``BASE-QUOTE``;
* ``ws_url(symbols)`` and ``subscribe_messages(symbols)``;
* ``new_session(symbols, sink)``: a per-connection parser whose
  ``on_message(payload)`` turns one frame into records on the sink.

The shared connection loop (mdlogger/worker.py) knows nothing of any
exchange: quirks live here, expressed through the hooks and through the few
exceptions below (``Reconnect``, ``Pause``) that a session may raise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

import orjson

from .. import records as rec
from ..settings import ExchangeSettings


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


class Refused(Exception):
    """A message or field that must not reach a file; ``reason`` is one of stats.DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


class Reconnect(Exception):
    """The exchange asked us to reconnect (shutdown notice, restart info)."""


class Rotate(Reconnect):
    """A planned reconnect with notice: open the next connection before this one goes."""


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
MAX_PAST_SECS = 2 * 86400  # older rows would land in days the writer no longer repairs
MAX_FUTURE_SECS = 600


def price(value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise Refused("bad_price", repr(value)) from None
    if not (0.0 < x < MAX_PRICE) or isinstance(value, bool):
        raise Refused("bad_price", repr(value))
    return x


def size(value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise Refused("bad_size", repr(value)) from None
    if not (0.0 < x < MAX_SIZE) or isinstance(value, bool):
        raise Refused("bad_size", repr(value))
    return x


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


def millis(value) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Refused("bad_time", repr(value))
    try:
        return check_time(rec.from_millis(value))
    except ValueError:
        raise Refused("bad_time", repr(value)) from None


def iso_time(value) -> tuple[int, int]:
    try:
        return check_time(rec.from_iso8601(value))
    except ValueError:
        raise Refused("bad_time", repr(value)) from None


def decimal_seconds(value) -> tuple[int, int]:
    try:
        return check_time(rec.from_decimal_seconds(value))
    except ValueError:
        raise Refused("bad_time", repr(value)) from None


def loads(payload: bytes):
    """Parse one frame's JSON; malformed text is refused as ``json``."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Refused("json", payload[:200]) from None


def receive_time(recv_ns: int) -> tuple[int, int]:
    return divmod(recv_ns, 1_000_000_000)


def trade_id(value) -> int:
    if isinstance(value, bool):
        raise Refused("missing_field", "trade id %r" % (value,))
    try:
        x = int(value)
    except (TypeError, ValueError):
        raise Refused("missing_field", "trade id %r" % (value,)) from None
    if not 0 <= x < 1 << 64:
        raise Refused("missing_field", "trade id %r" % (value,))
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
        """A (re)subscription was acknowledged: its next trade message is a replay again."""
        self._replayed.discard(name)

    def symbol(self, name) -> bytes:
        if not isinstance(name, str):
            raise Refused("bad_symbol", repr(name)[:200])
        sym = self.by_name.get(name)
        if sym is None:
            raise Refused("unknown_symbol", repr(name)[:200])
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
    """Declarative description of one exchange plus its hooks."""

    name: ClassVar[str]
    channels: ClassVar[tuple[str, ...]]  # subscribed per symbol
    max_channels_per_connection: ClassVar[int]
    connect_rate: ClassVar[float]  # new connections per second allowed per IP
    send_rate: ClassVar[float]  # our budget of outgoing messages per second per connection
    max_frame_bytes: ClassVar[int] = 1 << 20
    max_connection_age: ClassVar[float | None] = None  # reconnect before the exchange closes us
    session_class: ClassVar[type[Session]]

    def __init__(self, settings: ExchangeSettings):
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


def resolve_symbols(adapter: Exchange, listed: Sequence[SymbolInfo], wanted: Sequence[str]):
    """Match configured symbols against the listing.

    Returns ``(chosen, problems)``: the active SymbolInfo to capture, and
    ``(configured name, status)`` pairs for names that are unknown or inactive.
    An empty ``wanted`` means every active listed symbol.
    """
    by_norm = {s.symbol: s for s in listed}
    by_name = {s.exchange_name: s for s in listed}
    if not wanted:
        return [s for s in listed if s.active], []
    chosen, problems, seen = [], [], set()
    for name in wanted:
        info = by_norm.get(name) or by_name.get(name) or by_norm.get(name.upper())
        if info is None:
            problems.append((name, "unknown"))
        elif not info.active:
            problems.append((name, "inactive"))
        elif info.symbol not in seen:
            seen.add(info.symbol)
            chosen.append(info)
    return chosen, problems


def split_shards(symbols: Sequence[SymbolInfo], per_connection: int, max_connections: int):
    """Balanced shards within both limits; returns ``(shards, uncovered)``."""
    capacity = per_connection * max_connections
    covered, uncovered = list(symbols[:capacity]), list(symbols[capacity:])
    if not covered:
        return [], uncovered
    n = math.ceil(len(covered) / per_connection)
    shards = [covered[i::n] for i in range(n)]
    return shards, uncovered


def reshard(current: Sequence[Sequence[SymbolInfo]], symbols: Sequence[SymbolInfo], per_connection: int,
            max_connections: int):
    """Shards for ``symbols`` that leave as many ``current`` shards untouched as the limits allow.

    Used by a configuration reload, where every changed shard means a
    reconnect. Each current shard keeps the symbols it has that are still
    wanted (unchanged if it lost none). Symbols no shard holds go first into
    new shards (balanced, while connections are free), then into the current
    shards with the most room. Returns ``(shards, uncovered)`` like
    :func:`split_shards`; a shard equal to a current one can keep its worker.
    """
    wanted = {s.symbol: s for s in symbols}
    shards: list[list[SymbolInfo]] = []
    held: set[str] = set()
    for shard in current:
        if len(shards) == max_connections:
            break
        keep = [wanted[s.symbol] for s in shard if s.symbol in wanted and s.symbol not in held][:per_connection]
        if keep:
            shards.append(keep)
            held.update(s.symbol for s in keep)
    leftover = [s for s in symbols if s.symbol not in held]
    free = max_connections - len(shards)
    if leftover and free:
        fresh, leftover = split_shards(leftover, per_connection, free)
        shards.extend(fresh)
    for symbol in list(leftover):
        roomiest = min(shards, key=len, default=None)
        if roomiest is None or len(roomiest) >= per_connection:
            break
        roomiest.append(symbol)
        leftover.remove(symbol)
    return shards, leftover
