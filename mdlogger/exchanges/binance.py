"""Binance spot: combined streams ``<symbol>@trade`` and ``<symbol>@ticker``.

Facts this module encodes (docs/PROTOCOLS.md, "Binance spot"):
the server pings every 20 s and wants its payload echoed (the worker answers
every ping with a pong carrying the same payload); at most 5 incoming
messages per second per connection, pongs included, so our own budget is 4;
1024 streams per connection (we subscribe SUBSCRIBE_CHUNK per message); 300
connection attempts per 5 minutes per IP; every connection is closed at 24 h,
so we rotate to a new one at 23.5 h; ``serverShutdown`` announces a restart
(rotate too). In a ``trade``, ``m`` true means the buyer was the maker: the
taker sold. Symbols have no separator: they are split with
``baseAsset``/``quoteAsset``, never guessed.

REST trade history (gap backfill): ``GET /api/v3/historicalTrades?symbol=&fromId=&limit=1000``,
oldest first, weight 25 per call whatever the limit, no API key needed. The
limit is 6000 weight per minute per IP; every reply's ``X-MBX-USED-WEIGHT-1M``
says how much of the current minute is used. A 429 comes with ``Retry-After``;
going on after 429s gets the IP banned (418, 2 minutes to 3 days), so a 429
pauses every caller until Retry-After, and we pause ourselves until the next
minute once the used weight passes 80 %. ``fromId`` is taken as inclusive
(the docs do not say).
"""

from __future__ import annotations

import time

import orjson

from .. import listing
from .. import records as rec
from ..history import HistoryDeadline, HistoryError
from ..records import ZERO_ID
from . import base
from .base import (
    MAX_PRICE,
    MAX_SIZE,
    MIN_VALUE,
    Exchange,
    HistoryRows,
    HistorySpec,
    Refused,
    Rotate,
    Session,
    SymbolInfo,
    ascending_by_id,
    history_row,
    millis,
    price,
    raw_id,
    exchange_text,
    shown,
    size,
    trade_id,
)

SUBSCRIBE_CHUNK = 100  # streams per SUBSCRIBE message
WEIGHT_PER_MINUTE = 6000  # REST request weight per minute per IP
HISTORY_WEIGHT = 25  # weight of one historicalTrades call
EXCHANGE_INFO_WEIGHT = 20
USED_WEIGHT_PAUSE_AT = 0.8 * WEIGHT_PER_MINUTE  # X-MBX-USED-WEIGHT-1M past this: wait for the next minute
NEXT_MINUTE_MARGIN_SECS = 1.0
MAX_PAST_MS = base.MAX_PAST_SECS * 1000
MAX_FUTURE_MS = base.MAX_FUTURE_SECS * 1000


