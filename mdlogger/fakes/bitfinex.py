"""A loopback fake of Bitfinex WebSocket v2 (public), its pair listing and its trade history.

Real behaviour: an ``info`` greeting; one ``subscribed`` ack per channel per
symbol with a fresh ``chanId``; error 10001 for unknown pairs and 10305 past
25 open channels; a trades snapshot of the last 30 trades made (newest
first, including trades made while nobody listened) after the trades ack;
every live trade as ``te`` followed shortly by ``tu``; tickers every second;
``[chanId,"hb"]`` on a channel quiet for ``hb_interval``. Trade ids rise but
are not consecutive (0-3 ids skipped at random between a pair's trades);
times in ms; in steady mode a trade is now and then a sweep of 2-3 trades
with the same MTS (``sweep_prob``). Symbols map to pairs as the exchange
spells them (``BTC-USDT`` -> ``BTCUST``, long codes with a colon). Protocol
notes: docs/PROTOCOLS.md, "Bitfinex".

REST ``GET /v2/trades/{tBTCUSD}/hist?start=&end=&limit=&sort=`` from the
made trade history: rows ``[ID, MTS, AMOUNT, PRICE]``; ``start``/``end``
inclusive ms bounds on MTS; ``sort=-1`` (default) the newest ``limit`` trades
of that span, newest first, ``sort=1`` the oldest ones, oldest first;
``limit`` default 125, at most 10000 (larger values are cut). Unknown
symbol: HTTP 500 ``["error",10020,"symbol: invalid"]``. At most
``hist_limit`` requests (15) to it in any ``hist_window`` seconds (60): the
next one gets HTTP 429 ``["error",11010,"ratelimit: error"]`` and blocks the
client for ``block_secs`` (60): every REST request during the block gets the
same 429 and is recorded in ``violations``. ``rest_failures`` answers the same
429 (without a block).
"""

from __future__ import annotations

import json
import re
import time

from .base import HISTORY_SIZE, JSON, FakeExchange, SlidingWindow, SymbolState, now_ms
from .wsserver import WsConn

CHANNELS = {"trades": "trades", "ticker": "ticker"}
MAX_CHANNELS = 25
SNAPSHOT = 30
TU_DELAY = 0.02
FROM_NORMAL = {"USDT": "UST", "BCH": "BCHN"}
HIST_PATH = re.compile(r"/v2/trades/([^/]+)/hist")
HIST_LIMIT_DEFAULT, HIST_LIMIT_MAX = 125, 10000
RATE_LIMITED = b'["error",11010,"ratelimit: error"]'


def pair_of(symbol: str) -> str:
    base, quote = (FROM_NORMAL.get(c, c) for c in symbol.split("-"))
    return base + quote if len(base) == 3 and len(quote) == 3 else "%s:%s" % (base, quote)


