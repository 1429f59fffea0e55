"""Coinbase Exchange: channels ``ticker``, ``matches`` and ``heartbeat``.

Facts this module encodes (docs/PROTOCOLS.md, "Coinbase Exchange"):
one ``subscribe`` message with every product and channel, which must arrive
within 5 s of connecting; in ``match``/``last_match`` the ``side`` is the
MAKER's, so the taker did the opposite, while a ``ticker``'s ``side`` is the
taker's; ``time`` is ISO-8601 with microseconds; order ids are UUIDs, stored
as their 16 bytes in RFC 4122 order; ``last_match`` is the last trade before
the subscription (a snapshot). The ``heartbeat`` channel (one message per
product per second) keeps quiet products' connections visibly alive.
WebSocket limits per IP: 8 requests/s (bursts to 20) and 100 client
messages/s; we open at most 2 connections/s, send at most 5 messages/s per
connection and put at most 100 products on one connection.

REST trade history (gap backfill): ``GET /products/{id}/trades?limit=1000&after=X``
gives trades older than id X, newest first, with the header ``CB-AFTER`` (the
oldest id of the page: the cursor of the next older page). Its ``side`` is
the maker's, as in ``match``; it has no order ids (stored as zeros). Public
REST is limited to 10 requests/s per IP (bursts to 15); a 429 comes without
Retry-After. The page size (1000) is not confirmed by Coinbase; paging
follows ``CB-AFTER`` whatever a page holds.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid

import orjson

from .. import listing
from .. import records as rec
from ..history import HistoryDeadline, HistoryError
from .base import (
    ascending_by_id,
    Exchange,
    exchange_text,
    HistoryRows,
    HistorySpec,
    iso_time,
    loads,
    optional_price,
    optional_size,
    price,
    Refused,
    scan_newest_first,
    Session,
    shown,
    size,
    SymbolInfo,
    trade_id,
)

MAKER_TO_TAKER = {"buy": rec.SIDE_SELL, "sell": rec.SIDE_BUY}
TAKER = {"buy": rec.SIDE_BUY, "sell": rec.SIDE_SELL}
_PRODUCT_RE = re.compile(r"\b([A-Za-z0-9]+-[A-Za-z0-9]+)\b")
IGNORED = {"subscriptions", "heartbeat"}
# A UUID in its canonical text form, ASCII hex only (uuid.UUID alone also takes braces,
# "urn:uuid:" and, through int(), other scripts' digits and underscores).
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _order_id(value) -> bytes:
    if value is None or value == "":
        return rec.ZERO_ID
    if type(value) is not str or _UUID_RE.fullmatch(value) is None:
        raise Refused("missing_field", "order id %s" % (shown(value),))
    return uuid.UUID(value).bytes


class CoinbaseSession(Session):
    def on_message(self, payload: bytes, recv_ns: int) -> None:
        msg = loads(payload)
        if not isinstance(msg, dict):
            raise Refused("unknown_type", payload[:200])
        kind = msg.get("type")
        if type(kind) is not str:  # (a list or an object would not even hash for the IGNORED test)
            raise Refused("unknown_type", payload[:200])
        if kind == "match" or kind == "last_match":
            self._match(msg, kind == "last_match")
        elif kind == "ticker":
            self._ticker(msg)
        elif kind in IGNORED:
            return
        elif kind == "error":
            self._error(msg)
        else:
            raise Refused("unknown_type", payload[:200])

    def _match(self, m: dict, snapshot: bool) -> None:
        try:
            sym = self.symbol(m["product_id"])
            tid = trade_id(m["trade_id"])
            sec, nanos = iso_time(m["time"])
            px = price(m["price"])
            qty = size(m["size"])
            side = m["side"]
        except KeyError as exc:
            raise Refused("missing_field", "match without %s" % (exc,)) from None
        side = MAKER_TO_TAKER.get(side) if type(side) is str else None
        if side is None:
            raise Refused("missing_field", "match side %s" % (shown(m["side"]),))
        maker = _order_id(m.get("maker_order_id"))
        taker = _order_id(m.get("taker_order_id"))
        self.sink.trade(sym, tid, sec, nanos, px, qty, side, maker, taker, snapshot=snapshot)

    def _ticker(self, t: dict) -> None:
        try:
            sym = self.symbol(t["product_id"])
            sec, nanos = iso_time(t["time"])
            px = price(t["price"])
        except KeyError as exc:
            raise Refused("missing_field", "ticker without %s" % (exc,)) from None
        side = TAKER.get(t.get("side"), rec.SIDE_UNKNOWN) if isinstance(t.get("side"), str) else rec.SIDE_UNKNOWN
        self.sink.ticker(sym, sec, nanos, px, optional_size(t.get("last_size")), side,
                         optional_price(t.get("best_bid")), optional_price(t.get("best_ask")))

    def _error(self, msg: dict) -> None:
        reason = exchange_text(msg.get("reason", ""))
        text = "%s: %s" % (exchange_text(msg.get("message", "error")), reason)
        symbol = None
        m = _PRODUCT_RE.search(reason)
        if m and rec.valid_symbol(m.group(1).upper()):
            symbol = m.group(1).upper()
        self.sink.exchange_error(text, symbol=symbol)


class Coinbase(Exchange):
    name = "coinbase"
    default_ws_endpoint = "wss://ws-feed.exchange.coinbase.com"
    default_rest_endpoint = "https://api.exchange.coinbase.com"
    channels = ("ticker", "matches", "heartbeat")
    max_channels_per_connection = 300  # 100 products per connection keeps each subscribe small
    connect_rate = 2.0  # well inside 8 requests/s per IP
    send_rate = 5.0  # 100 client messages/s per IP is the limit
    session_class = CoinbaseSession

    def discover(self, rest) -> list[SymbolInfo]:
        """Every product; entries and fields are checked first (mdlogger/listing.py)."""
        doc = rest.get_json(self.settings.rest_endpoint.rstrip("/") + "/products")
        if not isinstance(doc, list):
            raise ValueError("Coinbase products: the reply is not a list")
        out = listing.Listing()
        for p in doc:
            out.take(lambda p: self._symbol_info(p, out), p)
        return out

    def _symbol_info(self, p: dict, out) -> SymbolInfo:
        name = listing.exchange_name(p["id"])
        base, quote = listing.code(p["base_currency"]), listing.code(p["quote_currency"])
        symbol = self.normalize(name)
        if symbol != "%s-%s" % (base, quote):
            raise listing.Skip("bad_symbol")
        active = not p.get("trading_disabled", False) and p.get("status", "online") == "online"
        return SymbolInfo(symbol, name, base, quote, active, out.amount("tick_size", p.get("quote_increment")),
                          out.amount("min_size", p.get("base_min_size") or p.get("base_increment")))

    def normalize(self, name: str) -> str:
        """BTC-USD as listed; "" (no valid symbol) for anything but ASCII, which is checked
        before upper-casing (``"US\u017fD".upper()`` is ``"USSD"``)."""
        if not isinstance(name, str) or not name.isascii():
            return ""
        return name.upper()

    # -- REST trade history ---------------------------------------------------------------------
    # 5/s with a burst of 4: at most 9 in any second, below the 10/s per IP.
    history = HistorySpec(consecutive_ids=True, has_ids=True, rest_rate=5.0, rest_burst=4.0, default_pause=5.0,
                          page_limit=1000)

    def fetch_history(self, client, info, after, before, deadline):
        sym = rec.symbol_bytes(info.symbol)
        url = self.rest_url("/products/%s/trades" % urllib.parse.quote(info.exchange_name, safe=""))
        rows = HistoryRows()
        cursor = before[0]  # after=X: the page of ids below X
        try:
            while cursor > after[0] + 1:
                doc, headers = client.get(url, {"limit": self.history.page_limit, "after": cursor},
                                          cost=self.history_cost, deadline=deadline)
                if not isinstance(doc, list):
                    raise HistoryError("Coinbase trades: not a list: %.200r" % (doc,))
                if not doc:
                    break
                lowest = scan_newest_first(rows, doc, lambda d: _rest_trade(sym, d), "trade_id", after[0], before[0])
                if lowest is None or lowest <= after[0]:
                    break
                nxt = headers.get("CB-AFTER")
                if nxt is None:
                    break
                try:
                    nxt = int(nxt)
                except ValueError:
                    raise HistoryError("Coinbase trades: CB-AFTER %.50r is not an id" % (nxt,)) from None
                if nxt >= cursor:
                    raise HistoryError("Coinbase trades: after=%d gave CB-AFTER %d" % (cursor, nxt))
                cursor = nxt
        except HistoryDeadline as exc:
            exc.rows, exc.direction = ascending_by_id(rows), "backward"
            raise
        return ascending_by_id(rows)

    def subscribe_messages(self, symbols) -> list[str]:
        return [orjson.dumps({"type": "subscribe", "product_ids": [s.exchange_name for s in symbols],
                              "channels": list(self.channels)}).decode()]


def _rest_trade(sym: bytes, d: dict) -> tuple:
    """One REST trade -> a TRADE_WIRE tuple. ``side`` is the maker's: "buy" means the taker sold."""
    tid = trade_id(d["trade_id"])
    sec, nanos = iso_time(d["time"])
    px = price(d["price"])
    qty = size(d["size"])
    side = MAKER_TO_TAKER.get(d["side"]) if isinstance(d["side"], str) else None
    if side is None:
        raise Refused("missing_field", "side=%s" % (shown(d["side"]),))
    return (sym, tid, sec, nanos, px, qty, side, rec.ZERO_ID, rec.ZERO_ID)