class BinanceSession(Session):
    def __init__(self, adapter, symbols, sink):
        super().__init__(adapter, symbols, sink)
        self._pack_trade = rec.TRADE_WIRE.pack
        self._add_trade = sink.raw_trade  # the sink's fast path, when it has one

    def rebind(self, sink) -> None:
        super().rebind(sink)
        self._add_trade = sink.raw_trade

    def on_message(self, payload: bytes, recv_ns: int) -> None:
        try:  # orjson directly rather than base.loads: this is the firehose's hot path
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise Refused("json", payload[:200]) from None
        if not isinstance(msg, dict):
            raise Refused("unknown_type", payload[:200])
        data = msg.get("data")
        if not isinstance(data, dict):
            self._control(msg, payload)
            return
        event = data.get("e")
        if event == "trade":
            if not self._fast_trade(data, recv_ns):
                self._trade(data, event)
        elif event == "aggTrade":
            self._trade(data, event)
        elif event == "24hrTicker":
            self._ticker(data)
        elif event == "serverShutdown":
            raise Rotate("serverShutdown announced")
        else:
            raise Refused("unknown_type", payload[:200])

    def _fast_trade(self, d: dict, recv_ns: int) -> bool:
        """The common case in a few operations; anything unusual goes the careful way."""
        add = self._add_trade
        if add is None:
            return False
        try:
            sym = self.by_name[d["s"]]
            tid = d["t"]
            ms = d["T"]
            p, q = d["p"], d["q"]
            # Texts only (a JSON number, true included, has no isascii), ASCII, without "_" and
            # without blanks around: what float() then takes is what base.number takes (its
            # NaN and inf fail the bounds below). Checked so, not char by char: ~0.1 us a trade.
            if not (p.isascii() and q.isascii() and "_" not in p and "_" not in q
                    and p.strip() is p and q.strip() is q):
                return False
            px = float(p)
            qty = float(q)
            maker = d["m"]
        except (KeyError, TypeError, ValueError, AttributeError):
            return False
        now_ms = recv_ns // 1_000_000
        if not (
            type(tid) is int and 0 <= tid < 1 << 64
            and type(ms) is int and now_ms - MAX_PAST_MS <= ms <= now_ms + MAX_FUTURE_MS
            and MIN_VALUE <= px < MAX_PRICE and MIN_VALUE <= qty < MAX_SIZE  # float32: see base.MIN_VALUE
            and (maker is True or maker is False)
        ):
            return False
        sec, rem = divmod(ms, 1000)
        add(self._pack_trade(sym, tid, sec, rem * 1_000_000, px, qty, 2 if maker else 1, ZERO_ID, ZERO_ID))
        return True

    def _trade(self, d: dict, event: str) -> None:
        try:
            sym = self.symbol(d["s"])
            tid = trade_id(d["t"] if event == "trade" else d["a"])
            sec, nanos = millis(d["T"])
            px = price(d["p"])
            qty = size(d["q"])
            maker = d["m"]
        except KeyError as exc:
            raise Refused("missing_field", "%s without %s" % (event, exc)) from None
        if not isinstance(maker, bool):
            raise Refused("missing_field", "m=%s" % (shown(maker),))
        self.sink.trade(sym, tid, sec, nanos, px, qty, rec.SIDE_SELL if maker else rec.SIDE_BUY)

    def _ticker(self, d: dict) -> None:
        try:
            sym = self.symbol(d["s"])
            sec, nanos = millis(d["E"])
            px = price(d["c"])
            qty = size(d["Q"]) if d["Q"] not in ("0", "0.00000000") else rec.NAN
            bid = price(d["b"])
            ask = price(d["a"])
        except KeyError as exc:
            raise Refused("missing_field", "24hrTicker without %s" % (exc,)) from None
        self.sink.ticker(sym, sec, nanos, px, qty, rec.SIDE_UNKNOWN, bid, ask)

    def _control(self, msg: dict, payload: bytes) -> None:
        if "result" in msg and "id" in msg:
            return  # SUBSCRIBE ack
        error = msg.get("error") if isinstance(msg.get("error"), dict) else msg
        if "code" in error and "msg" in error:
            self.sink.exchange_error("code %s: %s (request id %s)" % (
                exchange_text(error["code"]), exchange_text(error["msg"]), exchange_text(msg.get("id"))))
            return
        raise Refused("unknown_type", payload[:200])


