"""Bitfinex WebSocket v2 (public): ``ticker`` and ``trades``, one subscription per channel per symbol.

Facts this module encodes (docs/PROTOCOLS.md, "Bitfinex"):
data frames carry only a ``chanId``, so each connection keeps the map from
the ``subscribed`` acks; at most 25 channels per connection; ``[CHAN,"hb"]``
heartbeats after 15 s of channel silence; a trade arrives as ``te`` then
``tu`` (stored once); the trades snapshot on subscribe comes newest first;
side is the sign of AMOUNT and size its absolute value; the ticker's VOLUME is
daily (so the MD volume is NaN) and it carries no time; frames may carry
extra trailing elements (sequence numbers with conf flags), so lengths are
never hard-coded; info 20051 asks for a reconnect, 20060/20061 bracket a
maintenance. Pairs: ``tBTCUSD``, or with a colon when a code is longer
(``tTESTBTC:TESTUSD``); UST means USDT and BCHN means BCH. Trade ids rise
but skip within a pair and are not known to be unique across pairs, so the
``te``/``tu`` dedupe is keyed by (symbol, id).

REST trade history (gap backfill): ``GET /v2/trades/{tSYM}/hist?start=&end=&limit=10000&sort=1``,
rows ``[ID, MTS, AMOUNT, PRICE]`` oldest first, start and end inclusive
milliseconds. Paged by time: the next start is the last MTS of a full page
(the pages overlap; rows are deduped by id). The endpoint allows only a few
requests per minute (sources say 10 to 90; this page 15), so we budget 10 a
minute; over it the reply is HTTP 429 or ``["error",11010,"ratelimit: error"]``
and the block lasts 60 s, which every caller then waits.
"""

from __future__ import annotations

import collections

import orjson

from .. import listing
from .. import records as rec
from ..history import HistoryDeadline, HistoryError
from .base import (
    loads,
    Exchange,
    HistoryRows,
    HistorySpec,
    ascending_by_id,
    edge_millis,
    history_row,
    Pause,
    Reconnect,
    Refused,
    Session,
    SymbolInfo,
    millis,
    optional_price,
    price,
    receive_time,
    exchange_text,
    shown,
    size,
    trade_id,
)

ALIASES = {"UST": "USDT", "BCHN": "BCH"}
MAINTENANCE_SECS = 120.0
RECENT_IDS = 4096  # (symbol, te id) pairs remembered per connection, to store each trade once
RATE_LIMIT_CODE = 11010
RATE_LIMIT_PAUSE_SECS = 60.0


def split_pair(pair: str) -> tuple[str, str] | None:
    if ":" in pair:
        base, _, quote = pair.partition(":")
    elif len(pair) == 6:
        base, quote = pair[:3], pair[3:]
    else:
        return None
    return ALIASES.get(base.upper(), base.upper()), ALIASES.get(quote.upper(), quote.upper())


