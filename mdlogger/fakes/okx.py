"""A loopback fake of OKX v5 public: REST instruments and trade history, and the ``/ws/v5/public`` WebSocket.

Speaks the real protocol (docs/PROTOCOLS.md, "OKX"):
``{"op":"subscribe","args":[..]}`` acked per arg with ``{"event":"subscribe",..}``,
error 60018 for an unknown channel or instId and 60012 for a request it cannot
read; ``tickers`` every second and ``trades`` frames that sometimes carry 2-3
trades at once (consecutive ``tradeId`` per instrument, ms times); the latest
trade made (even while nobody listened) is pushed right after a ``trades``
subscribe; the TEXT ``ping`` is answered with the TEXT ``pong``; a
connection that was sent nothing for ``idle_close_secs`` and did not ping is
closed with code 4004. Faults: :meth:`send_notice_64008` (service upgrade
notice) and :meth:`send_error`.

Merged fills (``merge_prob``, default 0): with that probability a steady-clock
trade is a taker order filling 2-3 resting orders at once (one time, one side,
consecutive ids), sent on the WebSocket as ONE row the way OKX's ``trades``
channel may send it: ``tradeId`` the last fill's id, ``count`` the number of
fills, ``sz`` their total, ``px`` the last fill's price (:meth:`push_merged`
makes one on demand). The made history, and so REST and ``made_trades``, keeps
the fills one by one; a subscribe snapshot whose latest trade is such a fill is
the merged row. The fills are not marked delivered (no connection got them one
by one); the merged rows sent live are recorded in ``sent_merged``.

REST ``GET /api/v5/market/history-trades?instId=&type=&after=&before=&limit=``
from the made trade history, wrapped ``{"code":"0","msg":"","data":[...]}``:
newest first; ``limit`` default and maximum 100 (larger values are cut to
100); ``type=1`` (default): ``after=X`` gives the newest trades with tradeId
< X, ``before=X`` the NEWEST trades with tradeId > X (not the page next to
X), both: ids strictly between; ``type=2``: ``after`` is a ms time (trades
with ts < after), ``before`` still a tradeId. Rows
``{"instId","tradeId","px","sz","side","source":"0","ts"}`` (strings, side
the taker's). Errors come with ``code`` != "0": unknown instId ``51001``
(HTTP 200), bad parameters ``51000`` (HTTP 200), missing instId ``50014``
(HTTP 400). At most ``history_limit`` requests (20) to this endpoint in any
``history_window`` seconds (2); over: HTTP 429
``{"code":"50011","msg":"Too Many Requests","data":[]}`` (also the answer while
``rest_failures`` lasts).
"""

from __future__ import annotations

import bisect
import json
import time

from .base import HISTORY_SIZE, JSON, FakeExchange, SlidingWindow, SymbolState, now_ms
from .wsserver import WsConn

PATH = "/ws/v5/public"
INSTRUMENTS = "/api/v5/public/instruments"
HISTORY_TRADES = "/api/v5/market/history-trades"
HISTORY_LIMIT = 100
RATE_LIMITED = b'{"code":"50011","msg":"Too Many Requests","data":[]}'
CHANNELS = {"trades": "trades", "tickers": "ticker"}
MAX_REQUEST_BYTES = 64 * 1024
MAX_SUBSCRIBES_PER_HOUR = 480
IDLE_REASON = "No data received in 30s."


def _param_error(name: str) -> dict:
    return {"code": "51000", "msg": "Parameter %s error" % name, "data": []}


def fmt(x: float) -> str:
    """A price or size as OKX writes it: plain decimal, no trailing zeros."""
    text = "%.8f" % x
    return text.rstrip("0").rstrip(".") if "." in text else text


def merged_row(fills: list) -> dict:
    """The one ``trades`` row OKX sends for consecutive fills of one taker order (oldest first)."""
    last = fills[-1]
    return {"instId": last["instId"], "tradeId": last["tradeId"], "px": last["px"],
            "sz": fmt(sum(float(f["sz"]) for f in fills)), "side": last["side"], "ts": last["ts"],
            "count": str(len(fills))}


