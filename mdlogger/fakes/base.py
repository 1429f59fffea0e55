"""What every fake exchange shares: markets, modes, trade history, recording, faults, REST plumbing.

A fake exchange subclasses :class:`FakeExchange` and provides:

* ``rest_routes()``: ``{path: callable(query)}`` and optionally
  ``rest_patterns()``: ``[(compiled regex, callable(query, *groups))]`` for
  paths with a symbol in them. A route returns ``(status, body)`` or
  ``(status, body, headers)``; a body that is ``bytes`` is sent as it is,
  anything else as JSON;
* ``rest_limit(path, now)``: None, or the exchange's own rate-limit answer
  for this request (called for every request, under ``rest_lock``), and
  ``rest_headers(now)``: headers added to every reply;
* ``rate_limited_answer(retry_after)`` / ``error_answer(status, path)``: the
  exchange's shapes for an injected 429 (``rest_failures``), an injected
  status (``rest_status_override``) and unknown paths;
* ``on_client_message(conn, payload)``: handle one client text frame
  (subscribe, ping, ...), keeping its subscriptions in ``conn.state``;
* ``make_trade(st, **fields)`` / ``make_ticker(st, **fields)``: one event in
  the exchange's own shape (a dict or list); trade times come from
  ``clock_ns()``; ``trade_key(event)`` is the trade's id (an int);
* ``frame_trade(conn, st, event)`` / ``frame_ticker(...)``: the text frame to
  send on one connection, or None when it is not subscribed (with
  ``batch_trades`` the trade framer also takes a list: several trades in one frame);
* optionally ``on_open(conn)`` (greeting), ``on_clock(conn, now)`` (server
  pings, heartbeats), ``clock_trade(symbol)`` (what one steady-mode trade is).

Modes: ``steady`` (``rate`` trades/s per symbol with jitter, tickers every
second), ``firehose`` (pre-encoded trades as fast as the socket takes them),
``idle`` (keepalives only), ``script`` (tests call ``push_trade``/``push_ticker``).

The market keeps trading while nobody listens: in ``steady`` mode every symbol
trades at ``rate`` whether or not a connection is subscribed, and while the
fake is silent (``trade_when_unsubscribed=False`` restores the old behaviour:
only subscribed symbols trade, nothing while silent). Every trade made by
``push_trade``/``push_trades`` or the steady clock is kept, in exchange order,
in its symbol's history ``st.made`` (bounded by ``history_size``; ``st.history``
is the same deque), which feeds the subscribe snapshots and the REST
trade-history endpoints; firehose trades are not kept. ``made_trades(symbol)``
lists it, ``delivered(symbol, trade)`` tells whether a trade was handed to the
socket of at least one connection (live, or in a subscribe snapshot), and
``sent_trades`` / ``sent_counts`` still hold only trades delivered live.
"Delivered" means written to the socket, not proof that the client read it.

For benchmarks (set as attributes after construction, before ``start``):
``firehose_trades`` (None: endless) ends each connection's firehose after that
many trade frames, the last round cut to fit (``sent_counts`` still counts it
whole), leaving the connection open with its keepalives; ``rates`` (``{symbol: trades/s}``, None: every symbol at
``rate``) switches the steady clock to a schedule: each symbol trades as a
Poisson process at its own rate and each subscribed symbol gets a ticker every
``ticker_interval`` seconds (1.0), spread over the interval instead of all at
once; ``stop_market()`` ends the steady trading (keepalives go on).
:func:`generated_symbols` makes long symbol lists.

Faults: ``drop_all()``, ``go_silent(seconds)``, ``drop_after(n)`` (end every
connection, without a close frame, once it was sent ``n`` data messages),
``refuse_upgrades(seconds)`` (WebSocket upgrades answered 503, REST still
served), ``rest_failures`` / ``rest_status_override``. Every plain HTTP request
is logged in ``rest_log`` as ``(monotonic time of arrival, path, status)``,
every upgrade request in ``upgrade_log`` (status 101 or 503).
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import json
import random
import string
import threading
import time

from .wsserver import OP_PONG, OP_TEXT, ConnectionClosed, FakeServer, WsConn, encode_frame

_H16 = 126  # server frame length codes: 16-bit and 64-bit extended lengths
_H64 = 127

START_PRICES = {"BTC": 87000.0, "ETH": 3100.0, "BNB": 610.0, "SOL": 140.0, "DOGE": 0.16, "XRP": 2.1, "ADA": 0.7}
FIREHOSE_BLOB = 20000  # trades pre-encoded per firehose blob
FIREHOSE_RENEW = 10.0  # seconds a blob is resent before fresh times and ids
HISTORY_SIZE = 200_000  # trades kept per symbol for snapshots and REST history
JSON = {"Content-Type": "application/json"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def generated_symbols(n: int, quote: str, first=("BTC", "ETH", "SOL", "XRP", "DOGE", "ADA")) -> list[str]:
    """``n`` symbols ``BASE-quote``: the ``first`` bases, then made-up three-letter ones (``QAA``, ``QAB``, ...,
    then ``JAA``...), which no fake or adapter treats specially (three letters keep Kraken's and Bitfinex's pair
    spellings plain). At most ``len(first)`` + 2 x 676."""
    made = ("%s%s%s" % (a, b, c) for a in "QJ" for b in string.ascii_uppercase for c in string.ascii_uppercase)
    bases = [b for b in first if b != quote][:n]
    bases += list(itertools.islice(made, max(0, n - len(bases))))
    if len(bases) < n:
        raise ValueError("at most %d generated symbols" % len(bases))
    return ["%s-%s" % (b, quote) for b in bases]


def cut_frames(blob: bytes, n: int) -> bytes:
    """The first ``n`` frames of a blob of unmasked server frames (all of it if it holds fewer)."""
    at = 0
    for _ in range(n):
        if at >= len(blob):
            break
        code = blob[at + 1] & 0x7F
        if code == _H16:
            at += 4 + int.from_bytes(blob[at + 2:at + 4], "big")
        elif code == _H64:
            at += 10 + int.from_bytes(blob[at + 2:at + 10], "big")
        else:
            at += 2 + code
    return blob[:at]


class SymbolState:
    """A random-walk market for one symbol with consecutive trade ids, and the trades it made."""

    def __init__(self, symbol: str, rng: random.Random, history_size: int = HISTORY_SIZE):
        self.symbol = symbol
        self.base, self.quote = symbol.split("-")
        self.price = START_PRICES.get(self.base, 1.0 + rng.random() * 100)
        if self.quote == "BTC":
            self.price /= START_PRICES["BTC"]
        self.next_id = 1_000_000 + rng.randrange(1_000_000)
        self.rng = rng
        self.last_qty = 0.001
        self.count = 0
        self.made: collections.deque = collections.deque(maxlen=history_size)  # exchange-shaped, oldest first
        self.history = self.made  # the older name, used by snapshots and tests
        self.live: set[int] = set()  # keys of made trades delivered live to at least one connection
        self.snapped: set[int] = set()  # keys of made trades sent in a subscribe snapshot

    def step(self) -> tuple[int, float, float, bool]:
        """Next trade: (id, price, qty, taker bought)."""
        self.price *= 1.0 + self.rng.gauss(0, 0.0002)
        qty = round(self.rng.expovariate(1.0) * 0.5 + 0.0001, 5)
        tid = self.next_id
        self.next_id += 1
        self.last_qty = qty
        self.count += 1
        return tid, self.price, qty, self.rng.random() < 0.5


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` stored; a request takes one."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at: float | None = None

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SlidingWindow:
    """At most ``limit`` requests within any ``window`` seconds (refused requests do not count)."""

    def __init__(self, limit: int, window: float):
        self.limit = limit
        self.window = window
        self.times: collections.deque = collections.deque()

    def take(self, now: float) -> bool:
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


class FakeExchange(FakeServer):
    # The exchange this fake speaks for: a subclass that sets it registers itself as that exchange's fake
    # (mdlogger/exchanges/registry.py), found by ``fake_class(name)``.
    name = "fake"
    default_symbols: tuple[str, ...] = ("BTC-USDT", "ETH-USDT")
    ws_path = ""  # what follows host:port in the exchange's ws_endpoint setting
    batch_trades = False  # True: several trades made at once go out in one frame (frame_trade gets a list)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            # Imported here, not above: importing the adapters may import an extra exchange module
            # (MDLOGGER_EXCHANGE_MODULES) that itself needs this module complete.
            from ..exchanges import registry

            registry.register_fake(cls)

    @property
    def ws_endpoint(self) -> str:
        """The value for ``exchanges.<name>.ws_endpoint`` that points at this fake."""
        return self.url_ws + self.ws_path

    def config_section(self, symbols=None, **overrides) -> dict:
        """An ``exchanges.<name>`` configuration section that points the logger at this fake: enabled, its
        WebSocket and REST endpoints, and ``symbols`` (default: every symbol this fake trades), then
        ``overrides`` (any other key of the section, e.g. timers) as given."""
        section = {"enabled": True, "ws_endpoint": self.ws_endpoint, "rest_endpoint": self.url_http,
                   "symbols": list(self.symbols if symbols is None else symbols)}
        section.update(overrides)
        return section

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, seed: int = 1, port: int = 0,
                 record: bool | None = None, max_client_msgs_per_sec: float | None = None,
                 trade_when_unsubscribed: bool = True, history_size: int = HISTORY_SIZE):
        super().__init__(port)
        if mode not in ("steady", "firehose", "idle", "script"):
            raise ValueError("unknown mode %r" % (mode,))
        self.mode = mode
        self.rate = rate
        self.rng = random.Random(seed)
        self.symbols = {s: SymbolState(s, self.rng, history_size) for s in (symbols or self.default_symbols)}
        self.record = (mode != "firehose") if record is None else record
        self.max_client_msgs = max_client_msgs_per_sec
        self.trade_when_unsubscribed = trade_when_unsubscribed
        self.sent_trades: list = []
        self.sent_tickers: list = []
        self.sent_counts: collections.Counter = collections.Counter()
        self.violations: list[str] = []
        self.errors_sent: list = []
        self.pongs: list[tuple[bytes, bool]] = []
        self.rest_failures = 0
        self.rest_status_override: int | None = None
        self.rest_calls = 0
        self.rest_log: list[tuple[float, str, int]] = []
        self.upgrade_log: list[tuple[float, str, int]] = []
        self.rest_lock = threading.Lock()  # REST rate-limit state and logs
        self.silent_until = 0.0
        self.refuse_until = 0.0
        self.drop_after_n: int | None = None
        self.dropped = 0  # connections ended by drop_after
        self._frozen_ns: int | None = None
        self.wall_ns = time.time_ns  # the wall clock trade times come from (tests may replace it)
        self.lock = threading.RLock()  # market state, records, and sends that must stay in order
        # Benchmark knobs (module docstring), set after construction:
        self.firehose_trades: int | None = None  # trade frames per connection's firehose (None: endless)
        self.rates: dict[str, float] | None = None  # per-symbol trades/s: the scheduled steady clock
        self.ticker_interval = 1.0  # seconds between one symbol's tickers on the scheduled clock
        self.trading = True  # False after stop_market(): the steady clock makes no more trades

    # -- lifecycle -----------------------------------------------------------------
    def start(self):
        super().start()
        self._spawn(self._clock, "fake-%s-clock" % self.name)
        return self

    def silent(self) -> bool:
        return time.monotonic() < self.silent_until

    def clock_ns(self) -> int:
        """The time of the trade being made (ns since the epoch; shared by the trades of one sweep)."""
        return self._frozen_ns if self._frozen_ns is not None else self.wall_ns()

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {}

    def rest_patterns(self) -> list:
        return []

    def rest_limit(self, path: str, now: float):
        """None to serve the request, or the exchange's rate-limit answer ``(status, headers, body)``."""
        return None

    def rest_headers(self, now: float) -> dict:
        """Headers added to every REST reply (Binance: the weight used)."""
        return {}

    # The exchange's REST error answers, declared by each fake: the rate-limit answer (its HTTP
    # status, body, and whether it says Retry-After), the body of a 404, and of any other error.
    rate_limited_status = 429
    rate_limited_body = b'{"error":"too many requests"}'
    rate_limited_retry_after = True
    not_found_body = b'{"error":"unknown path"}'
    error_body = b'{"error":"override"}'

    def rate_limited_answer(self, retry_after: int) -> tuple[int, dict, bytes]:
        """The exchange's answer to a client over its REST rate limit (used by ``rest_failures``)."""
        headers = dict(JSON, **{"Retry-After": str(retry_after)}) if self.rate_limited_retry_after else dict(JSON)
        return self.rate_limited_status, headers, self.rate_limited_body

    def error_answer(self, status: int, path: str) -> tuple[int, dict, bytes]:
        """The exchange's answer for an unknown path (404) or an injected status."""
        if status == 429:
            return self.rate_limited_answer(1)
        return status, dict(JSON), self.not_found_body if status == 404 else self.error_body

    def on_http(self, method, path, query, headers):
        now = time.monotonic()
        with self.rest_lock:
            status, extra, body = self._answer_http(method, path, query, now)
            extra.update(self.rest_headers(now))
            self.rest_log.append((now, path, status))
        return status, extra, body

    def _answer_http(self, method, path, query, now):
        self.rest_calls += 1
        if self.rest_failures > 0:
            self.rest_failures -= 1
            return self.rate_limited_answer(1)
        if self.rest_status_override:
            return self.error_answer(self.rest_status_override, path)
        limited = self.rest_limit(path, now)
        if limited is not None:
            return limited
        route = self._route(method, path)
        if route is None:
            return self.error_answer(404, path)
        result = route(query)
        status, body = result[0], result[1]
        extra = dict(JSON, **(result[2] if len(result) > 2 else {}))
        return status, extra, body if isinstance(body, bytes) else json.dumps(body).encode()

    def _route(self, method: str, path: str):
        if method not in ("GET", "HEAD"):
            return None
        route = self.rest_routes().get(path)
        if route is not None:
            return route
        for pattern, handler in self.rest_patterns():
            m = pattern.fullmatch(path)
            if m:
                return lambda query, _h=handler, _g=m.groups(): _h(query, *_g)
        return None

    def upgrade_answer(self, path, query, headers):
        """WebSocket upgrades are answered 503 while ``refuse_upgrades`` lasts."""
        now = time.monotonic()
        refused = now < self.refuse_until
        with self.rest_lock:
            self.upgrade_log.append((now, path, 503 if refused else 101))
        if refused:
            return 503, {"Content-Type": "text/plain"}, b"Service Unavailable"
        return None

    # -- WebSocket --------------------------------------------------------------------------
    def on_ws(self, conn: WsConn) -> None:
        conn.state["recent"] = collections.deque()
        conn.state["pings"] = {}
        conn.state["data_sent"] = 0
        if not self.on_open(conn):
            return
        conn.state["ready"] = True  # set up: the clock may call on_clock for it from now on
        if self.mode == "firehose":
            self._spawn(self._firehose, "fake-%s-firehose" % self.name, conn)
        while True:
            opcode, payload = conn.recv()
            if not self._rate_ok(conn):
                return
            if opcode == OP_TEXT:
                with self.lock:
                    self.on_client_message(conn, payload)
            elif opcode == OP_PONG:
                sent = conn.state["pings"].pop(payload, None)
                self.pongs.append((payload, sent is not None))

    def on_open(self, conn: WsConn) -> bool:
        """Greet a new connection; False to end it."""
        return True

    def on_client_message(self, conn: WsConn, payload: bytes) -> None:
        raise NotImplementedError

    def on_clock(self, conn: WsConn, now: float) -> None:
        """Called about every 10 ms per connection (not while silent)."""

    def _rate_ok(self, conn: WsConn) -> bool:
        if self.max_client_msgs is None:
            return True
        now = time.monotonic()
        recent = conn.state["recent"]
        recent.append(now)
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) > self.max_client_msgs:
            self.violations.append("%d client messages within 1 s" % len(recent))
            conn.close(1008, "Too many requests")
            return False
        return True

    def pongs_matched(self) -> int:
        return sum(1 for _, ok in self.pongs if ok)

    def send(self, conn: WsConn, obj) -> bool:
        """Send a JSON document (or text) on one connection; False if it is gone."""
        text = obj if isinstance(obj, (str, bytes)) else json.dumps(obj, separators=(",", ":"))
        try:
            conn.send_text(text)
        except ConnectionClosed:
            return False
        self._count_sent(conn, 1)
        return True

    def _count_sent(self, conn: WsConn, n: int) -> None:
        """Count data messages sent on a connection; end it once ``drop_after`` is reached."""
        with self.lock:
            sent = conn.state["data_sent"] = conn.state.get("data_sent", 0) + n
            if self.drop_after_n is not None and sent >= self.drop_after_n and not conn.closed:
                conn.half_close()
                self.dropped += 1

    # -- events -------------------------------------------------------------------------------
    def make_trade(self, st: SymbolState, **fields):
        raise NotImplementedError

    def make_ticker(self, st: SymbolState, **fields):
        raise NotImplementedError

    def trade_key(self, event) -> int:
        """A made trade's id (for Kraken, the internal id its REST API shows)."""
        raise NotImplementedError

    def frame_trade(self, conn: WsConn, st: SymbolState, event) -> str | None:
        raise NotImplementedError

    def frame_ticker(self, conn: WsConn, st: SymbolState, event) -> str | None:
        raise NotImplementedError

    def _deliver(self, st: SymbolState, event, framer) -> int:
        if self.silent():
            return 0
        n = 0
        for conn in self.open_connections():
            text = framer(conn, st, event)
            if text is not None and self.send(conn, text):
                n += 1
        return n

    def _keep(self, st: SymbolState, events: list) -> None:
        """Append made trades to their symbol's history (forgetting the delivery marks of evicted ones)."""
        for event in events:
            if st.made and len(st.made) == st.made.maxlen:
                old = self.trade_key(st.made[0])
                st.live.discard(old)
                st.snapped.discard(old)
            st.made.append(event)

    def push_trade(self, symbol: str, **fields):
        """Make one trade now and send it to every connection subscribed to it."""
        return self.push_trades(symbol, 1, **fields)[-1]

    def push_trades(self, symbol: str, n: int, **fields) -> list:
        """Make ``n`` trades of one symbol at once (one frame if ``batch_trades``, else one frame each)."""
        st = self.symbols[symbol]
        with self.lock:
            events = [self.make_trade(st, **fields) for _ in range(n)]
            self._keep(st, events)
            groups = [events] if self.batch_trades and n > 1 else [[e] for e in events]
            for group in groups:
                if self._deliver(st, group if len(group) > 1 else group[0], self.frame_trade):
                    st.live.update(self.trade_key(e) for e in group)
                    self.sent_counts[symbol] += len(group)
                    if self.record:
                        self.sent_trades.extend(group)
        return events

    def sweep(self, symbol: str, n: int) -> list:
        """``n`` trades sharing one timestamp (a taker order filling several resting orders)."""
        with self.lock:
            self._frozen_ns = self.wall_ns()
            try:
                return self.push_trades(symbol, n)
            finally:
                self._frozen_ns = None

    def clock_trade(self, symbol: str) -> None:
        """One trade of the steady clock."""
        self.push_trade(symbol)

    def snapshot_sent(self, st: SymbolState, events) -> None:
        """Mark made trades as delivered in a subscribe snapshot."""
        st.snapped.update(self.trade_key(e) for e in events)

    def push_ticker(self, symbol: str, **fields):
        st = self.symbols[symbol]
        with self.lock:
            event = self.make_ticker(st, **fields)
            if self._deliver(st, event, self.frame_ticker) and self.record:
                self.sent_tickers.append(event)
        return event

    def push_raw(self, text) -> None:
        """Send a raw text frame to every open connection."""
        for conn in self.open_connections():
            self.send(conn, text)

    def wants(self, conn: WsConn, st: SymbolState, channel: str) -> bool:
        """Whether a connection is subscribed to a symbol's channel ('trades' or 'ticker')."""
        return (channel, st.symbol) in conn.state.get("subs", ())

    def subscribed(self, channel: str) -> set[str]:
        """Symbols some open connection is subscribed to on a channel."""
        out = set()
        for conn in self.open_connections():
            out |= {s for c, s in conn.state.get("subs", ()) if c == channel}
        return out

    # -- trade history ---------------------------------------------------------------------------
    def made_trades(self, symbol: str) -> list:
        """Every trade of a symbol still in its history, exchange-shaped, oldest first."""
        with self.lock:
            return list(self.symbols[symbol].made)

    def delivered(self, symbol: str, trade, snapshots: bool = True) -> bool:
        """Whether a made trade (an event, or its ``trade_key``) reached the socket of at least one
        connection: live, or (unless ``snapshots`` is False) in a subscribe snapshot."""
        key = trade if isinstance(trade, int) else self.trade_key(trade)
        st = self.symbols[symbol]
        with self.lock:
            return key in st.live or (snapshots and key in st.snapped)

    def undelivered(self, symbol: str, snapshots: bool = True) -> list:
        """The made trades of a symbol that never reached any connection, oldest first."""
        st = self.symbols[symbol]
        with self.lock:
            return [e for e in st.made
                    if self.trade_key(e) not in st.live and not (snapshots and self.trade_key(e) in st.snapped)]

    def _history_slice(self, st: SymbolState, lo=None, hi=None, key=None) -> list:
        """The made trades with ``lo <= key(t) <= hi`` (either bound optional), oldest first.

        ``key`` defaults to ``trade_key``; it must not decrease along the history (ids and times don't).
        """
        key = key or self.trade_key
        with self.lock:
            events = list(st.made)
        start = 0 if lo is None else bisect.bisect_left(events, lo, key=key)
        stop = len(events) if hi is None else bisect.bisect_right(events, hi, key=key)
        return events[start:stop]

    # -- the clock: steady trades, tickers, keepalives -------------------------------------------
    def _clock(self) -> None:
        tick = 0.01
        next_ticker = time.monotonic() + 1.0
        owed = collections.defaultdict(float)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            silent = self.silent()
            if not silent:
                for conn in self.open_connections():
                    if not conn.state.get("ready"):
                        continue  # accepted, but on_open has not finished setting it up
                    try:
                        with self.lock:
                            self.on_clock(conn, now)
                    except ConnectionClosed:
                        pass
            if self.mode != "steady" or not self.trading:
                continue
            if self.rates is not None:
                self._scheduled(now, silent)
                continue
            if self.trade_when_unsubscribed:
                trading = list(self.symbols)
            elif silent:
                continue
            else:
                trading = sorted(self.subscribed("trades"))
            for symbol in trading:
                owed[symbol] += self.rate * tick * self.rng.uniform(0.5, 1.5)
                while owed[symbol] >= 1.0:
                    owed[symbol] -= 1.0
                    self.clock_trade(symbol)
            if not silent and now >= next_ticker:
                next_ticker = now + 1.0
                for symbol in self.subscribed("ticker"):
                    self.push_ticker(symbol)

    def stop_market(self) -> None:
        """The steady clock makes no more trades or tickers from now on (keepalives go on)."""
        self.trading = False

    def _scheduled(self, now: float, silent: bool) -> None:
        """One tick of the scheduled steady clock (``rates``): due trades (Poisson arrivals per symbol) and due
        tickers (every ``ticker_interval`` per subscribed symbol, phases spread over the interval)."""
        sched = getattr(self, "_schedule", None)
        if sched is None:
            sched = self._schedule = {"heap": [], "subs": (0.0, set(), set())}
            for symbol in self.symbols:
                rate = self.rates.get(symbol, self.rate)
                if rate > 0:
                    sched["heap"].append((now + self.rng.expovariate(rate), 0, symbol))
                sched["heap"].append((now + self.rng.uniform(0, self.ticker_interval), 1, symbol))
            heapq.heapify(sched["heap"])
        at, trades_to, tickers_to = sched["subs"]
        if now - at >= 0.5:  # who is subscribed, refreshed twice a second
            trades_to, tickers_to = self.subscribed("trades"), self.subscribed("ticker")
            sched["subs"] = (now, trades_to, tickers_to)
        heap = sched["heap"]
        while heap and heap[0][0] <= now:
            due, kind, symbol = heapq.heappop(heap)
            if kind == 0:
                if self.trade_when_unsubscribed or (not silent and symbol in trades_to):
                    self.clock_trade(symbol)
                rate = self.rates.get(symbol, self.rate)
                heapq.heappush(heap, (due + self.rng.expovariate(rate), 0, symbol))
            else:
                if not silent and symbol in tickers_to:
                    self.push_ticker(symbol)
                heapq.heappush(heap, (max(due + self.ticker_interval, now), 1, symbol))

    # -- firehose -----------------------------------------------------------------------------------
    def _firehose(self, conn: WsConn) -> None:
        """Trade frames as fast as the socket takes them, from the fake's firehose source; at most
        ``firehose_trades`` frames on this connection when that is set."""
        source, key = None, None
        left = self.firehose_trades
        while not conn.closed and not self._stopping.is_set():
            if left is not None and left <= 0:
                return  # done: the connection stays open (keepalives, client messages)
            if self.silent():
                time.sleep(0.05)
                continue
            states = self.firehose_states(conn)
            if not states:
                time.sleep(0.01)
                continue
            names = tuple(st.symbol for st in states)
            if names != key or source.stale():
                key = names
                with self.lock:
                    source = self.firehose_source(conn, states)
            with self.lock:
                blob = source.next_round()
            frames = source.frames
            if left is not None and frames > left:
                blob, frames = cut_frames(blob, left), left
            try:
                conn.send_frames(blob)
            except ConnectionClosed:
                return
            if left is not None:
                left -= frames
            with self.lock:
                source.sent()
                self._count_sent(conn, frames)

    def firehose_states(self, conn: WsConn) -> list:
        """The symbols whose trades the firehose sends on a connection (those it subscribed to)."""
        return [st for st in self.symbols.values() if self.wants(conn, st, "trades")]

    def firehose_source(self, conn: WsConn, states: list) -> "ResentBlob":
        """What the firehose sends: ``next_round() -> bytes``, ``sent()`` once it is on the socket, ``stale()``,
        ``frames`` (frames per round)."""
        return ResentBlob(self, conn, states)

    def _firehose_blob(self, conn: WsConn, states, per: int) -> bytes:
        parts = []
        for _ in range(per):
            for st in states:
                text = self.frame_trade(conn, st, self.make_trade(st))
                if text is not None:
                    parts.append(encode_frame(OP_TEXT, text.encode() if isinstance(text, str) else text))
        return b"".join(parts)

    # -- faults ---------------------------------------------------------------------------------------
    def drop_all(self, abort: bool = True) -> None:
        for conn in self.open_connections():
            conn.abort() if abort else conn.close(1001, "going away")

    def go_silent(self, seconds: float) -> None:
        """Send nothing at all (no data, no keepalives) for a while, keeping TCP open.

        The market goes on trading meanwhile (unless ``trade_when_unsubscribed`` is False):
        those trades are made, kept in the history, and never sent."""
        self.silent_until = time.monotonic() + seconds

    def drop_after(self, n: int | None) -> None:
        """End every WebSocket connection, new and open ones, without a close frame once it was sent
        ``n`` data messages (acks and snapshots included; a firehose blob counts whole): everything
        already sent is delivered, then TCP FIN. None disables it."""
        with self.lock:
            self.drop_after_n = n
            if n is not None:
                for conn in self.open_connections():
                    if conn.state.get("data_sent", 0) >= n:
                        conn.half_close()
                        self.dropped += 1

    def refuse_upgrades(self, seconds: float) -> None:
        """Answer WebSocket upgrade requests with HTTP 503 for ``seconds`` (0 ends it); REST keeps answering.
        Open connections are not touched."""
        self.refuse_until = time.monotonic() + seconds


class ResentBlob:
    """The plain firehose source: FIREHOSE_BLOB pre-encoded trades, resent until FIREHOSE_RENEW s old."""

    def __init__(self, fake: FakeExchange, conn: WsConn, states: list):
        self.fake = fake
        self.states = states
        self.made = time.monotonic()
        self.per = max(1, FIREHOSE_BLOB // len(states))
        self.frames = self.per * len(states)
        self.blob = fake._firehose_blob(conn, states, self.per)

    def stale(self) -> bool:
        return time.monotonic() - self.made > FIREHOSE_RENEW

    def next_round(self) -> bytes:
        return self.blob

    def sent(self) -> None:
        for st in self.states:
            self.fake.sent_counts[st.symbol] += self.per
