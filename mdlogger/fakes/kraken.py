"""A loopback fake of Kraken WebSocket v1, REST AssetPairs and REST trade history.

Real behaviour: ``systemStatus`` greeting; one ``subscriptionStatus`` ack per
pair; an error status for unknown pairs; right after the trade ack, a replay
of up to the last 50 trades made (their original times, including trades made
while nobody listened) in the normal trade shape; live trades (several made
at once share one frame); tickers every second; ``{"event":"heartbeat"}``
every ``heartbeat_interval`` when nothing else was sent; ``ping``/``pong``
with ``reqid``. Pairs use ``XBT``/``XDG`` wsnames. Trade times are whole
microseconds; each pair keeps a consecutive internal trade id that WS v1
never shows; in steady mode a trade is now and then a sweep of 2-3 trades
with the same time (``sweep_prob``). Protocol notes: docs/PROTOCOLS.md,
"Kraken (WebSocket v1)".

REST ``GET /0/public/Trades?pair=XBTUSD&since=&count=`` from the made trade
history: ``pair`` is the REST altname (or the AssetPairs key); ``count``
default and maximum 1000 (larger values are cut); oldest first; ``since``
in ns (a value below 1e12 is taken as seconds): only trades strictly after
it; without ``since`` the latest ``count`` trades. Reply
``{"error":[],"result":{"<AssetPairs key>":[[price, volume, time, "b"/"s",
"m"/"l", "", trade_id], ...],"last":"<ns of the last row>"}}``: price and
volume strings, time a JSON number of seconds with 6 decimals (the same
microsecond as the WS string), b/s the taker's side; ``last`` is ``since``
(or "0") when no row came. Unknown pair: ``{"error":["EQuery:Unknown asset
pair"]}``. Every public REST request takes a token from a bucket of
``rest_rate`` per second, burst ``rest_burst`` (1/s, 2); without one: HTTP
200 ``{"error":["EGeneral:Too many requests"]}`` (also the answer while
``rest_failures`` lasts).
"""

from __future__ import annotations

import json
import time

from .base import HISTORY_SIZE, JSON, FakeExchange, SymbolState, TokenBucket
from .wsserver import WsConn

TO_KRAKEN = {"BTC": "XBT", "DOGE": "XDG"}
CHANNELS = {"trade": "trades", "ticker": "ticker"}
REPLAY = 50
TRADES_COUNT = 1000
RATE_LIMITED = b'{"error":["EGeneral:Too many requests"]}'


def wsname(symbol: str) -> str:
    base, quote = symbol.split("-")
    return "%s/%s" % (TO_KRAKEN.get(base, base), TO_KRAKEN.get(quote, quote))


def altname(symbol: str) -> str:
    """The REST altname: ``XBTUSD``."""
    return wsname(symbol).replace("/", "")


def rest_key(symbol: str) -> str:
    """The pair's key in REST results (AssetPairs, Trades): ``XXBTZUSD``."""
    base, quote = wsname(symbol).split("/")
    return "X%sZ%s" % (base, quote) if len(base) == 3 else base + quote


def micros(time_text: str) -> int:
    """Whole microseconds from a ``seconds.micro`` time string."""
    sec, _, frac = time_text.partition(".")
    return int(sec) * 1_000_000 + int((frac + "000000")[:6])