class BitfinexSession(Session):
    def __init__(self, adapter, symbols, sink):
        super().__init__(adapter, symbols, sink)
        self.channels: dict[int, tuple[str, str]] = {}  # chanId -> (channel, exchange symbol)
        self._chan_ids: dict[tuple[str, str], int] = {}  # the reverse: one chanId per channel of ours
        self._recent: collections.deque = collections.deque(maxlen=RECENT_IDS)
        self._recent_set: set[tuple[bytes, int]] = set()

    def on_message(self, payload: bytes, recv_ns: int) -> None:
        msg = loads(payload)
        if isinstance(msg, dict):
            self._event(msg, payload)
            return
        if not isinstance(msg, list) or len(msg) < 2:
            raise Refused("unknown_type", payload[:200])
        entry = self.channels.get(msg[0]) if type(msg[0]) is int else None  # (true would find chanId 1)
        if entry is None:
            raise Refused("unknown_type", payload[:200])
        if msg[1] == "hb":
            return
        channel, name = entry
        if channel == "ticker":
            self._ticker(name, msg[1], recv_ns)
        elif channel == "trades":
            self._trades(name, msg)
        else:
            raise Refused("unknown_type", payload[:200])

    # -- data ---------------------------------------------------------------------------
    def _ticker(self, name: str, t, recv_ns: int) -> None:
        sym = self.symbol(name)
        if not isinstance(t, list) or len(t) < 7:
            raise Refused("missing_field", "ticker %s" % (shown(t),))
        px = price(t[6])
        sec, nanos = receive_time(recv_ns)
        self.sink.ticker(sym, sec, nanos, px, rec.NAN, rec.SIDE_UNKNOWN, optional_price(t[0]), optional_price(t[2]))

    def _trades(self, name: str, msg: list) -> None:
        sym = self.symbol(name)
        if msg[1] in ("te", "tu"):
            if len(msg) < 3:
                raise Refused("missing_field", "trade update without data")
            tid, sec, nanos, px, qty, side = self._trade_fields(msg[2])
            if (sym, tid) in self._recent_set:
                return  # the tu of a te already stored
            self._remember((sym, tid))
            self.sink.trade(sym, tid, sec, nanos, px, qty, side)
            return
        if not isinstance(msg[1], list):
            raise Refused("unknown_type", shown(msg))
        rows = [self._trade_fields(item) for item in msg[1]]
        rows.sort(key=lambda r: (r[1], r[2], r[0]))  # newest first on the wire: store oldest first
        for tid, sec, nanos, px, qty, side in rows:
            self._remember((sym, tid))
            self.sink.trade(sym, tid, sec, nanos, px, qty, side, snapshot=True)

    @staticmethod
    def _trade_fields(item):
        if not isinstance(item, list) or len(item) < 4:
            raise Refused("missing_field", "trade %s" % (shown(item),))
        tid = trade_id(item[0])
        sec, nanos = millis(item[1])
        amount = item[2]
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount == 0:
            raise Refused("bad_size", shown(amount))
        qty = size(abs(amount))
        return tid, sec, nanos, price(item[3]), qty, rec.SIDE_BUY if amount > 0 else rec.SIDE_SELL

    def _remember(self, key: tuple[bytes, int]) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(key)
        self._recent_set.add(key)

    # -- events ---------------------------------------------------------------------------
    def _event(self, msg: dict, payload: bytes) -> None:
        event = msg.get("event")
        if event == "subscribed":
            self._subscribed(msg)
        elif event == "unsubscribed":
            chan = msg.get("chanId")
            if type(chan) is not int:
                raise Refused("missing_field", "unsubscribed chanId %s" % (shown(chan),))
            key = self.channels.pop(chan, None)
            if key is not None and self._chan_ids.get(key) == chan:
                del self._chan_ids[key]
        elif event == "info":
            self._info(msg)
        elif event == "error":
            name = msg.get("symbol") or msg.get("pair")
            symbol = None
            if isinstance(name, str):
                try:
                    symbol = self.adapter.normalize(name if name.startswith("t") else "t" + name)
                except ValueError:
                    symbol = None
            self.sink.exchange_error("code %s: %s" % (exchange_text(msg.get("code")), exchange_text(msg.get("msg", ""))),
                                     symbol=symbol)
        elif event in ("pong", "conf"):
            return
        else:
            raise Refused("unknown_type", payload[:200])

    def _subscribed(self, msg: dict) -> None:
        """Map an ack's chanId to (channel, symbol), for the channels we parse on our symbols only,
        one chanId each (a newer ack replaces the older): the map never outgrows the subscriptions."""
        chan, channel = msg.get("chanId"), msg.get("channel")
        name = msg.get("symbol")
        if not name:
            pair = msg.get("pair")
            name = "t" + pair if isinstance(pair, str) else None
        if type(chan) is not int or not isinstance(name, str):
            raise Refused("missing_field", "subscribed chanId %s symbol %s" % (shown(chan), shown(name)))
        if channel not in ("ticker", "trades") or name not in self.by_name:
            return  # not a channel of ours: data on that chanId is refused as unknown_type
        key = (channel, name)
        old = self._chan_ids.get(key)
        if old is not None:
            self.channels.pop(old, None)
        taken = self.channels.get(chan)
        if taken is not None:
            self._chan_ids.pop(taken, None)
        self.channels[chan] = key
        self._chan_ids[key] = chan

    @staticmethod
    def _info(msg: dict) -> None:
        code = msg.get("code")
        if code == 20051:
            raise Reconnect("Bitfinex info 20051: server restarting")
        if code == 20060:
            raise Pause(MAINTENANCE_SECS, "Bitfinex info 20060: maintenance")
        if code == 20061:
            raise Reconnect("Bitfinex info 20061: maintenance over, resubscribing")