class Binance(Exchange):
    name = "binance"
    default_ws_endpoint = "wss://stream.binance.com:9443"
    default_rest_endpoint = "https://api.binance.com"
    channels = ("trade", "ticker")
    max_channels_per_connection = 1024
    connect_rate = 300 / 300.0
    send_rate = 4.0
    max_connection_age = 23.5 * 3600
    session_class = BinanceSession

    def discover(self, rest) -> list[SymbolInfo]:
        """Every symbol of exchangeInfo; entries and fields are checked first (mdlogger/listing.py)."""
        doc = rest.get_json(self.settings.rest_endpoint.rstrip("/") + "/api/v3/exchangeInfo")
        entries = doc.get("symbols") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ValueError("Binance exchangeInfo: no list of symbols in the reply")
        out = listing.Listing()
        for s in entries:
            out.take(lambda s: self._symbol_info(s, out), s)
        return out

    @staticmethod
    def _symbol_info(s: dict, out) -> SymbolInfo:
        base, quote = listing.code(s["baseAsset"]), listing.code(s["quoteAsset"])
        name = listing.exchange_name(s["symbol"])
        if not name.isalnum():  # (it names a stream: btcusdt@trade)
            raise listing.Skip("bad_name")
        filters = {}
        for f in s.get("filters") or []:
            kind = f.get("filterType") if isinstance(f, dict) else None
            if isinstance(kind, str):
                filters[kind] = f
        return SymbolInfo(
            symbol="%s-%s" % (base, quote),
            exchange_name=name,
            base=base,
            quote=quote,
            active=s.get("status") == "TRADING",
            tick_size=out.amount("tick_size", filters.get("PRICE_FILTER", {}).get("tickSize")),
            min_size=out.amount("min_size", filters.get("LOT_SIZE", {}).get("minQty")),
        )

    def normalize(self, name: str) -> str:
        raise ValueError("Binance symbols have no separator; use the exchangeInfo listing")

    def ws_url(self, symbols) -> str:
        return self.settings.ws_endpoint.rstrip("/") + "/stream"

    def subscribe_messages(self, symbols) -> list[str]:
        streams = [
            "%s@%s" % (s.exchange_name.lower(), channel) for s in symbols for channel in self.channels
        ]
        out = []
        for i in range(0, len(streams), SUBSCRIBE_CHUNK):
            chunk = streams[i : i + SUBSCRIBE_CHUNK]
            out.append(orjson.dumps({"method": "SUBSCRIBE", "params": chunk, "id": i // SUBSCRIBE_CHUNK + 1}).decode())
        return out

    # -- REST trade history ---------------------------------------------------------------------
    # The bucket counts request weight: half of 6000 per minute, so discovery (exchangeInfo,
    # weight 20) and anything else on this IP keep room, and at most 250 + 3000 a minute.
    history = HistorySpec(consecutive_ids=True, has_ids=True, rest_rate=WEIGHT_PER_MINUTE / 2 / 60.0,
                          rest_burst=10.0 * HISTORY_WEIGHT, default_pause=60.0, page_limit=1000,
                          discovery_cost=float(EXCHANGE_INFO_WEIGHT))
    history_cost = float(HISTORY_WEIGHT)

    def fetch_history(self, client, info, after, before, deadline):
        sym = rec.symbol_bytes(info.symbol)
        url = self.rest_url("/api/v3/historicalTrades")
        limit = self.history.page_limit
        rows = HistoryRows()
        from_id = after[0] + 1
        try:
            while from_id < before[0]:
                params = {"symbol": info.exchange_name, "fromId": from_id, "limit": limit}
                doc, _ = client.get(url, params, cost=self.history_cost, deadline=deadline)
                if not isinstance(doc, list):
                    raise HistoryError("Binance historicalTrades: not a list: %.200r" % (doc,))
                last = None
                for item in doc:
                    row = history_row(rows, lambda d: _rest_trade(sym, d), item)
                    tid = row[1] if row is not None else raw_id(item, "id")
                    if tid is not None and (last is None or tid > last):
                        last = tid
                    if row is not None and after[0] < tid < before[0]:
                        rows.append(row)
                if len(doc) < limit or last is None or last + 1 >= before[0]:
                    break
                if last < from_id:
                    raise HistoryError("Binance historicalTrades: fromId=%d gave ids up to %d" % (from_id, last))
                from_id = last + 1
        except HistoryDeadline as exc:
            exc.rows, exc.direction = ascending_by_id(rows), "forward"
            raise
        return ascending_by_id(rows)

    @classmethod
    def after_reply(cls, headers):
        try:
            used = int(headers.get("X-MBX-USED-WEIGHT-1M"))
        except (AttributeError, TypeError, ValueError):
            return None
        if used < USED_WEIGHT_PAUSE_AT:
            return None
        return 60.0 - time.time() % 60.0 + NEXT_MINUTE_MARGIN_SECS


def _rest_trade(sym: bytes, d: dict) -> tuple:
    """One historicalTrades row -> a TRADE_WIRE tuple (Refused / KeyError when unusable)."""
    tid = trade_id(d["id"])
    sec, nanos = millis(d["time"])
    px = price(d["price"])
    qty = size(d["qty"])
    maker = d["isBuyerMaker"]
    if not isinstance(maker, bool):
        raise Refused("missing_field", "isBuyerMaker=%s" % (shown(maker),))
    return (sym, tid, sec, nanos, px, qty, rec.SIDE_SELL if maker else rec.SIDE_BUY, ZERO_ID, ZERO_ID)
