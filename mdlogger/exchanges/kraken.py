"""Kraken WebSocket v1 (public): ``trade`` and ``ticker`` on ``XBT/USD``-style pairs.

Facts this module encodes (docs/exchange-protocols.md, Kraken section):
symbols are the AssetPairs ``wsname`` (``XBT/USD``), normalized with
XBT -> BTC and XDG -> DOGE; dark-pool pairs have no ``wsname`` and are
skipped; a trade is ``[price, volume, time, side, ordertype, misc]`` with the
time as decimal seconds and side ``b``/``s`` the taker's, and v1 has no trade
id (stored as 0); on subscribe the server replays the last trades (the first
trade message of a pair on a connection), stored only when newer than what
we have (by time); tickers carry no time (the receive time is stored);
``{"event":"heartbeat"}`` comes about every second on a quiet connection;
``systemStatus`` ``maintenance`` means wait.
"""

from __future__ import annotations

import orjson

from .. import records as rec
from .base import (
    loads,
    Exchange,
    Pause,
    Refused,
    Session,
    SymbolInfo,
    decimal_seconds,
    optional_price,
    optional_size,
    price,
    receive_time,
    size,
)

ALIASES = {"XBT": "BTC", "XDG": "DOGE"}
SIDES = {"b": rec.SIDE_BUY, "s": rec.SIDE_SELL}
SUBSCRIBE_CHUNK = 50
PING_AFTER_SECS = 20.0
MAINTENANCE_PAUSE_SECS = 60.0


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
            raise Refused("missing_field", "trade data %r" % (items,))
        snapshot = self.first_trades(pair)
        rows = []
        for item in items:
            try:
                px, vol, when, side = item[0], item[1], item[2], item[3]
            except (IndexError, TypeError, KeyError):
                raise Refused("missing_field", "trade %r" % (item,)) from None
            if side not in SIDES:
                raise Refused("missing_field", "side %r" % (side,))
            sec, nanos = decimal_seconds(when)
            rows.append((sec, nanos, price(px), size(vol), SIDES[side]))
        for sec, nanos, px, vol, side in sorted(rows) if snapshot else rows:
            self.sink.trade(sym, 0, sec, nanos, px, vol, side, snapshot=snapshot)

    def _ticker(self, pair, t, recv_ns: int) -> None:
        sym = self.symbol(pair)
        try:
            last, bid, ask = t["c"], t["b"], t["a"]
            px = price(last[0])
            volume = optional_size(last[1] if len(last) > 1 else None)
            best_bid, best_ask = optional_price(bid[0]), optional_price(ask[0])
        except (KeyError, IndexError, TypeError):
            raise Refused("missing_field", "ticker %r" % (t,)) from None
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
                self.sink.exchange_error("%s (pair %s)" % (msg.get("errorMessage", "subscription error"), pair),
                                         symbol=symbol if symbol and rec.valid_symbol(symbol) else None)
            elif msg.get("status") == "subscribed" and msg.get("channelName") == "trade":
                self.expect_replay(msg.get("pair"))
            return
        if event == "error":
            self.sink.exchange_error(str(msg.get("errorMessage", msg)))
            return
        raise Refused("unknown_type", payload[:200])


class Kraken(Exchange):
    name = "kraken"
    channels = ("trade", "ticker")
    max_channels_per_connection = 200  # 100 pairs, two subscriptions each, per connection
    connect_rate = 1.0  # Kraken asks for reconnects to be spread out; one a second per IP is polite
    send_rate = 5.0
    session_class = KrakenSession

    def discover(self, rest) -> list[SymbolInfo]:
        doc = rest.get_json(self.settings.rest_endpoint.rstrip("/") + "/0/public/AssetPairs")
        if doc.get("error"):
            raise ValueError("Kraken AssetPairs error: %s" % "; ".join(map(str, doc["error"])))
        out = []
        for info in doc.get("result", {}).values():
            wsname = info.get("wsname") if isinstance(info, dict) else None
            if not isinstance(wsname, str) or "/" not in wsname:
                continue  # dark pool pairs have no wsname
            symbol = self.normalize(wsname)
            if not rec.valid_symbol(symbol):
                continue
            base, quote = symbol.split("-")
            decimals = info.get("pair_decimals")
            tick = ("%.*f" % (decimals, 10 ** -decimals)) if isinstance(decimals, int) else ""
            out.append(SymbolInfo(symbol, wsname, base, quote, info.get("status", "online") == "online", tick,
                                  str(info.get("ordermin", ""))))
        return out

    def normalize(self, name: str) -> str:
        base, _, quote = name.partition("/")
        return "%s-%s" % (normalize_code(base), normalize_code(quote))

    def subscribe_messages(self, symbols) -> list[str]:
        pairs = [s.exchange_name for s in symbols]
        out = []
        for channel in self.channels:
            for i in range(0, len(pairs), SUBSCRIBE_CHUNK):
                out.append(orjson.dumps({"event": "subscribe", "pair": pairs[i : i + SUBSCRIBE_CHUNK],
                                         "subscription": {"name": channel}}).decode())
        return out
