"""A loopback fake of Binance spot: REST exchangeInfo and historicalTrades, and the combined WebSocket stream.

Speaks the real protocol (docs/PROTOCOLS.md, "Binance spot"):

* REST ``GET /api/v3/exchangeInfo`` (weight 20) in the real shape, built from
  ``symbols`` plus one BREAK and one HALT symbol.
* REST ``GET /api/v3/historicalTrades?symbol=BTCUSDT&fromId=&limit=``
  (weight 25) from the made trade history: ``limit`` default 500, at most
  1000 (more, or not a number: 400 ``-1100``); oldest first; ``fromId``
  inclusive, without it the latest ``limit`` trades; rows
  ``{"id","price","qty","quoteQty","time","isBuyerMaker","isBestMatch"}``
  (numbers as strings, ``time`` ms); unknown symbol 400 ``-1121``. A
  ``fromId`` older than the kept history starts at the oldest kept trade.
* Request weight per fixed window of ``weight_window`` seconds (60), windows
  starting at wall-clock multiples of it (on the minute, as real) shifted by
  ``weight_phase`` seconds (tests pin the phase): every reply carries
  ``X-MBX-USED-WEIGHT-1M``; a request that takes the window past
  ``weight_limit`` (6000) gets 429 ``-1003`` with ``Retry-After`` = whole
  seconds to the window's end; ANY request before that moment gets 418 with
  ``Retry-After`` and starts a ``ban_secs`` ban (every request during it gets
  418 too); both are recorded in ``violations``. Other errors in Binance's
  ``{"code":..,"msg":..}`` shape (429 ``Retry-After: 1`` while
  ``rest_failures`` lasts, outside the weight count; ``rest_status_override``;
  404 for unknown paths).
* WebSocket ``/stream`` (and ``/ws``) with ``?streams=a/b`` or live
  ``SUBSCRIBE``/``UNSUBSCRIBE``/``LIST_SUBSCRIPTIONS``; invalid requests get
  ``{"code":2,"msg":"Invalid request: ...","id":N}``; at most 1024 streams.
* Events wrapped as ``{"stream":..., "data":...}`` in the real ``trade`` and
  ``24hrTicker`` shapes; only ``<sym>@trade`` and ``<sym>@ticker`` are fed,
  other valid stream names are accepted and stay silent, except in firehose
  mode, where a connection subscribed to ``<sym>@aggTrade`` streams and to no
  ``@trade`` one gets the firehose as ``aggTrade`` events (``a``, ``f`` and
  ``l`` all the consecutive id): what other clients subscribe to, for the
  benchmark (bench/bench_firehose.py). Trade ids are
  consecutive per symbol, times in ms; prices sit on the symbol's tick;
  tickers carry 24 h figures built from the trades made. No snapshot on
  subscribe (as real).
* A server ping every ``ping_interval`` whose payload the client must echo
  within ``pong_timeout``; more than ``max_client_msgs_per_sec`` client frames
  (text, ping, pong) within 1 s closes the connection with 1008; both are
  recorded in ``violations``. ``serverShutdown`` and the connection age limit.

Modes, the trade history, recording and faults (``drop_all``, ``go_silent``,
``drop_after``, ``refuse_upgrades``) come from
:class:`~mdlogger.fakes.base.FakeExchange`.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Callable

from .base import HISTORY_SIZE, JSON, FakeExchange, SymbolState, now_ms
from .wsserver import OP_PONG, OP_TEXT, WsConn, frame_header

MAX_STREAMS = 1024
CHANNELS = {"trade": "trades", "ticker": "ticker"}  # stream kinds that are fed -> base channel names
# Stream kinds accepted (case as Binance spells them); anything but trade/ticker stays silent.
_KIND = re.compile(
    r"^(trade|aggTrade|ticker|miniTicker|bookTicker|avgPrice"
    r"|depth(5|10|20)?(@100ms|@1000ms)?|kline_(1s|1m|3m|5m|15m|30m|1h|2h|4h|6h|8h|12h|1d|3d|1w|1M)"
    r"|ticker_(1h|4h|1d))$"
)
INACTIVE_SYMBOLS = (("OLD-BTC", "BREAK"), ("HALTED-USDT", "HALT"))
DAY_MS = 86_400_000
FIREHOSE_ROUND = 4000  # trade frames per sendall in firehose mode (fresh ids and times each time)
FIREHOSE_PATH_SECS = 1.0  # how long one pre-built price path is reused before a new one
WEIGHTS = {"/api/v3/exchangeInfo": 20, "/api/v3/historicalTrades": 25}  # request weight; 1 for any other path
HIST_LIMIT_DEFAULT, HIST_LIMIT_MAX = 500, 1000


def tick_size(price: float) -> float:
    """A plausible PRICE_FILTER tick for a price: 0.01 from 10 up, five significant digits below."""
    if price >= 10:
        return 0.01
    return max(1e-8, 10.0 ** (math.floor(math.log10(price)) - 4))


class DayStats:
    """Rolling-24 h figures of one symbol, from the trades the fake made."""

    def __init__(self, st: SymbolState, tick: float):
        self.open = self.high = self.low = max(tick, round(st.price / tick) * tick)
        self.first_id = st.next_id
        self.volume = self.quote_volume = 0.0
        self.last_price = self.open

    def add(self, price: float, qty: float) -> None:
        self.last_price = price
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        self.volume += qty
        self.quote_volume += price * qty


class FakeBinance(FakeExchange):
    """Fake Binance spot on loopback; see the module docstring."""

    name = "binance"
    default_symbols = ("BTC-USDT", "ETH-USDT", "BNB-BTC", "SOL-USDT", "DOGE-USDT")

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, ping_interval: float = 20.0,
                 pong_timeout: float = 60.0, max_client_msgs_per_sec: int = 5, max_connection_age: float = 86400.0,
                 seed: int = 1, port: int = 0, record: bool | None = None,
                 extra_exchange_info: Callable[[dict], None] | None = None, weight_limit: int = 6000,
                 weight_window: float = 60.0, weight_phase: float = 0.0, ban_secs: float = 120.0,
                 trade_when_unsubscribed: bool = True,
                 history_size: int = HISTORY_SIZE):
        super().__init__(symbols, mode, rate, seed, port, record, max_client_msgs_per_sec,
                         trade_when_unsubscribed=trade_when_unsubscribed, history_size=history_size)
        self.weight_limit = weight_limit
        self.weight_window = weight_window
        self.ban_secs = ban_secs
        self.weight_phase = weight_phase  # windows start at wall-clock multiples of weight_window plus this
        self.weight_window_no = None
        self.weight_used = 0
        self.limited_until = 0.0  # end of the window in which a 429 was answered
        self.banned_until = 0.0
        self.by_rest = {st.base + st.quote: st for st in self.symbols.values()}
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.max_connection_age = max_connection_age
        self.extra_exchange_info = extra_exchange_info  # called with the exchangeInfo document to amend it
        self.by_stream = {st.base.lower() + st.quote.lower(): st for st in self.symbols.values()}
        self.ticks = {s: tick_size(st.price) for s, st in self.symbols.items()}
        self.day = {s: DayStats(st, self.ticks[s]) for s, st in self.symbols.items()}

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {"/api/v3/exchangeInfo": lambda query: (200, self.exchange_info()),
                "/api/v3/historicalTrades": self.historical_trades}

    def _roll(self) -> float:
        """Start a new weight window if the wall clock entered one; the seconds left in the current one."""
        t = time.time() - self.weight_phase
        window = math.floor(t / self.weight_window)
        if window != self.weight_window_no:
            self.weight_window_no = window
            self.weight_used = 0
        return (window + 1) * self.weight_window - t

    def rest_limit(self, path: str, now: float):
        """Request weight per window; 429 past the limit, 418 (and a ban) for asking again too soon."""
        left = self._roll()
        if now < self.banned_until:
            self.violations.append("request during a 418 ban")
            return self._answer(418, self.banned_until - now, -1003, "Way too many requests; IP banned.")
        if now < self.limited_until:
            self.violations.append("request after 429")
            self.banned_until = now + self.ban_secs
            return self._answer(418, self.ban_secs, -1003, "Way too many requests; IP banned.")
        self.weight_used += WEIGHTS.get(path, 1)
        if self.weight_used > self.weight_limit:
            self.limited_until = now + left
            return self._answer(429, left, -1003, self._too_many())
        return None

    def rest_headers(self, now: float) -> dict:
        self._roll()
        return {"X-MBX-USED-WEIGHT-1M": str(self.weight_used)}

    def _too_many(self) -> str:
        return ("Too many requests; current limit of IP is %d requests per minute. Please use the websocket "
                "for live updates to avoid polling the API." % self.weight_limit)

    @staticmethod
    def _answer(status: int, retry_after: float, code: int, msg: str) -> tuple[int, dict, bytes]:
        return status, dict(JSON, **{"Retry-After": str(max(1, math.ceil(retry_after)))}), _error_body(code, msg)

    def rate_limited_answer(self, retry_after: int):
        return self._answer(429, retry_after, -1003, self._too_many())

    def error_answer(self, status: int, path: str):
        if status == 429:
            return self.rate_limited_answer(1)
        if status == 404:
            return 404, dict(JSON), _error_body(-1, "Unknown path %s" % path)
        return status, dict(JSON), _error_body(-1000, "An unknown error occurred while processing the request.")

    def historical_trades(self, query: dict):
        """``/api/v3/historicalTrades``: oldest first, ``fromId`` inclusive, else the latest ``limit``."""
        symbol = query.get("symbol")
        if not symbol:
            return 400, {"code": -1102,
                         "msg": "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."}
        st = self.by_rest.get(symbol)
        if st is None:
            return 400, {"code": -1121, "msg": "Invalid symbol."}
        limit = _int(query.get("limit", HIST_LIMIT_DEFAULT))
        if limit is None or not 1 <= limit <= HIST_LIMIT_MAX:
            return 400, {"code": -1100, "msg": "Illegal characters found in parameter 'limit'; legal range is "
                                               "'1 to %d'." % HIST_LIMIT_MAX}
        if "fromId" in query:
            from_id = _int(query["fromId"])
            if from_id is None or from_id < 0:
                return 400, {"code": -1100, "msg": "Illegal characters found in parameter 'fromId'; legal range "
                                                   "is '^([0-9]{1,20})$'."}
            events = self._history_slice(st, lo=from_id)[:limit]
        else:
            events = self._history_slice(st)[-limit:]
        return 200, [_history_row(e) for e in events]

    def exchange_info(self) -> dict:
        """The exchangeInfo document: every fake symbol TRADING, plus a BREAK and a HALT one."""
        symbols = [self._symbol_doc(s, "TRADING", self.ticks[s]) for s in self.symbols]
        symbols += [self._symbol_doc(s, status, 0.01) for s, status in INACTIVE_SYMBOLS]
        doc = {
            "timezone": "UTC",
            "serverTime": now_ms(),
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": self.weight_limit},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
            ],
            "exchangeFilters": [],
            "symbols": symbols,
        }
        if self.extra_exchange_info is not None:
            self.extra_exchange_info(doc)
        return doc

    @staticmethod
    def _symbol_doc(symbol: str, status: str, tick: float) -> dict:
        base, quote = symbol.split("-")
        return {
            "symbol": base + quote, "status": status, "baseAsset": base, "baseAssetPrecision": 8,
            "quoteAsset": quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
            "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"], "icebergAllowed": True, "ocoAllowed": True,
            "isSpotTradingAllowed": True, "isMarginTradingAllowed": False,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": "%.8f" % tick, "maxPrice": "1000000.00000000",
                 "tickSize": "%.8f" % tick},
                {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
            ],
            "permissions": ["SPOT"],
        }

    # -- WebSocket: subscriptions ------------------------------------------------------------
    def on_open(self, conn: WsConn) -> bool:
        if conn.path not in ("/stream", "/ws"):
            conn.close(1008, "unknown path")
            return False
        conn.state["streams"] = set()
        conn.state["subs"] = set()
        streams = {s for s in conn.query.get("streams", "").split("/") if s}
        if len(streams) > MAX_STREAMS:
            conn.close(1008, "too many streams")
            return False
        self._set_streams(conn, streams)
        return True

    def _set_streams(self, conn: WsConn, streams: set) -> None:
        conn.state["streams"] = streams
        subs = set()
        for name in streams:
            sym, _, kind = name.partition("@")
            if sym in self.by_stream and kind in CHANNELS:
                subs.add((CHANNELS[kind], self.by_stream[sym].symbol))
        conn.state["subs"] = subs

    def on_client_message(self, conn: WsConn, payload: bytes) -> None:
        try:
            req = json.loads(payload)
            method, rid = req["method"], req.get("id")
        except (ValueError, KeyError, TypeError):
            self._invalid(conn, None, "could not parse request")
            return
        params = req.get("params") or []
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            self._change_streams(conn, method, params, rid)
        elif method == "LIST_SUBSCRIPTIONS":
            self.send(conn, {"result": sorted(conn.state["streams"]), "id": rid})
        else:
            self._invalid(conn, rid, "unknown method %s" % (method,))

    def _change_streams(self, conn: WsConn, method: str, params, rid) -> None:
        if not isinstance(params, list):
            self._invalid(conn, rid, "params must be a list of stream names")
            return
        bad = [p for p in params if not self.valid_stream(p)]
        if bad:
            self._invalid(conn, rid, "invalid stream name %s" % (bad[0],))
            return
        streams = conn.state["streams"]
        if method == "UNSUBSCRIBE":
            self._set_streams(conn, streams - set(params))
        elif len(streams | set(params)) > MAX_STREAMS:
            self._invalid(conn, rid, "too many streams (max %d)" % MAX_STREAMS)
            return
        else:
            self._set_streams(conn, streams | set(params))
        self.send(conn, {"result": None, "id": rid})

    def _invalid(self, conn: WsConn, rid, what: str) -> None:
        error = {"code": 2, "msg": "Invalid request: " + what, "id": rid}
        self.errors_sent.append(error)
        self.send(conn, error)

    def valid_stream(self, name) -> bool:
        """``<known lowercase symbol>@<known kind>``: what Binance would accept."""
        if not isinstance(name, str):
            return False
        sym, _, kind = name.partition("@")
        return sym in self.by_stream and bool(_KIND.match(kind))

    def subscribed_streams(self) -> set[str]:
        """Every stream some open connection is subscribed to."""
        out = set()
        for conn in self.open_connections():
            out |= conn.state.get("streams", set())
        return out

    def connections_info(self) -> dict:
        """What the connections did: counts, and per WebSocket its streams and pongs."""
        with self.conns_lock:
            conns = list(self.conns)
        return {
            "accepted": self.accepted,
            "open": sum(1 for c in conns if not c.closed),
            "connections": [
                {
                    "path": c.path,
                    "open": not c.closed,
                    "age": time.monotonic() - c.opened,
                    "streams": sorted(c.state.get("streams", ())),
                    "pongs": [p for _, op, p in list(c.received) if op == OP_PONG],
                    "close_code": c.close_code,
                }
                for c in conns
            ],
        }

    # -- events ---------------------------------------------------------------------------
    def make_trade(self, st: SymbolState, **fields) -> dict:
        """The next trade of a symbol (random walk, price on its tick); ``fields`` override."""
        tid, px, qty, bought = st.step()
        tick = self.ticks[st.symbol]
        px = max(tick, round(px / tick) * tick)
        self.day[st.symbol].add(px, qty)
        ms = self.clock_ns() // 1_000_000
        data = {"e": "trade", "E": ms, "s": st.base + st.quote, "t": tid, "p": "%.8f" % px, "q": "%.8f" % qty,
                "T": ms, "m": not bought, "M": True}
        data.update(fields)
        return data

    def trade_key(self, event) -> int:
        return event["t"]

    def make_ticker(self, st: SymbolState, **fields) -> dict:
        """A 24hrTicker consistent with the last trade made; ``fields`` override."""
        ms = now_ms()
        day = self.day[st.symbol]
        tick = self.ticks[st.symbol]
        last = day.last_price
        change = last - day.open
        data = {
            "e": "24hrTicker", "E": ms, "s": st.base + st.quote, "p": "%.8f" % change,
            "P": "%.3f" % (100.0 * change / day.open), "w": "%.8f" % (day.quote_volume / day.volume if day.volume else last),
            "x": "%.8f" % day.open, "c": "%.8f" % last, "Q": "%.8f" % st.last_qty,
            "b": "%.8f" % (last - tick), "B": "1.25000000", "a": "%.8f" % (last + tick), "A": "0.75000000",
            "o": "%.8f" % day.open, "h": "%.8f" % day.high, "l": "%.8f" % day.low, "v": "%.8f" % day.volume,
            "q": "%.8f" % day.quote_volume, "O": ms - DAY_MS, "C": ms, "F": day.first_id, "L": st.next_id - 1,
            "n": st.next_id - day.first_id,
        }
        data.update(fields)
        return data

    def frame_trade(self, conn: WsConn, st: SymbolState, event) -> str | None:
        if not self.wants(conn, st, "trades"):
            return None
        return '{"stream":"%s@trade","data":%s}' % (event["s"].lower(), json.dumps(event, separators=(",", ":")))

    def frame_ticker(self, conn: WsConn, st: SymbolState, event) -> str | None:
        if not self.wants(conn, st, "ticker"):
            return None
        return '{"stream":"%s@ticker","data":%s}' % (event["s"].lower(), json.dumps(event, separators=(",", ":")))

    # -- firehose ----------------------------------------------------------------------------
    def firehose_source(self, conn: WsConn, states: list) -> "FirehosePath":
        """Consecutive ids and current times in every round (see FirehosePath); aggTrade events for a
        connection subscribed to aggTrade streams only."""
        return FirehosePath(self, states, agg=not any(self.wants(conn, st, "trades") for st in states))

    def firehose_states(self, conn: WsConn) -> list:
        """The symbols subscribed with ``@trade`` or, when there are none, with ``@aggTrade``."""
        states = super().firehose_states(conn)
        if states:
            return states
        streams = conn.state.get("streams", ())
        return [st for name, st in self.by_stream.items() if name + "@aggTrade" in streams]

    def _walk(self, st: SymbolState) -> tuple[str, str, bool]:
        """Move a symbol's price one trade without using a trade id: (price, qty, taker bought)."""
        st.price *= 1.0 + st.rng.gauss(0, 0.0002)
        qty = round(st.rng.expovariate(1.0) * 0.5 + 0.0001, 5)
        tick = self.ticks[st.symbol]
        px = max(tick, round(st.price / tick) * tick)
        st.last_qty = qty
        self.day[st.symbol].add(px, qty)
        return "%.8f" % px, "%.8f" % qty, st.rng.random() < 0.5

    # -- keepalive, age limit, faults ---------------------------------------------------------
    def on_clock(self, conn: WsConn, now: float) -> None:
        if now - conn.opened > self.max_connection_age:
            conn.close(1000, "connection age limit")
            return
        if now - conn.state.get("last_ping", conn.opened) >= self.ping_interval:
            payload = str(now_ms()).encode()
            conn.state["last_ping"] = now
            conn.state["pings"][payload] = now
            conn.send_ping(payload)
        for sent in list(conn.state["pings"].values()):
            if now - sent > self.pong_timeout:
                self.violations.append("no pong within %.0f s" % self.pong_timeout)
                conn.close(1008, "pong timeout")
                return

    def send_server_shutdown(self, close_after: float = 0.2) -> None:
        """Announce a shutdown on every open connection, then close those (not newer ones)."""
        doomed = self.open_connections()
        notice = json.dumps({"stream": "!serverShutdown", "data": {"e": "serverShutdown", "E": now_ms()}},
                            separators=(",", ":"))
        for conn in doomed:
            self.send(conn, notice)
        time.sleep(close_after)
        for conn in doomed:
            conn.close(1001, "server shutdown")