class FakeBitfinex(FakeExchange):
    name = "bitfinex"
    rate_limited_status = 429
    rate_limited_body = RATE_LIMITED
    rate_limited_retry_after = False
    not_found_body = b'["error",10020,"path: invalid"]'
    error_body = b'["error",10000,"unknown error"]'
    ws_path = "/ws/2"
    default_symbols = ("BTC-USD", "ETH-USD", "BTC-USDT", "TESTBTC-TESTUSD")

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, seed: int = 1, port: int = 0,
                 record: bool | None = None, hb_interval: float = 15.0, hist_limit: int = 15,
                 hist_window: float = 60.0, block_secs: float = 60.0, sweep_prob: float = 0.1,
                 trade_when_unsubscribed: bool = True, history_size: int = HISTORY_SIZE):
        super().__init__(symbols, mode, rate, seed, port, record,
                         trade_when_unsubscribed=trade_when_unsubscribed, history_size=history_size)
        self.hist_limiter = SlidingWindow(hist_limit, hist_window)
        self.block_secs = block_secs
        self.blocked_until = 0.0
        self.sweep_prob = sweep_prob
        self.hb_interval = hb_interval
        self.by_pair = {pair_of(s): st for s, st in self.symbols.items()}
        self.next_chan = 200000

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {"/v2/conf/pub:list:pair:exchange": lambda query: (200, [sorted(self.by_pair)])}

    def rest_patterns(self) -> list:
        return [(HIST_PATH, self.trades_hist)]

    def rest_limit(self, path: str, now: float):
        if now < self.blocked_until:
            self.violations.append("request during the rate-limit block")
            return self.rate_limited_answer(1)
        if HIST_PATH.fullmatch(path) and not self.hist_limiter.take(now):
            self.blocked_until = now + self.block_secs
            return self.rate_limited_answer(1)
        return None

    def trades_hist(self, query: dict, symbol: str):
        """``/v2/trades/{symbol}/hist``: inclusive ``start``/``end`` on MTS, ``sort`` 1 or -1."""
        st = self.by_pair.get(symbol[1:]) if symbol.startswith("t") else None
        if st is None:
            return 500, ["error", 10020, "symbol: invalid"]
        args = {}
        for name, default in (("limit", HIST_LIMIT_DEFAULT), ("sort", -1), ("start", None), ("end", None)):
            raw = query.get(name, "")
            try:
                args[name] = int(raw) if raw != "" else default
            except ValueError:
                return 500, ["error", 10020, "%s: invalid" % name]
        limit = min(max(args["limit"], 1), HIST_LIMIT_MAX)
        events = self._history_slice(st, args["start"], args["end"], key=lambda e: e["trade"][1])
        rows = events[:limit] if args["sort"] == 1 else events[-limit:][::-1]
        return 200, [e["trade"] for e in rows]

    # -- WebSocket ----------------------------------------------------------------------
    def on_open(self, conn: WsConn) -> bool:
        if conn.path != self.ws_path:
            conn.close(1008, "unknown path")
            return False
        conn.state["subs"] = set()
        conn.state["chans"] = {}  # (channel, symbol) -> chanId
        conn.state["last"] = {}  # chanId -> monotonic time of the last frame
        conn.state["tu"] = []  # (due, text)
        self.send(conn, {"event": "info", "version": 2, "serverId": "fake-bitfinex", "platform": {"status": 1}})
        return True

    def on_client_message(self, conn: WsConn, payload: bytes) -> None:
        try:
            req = json.loads(payload)
            event = req["event"]
        except (ValueError, KeyError, TypeError):
            self.send_error(conn, 10000, "unknown event", None)
            return
        if event == "ping":
            self.send(conn, {"event": "pong", "ts": now_ms(), "cid": req.get("cid")})
        elif event == "subscribe":
            self._subscribe(conn, req.get("channel"), req.get("symbol"))
        elif event != "conf":
            self.send_error(conn, 10000, "unknown event", None)

    def _subscribe(self, conn: WsConn, channel, symbol) -> None:
        st = self.by_pair.get(symbol[1:]) if isinstance(symbol, str) and symbol.startswith("t") else None
        if channel not in CHANNELS:
            self.send_error(conn, 10302, "subscribe: unknown channel", symbol)
            return
        if st is None:
            self.send_error(conn, 10001, "subscribe: symbol invalid", symbol)
            return
        if len(conn.state["chans"]) >= MAX_CHANNELS:
            self.send_error(conn, 10305, "subscribe: limit", symbol)
            return
        self.next_chan += 1
        chan = self.next_chan
        key = (CHANNELS[channel], st.symbol)
        conn.state["chans"][key] = chan
        conn.state["subs"].add(key)
        self.send(conn, {"event": "subscribed", "channel": channel, "chanId": chan, "symbol": symbol,
                         "pair": symbol[1:]})
        conn.state["last"][chan] = time.monotonic()
        if channel == "trades":
            made = list(st.history)[-SNAPSHOT:]
            if self.send(conn, [chan, [e["trade"] for e in reversed(made)]]):  # newest first
                self.snapshot_sent(st, made)

    def send_error(self, conn: WsConn, code: int, msg: str, symbol) -> None:
        doc = {"event": "error", "msg": msg, "code": code}
        if symbol is not None:
            doc["symbol"] = symbol
        self.errors_sent.append(doc)
        self.send(conn, doc)

    def send_info(self, code: int) -> None:
        self.push_raw(json.dumps({"event": "info", "code": code, "msg": "info %d" % code}))

    def on_clock(self, conn: WsConn, now: float) -> None:
        due = [t for t in conn.state["tu"] if t[0] <= now]
        if due:
            conn.state["tu"] = [t for t in conn.state["tu"] if t[0] > now]
            for _, text in due:
                self.send(conn, text)
        for chan, last in list(conn.state["last"].items()):
            if now - last >= self.hb_interval:
                conn.state["last"][chan] = now
                self.send(conn, [chan, "hb"])

    # -- events ---------------------------------------------------------------------------
    def make_trade(self, st: SymbolState, **fields) -> dict:
        tid, px, qty, bought = st.step()
        st.next_id += self.rng.randint(0, 3)  # ids rise, with gaps: other books' trades share the counter
        event = {"pair": pair_of(st.symbol),
                 "trade": [tid, self.clock_ns() // 1_000_000, qty if bought else -qty, round(px, 8)]}
        event.update(fields)
        return event

    def trade_key(self, event) -> int:
        return event["trade"][0]

    def clock_trade(self, symbol: str) -> None:
        """A steady-mode trade: now and then a sweep of 2-3 trades sharing one MTS."""
        if self.rng.random() < self.sweep_prob:
            self.sweep(symbol, self.rng.choice((2, 3)))
        else:
            self.push_trade(symbol)

    def make_ticker(self, st: SymbolState, **fields) -> dict:
        px = round(st.price, 8)
        event = {"pair": pair_of(st.symbol), "ticker": [round(px * 0.9999, 8), 1.5, round(px * 1.0001, 8), 2.5,
                                                         -10.0, -0.001, px, 12345.6, round(px * 1.01, 8),
                                                         round(px * 0.99, 8)]}
        event.update(fields)
        return event

    def frame_trade(self, conn: WsConn, st: SymbolState, event) -> str | None:
        chan = conn.state["chans"].get(("trades", st.symbol))
        if chan is None:
            return None
        conn.state["last"][chan] = time.monotonic()
        if self.mode != "firehose":
            conn.state["tu"].append((time.monotonic() + TU_DELAY, json.dumps([chan, "tu", event["trade"]])))
        return json.dumps([chan, "te", event["trade"]], separators=(",", ":"))

    def frame_ticker(self, conn: WsConn, st: SymbolState, event) -> str | None:
        chan = conn.state["chans"].get(("ticker", st.symbol))
        if chan is None:
            return None
        conn.state["last"][chan] = time.monotonic()
        return json.dumps([chan, event["ticker"]], separators=(",", ":"))
