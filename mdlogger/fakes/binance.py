"""A loopback fake of Binance spot: REST exchangeInfo and the combined WebSocket stream.

Speaks the real protocol (docs/exchange-protocols.md): ``/stream`` with
``streams=`` or live ``SUBSCRIBE``/``UNSUBSCRIBE``/``LIST_SUBSCRIPTIONS``,
events wrapped as ``{"stream":..., "data":...}`` in the real ``trade`` and
``24hrTicker`` shapes, a server ping every ``ping_interval`` whose payload the
client must echo, at most 5 client messages per second (more closes the
connection with 1008 and is recorded in ``violations``), 1024 streams per
connection, ``serverShutdown`` and the 24 h connection limit.

Modes: ``steady`` (``rate`` trades/s per symbol, tickers every second),
``firehose`` (trades as fast as the socket takes them; ids repeat while
a pre-encoded blob is resent, so use it for load, not for exactness), ``idle`` (pings
only), ``script`` (the test calls ``push_trade``/``push_ticker``).
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time

from .wsserver import OP_PING, OP_PONG, OP_TEXT, ConnectionClosed, FakeServer, WsConn, encode_frame

DEFAULT_SYMBOLS = ("BTC-USDT", "ETH-USDT", "BNB-BTC", "SOL-USDT", "DOGE-USDT")
START_PRICES = {"BTC": 87000.0, "ETH": 3100.0, "BNB": 0.0071, "SOL": 140.0, "DOGE": 0.16}
MAX_STREAMS = 1024
FIREHOSE_BLOB = 20000  # trades pre-encoded per firehose blob
FIREHOSE_RENEW = 2.0  # seconds a blob is resent before fresh times and ids


def _now_ms() -> int:
    return int(time.time() * 1000)


class SymbolState:
    """A random-walk market for one symbol with consecutive trade ids."""

    def __init__(self, symbol: str, rng: random.Random):
        self.symbol = symbol
        self.name = symbol.replace("-", "")
        self.stream = self.name.lower()
        base = symbol.split("-")[0]
        self.price = START_PRICES.get(base, 1.0 + rng.random() * 100)
        self.next_id = 1_000_000 + rng.randrange(1_000_000)
        self.rng = rng
        self.last_qty = 0.0
        self.count = 0

    def step(self) -> tuple[int, float, float, bool]:
        self.price *= 1.0 + self.rng.gauss(0, 0.0002)
        qty = round(self.rng.expovariate(1.0) * 0.5 + 0.0001, 5)
        tid = self.next_id
        self.next_id += 1
        self.last_qty = qty
        self.count += 1
        return tid, self.price, qty, self.rng.random() < 0.5


class FakeBinance(FakeServer):
    def __init__(self, symbols=DEFAULT_SYMBOLS, mode: str = "steady", rate: float = 5.0, ping_interval: float = 20.0,
                 pong_timeout: float = 60.0, max_client_msgs_per_sec: int = 5, max_connection_age: float = 86400.0,
                 seed: int = 1, port: int = 0, record: bool | None = None):
        super().__init__(port)
        if mode not in ("steady", "firehose", "idle", "script"):
            raise ValueError("unknown mode %r" % (mode,))
        self.mode = mode
        self.rate = rate
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.max_client_msgs = max_client_msgs_per_sec
        self.max_connection_age = max_connection_age
        self.rng = random.Random(seed)
        self.symbols = {s: SymbolState(s, self.rng) for s in symbols}
        self.by_stream = {st.stream: st for st in self.symbols.values()}
        self.record = (mode != "firehose") if record is None else record
        self.sent_trades: list[dict] = []
        self.sent_tickers: list[dict] = []
        self.sent_counts: collections.Counter = collections.Counter()
        self.violations: list[str] = []
        self.pongs: list[tuple[bytes, bool]] = []
        self.rest_failures = 0
        self.rest_status_override: int | None = None
        self.rest_calls = 0
        self.silent_until = 0.0
        self._lock = threading.Lock()  # market state and records

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "FakeBinance":
        super().start()
        self._spawn(self._clock, "fake-binance-clock")
        return self

    def silent(self) -> bool:
        return time.monotonic() < self.silent_until

    # -- REST -----------------------------------------------------------------------
    def on_http(self, method, path, query, headers):
        self.rest_calls += 1
        if self.rest_failures > 0:
            self.rest_failures -= 1
            return 429, {"Retry-After": "1", "Content-Type": "application/json"}, b'{"code":-1003,"msg":"Too many requests."}'
        if self.rest_status_override:
            return self.rest_status_override, {"Content-Type": "application/json"}, b'{"code":-1,"msg":"override"}'
        if method == "GET" and path == "/api/v3/exchangeInfo":
            return 200, {"Content-Type": "application/json"}, json.dumps(self.exchange_info()).encode()
        return 404, {"Content-Type": "application/json"}, json.dumps({"code": -1, "msg": "unknown path %s" % path}).encode()

    def exchange_info(self) -> dict:
        symbols = [self._symbol_doc(s, "TRADING") for s in self.symbols]
        symbols.append(self._symbol_doc("OLD-BTC", "BREAK"))
        symbols.append(self._symbol_doc("HALTED-USDT", "HALT"))
        return {
            "timezone": "UTC",
            "serverTime": _now_ms(),
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
            ],
            "exchangeFilters": [],
            "symbols": symbols,
        }

    @staticmethod
    def _symbol_doc(symbol: str, status: str) -> dict:
        base, quote = symbol.split("-")
        return {
            "symbol": base + quote,
            "status": status,
            "baseAsset": base,
            "baseAssetPrecision": 8,
            "quoteAsset": quote,
            "quotePrecision": 8,
            "quoteAssetPrecision": 8,
            "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"],
            "icebergAllowed": True,
            "ocoAllowed": True,
            "isSpotTradingAllowed": True,
            "isMarginTradingAllowed": False,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": "0.01000000", "maxPrice": "1000000.00000000", "tickSize": "0.01000000"},
                {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
            ],
            "permissions": ["SPOT"],
        }

    # -- WebSocket ----------------------------------------------------------------------
    def on_ws(self, conn: WsConn) -> None:
        if conn.path not in ("/stream", "/ws"):
            conn.close(1008, "unknown path")
            return
        conn.state["subs"] = set()
        conn.state["recent"] = collections.deque()
        conn.state["pings"] = {}
        streams = conn.query.get("streams")
        if streams:
            conn.state["subs"].update(s for s in streams.split("/") if s)
        if self.mode == "firehose":
            self._spawn(self._firehose, "fake-binance-firehose", conn)
        while True:
            opcode, payload = conn.recv()
            if not self._rate_ok(conn):
                return
            if opcode == OP_TEXT:
                self._on_request(conn, payload)
            elif opcode == OP_PONG:
                sent = conn.state["pings"].pop(payload, None)
                self.pongs.append((payload, sent is not None))

    def _rate_ok(self, conn: WsConn) -> bool:
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

    def _on_request(self, conn: WsConn, payload: bytes) -> None:
        try:
            req = json.loads(payload)
            method, rid = req["method"], req.get("id")
        except (ValueError, KeyError, TypeError):
            conn.send_text(json.dumps({"code": 2, "msg": "Invalid request: could not parse", "id": None}))
            return
        params = req.get("params") or []
        subs = conn.state["subs"]
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            bad = [p for p in params if not self._valid_stream(p)]
            if bad or not isinstance(params, list):
                conn.send_text(json.dumps({"code": 2, "msg": "Invalid request: invalid stream name %s" % bad[:1], "id": rid}))
                return
            if method == "SUBSCRIBE":
                if len(subs | set(params)) > MAX_STREAMS:
                    conn.send_text(json.dumps({"code": 2, "msg": "Invalid request: too many streams", "id": rid}))
                    return
                subs.update(params)
            else:
                subs.difference_update(params)
            conn.send_text(json.dumps({"result": None, "id": rid}))
        elif method == "LIST_SUBSCRIPTIONS":
            conn.send_text(json.dumps({"result": sorted(subs), "id": rid}))
        else:
            conn.send_text(json.dumps({"code": 2, "msg": "Invalid request: unknown method %s" % method, "id": rid}))

    def _valid_stream(self, name) -> bool:
        if not isinstance(name, str) or name != name.lower() or "@" not in name:
            return False
        sym, _, kind = name.partition("@")
        return sym in self.by_stream and kind in ("trade", "ticker", "aggTrade".lower(), "bookticker", "depth")

    def subscribed_streams(self) -> set[str]:
        out = set()
        for conn in self.open_connections():
            out |= conn.state.get("subs", set())
        return out

    def pongs_matched(self) -> int:
        return sum(1 for _, ok in self.pongs if ok)

    # -- events ------------------------------------------------------------------------------
    def _trade_data(self, st: SymbolState, **fields) -> dict:
        tid, px, qty, maker = st.step()
        ms = _now_ms()
        data = {"e": "trade", "E": ms, "s": st.name, "t": tid, "p": "%.8f" % px, "q": "%.8f" % qty,
                "T": ms, "m": maker, "M": True}
        data.update(fields)
        return data

    def _ticker_data(self, st: SymbolState, **fields) -> dict:
        ms = _now_ms()
        px = st.price
        data = {
            "e": "24hrTicker", "E": ms, "s": st.name, "p": "0.00000000", "P": "0.000", "w": "%.8f" % px,
            "x": "%.8f" % px, "c": "%.8f" % px, "Q": "%.8f" % (st.last_qty or 0.001),
            "b": "%.8f" % (px * 0.9999), "B": "1.00000000", "a": "%.8f" % (px * 1.0001), "A": "1.00000000",
            "o": "%.8f" % px, "h": "%.8f" % (px * 1.01), "l": "%.8f" % (px * 0.99), "v": "1000.00000000",
            "q": "%.8f" % (px * 1000), "O": ms - 86400000, "C": ms, "F": 1, "L": st.next_id - 1, "n": st.count,
        }
        data.update(fields)
        return data

    def _broadcast(self, stream: str, data: dict) -> int:
        frame = encode_frame(OP_TEXT, json.dumps({"stream": stream, "data": data}, separators=(",", ":")).encode())
        n = 0
        for conn in self.open_connections():
            if stream in conn.state.get("subs", ()):
                try:
                    conn.send_frames(frame)
                    n += 1
                except ConnectionClosed:
                    pass
        return n

    def push_trade(self, symbol: str, **fields) -> dict:
        """Send one trade now to every connection subscribed to it (script mode)."""
        st = self.symbols[symbol]
        with self._lock:
            data = self._trade_data(st, **fields)
            if self._broadcast(st.stream + "@trade", data):
                self.sent_counts[symbol] += 1
                if self.record:
                    self.sent_trades.append(data)
        return data

    def push_ticker(self, symbol: str, **fields) -> dict:
        st = self.symbols[symbol]
        with self._lock:
            data = self._ticker_data(st, **fields)
            if self._broadcast(st.stream + "@ticker", data) and self.record:
                self.sent_tickers.append(data)
        return data

    def push_raw(self, text) -> None:
        """Send a raw text frame to every open connection."""
        for conn in self.open_connections():
            try:
                conn.send_text(text)
            except ConnectionClosed:
                pass

    # -- clock: steady trades, tickers, pings, age limit -----------------------------------
    def _clock(self) -> None:
        tick = 0.01
        next_ticker = time.monotonic() + 1.0
        owed = collections.defaultdict(float)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            self._pings_and_age(now)
            if self.silent() or self.mode in ("idle", "script", "firehose"):
                continue
            subs = self.subscribed_streams()
            for symbol, st in self.symbols.items():
                if st.stream + "@trade" in subs:
                    owed[symbol] += self.rate * tick * self.rng.uniform(0.5, 1.5)
                    while owed[symbol] >= 1.0:
                        owed[symbol] -= 1.0
                        self.push_trade(symbol)
            if now >= next_ticker:
                next_ticker = now + 1.0
                for symbol, st in self.symbols.items():
                    if st.stream + "@ticker" in subs:
                        self.push_ticker(symbol)

    def _pings_and_age(self, now: float) -> None:
        for conn in self.open_connections():
            if "pings" not in conn.state:
                continue
            if now - conn.opened > self.max_connection_age:
                conn.close(1000, "connection age limit")
                continue
            last = conn.state.get("last_ping", conn.opened)
            if not self.silent() and now - last >= self.ping_interval:
                payload = str(_now_ms()).encode()
                conn.state["last_ping"] = now
                conn.state["pings"][payload] = now
                try:
                    conn.send_ping(payload)
                except ConnectionClosed:
                    continue
            for payload, sent in list(conn.state["pings"].items()):
                if now - sent > self.pong_timeout:
                    self.violations.append("no pong within %.0f s" % self.pong_timeout)
                    conn.close(1008, "pong timeout")
                    break

    def _firehose(self, conn: WsConn) -> None:
        """Trades as fast as the socket takes them, to every stream the connection has.

        Frames are pre-encoded in blobs of ``FIREHOSE_BLOB`` trades and the
        blob is sent again and again, renewed (fresh times, the next ids)
        every ``FIREHOSE_RENEW`` seconds, so the fake spends its CPU in the
        kernel's copy rather than in Python.
        """
        blob, made, streams = b"", 0.0, None
        while not conn.closed and not self._stopping.is_set():
            if self.silent():
                time.sleep(0.05)
                continue
            subs = frozenset(s for s in conn.state["subs"] if s.endswith("@trade"))
            if not subs:
                time.sleep(0.01)
                continue
            if subs != streams or time.monotonic() - made > FIREHOSE_RENEW:
                streams = subs
                blob, made = self._firehose_blob([self.by_stream[s.split("@")[0]] for s in sorted(subs)]), time.monotonic()
            try:
                conn.send_frames(blob)
            except ConnectionClosed:
                return

    def _firehose_blob(self, states) -> bytes:
        parts = []
        ms = _now_ms()
        per = max(1, FIREHOSE_BLOB // len(states))
        for _ in range(per):
            for st in states:
                tid = st.next_id
                st.next_id += 1
                text = ('{"stream":"%s@trade","data":{"e":"trade","E":%d,"s":"%s","t":%d,"p":"%.8f",'
                        '"q":"0.01000000","T":%d,"m":%s,"M":true}}'
                        % (st.stream, ms, st.name, tid, st.price, ms, "true" if tid & 1 else "false"))
                parts.append(encode_frame(OP_TEXT, text.encode()))
        for st in states:
            self.sent_counts[st.symbol] += per
        return b"".join(parts)

    # -- faults -----------------------------------------------------------------------------------
    def drop_all(self, abort: bool = True) -> None:
        for conn in self.open_connections():
            conn.abort() if abort else conn.close(1001, "going away")

    def go_silent(self, seconds: float) -> None:
        """Send nothing at all (no data, no pings) for a while, keeping TCP open."""
        self.silent_until = time.monotonic() + seconds

    def send_server_shutdown(self, close_after: float = 0.2) -> None:
        self.push_raw(json.dumps({"stream": "!serverShutdown", "data": {"e": "serverShutdown", "E": _now_ms()}}))
        time.sleep(close_after)
        self.drop_all(abort=False)