class Bitfinex(Exchange):
    name = "bitfinex"
    default_ws_endpoint = "wss://api-pub.bitfinex.com/ws/2"
    default_rest_endpoint = "https://api-pub.bitfinex.com"
    default_settings = {"symbols_per_connection": 12}  # 25 channels per connection, 2 per symbol
    channels = ("ticker", "trades")
    max_channels_per_connection = 25
    connect_rate = 20 / 60.0  # 20 connections per minute on api-pub
    send_rate = 10.0  # undocumented per-connection limit: 25 subscribes then take 2.5 s
    session_class = BitfinexSession

    def discover(self, rest) -> list[SymbolInfo]:
        """Every exchange pair; names are checked first (mdlogger/listing.py)."""
        doc = rest.get_json(self.settings.rest_endpoint.rstrip("/") + "/v2/conf/pub:list:pair:exchange")
        if not (isinstance(doc, list) and doc and isinstance(doc[0], list)):
            raise ValueError("Bitfinex pair list: the reply is not a list of pairs")
        out = listing.Listing()  # (BTCUST and a real BTCUSDT would collide: the first is kept)
        for pair in doc[0]:
            out.take(self._symbol_info, pair)
        return out

    def _symbol_info(self, pair: str) -> SymbolInfo:
        if not isinstance(pair, str):
            raise listing.Skip("malformed")
        name = listing.exchange_name("t" + pair)
        try:
            symbol = self.normalize(name)
        except ValueError:
            raise listing.Skip("bad_symbol") from None
        base, quote = symbol.split("-")
        return SymbolInfo(symbol, name, base, quote)

    def normalize(self, name: str) -> str:
        """tBTCUSD -> BTC-USD, tTESTBTC:TESTUSD -> TESTBTC-TESTUSD; ValueError for anything else,
        non-ASCII names included (checked before upper-casing: ``"US\u017fD".upper()`` is ``"USSD"``)."""
        if not isinstance(name, str) or not name.isascii() or not name.startswith("t"):
            raise ValueError("Bitfinex trading pairs are ASCII and start with t: %s" % (shown(name),))
        parts = split_pair(name[1:])
        symbol = "%s-%s" % parts if parts else ""
        if not rec.valid_symbol(symbol):
            raise ValueError("cannot normalize Bitfinex pair %s" % (shown(name),))
        return symbol

    # -- REST trade history ---------------------------------------------------------------------
    # 10 a minute, burst 3: one request covers a gap of up to 10,000 trades.
    history = HistorySpec(consecutive_ids=False, has_ids=True, rest_rate=10 / 60.0, rest_burst=3.0,
                          default_pause=RATE_LIMIT_PAUSE_SECS, page_limit=10000)

    def fetch_history(self, client, info, after, before, deadline):
        sym = rec.symbol_bytes(info.symbol)
        url = self.rest_url("/v2/trades/%s/hist" % (info.exchange_name,))
        limit = self.history.page_limit
        rows = HistoryRows()
        start, end = edge_millis(after), edge_millis(before)
        try:
            while True:
                params = {"start": start, "end": end, "limit": limit, "sort": 1}
                doc, _ = client.get(url, params, cost=self.history_cost, deadline=deadline)
                if not isinstance(doc, list) or (doc and doc[0] == "error"):
                    raise HistoryError("Bitfinex trades hist: unexpected reply %.200r" % (doc,))
                for item in doc:
                    row = history_row(rows, lambda d: _rest_trade(sym, d), item)
                    if row is not None and after[0] < row[1] < before[0]:
                        rows.append(row)
                if len(doc) < limit:
                    break
                try:
                    last = int(doc[-1][1])
                except (TypeError, ValueError, IndexError):
                    raise HistoryError("Bitfinex trades hist: last row %.100r has no MTS" % (doc[-1],)) from None
                if last <= start:
                    raise HistoryError("Bitfinex trades hist: %d trades in millisecond %d, cannot page past it"
                                       % (len(doc), start))
                start = last
        except HistoryDeadline as exc:
            exc.rows, exc.direction = ascending_by_id(rows), "forward"
            raise
        return ascending_by_id(rows)

    @classmethod
    def limited(cls, status, doc, headers):
        if isinstance(doc, list) and len(doc) >= 2 and doc[0] == "error" and doc[1] == RATE_LIMIT_CODE:
            return cls.history.default_pause
        if isinstance(doc, dict) and doc.get("error") == "ERR_RATE_LIMIT":
            return cls.history.default_pause
        return None

    @classmethod
    def fatal(cls, status, doc):
        # Errors come as ["error", CODE, MSG], an unknown symbol (10020) even with HTTP 500.
        if isinstance(doc, list) and len(doc) >= 2 and doc[0] == "error" and doc[1] != RATE_LIMIT_CODE:
            return "Bitfinex error %s: %s" % (doc[1], doc[2] if len(doc) > 2 else "")
        return None

    def subscribe_messages(self, symbols) -> list[str]:
        return [orjson.dumps({"event": "subscribe", "channel": channel, "symbol": s.exchange_name}).decode()
                for s in symbols for channel in self.channels]


def _rest_trade(sym: bytes, item) -> tuple:
    """``[ID, MTS, AMOUNT, PRICE]`` -> a TRADE_WIRE tuple (the same checks as the WebSocket's)."""
    tid, sec, nanos, px, qty, side = BitfinexSession._trade_fields(item)
    return (sym, tid, sec, nanos, px, qty, side, rec.ZERO_ID, rec.ZERO_ID)
