"""OKX v5 public WebSocket: channels ``tickers`` and ``trades`` per instrument.

Facts this module encodes (docs/PROTOCOLS.md, "OKX"):

* subscribe with ``{"op":"subscribe","args":[{"channel":..,"instId":..},..]}``;
  the args of one request must stay under 64 KB (we send SUBSCRIBE_CHUNK args
  per message, about 5 KB) and the server acks every arg with
  ``{"event":"subscribe","arg":{..}}``;
* at most 480 subscribe requests per hour per connection and 3 new
  connections per second per IP;
* the server closes a connection that received no data for 30 s (code 4004):
  the client sends the TEXT ``ping`` after PING_AFTER_SECS of silence and the
  server answers the TEXT ``pong`` (not JSON);
* a ``trades`` frame may carry several trades in ``data``; ``tradeId`` is a
  numeric string, consecutive per instrument; ``side`` is the taker's side;
  right after a subscribe the server pushes the latest trade (the capture
  shows one 25 s old), so the first ``trades`` frame of an instrument on a
  connection is passed as a snapshot (stored only if newer than what we have);
* merged fills: the ``trades`` channel may send the fills of one taker order
  as ONE row, with ``tradeId`` the id of the last fill and ``count`` = n: the
  row stands for the ids ``tradeId - n + 1`` .. ``tradeId``, ``sz`` is their
  total and ``px`` the last fill's price. REST history and the ``trades-all``
  channel list the same fills one by one. We never store such a row (it
  would be one trade where the exchange has n, and would add its volume a
  second time once the fills come from REST): it is refused and counted as
  ``merged``. Nothing else is needed: the ids it stands for are missing from
  the stored ones, so the next trade we store is an id jump, and the writer's
  gap backfill (mdlogger/gaps.py) fetches every fill, ``tradeId`` included,
  from REST. Until a later trade arrives those fills are simply not stored
  yet. A row with ``count`` 1, or without ``count`` (older frames), is one
  fill and stored as usual; a ``count`` that is not a positive integer (an
  int or a string of digits) is refused as ``missing_field``. ``seqId``
  (newer frames) is not used: ids are checked by the writer, not here;
* errors ``{"event":"error","code":"600xx","msg":..}`` (60018: the channel or
  instrument does not exist) and the notice ``64008`` sent before a service
  upgrade closes the connection;
* instruments: ``GET /api/v5/public/instruments?instType=SPOT``, answer
  ``{"code":"0","data":[..],"msg":""}``; only ``state: live`` is tradable;
  ``instId`` is already ``BASE-QUOTE``;
* REST trade history (gap backfill): ``GET /api/v5/market/history-trades?instId=&type=1&after=X&limit=100``
  gives the trades older than tradeId X, newest first, 100 at most, for the
  last 3 months; 20 requests per 2 s per IP. Every reply carries ``code``:
  ``"0"`` is success, ``50011`` is the rate limit (under HTTP 429, and also
  documented under HTTP 200), so ``code`` is checked on every reply.
"""

from __future__ import annotations

import re

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
    loads,
    millis,
    optional_price,
    optional_size,
    price,
    Refused,
    Rotate,
    scan_newest_first,
    Session,
    shown,
    size,
    SymbolInfo,
    trade_id,
)

SUBSCRIBE_CHUNK = 100  # args per subscribe message: ~5 KB of JSON, far under 64 KB
PING_AFTER_SECS = 25.0  # the server drops a connection idle for 30 s
SIDES = {"buy": rec.SIDE_BUY, "sell": rec.SIDE_SELL}
RATE_LIMIT_CODE = "50011"
_INST_ID_RE = re.compile(r"instId:\s*([A-Za-z0-9_-]+)")


