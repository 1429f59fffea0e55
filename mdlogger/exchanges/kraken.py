"""Kraken WebSocket v1 (public): ``trade`` and ``ticker`` on ``XBT/USD``-style pairs.

Facts this module encodes (docs/PROTOCOLS.md, "Kraken (WebSocket v1)"):
symbols are the AssetPairs ``wsname`` (``XBT/USD``), normalized with
XBT -> BTC and XDG -> DOGE; dark-pool pairs have no ``wsname`` and are
skipped; a trade is ``[price, volume, time, side, ordertype, misc]`` with the
time as decimal seconds and side ``b``/``s`` the taker's, and v1 has no trade
id (stored as 0); Kraken documents a replay of the last 50 trades on
subscribe (the 2021 capture shows none), so the first trade message of a pair
after its ``subscribed`` ack is passed as a snapshot, stored only when newer
than what we have (by time); tickers carry no time (the receive time is
stored); ``{"event":"heartbeat"}`` comes about every second on a quiet
connection, and we ping after PING_AFTER_SECS of silence;
``systemStatus`` ``maintenance`` means wait (MAINTENANCE_PAUSE_SECS).

REST trade history (gap backfill): ``GET /0/public/Trades?pair=XBTUSD&since=<ns>&count=1000``,
oldest first; rows ``[price, volume, time, b/s, m/l, misc, trade_id]`` with
the time a JSON float of seconds; the result is keyed by Kraken's own pair
name (``XXBTZUSD``) next to ``last``, the ns cursor of the next page.
``since`` is taken as exclusive (not confirmed by Kraken): we ask from 1 ns
before each bound, which is right either way. Public
REST allows about one request per second per IP; over it, ``error`` holds
``EGeneral:Too many requests`` (with HTTP 200 as far as the docs say). We then
pause every caller RATE_LIMIT_PAUSE_SECS: Kraken's public counter drains at
about one a second, so a few seconds bring it back under the limit.
"""

from __future__ import annotations

import orjson

from .. import listing
from .. import records as rec
from ..history import HistoryDeadline, HistoryError
from .base import (
    loads,
    Exchange,
    HistoryRows,
    HistorySpec,
    edge_nanos,
    history_row,
    micro_seconds_float,
    Pause,
    Refused,
    Session,
    SymbolInfo,
    decimal_seconds,
    optional_price,
    optional_size,
    price,
    receive_time,
    exchange_text,
    shown,
    size,
)

ALIASES = {"XBT": "BTC", "XDG": "DOGE"}
SIDES = {"b": rec.SIDE_BUY, "s": rec.SIDE_SELL}
SUBSCRIBE_CHUNK = 50
PING_AFTER_SECS = 20.0
MAINTENANCE_PAUSE_SECS = 60.0
RATE_LIMIT_PAUSE_SECS = 5.0
RATE_LIMIT_ERRORS = ("EGeneral:Too many requests", "EAPI:Rate limit exceeded")


def normalize_code(code: str) -> str:
    code = code.upper()
    return ALIASES.get(code, code)


