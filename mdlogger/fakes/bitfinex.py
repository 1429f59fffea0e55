"""A loopback fake of Bitfinex WebSocket v2 (public) and its pair listing.

Real behaviour: an ``info`` greeting; one ``subscribed`` ack per channel per
symbol with a fresh ``chanId``; error 10001 for unknown pairs and 10305 past
25 open channels; a trades snapshot (newest first) after the trades ack;
every live trade as ``te`` followed shortly by ``tu``; tickers every second;
``[chanId,"hb"]`` on a channel quiet for ``hb_interval``. Symbols map to
pairs as the exchange spells them (``BTC-USDT`` -> ``BTCUST``, long codes
with a colon).
"""

from __future__ import annotations

import json
import time

from .base import FakeExchange, SymbolState, now_ms
from .wsserver import WsConn

CHANNELS = {"trades": "trades", "ticker": "ticker"}
MAX_CHANNELS = 25
SNAPSHOT = 30
TU_DELAY = 0.02
FROM_NORMAL = {"USDT": "UST", "BCH": "BCHN"}


def pair_of(symbol: str) -> str:
    base, quote = (FROM_NORMAL.get(c, c) for c in symbol.split("-"))
    return base + quote if len(base) == 3 and len(quote) == 3 else "%s:%s" % (base, quote)


class FakeBitfinex(FakeExchange):
    name = "bitfinex"
    ws_path = "/ws/2"
    default_symbols = ("BTC-USD", "ETH-USD", "BTC-USDT", "TESTBTC-TESTUSD")

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, seed: int = 1, port: int = 0,
                 record: bool | None = None, hb_interval: float = 15.0):
        super().__init__(symbols, mode, rate, seed, port, record)
        self.hb_interval = hb_interval
        self.by_pair = {pair_of(s): st for s, st in self.symbols.items()}
        self.next_chan = 200000

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {"/v2/conf/pub:list:pair:exchange": lambda query: (200, [sorted(self.by_pair)])}

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
            past = [e["trade"] for e in reversed(list(st.history)[-SNAPSHOT:])]  # newest first
            self.send(conn, [chan, past])

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
        event = {"pair": pair_of(st.symbol), "trade": [tid, now_ms(), qty if bought else -qty, round(px, 8)]}
        event.update(fields)
        return event

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