def _error_body(code: int, msg: str) -> bytes:
    return json.dumps({"code": code, "msg": msg}).encode()


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _history_row(e: dict) -> dict:
    """A made trade as historicalTrades lists it."""
    try:
        quote = "%.8f" % (float(e["p"]) * float(e["q"]))
    except (TypeError, ValueError):
        quote = "0.00000000"
    return {"id": e["t"], "price": e["p"], "qty": e["q"], "quoteQty": quote, "time": e["T"],
            "isBuyerMaker": e["m"], "isBestMatch": e["M"]}


class FirehosePath:
    """Pre-encoded firehose frames for one connection's symbols, ids and times patched in per round.

    Each frame is 8 pieces: header, stream+``"E":``, E, ``"s"``+``"t":``, id,
    price/qty+``"T":``, T, ``"m"``+``"M"``; a round fills the id and time slots
    with extended-slice assignments and joins the list.
    """

    K = 8  # pieces per frame

    def __init__(self, fake: FakeBinance, states: list, agg: bool = False):
        self.fake = fake
        self.states = states
        self.agg = agg  # aggTrade events: the id slot holds ``a`` plus ``"f"`` and ``"l"``
        self.made = time.monotonic()
        self.per = max(1, FIREHOSE_ROUND // len(states))
        self.n = self.frames = self.per * len(states)
        self.pieces: list = [b""] * (self.n * self.K)
        self.static_len: list[int] = []
        self.static: list[tuple[str, str, bool]] = []  # (price, qty, bought) per frame, for recording
        self._headers: dict = {}
        self.round_ms = 0
        self.first_ids: list[int] = []  # each symbol's first trade id in the last round
        for _ in range(self.per):
            for st in states:
                self._add_frame(st)

    def stale(self) -> bool:
        """Whether to build a new price path."""
        return time.monotonic() - self.made > FIREHOSE_PATH_SECS

    def _add_frame(self, st: SymbolState) -> None:
        j = len(self.static)
        price, qty, bought = self.fake._walk(st)
        stream = st.base.lower() + st.quote.lower()
        kind, id_key = (b"aggTrade", b"a") if self.agg else (b"trade", b"t")
        parts = (
            b'{"stream":"%s@%s","data":{"e":"%s","E":' % (stream.encode(), kind, kind),
            b',"s":"%s","%s":' % ((st.base + st.quote).encode(), id_key),
            b',"p":"%s","q":"%s","T":' % (price.encode(), qty.encode()),
            b',"m":%s,"M":true}}' % (b"false" if bought else b"true"),
        )
        self.pieces[j * self.K + 1], self.pieces[j * self.K + 3] = parts[0], parts[1]
        self.pieces[j * self.K + 5], self.pieces[j * self.K + 7] = parts[2], parts[3]
        self.static_len.append(sum(map(len, parts)))
        self.static.append((price, qty, bought))

    def _header_list(self, id_width: int, ms_width: int) -> list[bytes]:
        key = (id_width, ms_width)
        if key not in self._headers:
            self._headers[key] = [frame_header(OP_TEXT, n + id_width + 2 * ms_width) for n in self.static_len]
        return self._headers[key]

    def next_round(self) -> bytes:
        """The next FIREHOSE_ROUND frames as one blob (ids taken); about a millisecond of C-level joins."""
        k, s, per = self.K, len(self.states), self.per
        self.round_ms = now_ms()
        ms = b"%d" % self.round_ms
        first_ids, widths = [], set()
        for si, st in enumerate(self.states):
            if self.agg:
                ids = [b'%d,"f":%d,"l":%d' % (i, i, i) for i in range(st.next_id, st.next_id + per)]
            else:
                ids = [b"%d" % i for i in range(st.next_id, st.next_id + per)]
            first_ids.append(st.next_id)
            st.next_id += per
            st.count += per
            widths.update((len(ids[0]), len(ids[-1])))
            self.pieces[si * k + 4::s * k] = ids
        self.pieces[2::k] = self.pieces[6::k] = [ms] * self.n
        if len(widths) == 1:
            self.pieces[0::k] = self._header_list(widths.pop(), len(ms))
        else:  # ids cross a power of ten within this round
            self.pieces[0::k] = [frame_header(OP_TEXT, self.static_len[j] + len(self.pieces[j * k + 4]) + 2 * len(ms))
                                 for j in range(self.n)]
        self.first_ids = first_ids
        return b"".join(self.pieces)

    def sent(self) -> None:
        """Count (and, if the fake records, record) the last round: it reached the socket."""
        fake, first_ids = self.fake, self.first_ids
        for st in self.states:
            fake.sent_counts[st.symbol] += self.per
        if not fake.record:
            return
        ms, s = self.round_ms, len(self.states)
        for j, (price, qty, bought) in enumerate(self.static):
            st = self.states[j % s]
            fake.sent_trades.append({"e": "trade", "E": ms, "s": st.base + st.quote, "t": first_ids[j % s] + j // s,
                                     "p": price, "q": qty, "T": ms, "m": not bought, "M": True})
