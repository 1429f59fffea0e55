"""What rows on disk must be: each exchange's documented field mapping, written out here independently of
the adapters (so a parser bug cannot hide behind itself), and checks of the files as a whole.

``SPECS[exchange]``: the symbols the end-to-end tests trade, the converters ``trade(event)`` and
``md(event)`` from a fake's exchange-shaped event to the stored row, ``name(event)`` (the event's symbol in
the exchange's spelling) and extra keyword arguments for the fake.
"""

from __future__ import annotations

import contextlib
import struct
import time
import uuid

from mdlogger import records as rec
from mdlogger.fakes import fake_class
from mdlogger.reader import read_rows
from mdlogger.storage import iter_tables, table_rows


def today() -> str:
    """The UTC day, as the reader names it (``YYYY-MM-DD``)."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def assert_tables_whole(data_path: str) -> int:
    """Every table's columns hold the same number of rows; returns the total rows."""
    total = 0
    for key in iter_tables(data_path):
        rows = table_rows(data_path, key)
        assert len(set(rows.values())) == 1, "torn table %s: %s" % (key, rows)
        total += next(iter(rows.values()))
    return total


def f32(x) -> float:
    """A number as a float32 column stores it."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def ms(value) -> tuple[int, int]:
    return rec.from_millis(int(value))


# -- the exchanges' documented mappings, written out independently -----------------------


def binance_trade(t):
    return (t["t"], *ms(t["T"]), f32(t["p"]), f32(t["q"]), 2 if t["m"] else 1, rec.ZERO_ID, rec.ZERO_ID)


def binance_md(d):
    return (*ms(d["E"]), f32(d["c"]), f32(d["Q"]), 0, f32(d["b"]), f32(d["a"]))


def okx_trade(t):
    return (int(t["tradeId"]), *ms(t["ts"]), f32(t["px"]), f32(t["sz"]), {"buy": 1, "sell": 2}[t["side"]],
            rec.ZERO_ID, rec.ZERO_ID)


def okx_md(d):
    return (*ms(d["ts"]), f32(d["last"]), f32(d["lastSz"]), 0, f32(d["bidPx"]), f32(d["askPx"]))


def coinbase_trade(t):
    # ``side`` of a match is the maker's: the taker did the opposite.
    return (t["trade_id"], *rec.from_iso8601(t["time"]), f32(t["price"]), f32(t["size"]),
            {"sell": 1, "buy": 2}[t["side"]], uuid.UUID(t["maker_order_id"]).bytes, uuid.UUID(t["taker_order_id"]).bytes)


def coinbase_md(d):
    return (*rec.from_iso8601(d["time"]), f32(d["price"]), f32(d["last_size"]), {"buy": 1, "sell": 2}[d["side"]],
            f32(d["best_bid"]), f32(d["best_ask"]))


def bitfinex_trade(e):
    tid, mts, amount, px = e["trade"][:4]
    return (tid, *ms(mts), f32(px), f32(abs(amount)), 1 if amount > 0 else 2, rec.ZERO_ID, rec.ZERO_ID)


def bitfinex_md(e):
    t = e["ticker"]
    return (None, None, f32(t[6]), float("nan"), 0, f32(t[0]), f32(t[2]))  # no time: the receive time is stored


def kraken_trade(e):
    px, vol, when, side = e["trade"][:4]
    return (0, *rec.from_decimal_seconds(when), f32(px), f32(vol), {"b": 1, "s": 2}[side], rec.ZERO_ID, rec.ZERO_ID)


def kraken_md(e):
    t = e["ticker"]
    return (None, None, f32(t["c"][0]), f32(t["c"][1]), 0, f32(t["b"][0]), f32(t["a"][0]))


SPECS = {
    "binance": {"symbols": ["BTC-USDT", "ETH-USDT"], "trade": binance_trade, "md": binance_md,
                "name": lambda e: e["s"], "fake": {"ping_interval": 1.0}},
    "okx": {"symbols": ["BTC-USDT", "ETH-USDT"], "trade": okx_trade, "md": okx_md, "name": lambda e: e["instId"], "fake": {}},
    "coinbase": {"symbols": ["BTC-USD", "ETH-USD"], "trade": coinbase_trade, "md": coinbase_md,
                 "name": lambda e: e["product_id"], "fake": {}},
    "bitfinex": {"symbols": ["BTC-USD", "ETH-USD"], "trade": bitfinex_trade, "md": bitfinex_md,
                 "name": lambda e: e["pair"], "fake": {}},
    "kraken": {"symbols": ["BTC-USD", "ETH-USD"], "trade": kraken_trade, "md": kraken_md,
               "name": lambda e: e["pair"], "fake": {}},
}


def _spellings(symbol: str) -> list[str]:
    """The ways the exchanges write a normalized symbol in their events."""
    base, quote = symbol.split("-")
    return [symbol, base + quote, "t" + base + quote, base + "/" + quote,
            ("XBT" if base == "BTC" else base) + "/" + quote]


def symbol_of(exchange: str, event) -> str:
    """The normalized symbol (one of ``SPECS[exchange]["symbols"]``) an event belongs to."""
    name = SPECS[exchange]["name"](event)
    for symbol in SPECS[exchange]["symbols"]:
        if name in _spellings(symbol):
            return symbol
    raise KeyError("%s: no symbol of SPECS spells %r" % (exchange, name))


@contextlib.contextmanager
def started_fakes(names, mode: str = "script", **kw):
    """``{exchange: started fake}`` trading ``SPECS[exchange]["symbols"]`` (``kw`` for every fake); stopped on leaving."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(fake_class(name)(symbols=SPECS[name]["symbols"], mode=mode,
                                                          **SPECS[name]["fake"], **kw))
               for name in names}


def all_subscribed(fake, symbols=None, channels=("trades",)) -> bool:
    """Whether some open connection of the fake is subscribed to each of ``symbols`` (default: every symbol
    of the fake) on each of ``channels`` ("trades", "ticker"). A fake sends a subscription's snapshot under
    the same lock as the trades pushed after it, so once this holds, what a test pushes comes after it."""
    wanted = set(fake.symbols if symbols is None else symbols)
    return all(wanted <= fake.subscribed(channel) for channel in channels)


def check_rows(data_path: str, name: str, fake) -> None:
    """The rows on disk of every ``SPECS`` symbol of ``name`` are exactly the trades and tickers the fake sent."""
    spec = SPECS[name]
    for sym in spec["symbols"]:
        want = [spec["trade"](e) for e in fake.sent_trades if symbol_of(name, e) == sym]
        got = read_rows(data_path, name, sym, "TRADES", today())
        assert got == want, "%s %s trades differ" % (name, sym)
        want_md = [spec["md"](e) for e in fake.sent_tickers if symbol_of(name, e) == sym]
        got_md = read_rows(data_path, name, sym, "MD", today())
        assert len(got_md) == len(want_md), "%s %s tickers: %d on disk, %d sent" % (name, sym, len(got_md), len(want_md))
        for g, w in zip(got_md, want_md):
            for i, (a, b) in enumerate(zip(g, w)):
                if b is None:
                    continue  # the exchange gives no time: the receive time was stored
                if isinstance(b, float) and b != b:
                    assert a != a, "%s %s MD column %d: want NaN, got %r" % (name, sym, i, a)
                else:
                    assert a == b, "%s %s MD column %d: %r != %r" % (name, sym, i, a, b)