class KrakenSession(Session):
    ping_after_secs = PING_AFTER_SECS
    ping_text = '{"event":"ping","reqid":1}'

    def on_message(self, payload: bytes, recv_ns: int) -> None:
        msg = loads(payload)
        if isinstance(msg, dict):
            self._event(msg, payload)
        elif isinstance(msg, list) and len(msg) >= 4 and isinstance(msg[-2], str):
            channel, pair = msg[-2], msg[-1]
            if channel == "trade":
                self._trades(pair, msg[1])
            elif channel == "ticker":
                self._ticker(pair, msg[1], recv_ns)
            else:
                raise Refused("unknown_type", payload[:200])
        else:
            raise Refused("unknown_type", payload[:200])

    def _trades(self, pair, items) -> None:
        sym = self.symbol(pair)
        if not isinstance(items, list):
            raise Refused("missing_field", "trade data %s" % (shown(items),))
        snapshot = self.first_trades(pair)
        rows = []
        for item in items:
            if type(item) is not list or len(item) < 4:  # (a string would index too)
                raise Refused("missing_field", "trade %s" % (shown(item),))
            px, vol, when, side = item[0], item[1], item[2], item[3]
            if not isinstance(side, str) or side not in SIDES:
                raise Refused("missing_field", "side %s" % (shown(side),))
            sec, nanos = decimal_seconds(when)
            rows.append((sec, nanos, price(px), size(vol), SIDES[side]))
        if snapshot:  # oldest first; trades of one time keep the exchange's order (a stable sort on time)
            rows.sort(key=_time_of)
        for sec, nanos, px, vol, side in rows:
            self.sink.trade(sym, 0, sec, nanos, px, vol, side, snapshot=snapshot)

    def _ticker(self, pair, t, recv_ns: int) -> None:
        sym = self.symbol(pair)
        try:
            last, bid, ask = t["c"], t["b"], t["a"]
        except (KeyError, TypeError):
            raise Refused("missing_field", "ticker %s" % (shown(t),)) from None
        # Each a list [price, ...]: a string would index too, character by character.
        if not (type(last) is list and type(bid) is list and type(ask) is list and last and bid and ask):
            raise Refused("missing_field", "ticker %s" % (shown(t),))
        px = price(last[0])
        volume = optional_size(last[1] if len(last) > 1 else None)
        best_bid, best_ask = optional_price(bid[0]), optional_price(ask[0])
        sec, nanos = receive_time(recv_ns)
        self.sink.ticker(sym, sec, nanos, px, volume, rec.SIDE_UNKNOWN, best_bid, best_ask)

    def _event(self, msg: dict, payload: bytes) -> None:
        event = msg.get("event")
        if event in ("heartbeat", "pong"):
            return
        if event == "systemStatus":
            if msg.get("status") == "maintenance":
                raise Pause(MAINTENANCE_PAUSE_SECS, "Kraken systemStatus maintenance")
            return
        if event == "subscriptionStatus":
            if msg.get("status") == "error":
                pair = msg.get("pair")
                symbol = self.adapter.normalize(pair) if isinstance(pair, str) and "/" in pair else None
                self.sink.exchange_error("%s (pair %s)" % (exchange_text(msg.get("errorMessage", "subscription error")),
                                                           exchange_text(pair)),
                                         symbol=symbol if symbol and rec.valid_symbol(symbol) else None)
            elif msg.get("status") == "subscribed" and msg.get("channelName") == "trade":
                pair = msg.get("pair")
                if not isinstance(pair, str):
                    raise Refused("missing_field", "subscribed pair %s" % (shown(pair),))
                self.expect_replay(pair)
            return
        if event == "error":
            self.sink.exchange_error(exchange_text(msg.get("errorMessage", msg)))
            return
        raise Refused("unknown_type", payload[:200])