class OkxSession(Session):
    ping_after_secs = PING_AFTER_SECS
    ping_text = "ping"

    def on_message(self, payload: bytes, recv_ns: int) -> None:
        if payload == b"pong":
            return
        msg = loads(payload)
        if not isinstance(msg, dict):
            raise Refused("unknown_type", payload[:200])
        if "event" in msg:
            self._event(msg, payload)
            return
        arg, data = msg.get("arg"), msg.get("data")
        if not isinstance(arg, dict) or not isinstance(data, list):
            raise Refused("unknown_type", payload[:200])
        channel = arg.get("channel")
        if channel == "trades":
            self._trades(arg, data)
        elif channel == "tickers":
            for item in data:
                self._ticker(item)
        else:
            raise Refused("unknown_type", payload[:200])

    # -- data ---------------------------------------------------------------------
    def _trades(self, arg: dict, data: list) -> None:
        """Store every valid trade of the frame; then refuse the first bad one, if any."""
        inst = arg.get("instId")
        snapshot = isinstance(inst, str) and inst in self.by_name and self.first_trades(inst)
        good, bad = [], None
        for item in data:
            try:
                good.append(self._trade_fields(item))
            except Refused as exc:
                bad = bad or exc
        if snapshot:
            good.sort(key=lambda t: (t[1], t[2], t[3]))  # oldest first
        for fields in good:
            self.sink.trade(*fields, snapshot=snapshot)
        if bad is not None:
            raise bad

    def _trade_fields(self, d) -> tuple:
        if not isinstance(d, dict):
            raise Refused("unknown_type", shown(d))
        try:
            sym = self.symbol(d["instId"])
            tid = trade_id(d["tradeId"])
            sec, nanos = millis(d["ts"])
            px = price(d["px"])
            qty = size(d["sz"])
            side = d["side"]
        except KeyError as exc:
            raise Refused("missing_field", "trade without %s" % (exc,)) from None
        side = SIDES.get(side) if type(side) is str else None  # (a list would not even hash)
        if side is None:
            raise Refused("missing_field", "side=%s" % (shown(d["side"]),))
        fills = fill_count(d["count"]) if "count" in d else 1
        if fills > 1:  # fetched fill by fill from REST by the writer's gap backfill (module docstring)
            raise Refused("merged", "tradeId %d stands for %d fills" % (tid, fills))
        return sym, tid, sec, nanos, px, qty, side

    def _ticker(self, d) -> None:
        if not isinstance(d, dict):
            raise Refused("unknown_type", shown(d))
        try:
            sym = self.symbol(d["instId"])
            sec, nanos = millis(d["ts"])
            px = price(d["last"])
            last_size = d.get("lastSz")
            qty = rec.NAN if last_size in ("0", 0) else optional_size(last_size)
            bid = optional_price(d.get("bidPx"))
            ask = optional_price(d.get("askPx"))
        except KeyError as exc:
            raise Refused("missing_field", "ticker without %s" % (exc,)) from None
        self.sink.ticker(sym, sec, nanos, px, qty, rec.SIDE_UNKNOWN, bid, ask)

    # -- events -------------------------------------------------------------------
    def _event(self, msg: dict, payload: bytes) -> None:
        event = msg.get("event")
        if event in ("subscribe", "unsubscribe"):
            return  # ack of one arg
        if event == "error":
            text = "code %s: %s (connId %s)" % (exchange_text(msg.get("code")), exchange_text(msg.get("msg")),
                                                exchange_text(msg.get("connId")))
            self.sink.exchange_error(text, symbol=self._error_symbol(msg.get("msg")))
            return
        if event == "notice":
            text = "code %s: %s" % (exchange_text(msg.get("code")), exchange_text(msg.get("msg")))
            self.sink.exchange_error(text)
            if msg.get("code") in ("64008", 64008):  # (not str(): a deeply nested value would not even print)
                raise Rotate("OKX notice 64008: service upgrade")
            return
        raise Refused("unknown_type", payload[:200])

    def _error_symbol(self, text) -> str | None:
        """The normalized symbol an error names (60018 quotes ``instId:XXX``), or None."""
        if not isinstance(text, str):
            return None
        m = _INST_ID_RE.search(text)
        if m is None:
            return None
        sym = self.by_name.get(m.group(1))
        if sym is not None:
            return sym.decode()
        normalized = m.group(1).upper()
        return normalized if rec.valid_symbol(normalized) else None


