"""A loopback fake of Kraken WebSocket v1 and REST AssetPairs.

Real behaviour: ``systemStatus`` greeting; one ``subscriptionStatus`` ack per
pair; an error status for unknown pairs; right after the trade ack, a replay
of up to 50 past trades (their original times) in the normal trade shape;
live trades; tickers every second;
``{"event":"heartbeat"}`` every ``heartbeat_interval`` when nothing else was
sent; ``ping``/``pong`` with ``reqid``. Pairs use ``XBT``/``XDG`` wsnames.
"""

from __future__ import annotations

import json
import time

from .base import FakeExchange, SymbolState
from .wsserver import WsConn

TO_KRAKEN = {"BTC": "XBT", "DOGE": "XDG"}
CHANNELS = {"trade": "trades", "ticker": "ticker"}
REPLAY = 50


def wsname(symbol: str) -> str:
    base, quote = symbol.split("-")
    return "%s/%s" % (TO_KRAKEN.get(base, base), TO_KRAKEN.get(quote, quote))


class FakeKraken(FakeExchange):
    name = "kraken"
    default_symbols = ("BTC-USD", "ETH-USD", "DOGE-EUR", "ETH-BTC")

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, seed: int = 1, port: int = 0,
                 record: bool | None = None, heartbeat_interval: float = 1.0):
        super().__init__(symbols, mode, rate, seed, port, record)
        self.heartbeat_interval = heartbeat_interval
        self.by_wsname = {wsname(s): st for s, st in self.symbols.items()}
        self.channel_ids = {}

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {"/0/public/AssetPairs": lambda query: (200, {"error": [], "result": self.asset_pairs()})}

    def asset_pairs(self) -> dict:
        out = {}
        for symbol in self.symbols:
            name = wsname(symbol)
            base, quote = name.split("/")
            key = "X%sZ%s" % (base, quote) if len(base) == 3 else base + quote
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
            past = [e["trade"] for e in list(st.history)[-REPLAY:]]
            self.send(conn, [cid, past, "trade", pair])

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
        _, px, qty, bought = st.step()
        trade = ["%.5f" % px, "%.8f" % qty, "%.6f" % time.time(), "b" if bought else "s",
                 "m" if self.rng.random() < 0.5 else "l", ""]
        event = {"pair": wsname(st.symbol), "trade": trade}
        event.update(fields)
        return event

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
        if not self.wants(conn, st, "trades"):
            return None
        cid = self.channel_ids.get(("trade", event["pair"]), 0)
        return json.dumps([cid, [event["trade"]], "trade", event["pair"]], separators=(",", ":"))

    def frame_ticker(self, conn: WsConn, st: SymbolState, event) -> str | None:
        if not self.wants(conn, st, "ticker"):
            return None
        cid = self.channel_ids.get(("ticker", event["pair"]), 0)
        return json.dumps([cid, event["ticker"], "ticker", event["pair"]], separators=(",", ":"))