class Kraken(Exchange):
    name = "kraken"
    default_ws_endpoint = "wss://ws.kraken.com"
    default_rest_endpoint = "https://api.kraken.com"
    channels = ("trade", "ticker")
    max_channels_per_connection = 200  # 100 pairs, two subscriptions each, per connection
    connect_rate = 1.0  # Kraken asks for reconnects to be spread out; one a second per IP is polite
    send_rate = 5.0
    session_class = KrakenSession

    def discover(self, rest) -> list[SymbolInfo]:
        """Every pair with a wsname; entries and fields are checked first (mdlogger/listing.py)."""
        doc = rest.get_json(self.settings.rest_endpoint.rstrip("/") + "/0/public/AssetPairs")
        if not isinstance(doc, dict):
            raise ValueError("Kraken AssetPairs: the reply is not a JSON object")
        if doc.get("error"):
            errors = doc["error"] if isinstance(doc["error"], list) else [doc["error"]]
            raise ValueError("Kraken AssetPairs error: %s" % "; ".join(exchange_text(e, 200) for e in errors[:5]))
        pairs = doc.get("result")
        if not isinstance(pairs, dict):
            raise ValueError("Kraken AssetPairs: no result object in the reply")
        out = listing.Listing()
        for info in pairs.values():
            out.take(lambda info: self._symbol_info(info, out), info)
        return out

    def _symbol_info(self, info: dict, out) -> SymbolInfo | None:
        wsname = info.get("wsname")
        if wsname is None:
            return None  # dark pool pairs have no wsname
        wsname = listing.exchange_name(wsname)
        if "/" not in wsname:
            raise listing.Skip("bad_name")
        symbol = self.normalize(wsname)
        if not rec.valid_symbol(symbol):
            raise listing.Skip("bad_symbol")
        base, quote = symbol.split("-")
        return SymbolInfo(symbol, wsname, base, quote, info.get("status", "online") == "online",
                          out.tick_from_decimals(info.get("pair_decimals")), out.amount("min_size", info.get("ordermin")))

    def normalize(self, name: str) -> str:
        """XBT/USD -> BTC-USD; "" (no valid symbol) for anything but ASCII, which is checked
        before upper-casing (``"US\u017fD".upper()`` is ``"USSD"``)."""
        if not isinstance(name, str) or not name.isascii():
            return ""
        base, _, quote = name.partition("/")
        return "%s-%s" % (normalize_code(base), normalize_code(quote))

    # -- REST trade history ---------------------------------------------------------------------
    # WS v1 trades have no id: rows keep id 0 and gaps are found by time only.
    history = HistorySpec(consecutive_ids=False, has_ids=False, rest_rate=1.0, rest_burst=1.0,
                          default_pause=RATE_LIMIT_PAUSE_SECS, page_limit=1000)

    def fetch_history(self, client, info, after, before, deadline):
        sym = rec.symbol_bytes(info.symbol)
        url = self.rest_url("/0/public/Trades")
        limit = self.history.page_limit
        pair = info.exchange_name.replace("/", "")  # the altname: XBT/USD -> XBTUSD
        lo, hi = edge_nanos(after), edge_nanos(before)
        rows = HistoryRows()
        seen: set = set()  # Kraken's own trade ids, where given: pages may overlap at the cursor
        since = lo - 1
        try:
            while True:
                doc, _ = client.get(url, {"pair": pair, "since": since, "count": limit},
                                    cost=self.history_cost, deadline=deadline)
                result = doc.get("result") if isinstance(doc, dict) else None
                if isinstance(doc, dict) and doc.get("error"):
                    raise HistoryError("Kraken Trades: %.200s" % ("; ".join(map(str, doc["error"])),))
                if not isinstance(result, dict):
                    raise HistoryError("Kraken Trades: unexpected reply %.200r" % (doc,))
                items = next((v for k, v in result.items() if k != "last" and isinstance(v, list)), [])
                passed = False
                for item in items:
                    row = history_row(rows, lambda d: _rest_trade(sym, d), item)
                    if row is None:
                        continue
                    t = row[2] * 1_000_000_000 + row[3]
                    if t > hi:
                        passed = True
                        continue
                    kid = item[6] if len(item) > 6 and isinstance(item[6], int) else None
                    if t >= lo and (kid is None or kid not in seen):
                        rows.append(row)
                        if kid is not None:
                            seen.add(kid)
                if len(items) < limit or passed:
                    break
                try:
                    last = int(result.get("last"))
                except (TypeError, ValueError):
                    raise HistoryError("Kraken Trades: cursor last=%.50r" % (result.get("last"),)) from None
                # Trades may share a time: a page can end inside such a group, so the next one starts
                # just before the last time (the trade ids weed out what is fetched twice).
                if last <= since:
                    break  # the cursor did not move: nothing newer
                if last - 1 <= since:
                    raise HistoryError("Kraken Trades: since=%d gave last=%d: cannot page on" % (since, last))
                since = last - 1
        except HistoryDeadline as exc:
            exc.rows, exc.direction = _by_time(rows), "forward"
            raise
        return _by_time(rows)

    @classmethod
    def limited(cls, status, doc, headers):
        errors = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(errors, list) and any(isinstance(e, str) and e.startswith(RATE_LIMIT_ERRORS) for e in errors):
            return cls.history.default_pause
        return None

    def subscribe_messages(self, symbols) -> list[str]:
        pairs = [s.exchange_name for s in symbols]
        out = []
        for channel in self.channels:
            for i in range(0, len(pairs), SUBSCRIBE_CHUNK):
                out.append(orjson.dumps({"event": "subscribe", "pair": pairs[i : i + SUBSCRIBE_CHUNK],
                                         "subscription": {"name": channel}}).decode())
        return out


def _rest_trade(sym: bytes, item) -> tuple:
    """``[price, volume, time, b/s, m/l, misc, trade_id]`` -> a TRADE_WIRE tuple with id 0."""
    if not isinstance(item, list):
        raise Refused("missing_field", "trade %s" % (shown(item),))
    side = SIDES.get(item[3]) if isinstance(item[3], str) else None
    if side is None:
        raise Refused("missing_field", "side %s" % (shown(item[3]),))
    sec, nanos = micro_seconds_float(item[2])
    return (sym, 0, sec, nanos, price(item[0]), size(item[1]), side, rec.ZERO_ID, rec.ZERO_ID)


def _by_time(rows: HistoryRows) -> HistoryRows:
    """Oldest first (stable: trades of one instant keep the exchange's order)."""
    out = HistoryRows(sorted(rows, key=lambda r: (r[2], r[3])))
    out.skipped = rows.skipped
    return out


def _time_of(row: tuple) -> tuple:
    return row[0], row[1]