class FakeOkx(FakeExchange):
    ws_path = PATH
    name = "okx"
    rate_limited_body = RATE_LIMITED
    rate_limited_retry_after = False
    not_found_body = b'{"code":"50030","msg":"Illegal request","data":[]}'
    error_body = b'{"code":"50001","msg":"Service temporarily unavailable. Please try again later.","data":[]}'
    batch_trades = True  # push_trades(symbol, n) sends the n trades in one frame
    default_symbols = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "ETH-BTC", "DOGE-USDT")

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, idle_close_secs: float = 30.0,
                 multi_trade_prob: float = 0.3, seed: int = 1, port: int = 0, record: bool | None = None,
                 max_client_msgs_per_sec: float | None = None, ping_interval: float | None = None,
                 history_limit: int = 20, history_window: float = 2.0, trade_when_unsubscribed: bool = True,
                 history_size: int = HISTORY_SIZE, merge_prob: float = 0.0):
        # ping_interval: accepted for the common command line; OKX never pings (the client does)
        super().__init__(symbols, mode, rate, seed, port, record, max_client_msgs_per_sec,
                         trade_when_unsubscribed=trade_when_unsubscribed, history_size=history_size)
        self.history_limiter = SlidingWindow(history_limit, history_window)
        self.idle_close_secs = idle_close_secs
        self.multi_trade_prob = multi_trade_prob
        self.merge_prob = merge_prob
        self.sent_merged: list = []  # merged rows delivered live (see push_merged)
        self._merged_last: dict[str, dict] = {}  # symbol -> its latest merged row (for subscribe snapshots)
        self.next_conn_id = 0xA4D3AE55

    # -- REST ----------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {INSTRUMENTS: self.instruments, HISTORY_TRADES: self.history_trades}

    def rest_limit(self, path: str, now: float):
        if path == HISTORY_TRADES and not self.history_limiter.take(now):
            return self.rate_limited_answer(1)
        return None

    def history_trades(self, query: dict):
        """``/api/v5/market/history-trades``: newest first, ``after``/``before`` cursors (exclusive)."""
        inst = query.get("instId")
        if not inst:
            return 400, {"code": "50014", "msg": "Parameter instId can not be empty.", "data": []}
        st = self.symbols.get(inst)
        if st is None:
            return 200, {"code": "51001", "msg": "Instrument ID does not exist.", "data": []}
        args = {}
        for name in ("type", "limit", "after", "before"):
            raw = query.get(name, "")
            try:
                args[name] = int(raw) if raw != "" else None
            except ValueError:
                return 200, _param_error(name)
        if args["type"] not in (None, 1, 2):
            return 200, _param_error("type")
        if args["limit"] is not None and args["limit"] < 1:
            return 200, _param_error("limit")
        args["type"] = args["type"] or 1
        args["limit"] = args["limit"] or HISTORY_LIMIT
        limit = min(args["limit"], HISTORY_LIMIT)
        lo = None if args["before"] is None else args["before"] + 1
        if args["type"] == 2:
            events = self._history_slice(st, lo=lo)
            if args["after"] is not None:
                events = self._slice_by_time(events, args["after"])
        else:
            hi = None if args["after"] is None else args["after"] - 1
            events = self._history_slice(st, lo, hi)
        page = events[-limit:][::-1]
        data = [{"instId": e["instId"], "tradeId": e["tradeId"], "px": e["px"], "sz": e["sz"], "side": e["side"],
                 "source": "0", "ts": e["ts"]} for e in page]
        return 200, {"code": "0", "msg": "", "data": data}

    @staticmethod
    def _slice_by_time(events: list, after_ms: int) -> list:
        """The events with ts < after_ms (times do not decrease along the history)."""
        return events[:bisect.bisect_left(events, after_ms, key=lambda e: int(e["ts"]))]

    def instruments(self, query: dict):
        if query.get("instType") != "SPOT":
            return 200, {"code": "51000", "data": [], "msg": "Parameter instType error"}
        data = [self._instrument_doc(s, "live") for s in self.symbols]
        data.append(self._instrument_doc("OLD-USDT", "suspend"))
        return 200, {"code": "0", "data": data, "msg": ""}

    @staticmethod
    def _instrument_doc(symbol: str, state: str) -> dict:
        base, quote = symbol.split("-")
        return {
            "alias": "", "baseCcy": base, "category": "1", "ctMult": "", "ctType": "", "ctVal": "",
            "ctValCcy": "", "expTime": "", "instId": symbol, "instType": "SPOT", "lever": "10",
            "listTime": "1548133413000", "lotSz": "0.00000001", "maxIcebergSz": "9999999999",
            "maxLmtSz": "9999999999", "maxMktSz": "1000000", "maxStopSz": "1000000",
            "maxTriggerSz": "9999999999", "maxTwapSz": "9999999999", "minSz": "0.00001", "optType": "",
            "quoteCcy": quote, "settleCcy": "", "state": state, "stk": "", "tickSz": "0.00000001", "uly": "",
        }

    # -- WebSocket -----------------------------------------------------------------------
    def on_open(self, conn: WsConn) -> bool:
        if conn.path != PATH:
            conn.close(1008, "unknown path")
            return False
        self.next_conn_id += 1
        conn.state.update(subs=set(), conn_id="%08x" % (self.next_conn_id & 0xFFFFFFFF), last_sent=conn.opened,
                          last_ping=None, subscribes=0)
        return True

    def send(self, conn: WsConn, obj) -> bool:
        ok = super().send(conn, obj)
        if ok:
            conn.state["last_sent"] = time.monotonic()
        return ok

    def on_client_message(self, conn: WsConn, payload: bytes) -> None:
        if payload == b"ping":
            conn.state["last_ping"] = time.monotonic()
            self.send(conn, "pong")
            return
        if len(payload) > MAX_REQUEST_BYTES:
            self.violations.append("subscribe request of %d bytes" % len(payload))
            self._error(conn, "60012", "Invalid request: request too large")
            return
        try:
            req = json.loads(payload)
            op, args = req["op"], req["args"]
        except (ValueError, KeyError, TypeError):
            self._error(conn, "60012", "Invalid request: %s" % payload.decode("utf-8", "replace")[:200])
            return
        if op not in ("subscribe", "unsubscribe") or not isinstance(args, list):
            self._error(conn, "60012", "Invalid request: %s" % payload.decode("utf-8", "replace")[:200])
            return
        if op == "subscribe":
            conn.state["subscribes"] += 1
            if conn.state["subscribes"] > MAX_SUBSCRIBES_PER_HOUR:
                self.violations.append("more than %d subscribe requests" % MAX_SUBSCRIBES_PER_HOUR)
                self._error(conn, "60014", "Requests too frequent.")
                return
        for arg in args:
            self._one_arg(conn, op, arg)

    def _one_arg(self, conn: WsConn, op: str, arg) -> None:
        channel = arg.get("channel") if isinstance(arg, dict) else None
        inst = arg.get("instId") if isinstance(arg, dict) else None
        if channel not in CHANNELS or not isinstance(inst, str) or inst not in self.symbols:
            self._error(conn, "60018", "Wrong URL or channel:%s,instId:%s doesn't exist. Please use the correct "
                        "URL, channel and parameters referring to API document." % (channel, inst))
            return
        key = (CHANNELS[channel], inst)
        fresh = key not in conn.state["subs"]
        if op == "subscribe":
            conn.state["subs"].add(key)
        else:
            conn.state["subs"].discard(key)
        self.send(conn, {"event": op, "arg": {"channel": channel, "instId": inst}, "connId": conn.state["conn_id"]})
        if op == "subscribe" and fresh and channel == "trades":
            self.on_subscribed(conn, self.symbols[inst], "trades")

    def on_subscribed(self, conn: WsConn, st: SymbolState, channel: str) -> None:
        """OKX pushes the latest trade of an instrument right after a trades subscribe."""
        if not st.history:
            return
        merged = self._merged_last.get(st.symbol)
        if merged is not None and merged["tradeId"] == st.history[-1]["tradeId"]:
            self.send(conn, self._trades_frame(st, [merged]))  # the latest trade is a merged row's last fill
            return
        if self.send(conn, self._trades_frame(st, [st.history[-1]])):
            self.snapshot_sent(st, [st.history[-1]])

    def _error(self, conn: WsConn, code: str, msg: str) -> None:
        doc = {"event": "error", "code": code, "msg": msg, "connId": conn.state.get("conn_id", "")}
        self.errors_sent.append(doc)
        self.send(conn, doc)

    # -- events --------------------------------------------------------------------------
    def make_trade(self, st: SymbolState, **fields) -> dict:
        tid, px, qty, bought = st.step()
        data = {"instId": st.symbol, "tradeId": str(tid), "px": fmt(px), "sz": fmt(qty),
                "side": "buy" if bought else "sell", "ts": str(self.clock_ns() // 1_000_000)}
        data.update(fields)
        return data

    def trade_key(self, event) -> int:
        return int(event["tradeId"])

    def make_ticker(self, st: SymbolState, **fields) -> dict:
        px = st.price
        data = {
            "instType": "SPOT", "instId": st.symbol, "last": fmt(px), "lastSz": fmt(st.last_qty),
            "askPx": fmt(px * 1.0001), "askSz": "1.5", "bidPx": fmt(px * 0.9999), "bidSz": "0.23",
            "open24h": fmt(px), "high24h": fmt(px * 1.01), "low24h": fmt(px * 0.99), "sodUtc0": fmt(px),
            "sodUtc8": fmt(px), "volCcy24h": fmt(px * 1000), "vol24h": "1000", "ts": str(now_ms()),
        }
        data.update(fields)
        return data

    @staticmethod
    def _trades_frame(st: SymbolState, events: list) -> str:
        return json.dumps({"arg": {"channel": "trades", "instId": st.symbol}, "data": events}, separators=(",", ":"))

    def frame_trade(self, conn: WsConn, st: SymbolState, event) -> str | None:
        """One frame for one trade (a dict) or several (a list)."""
        if not self.wants(conn, st, "trades"):
            return None
        return self._trades_frame(st, event if isinstance(event, list) else [event])

    def frame_ticker(self, conn: WsConn, st: SymbolState, event) -> str | None:
        if not self.wants(conn, st, "ticker"):
            return None
        doc = {"arg": {"channel": "tickers", "instId": st.symbol}, "data": [event]}
        return json.dumps(doc, separators=(",", ":"))

    def push_trade(self, symbol: str, **fields):
        """One trade, or in steady mode sometimes 2-3 in one frame; returns the last one made."""
        n = 1
        if self.mode == "steady" and self.rng.random() < self.multi_trade_prob:
            n = self.rng.choice((2, 3))
        return self.push_trades(symbol, n, **fields)[-1]

    def clock_trade(self, symbol: str) -> None:
        """One trade of the steady clock: with ``merge_prob``, 2-3 fills sent as one merged row."""
        if self.merge_prob and self.rng.random() < self.merge_prob:
            self.push_merged(symbol, self.rng.choice((2, 3)))
        else:
            self.push_trade(symbol)

    def push_merged(self, symbol: str, n: int, **fields) -> dict:
        """Make ``n`` fills of one taker order (one time, one side) and send them as ONE ``trades`` row
        (``tradeId`` the last fill's, ``count`` n, ``sz`` the total, ``px`` the last fill's price);
        the history keeps the fills. Returns the merged row."""
        st = self.symbols[symbol]
        with self.lock:
            self._frozen_ns = self.wall_ns()
            try:
                first = self.make_trade(st, **fields)
                fills = [first] + [self.make_trade(st, **dict(fields, side=first["side"])) for _ in range(n - 1)]
            finally:
                self._frozen_ns = None
            self._keep(st, fills)
            row = merged_row(fills)
            self._merged_last[symbol] = row
            if self._deliver(st, row, self.frame_trade) and self.record:
                self.sent_merged.append(row)
        return row

    def _firehose_blob(self, conn: WsConn, states, per: int) -> bytes:
        conn.state["last_sent"] = time.monotonic() + 2.0  # the blob is resent for a while
        return super()._firehose_blob(conn, states, per)

    # -- keepalive and faults --------------------------------------------------------------
    def on_clock(self, conn: WsConn, now: float) -> None:
        last = max(conn.state.get("last_sent", conn.opened), conn.state.get("last_ping") or 0.0)
        if now - last >= self.idle_close_secs:
            conn.close(4004, IDLE_REASON)

    def send_notice_64008(self, close_after: float | None = None) -> None:
        """The service-upgrade notice on every open connection; optionally close them after a delay."""
        doomed = self.open_connections()
        notice = {"event": "notice", "code": "64008",
                  "msg": "The connection will soon be closed for a service upgrade. Please reconnect."}
        for conn in doomed:
            self.errors_sent.append(notice)
            self.send(conn, notice)
        if close_after is not None:
            time.sleep(close_after)
            for conn in doomed:
                conn.close(1001, "service upgrade")

    def send_error(self, code: str = "60012", msg: str = "Invalid request: test") -> None:
        """An ``{"event":"error",..}`` message on every open connection."""
        for conn in self.open_connections():
            self._error(conn, str(code), msg)
