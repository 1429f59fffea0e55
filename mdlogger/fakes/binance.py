"""A loopback fake of Binance spot: REST exchangeInfo and the combined WebSocket stream.

Speaks the real protocol (docs/exchange-protocols.md): ``/stream`` with
``streams=`` or live ``SUBSCRIBE``/``UNSUBSCRIBE``/``LIST_SUBSCRIPTIONS``,
events wrapped as ``{"stream":..., "data":...}`` in the real ``trade`` and
``24hrTicker`` shapes, a server ping every ``ping_interval`` whose payload the
client must echo, at most 5 client messages per second (more closes the
connection with 1008 and is recorded in ``violations``), 1024 streams per
connection, ``serverShutdown`` and the 24 h connection limit.
"""

from __future__ import annotations

import json
import time

from .base import FakeExchange, SymbolState, now_ms
from .wsserver import WsConn

MAX_STREAMS = 1024
CHANNELS = {"trade": "trades", "ticker": "ticker"}


class FakeBinance(FakeExchange):
    name = "binance"
    default_symbols = ("BTC-USDT", "ETH-USDT", "BNB-BTC", "SOL-USDT", "DOGE-USDT")

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, ping_interval: float = 20.0,
                 pong_timeout: float = 60.0, max_client_msgs_per_sec: int = 5, max_connection_age: float = 86400.0,
                 seed: int = 1, port: int = 0, record: bool | None = None):
        super().__init__(symbols, mode, rate, seed, port, record, max_client_msgs_per_sec)
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.max_connection_age = max_connection_age
        self.by_stream = {st.symbol.replace("-", "").lower(): st for st in self.symbols.values()}

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {"/api/v3/exchangeInfo": lambda query: (200, self.exchange_info())}

    def exchange_info(self) -> dict:
        symbols = [self._symbol_doc(s, "TRADING") for s in self.symbols]
        symbols.append(self._symbol_doc("OLD-BTC", "BREAK"))
        symbols.append(self._symbol_doc("HALTED-USDT", "HALT"))
        return {
            "timezone": "UTC",
            "serverTime": now_ms(),
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
            "symbol": base + quote, "status": status, "baseAsset": base, "baseAssetPrecision": 8,
            "quoteAsset": quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
            "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"], "icebergAllowed": True, "ocoAllowed": True,
            "isSpotTradingAllowed": True, "isMarginTradingAllowed": False,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": "0.01000000", "maxPrice": "1000000.00000000", "tickSize": "0.01000000"},
                {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
            ],
            "permissions": ["SPOT"],
        }

    # -- WebSocket ----------------------------------------------------------------------
    def on_open(self, conn: WsConn) -> bool:
        if conn.path not in ("/stream", "/ws"):
            conn.close(1008, "unknown path")
            return False
        conn.state["streams"] = set()
        conn.state["subs"] = set()
        streams = conn.query.get("streams")
        if streams:
            self._set_streams(conn, conn.state["streams"] | {s for s in streams.split("/") if s})
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
            self.send(conn, {"code": 2, "msg": "Invalid request: could not parse", "id": None})
            return
        params = req.get("params") or []
        streams = conn.state["streams"]
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            bad = [p for p in params if not self._valid_stream(p)] if isinstance(params, list) else [params]
            if bad:
                self.send(conn, {"code": 2, "msg": "Invalid request: invalid stream name %s" % bad[:1], "id": rid})
                return
            if method == "SUBSCRIBE":
                if len(streams | set(params)) > MAX_STREAMS:
                    self.send(conn, {"code": 2, "msg": "Invalid request: too many streams", "id": rid})
                    return
                self._set_streams(conn, streams | set(params))
            else:
                self._set_streams(conn, streams - set(params))
            self.send(conn, {"result": None, "id": rid})
        elif method == "LIST_SUBSCRIPTIONS":
            self.send(conn, {"result": sorted(streams), "id": rid})
        else:
            self.send(conn, {"code": 2, "msg": "Invalid request: unknown method %s" % method, "id": rid})

    def _valid_stream(self, name) -> bool:
        if not isinstance(name, str) or name != name.lower() or "@" not in name:
            return False
        sym, _, kind = name.partition("@")
        return sym in self.by_stream and kind in ("trade", "ticker", "aggtrade", "bookticker", "depth")

    def subscribed_streams(self) -> set[str]:
        out = set()
        for conn in self.open_connections():
            out |= conn.state.get("streams", set())
        return out

    # -- events ---------------------------------------------------------------------------
    def make_trade(self, st: SymbolState, **fields) -> dict:
        tid, px, qty, bought = st.step()
        ms = now_ms()
        data = {"e": "trade", "E": ms, "s": st.base + st.quote, "t": tid, "p": "%.8f" % px, "q": "%.8f" % qty,
                "T": ms, "m": not bought, "M": True}
        data.update(fields)
        return data

    def make_ticker(self, st: SymbolState, **fields) -> dict:
        ms = now_ms()
        px = st.price
        data = {
            "e": "24hrTicker", "E": ms, "s": st.base + st.quote, "p": "0.00000000", "P": "0.000", "w": "%.8f" % px,
            "x": "%.8f" % px, "c": "%.8f" % px, "Q": "%.8f" % st.last_qty,
            "b": "%.8f" % (px * 0.9999), "B": "1.00000000", "a": "%.8f" % (px * 1.0001), "A": "1.00000000",
            "o": "%.8f" % px, "h": "%.8f" % (px * 1.01), "l": "%.8f" % (px * 0.99), "v": "1000.00000000",
            "q": "%.8f" % (px * 1000), "O": ms - 86400000, "C": ms, "F": 1, "L": st.next_id - 1, "n": st.count,
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
        notice = json.dumps({"stream": "!serverShutdown", "data": {"e": "serverShutdown", "E": now_ms()}})
        for conn in doomed:
            self.send(conn, notice)
        time.sleep(close_after)
        for conn in doomed:
            conn.close(1001, "server shutdown")