class Okx(Exchange):
    """OKX spot.

    ``max_channels_per_connection`` is 240 (120 instruments): OKX documents no
    hard channel cap, only 64 KB per subscribe request and 480 requests per
    hour. 240 args are 3 chunked requests per connection, far under that
    budget, and a connection this size keeps one socket's backlog (or loss)
    from delaying or dropping much of the market (5 connections: 600
    instruments; the 2022 capture lists 513 spot pairs).
    """

    name = "okx"
    default_ws_endpoint = "wss://ws.okx.com:8443/ws/v5/public"
    default_rest_endpoint = "https://www.okx.com"
    channels = ("tickers", "trades")
    max_channels_per_connection = 2 * 120
    connect_rate = 1.0  # the exchange allows 3/s per IP
    send_rate = 1.0  # 480 subscribes/h per connection; pings are one per 25 s
    session_class = OkxSession

    def discover(self, rest) -> list[SymbolInfo]:
        """Every SPOT instrument; entries and fields are checked first (mdlogger/listing.py)."""
        url = self.settings.rest_endpoint.rstrip("/") + "/api/v5/public/instruments"
        doc = rest.get_json(url, params={"instType": "SPOT"})
        if not isinstance(doc, dict):
            raise ValueError("OKX instruments: not a JSON object: %s" % (shown(doc),))
        if str(doc.get("code")) != "0":
            raise ValueError("OKX instruments: code %s: %s" % (exchange_text(doc.get("code"), 40),
                                                                exchange_text(doc.get("msg"), 200)))
        data = doc.get("data") or []
        if not isinstance(data, list):
            raise ValueError("OKX instruments: data is not a list")
        out = listing.Listing()
        for item in data:
            out.take(lambda item: self._symbol_info(item, out), item)
        return out

    @staticmethod
    def _symbol_info(item, out) -> SymbolInfo | None:
        name = listing.exchange_name(item["instId"])
        base, quote = listing.code(item["baseCcy"]), listing.code(item["quoteCcy"])
        if item.get("instType", "SPOT") != "SPOT":
            return None
        return SymbolInfo(
            symbol="%s-%s" % (base, quote), exchange_name=name, base=base, quote=quote,
            active=item.get("state") == "live",
            tick_size=out.amount("tick_size", item.get("tickSz")), min_size=out.amount("min_size", item.get("minSz")),
        )

    def normalize(self, name: str) -> str:
        """BTC-USDT as listed; ValueError for anything else, non-ASCII names included (checked
        before upper-casing: ``"US\u017fD".upper()`` is ``"USSD"``)."""
        symbol = name.upper() if isinstance(name, str) and name.isascii() else ""
        if not rec.valid_symbol(symbol):
            raise ValueError("not an OKX spot instId: %s" % (shown(name),))
        return symbol

    # -- REST trade history ---------------------------------------------------------------------
    # 5/s with a burst of 5: at most 15 in any 2 s, below 20 per 2 s per IP.
    history = HistorySpec(consecutive_ids=True, has_ids=True, rest_rate=5.0, rest_burst=5.0, default_pause=2.0,
                          page_limit=100)

    def fetch_history(self, client, info, after, before, deadline):
        sym = rec.symbol_bytes(info.symbol)
        url = self.rest_url("/api/v5/market/history-trades")
        limit = self.history.page_limit
        rows = HistoryRows()
        cursor = before[0]  # after=X: the trades older than X
        try:
            while cursor > after[0] + 1:
                params = {"instId": info.exchange_name, "type": "1", "after": cursor, "limit": limit}
                doc, _ = client.get(url, params, cost=self.history_cost, deadline=deadline)
                if not isinstance(doc, dict) or not isinstance(doc.get("data", []), list):
                    raise HistoryError("OKX history-trades: unexpected reply %.200r" % (doc,))
                if str(doc.get("code")) != "0":
                    raise HistoryError("OKX history-trades: code %s: %.200s" % (doc.get("code"), doc.get("msg")))
                data = doc.get("data") or []
                lowest = scan_newest_first(rows, data, lambda d: _rest_trade(sym, d), "tradeId", after[0], before[0])
                if len(data) < limit or lowest is None or lowest <= after[0]:
                    break
                if lowest >= cursor:
                    raise HistoryError("OKX history-trades: after=%d gave ids down to %d" % (cursor, lowest))
                cursor = lowest
        except HistoryDeadline as exc:
            exc.rows, exc.direction = ascending_by_id(rows), "backward"
            raise
        return ascending_by_id(rows)

    @classmethod
    def limited(cls, status, doc, headers):
        if isinstance(doc, dict) and str(doc.get("code")) == RATE_LIMIT_CODE:
            return cls.history.default_pause
        return None

    def subscribe_messages(self, symbols) -> list[str]:
        args = [{"channel": channel, "instId": s.exchange_name} for s in symbols for channel in self.channels]
        return [
            orjson.dumps({"op": "subscribe", "args": args[i : i + SUBSCRIBE_CHUNK]}).decode()
            for i in range(0, len(args), SUBSCRIBE_CHUNK)
        ]


def fill_count(value) -> int:
    """A trades row's ``count``: how many fills it stands for (a positive int or a string of digits)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:  # (int() takes 4300 digits at most)
        n = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        raise Refused("missing_field", "count=%s" % (shown(value),))
    if n < 1:
        raise Refused("missing_field", "count=%s" % (shown(value),))
    return n


def _rest_trade(sym: bytes, d: dict) -> tuple:
    """One history-trades row -> a TRADE_WIRE tuple (``side`` is the taker's)."""
    tid = trade_id(d["tradeId"])
    sec, nanos = millis(d["ts"])
    px = price(d["px"])
    qty = size(d["sz"])
    side = SIDES.get(d["side"]) if isinstance(d["side"], str) else None
    if side is None:
        raise Refused("missing_field", "side=%s" % (shown(d["side"]),))
    return (sym, tid, sec, nanos, px, qty, side, rec.ZERO_ID, rec.ZERO_ID)
