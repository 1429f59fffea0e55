"""A loopback fake of Coinbase Exchange: REST ``/products``, REST trade history and the WebSocket feed.

Real behaviour: a client that sends no ``subscribe`` within ``subscribe_timeout``
is disconnected; a subscribe is acked with ``subscriptions``; right after it
the server sends one ``ticker`` and one ``last_match`` per product (the
latest trade made, even while nobody listened); ``match`` messages carry
consecutive ``trade_id`` per product, the MAKER's ``side``, real UUID order
ids and microsecond times; a ``ticker`` repeats the latest match (same
``trade_id`` and ``sequence``, ``side`` the taker's), sent once a second per
subscribed product in steady mode (or by ``push_ticker``), not after every
match as the real feed does; ``heartbeat`` per product per
``heartbeat_interval`` when subscribed; unknown products get the real error.
Protocol notes: docs/PROTOCOLS.md, "Coinbase Exchange".

REST ``GET /products/{product_id}/trades?limit=&after=&before=`` from the made
trade history: newest first; ``limit`` default and maximum 1000 (outside
1..1000: 400); ``after=X`` gives the newest ``limit`` trades with id < X (the
next older page), ``before=X`` the NEWEST ``limit`` trades with id > X (not
the page right after X); both together: ids strictly between, newest first.
Headers ``CB-BEFORE`` (newest id of the page) and ``CB-AFTER`` (oldest id),
absent on an empty page. Rows ``{"time","trade_id","price","size","side"}``,
``side`` the maker's as in ``match``. Unknown product: 404
``{"message":"NotFound"}``. Every REST request takes a token from a bucket of
``rest_rate`` per second, burst ``rest_burst`` (10/s, 15); without one: 429
``{"message":"Public rate limit exceeded"}`` (no Retry-After), also the answer
while ``rest_failures`` lasts.
"""

from __future__ import annotations

import datetime
import json
import re
import time
import uuid

from .base import HISTORY_SIZE, JSON, FakeExchange, SymbolState, TokenBucket
from .wsserver import WsConn

CHANNELS = {"matches": "trades", "ticker": "ticker", "heartbeat": "heartbeat"}
TRADES_PATH = re.compile(r"/products/([^/]+)/trades")
TRADES_LIMIT = 1000
RATE_LIMITED = b'{"message":"Public rate limit exceeded"}'