class FakeKraken(FakeExchange):
    name = "kraken"
    rate_limited_status = 200
    rate_limited_body = RATE_LIMITED
    rate_limited_retry_after = False
    not_found_body = b'{"error":["EGeneral:Unknown method"]}'
    error_body = b'{"error":["EService:Unavailable"]}'
    batch_trades = True  # push_trades(symbol, n) sends the n trades in one frame
    default_symbols = ("BTC-USD", "ETH-USD", "DOGE-EUR", "ETH-BTC")

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, seed: int = 1, port: int = 0,
                 record: bool | None = None, heartbeat_interval: float = 1.0, rest_rate: float = 1.0,
                 rest_burst: float = 2, sweep_prob: float = 0.1, trade_when_unsubscribed: bool = True,
                 history_size: int = HISTORY_SIZE):
        super().__init__(symbols, mode, rate, seed, port, record,
                         trade_when_unsubscribed=trade_when_unsubscribed, history_size=history_size)
        self.heartbeat_interval = heartbeat_interval
        self.bucket = TokenBucket(rest_rate, rest_burst)
        self.sweep_prob = sweep_prob
        self.by_wsname = {wsname(s): st for s, st in self.symbols.items()}
        self.by_rest = {}
        for s, st in self.symbols.items():
            self.by_rest[altname(s)] = self.by_rest[rest_key(s)] = st
        self.channel_ids = {}

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {"/0/public/AssetPairs": lambda query: (200, {"error": [], "result": self.asset_pairs()}),
                "/0/public/Trades": self.trades}

    def rest_limit(self, path: str, now: float):
        return None if self.bucket.take(now) else self.rate_limited_answer(1)

    def trades(self, query: dict):
        """``/0/public/Trades``: oldest first, trades strictly after ``since`` (ns)."""
        st = self.by_rest.get(query.get("pair", ""))
        if st is None:
            return 200, {"error": ["EQuery:Unknown asset pair"]}
        try:
            count = int(query.get("count", TRADES_COUNT))
            since = query.get("since", "")
            since_ns = None if since == "" else int(since) if "." not in since else int(float(since) * 1e9)
        except ValueError:
            return 200, {"error": ["EGeneral:Invalid arguments"]}
        if since_ns is not None and since_ns < 10 ** 12:
            since_ns *= 1_000_000_000  # seconds
        count = min(max(count, 1), TRADES_COUNT)
        if since_ns is None:
            events = self._history_slice(st)[-count:]
        else:
            lo = since_ns // 1000 + 1  # strictly after: the first whole microsecond past it
            events = self._history_slice(st, lo=lo, key=lambda e: micros(e["trade"][2]))[:count]
        rows = []
        for e in events:
            px, vol, when, side, kind, misc = e["trade"][:6]
            us = micros(when)
            rows.append("[%s,%s,%d.%06d,%s,%s,%s,%d]" % (json.dumps(px), json.dumps(vol), us // 1_000_000,
                                                          us % 1_000_000, json.dumps(side), json.dumps(kind),
                                                          json.dumps(misc), e["trade_id"]))
        last = micros(events[-1]["trade"][2]) * 1000 if events else (since_ns or 0)
        body = '{"error":[],"result":{%s:[%s],"last":"%d"}}' % (json.dumps(rest_key(st.symbol)), ",".join(rows), last)
        return 200, body.encode()

    def asset_pairs(self) -> dict:
        out = {}
        for symbol in self.symbols:
            name = wsname(symbol)
            base, quote = name.split("/")
            key = rest_key(symbol)
            out[key] = {"altname": base + quote, "wsname": name, "aclass_base": "currency", "base": "X" + base,
                        "aclass_quote": "currency", "quote": "Z" + quote, "lot": "unit", "pair_decimals": 5,
                        "lot_decimals": 8, "lot_multiplier": 1, "ordermin": "0.0001"}
        out["XXBTZUSD.d"] = {"altname": "XBTUSD.d", "base": "XXBT", "quote": "ZUSD", "pair_decimals": 1}
        return out

    # -- WebSocket ----------------------------------------------------------------------
    def on_open(self, conn: WsConn) -> bool:
        conn.state["subs"] = set()
        conn.state["last_sent"] = time.monotonic()
        self.send(conn, {"connectionID": 18239578009413566319, "event": "systemStatus", "status": "online",
                         "version": "1.8.3"})
        return True

    def send(self, conn: WsConn, obj) -> bool:
        conn.state["last_sent"] = time.monotonic()
        return super().send(conn, obj)

    def on_client_message(self, conn: WsConn, payload: bytes) -> None:
        try:
            req = json.loads(payload)
            event = req["event"]
        except (ValueError, KeyError, TypeError):
            self.send(conn, {"errorMessage": "Malformed request", "event": "error", "status": "error"})
            return
        if event == "ping":
            self.send(conn, {"event": "pong", "reqid": req.get("reqid")})
            return
        if event != "subscribe":
            self.send(conn, {"errorMessage": "Unsupported event", "event": "error", "status": "error"})
            return
        name = (req.get("subscription") or {}).get("name")
        for pair in req.get("pair") or []:
            self._subscribe(conn, pair, name, req.get("subscription"))

    def _subscribe(self, conn: WsConn, pair: str, name: str, subscription) -> None:
        st = self.by_wsname.get(pair)
        if st is None or name not in CHANNELS:
            self.send_subscription_error(conn, pair, "Currency pair not supported %s" % pair if st is None
                                         else "Subscription name invalid", subscription)
            return
        conn.state["subs"].add((CHANNELS[name], st.symbol))
        cid = self.channel_ids.setdefault((name, pair), 1000 + len(self.channel_ids))
        self.send(conn, {"channelID": cid, "channelName": name, "event": "subscriptionStatus", "pair": pair,
                         "status": "subscribed", "subscription": {"name": name}})
        if name == "trade" and st.history:
            made = list(st.history)[-REPLAY:]
            if self.send(conn, [cid, [e["trade"] for e in made], "trade", pair]):
                self.snapshot_sent(st, made)

    def send_subscription_error(self, conn: WsConn, pair: str, message: str, subscription=None) -> None:
        doc = {"errorMessage": message, "event": "subscriptionStatus", "pair": pair, "status": "error",
               "subscription": subscription or {"name": "trade"}}
        self.errors_sent.append(doc)
        self.send(conn, doc)

    def send_system_status(self, status: str) -> None:
        self.push_raw(json.dumps({"connectionID": 1, "event": "systemStatus", "status": status, "version": "1.8.3"}))

    def on_clock(self, conn: WsConn, now: float) -> None:
        if now - conn.state["last_sent"] >= self.heartbeat_interval:
            self.send(conn, {"event": "heartbeat"})

    # -- events --------------------------------------------------------------------------
    def make_trade(self, st: SymbolState, **fields) -> dict:
        """``{"pair", "trade": [price, volume, time, side, type, misc], "trade_id"}``; only the trade
        array goes on the wire; ``trade_id`` is the internal id REST shows."""
        tid, px, qty, bought = st.step()
        sec, us = divmod(self.clock_ns() // 1000, 1_000_000)
        trade = ["%.5f" % px, "%.8f" % qty, "%d.%06d" % (sec, us), "b" if bought else "s",
                 "m" if self.rng.random() < 0.5 else "l", ""]
        event = {"pair": wsname(st.symbol), "trade": trade, "trade_id": tid}
        event.update(fields)
        return event

    def trade_key(self, event) -> int:
        return event["trade_id"]

    def clock_trade(self, symbol: str) -> None:
        """A steady-mode trade: now and then a sweep of 2-3 trades sharing one time (and one frame)."""
        if self.rng.random() < self.sweep_prob:
            self.sweep(symbol, self.rng.choice((2, 3)))
        else:
            self.push_trade(symbol)

    def make_ticker(self, st: SymbolState, **fields) -> dict:
        px = st.price
        ticker = {"a": ["%.5f" % (px * 1.0001), 1, "1.000"], "b": ["%.5f" % (px * 0.9999), 2, "2.000"],
                  "c": ["%.5f" % px, "%.8f" % st.last_qty], "v": ["100.0", "1000.0"],
                  "p": ["%.5f" % px, "%.5f" % px], "t": [10, 100], "l": ["%.5f" % (px * 0.99)] * 2,
                  "h": ["%.5f" % (px * 1.01)] * 2, "o": ["%.5f" % px] * 2}
        event = {"pair": wsname(st.symbol), "ticker": ticker}
        event.update(fields)
        return event

    def frame_trade(self, conn: WsConn, st: SymbolState, event) -> str | None:
        """One frame for one trade (a dict) or several (a list)."""
        if not self.wants(conn, st, "trades"):
            return None
        events = event if isinstance(event, list) else [event]
        pair = events[0]["pair"]
        cid = self.channel_ids.get(("trade", pair), 0)
        return json.dumps([cid, [e["trade"] for e in events], "trade", pair], separators=(",", ":"))

    def frame_ticker(self, conn: WsConn, st: SymbolState, event) -> str | None:
        if not self.wants(conn, st, "ticker"):
            return None
        cid = self.channel_ids.get(("ticker", event["pair"]), 0)
        return json.dumps([cid, event["ticker"], "ticker", event["pair"]], separators=(",", ":"))
