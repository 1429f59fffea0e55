"""What every fake exchange shares: markets, modes, recording, faults.

A fake exchange subclasses :class:`FakeExchange` and provides:

* ``rest_routes()``: ``{path: callable(query) -> (status, body_obj)}`` for its REST API;
* ``on_client_message(conn, payload)``: handle one client text frame
  (subscribe, ping, ...), keeping its subscriptions in ``conn.state``;
* ``make_trade(st, **fields)`` / ``make_ticker(st, **fields)``: one event in
  the exchange's own shape (a dict or list), recorded in ``sent_trades`` /
  ``sent_tickers`` when it reached at least one connection;
* ``frame_trade(conn, st, event)`` / ``frame_ticker(...)``: the text frame to
  send on one connection, or None when it is not subscribed;
* optionally ``on_open(conn)`` (greeting), ``on_clock(conn, now)`` (server
  pings, heartbeats) and ``on_subscribed(conn, st, channel)`` (snapshots).

Modes: ``steady`` (``rate`` trades/s per symbol with jitter, tickers every
second), ``firehose`` (pre-encoded trades as fast as the socket takes them),
``idle`` (keepalives only), ``script`` (tests call ``push_trade``/``push_ticker``).
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time

from .wsserver import OP_PONG, OP_TEXT, ConnectionClosed, FakeServer, WsConn, encode_frame

START_PRICES = {"BTC": 87000.0, "ETH": 3100.0, "BNB": 610.0, "SOL": 140.0, "DOGE": 0.16, "XRP": 2.1, "ADA": 0.7}
FIREHOSE_BLOB = 20000  # trades pre-encoded per firehose blob
FIREHOSE_RENEW = 10.0  # seconds a blob is resent before fresh times and ids


def now_ms() -> int:
    return int(time.time() * 1000)


class SymbolState:
    """A random-walk market for one symbol with consecutive trade ids."""

    def __init__(self, symbol: str, rng: random.Random):
        self.symbol = symbol
        self.base, self.quote = symbol.split("-")
        self.price = START_PRICES.get(self.base, 1.0 + rng.random() * 100)
        if self.quote == "BTC":
            self.price /= START_PRICES["BTC"]
        self.next_id = 1_000_000 + rng.randrange(1_000_000)
        self.rng = rng
        self.last_qty = 0.001
        self.count = 0
        self.history: collections.deque = collections.deque(maxlen=100)  # for snapshots

    def step(self) -> tuple[int, float, float, bool]:
        """Next trade: (id, price, qty, taker bought)."""
        self.price *= 1.0 + self.rng.gauss(0, 0.0002)
        qty = round(self.rng.expovariate(1.0) * 0.5 + 0.0001, 5)
        tid = self.next_id
        self.next_id += 1
        self.last_qty = qty
        self.count += 1
        return tid, self.price, qty, self.rng.random() < 0.5


class FakeExchange(FakeServer):
    name = "fake"
    default_symbols: tuple[str, ...] = ("BTC-USDT", "ETH-USDT")
    ws_path = ""  # what follows host:port in the exchange's ws_endpoint setting

    @property
    def ws_endpoint(self) -> str:
        """The value for ``exchanges.<name>.ws_endpoint`` that points at this fake."""
        return self.url_ws + self.ws_path

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, seed: int = 1, port: int = 0,
                 record: bool | None = None, max_client_msgs_per_sec: float | None = None):
        super().__init__(port)
        if mode not in ("steady", "firehose", "idle", "script"):
            raise ValueError("unknown mode %r" % (mode,))
        self.mode = mode
        self.rate = rate
        self.rng = random.Random(seed)
        self.symbols = {s: SymbolState(s, self.rng) for s in (symbols or self.default_symbols)}
        self.record = (mode != "firehose") if record is None else record
        self.max_client_msgs = max_client_msgs_per_sec
        self.sent_trades: list = []
        self.sent_tickers: list = []
        self.sent_counts: collections.Counter = collections.Counter()
        self.violations: list[str] = []
        self.errors_sent: list = []
        self.pongs: list[tuple[bytes, bool]] = []
        self.rest_failures = 0
        self.rest_status_override: int | None = None
        self.rest_calls = 0
        self.silent_until = 0.0
        self.lock = threading.RLock()  # market state, records, and sends that must stay in order

    # -- lifecycle -----------------------------------------------------------------
    def start(self):
        super().start()
        self._spawn(self._clock, "fake-%s-clock" % self.name)
        return self

    def silent(self) -> bool:
        return time.monotonic() < self.silent_until

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {}

    def on_http(self, method, path, query, headers):
        self.rest_calls += 1
        if self.rest_failures > 0:
            self.rest_failures -= 1
            return 429, {"Retry-After": "1", "Content-Type": "application/json"}, b'{"error":"too many requests"}'
        if self.rest_status_override:
            return self.rest_status_override, {"Content-Type": "application/json"}, b'{"error":"override"}'
        route = self.rest_routes().get(path)
        if method != "GET" or route is None:
            return 404, {"Content-Type": "application/json"}, json.dumps({"error": "unknown path %s" % path}).encode()
        status, body = route(query)
        return status, {"Content-Type": "application/json"}, json.dumps(body).encode()

    # -- WebSocket --------------------------------------------------------------------------
    def on_ws(self, conn: WsConn) -> None:
        conn.state["recent"] = collections.deque()
        conn.state["pings"] = {}
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
            return True
        except ConnectionClosed:
            return False

    # -- events -------------------------------------------------------------------------------
    def make_trade(self, st: SymbolState, **fields):
        raise NotImplementedError

    def make_ticker(self, st: SymbolState, **fields):
        raise NotImplementedError

    def frame_trade(self, conn: WsConn, st: SymbolState, event) -> str | None:
        raise NotImplementedError

    def frame_ticker(self, conn: WsConn, st: SymbolState, event) -> str | None:
        raise NotImplementedError

    def _deliver(self, st: SymbolState, event, framer) -> int:
        n = 0
        for conn in self.open_connections():
            text = framer(conn, st, event)
            if text is not None and self.send(conn, text):
                n += 1
        return n

    def push_trade(self, symbol: str, **fields):
        """Send one trade now to every connection subscribed to it."""
        st = self.symbols[symbol]
        with self.lock:
            event = self.make_trade(st, **fields)
            st.history.append(event)
            if self._deliver(st, event, self.frame_trade):
                self.sent_counts[symbol] += 1
                if self.record:
                    self.sent_trades.append(event)
        return event

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

    # -- the clock: steady trades, tickers, keepalives -------------------------------------------
    def _clock(self) -> None:
        tick = 0.01
        next_ticker = time.monotonic() + 1.0
        owed = collections.defaultdict(float)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            if self.silent():
                continue
            for conn in self.open_connections():
                if not conn.state.get("ready"):
                    continue  # accepted, but on_open has not finished setting it up
                try:
                    with self.lock:
                        self.on_clock(conn, now)
                except ConnectionClosed:
                    pass
            if self.mode != "steady":
                continue
            trading = self.subscribed("trades")
            for symbol in trading:
                owed[symbol] += self.rate * tick * self.rng.uniform(0.5, 1.5)
                while owed[symbol] >= 1.0:
                    owed[symbol] -= 1.0
                    self.push_trade(symbol)
            if now >= next_ticker:
                next_ticker = now + 1.0
                for symbol in self.subscribed("ticker"):
                    self.push_ticker(symbol)

    # -- firehose -----------------------------------------------------------------------------------
    def _firehose(self, conn: WsConn) -> None:
        """Trade frames as fast as the socket takes them, from the fake's firehose source."""
        source, key = None, None
        while not conn.closed and not self._stopping.is_set():
            if self.silent():
                time.sleep(0.05)
                continue
            states = [st for st in self.symbols.values() if self.wants(conn, st, "trades")]
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
            try:
                conn.send_frames(blob)
            except ConnectionClosed:
                return
            with self.lock:
                source.sent()

    def firehose_source(self, conn: WsConn, states: list) -> "ResentBlob":
        """What the firehose sends: ``next_round() -> bytes``, ``sent()`` once it is on the socket, ``stale()``."""
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
        """Send nothing at all (no data, no keepalives) for a while, keeping TCP open."""
        self.silent_until = time.monotonic() + seconds


class ResentBlob:
    """The plain firehose source: FIREHOSE_BLOB pre-encoded trades, resent until FIREHOSE_RENEW s old."""

    def __init__(self, fake: FakeExchange, conn: WsConn, states: list):
        self.fake = fake
        self.states = states
        self.made = time.monotonic()
        self.per = max(1, FIREHOSE_BLOB // len(states))
        self.blob = fake._firehose_blob(conn, states, self.per)

    def stale(self) -> bool:
        return time.monotonic() - self.made > FIREHOSE_RENEW

    def next_round(self) -> bytes:
        return self.blob

    def sent(self) -> None:
        for st in self.states:
            self.fake.sent_counts[st.symbol] += self.per