def iso_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_from_ns(ns: int) -> str:
    """ISO-8601 UTC with microseconds, as Coinbase writes times."""
    sec, us = divmod(ns // 1000, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + ".%06dZ" % us


class FakeCoinbase(FakeExchange):
    name = "coinbase"
    rate_limited_status = 429
    rate_limited_body = RATE_LIMITED
    rate_limited_retry_after = False
    not_found_body = b'{"message":"NotFound"}'
    error_body = b'{"message":"Internal server error"}'
    default_symbols = ("BTC-USD", "ETH-USD", "SOL-USD", "ETH-BTC")

    def __init__(self, symbols=None, mode: str = "steady", rate: float = 5.0, seed: int = 1, port: int = 0,
                 record: bool | None = None, heartbeat_interval: float = 1.0, subscribe_timeout: float = 5.0,
                 max_client_msgs_per_sec: float | None = 100, refuse=(), rest_rate: float = 10.0,
                 rest_burst: float = 15, trade_when_unsubscribed: bool = True, history_size: int = HISTORY_SIZE):
        super().__init__(symbols, mode, rate, seed, port, record, max_client_msgs_per_sec,
                         trade_when_unsubscribed=trade_when_unsubscribed, history_size=history_size)
        self.bucket = TokenBucket(rest_rate, rest_burst)
        self.refuse = set(refuse)  # listed over REST but refused on subscribe (a delisting in progress)
        self.heartbeat_interval = heartbeat_interval
        self.subscribe_timeout = subscribe_timeout
        self.sequence = 1_000_000

    # -- REST --------------------------------------------------------------------------
    def rest_routes(self) -> dict:
        return {"/products": lambda query: (200, self.products())}

    def rest_patterns(self) -> list:
        return [(TRADES_PATH, self.product_trades)]

    def rest_limit(self, path: str, now: float):
        return None if self.bucket.take(now) else self.rate_limited_answer(1)

    def product_trades(self, query: dict, product: str):
        """``/products/{id}/trades``: newest first; ``after``/``before`` are trade_id cursors (exclusive)."""
        st = self.symbols.get(product)
        if st is None:
            return 404, {"message": "NotFound"}
        args = {}
        for name, default in (("limit", TRADES_LIMIT), ("after", None), ("before", None)):
            try:
                args[name] = int(query[name]) if name in query else default
            except ValueError:
                return 400, {"message": "Invalid %s" % name}
        if not 1 <= args["limit"] <= TRADES_LIMIT:
            return 400, {"message": "Invalid limit"}
        hi = None if args["after"] is None else args["after"] - 1
        lo = None if args["before"] is None else args["before"] + 1
        page = self._history_slice(st, lo, hi)[-args["limit"]:][::-1]
        headers = {"CB-BEFORE": str(page[0]["trade_id"]), "CB-AFTER": str(page[-1]["trade_id"])} if page else {}
        rows = [{"time": e["time"], "trade_id": e["trade_id"], "price": e["price"], "size": e["size"],
                 "side": e["side"]} for e in page]
        return 200, rows, headers

    def products(self) -> list:
        out = [self._product(s) for s in self.symbols]
        out.append(dict(self._product("OLD-USD"), trading_disabled=True))
        out.append(dict(self._product("GONE-USD"), status="delisted"))
        return out

    @staticmethod
    def _product(symbol: str) -> dict:
        base, quote = symbol.split("-")
        return {"id": symbol, "base_currency": base, "quote_currency": quote, "quote_increment": "0.01",
                "base_increment": "0.00000001", "display_name": "%s/%s" % (base, quote), "min_market_funds": "1",
                "margin_enabled": False, "post_only": False, "limit_only": False, "cancel_only": False,
                "status": "online", "status_message": "", "trading_disabled": False, "fx_stablecoin": False,
                "auction_mode": False}

    # -- WebSocket ----------------------------------------------------------------------
    def on_open(self, conn: WsConn) -> bool:
        conn.state["subs"] = set()
        conn.state["subscribed"] = False
        return True

    def on_client_message(self, conn: WsConn, payload: bytes) -> None:
        try:
            req = json.loads(payload)
            kind = req["type"]
        except (ValueError, KeyError, TypeError):
            self.send_error(conn, "Failed to subscribe", "malformed JSON")
            return
        if kind not in ("subscribe", "unsubscribe"):
            self.send_error(conn, "Failed to subscribe", "%s is not a valid type" % kind)
            return
        products = req.get("product_ids") or []
        channels = [c if isinstance(c, str) else c.get("name") for c in req.get("channels") or []]
        bad = [p for p in products if p not in self.symbols or p in self.refuse]
        if bad:
            self.send_error(conn, "Failed to subscribe", "%s is not a valid product" % bad[0])
            products = [p for p in products if p in self.symbols and p not in self.refuse]
        unknown = [c for c in channels if c not in CHANNELS]
        if unknown:
            self.send_error(conn, "Failed to subscribe", "%s is not a valid channel" % unknown[0])
            return
        keys = {(CHANNELS[c], p) for c in channels for p in products}
        if kind == "unsubscribe":
            conn.state["subs"] -= keys
        else:
            conn.state["subs"] |= keys
            conn.state["subscribed"] = True
        listed = {}
        for channel, product in sorted(conn.state["subs"]):
            name = {v: k for k, v in CHANNELS.items()}[channel]
            listed.setdefault(name, []).append(product)
        self.send(conn, {"type": "subscriptions", "channels": [{"name": n, "product_ids": p} for n, p in listed.items()]})
        if kind == "subscribe":
            for product in products:
                st = self.symbols[product]
                if "ticker" in channels and st.history:
                    self.send(conn, self._ticker_from(st, st.history[-1], time=st.history[-1]["time"]))
                if "matches" in channels and st.history:
                    if self.send(conn, dict(st.history[-1], type="last_match")):
                        self.snapshot_sent(st, [st.history[-1]])

    def send_error(self, conn: WsConn, message: str, reason: str) -> None:
        doc = {"type": "error", "message": message, "reason": reason}
        self.errors_sent.append(doc)
        self.send(conn, doc)

    def on_clock(self, conn: WsConn, now: float) -> None:
        if not conn.state.get("subscribed") and now - conn.opened > self.subscribe_timeout:
            conn.close(1008, "no subscribe within %.0f s" % self.subscribe_timeout)
            return
        if now - conn.state.get("last_hb", conn.opened) < self.heartbeat_interval:
            return
        conn.state["last_hb"] = now
        for channel, product in sorted(conn.state["subs"]):
            if channel == "heartbeat":
                st = self.symbols[product]
                self.send(conn, {"type": "heartbeat", "sequence": self.sequence, "last_trade_id": st.next_id - 1,
                                 "product_id": product, "time": iso_now()})

    # -- events ----------------------------------------------------------------------------
    def make_trade(self, st: SymbolState, **fields) -> dict:
        tid, px, qty, bought = st.step()
        self.sequence += 1
        event = {"type": "match", "trade_id": tid, "maker_order_id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
                 "taker_order_id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
                 "side": "sell" if bought else "buy",  # the maker's side
                 "size": "%.8f" % qty, "price": "%.2f" % px if px > 1 else "%.8f" % px,
                 "product_id": st.symbol, "sequence": self.sequence, "time": iso_from_ns(self.clock_ns())}
        event.update(fields)
        return event

    def trade_key(self, event) -> int:
        return event["trade_id"]

    def _ticker_from(self, st: SymbolState, match: dict, **fields) -> dict:
        px = float(match["price"])
        event = {"type": "ticker", "sequence": match["sequence"], "product_id": st.symbol, "price": match["price"],
                 "open_24h": "%.8f" % px, "volume_24h": "1000.0", "low_24h": "%.8f" % (px * 0.99),
                 "high_24h": "%.8f" % (px * 1.01), "volume_30d": "30000.0",
                 "best_bid": "%.8f" % (px * 0.9999), "best_bid_size": "0.5", "best_ask": "%.8f" % (px * 1.0001),
                 "best_ask_size": "0.7", "side": "buy" if match["side"] == "sell" else "sell",
                 "time": iso_now(), "trade_id": match["trade_id"], "last_size": match["size"]}
        event.update(fields)
        return event

    def make_ticker(self, st: SymbolState, **fields) -> dict:
        match = st.history[-1] if st.history else self.make_trade(st)
        return self._ticker_from(st, match, **fields)

    def frame_trade(self, conn: WsConn, st: SymbolState, event) -> str | None:
        return json.dumps(event, separators=(",", ":")) if self.wants(conn, st, "trades") else None

    def frame_ticker(self, conn: WsConn, st: SymbolState, event) -> str | None:
        return json.dumps(event, separators=(",", ":")) if self.wants(conn, st, "ticker") else None
