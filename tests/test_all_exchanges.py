"""Every exchange at once, and each one's reconnect, against the loopback fakes.

Rows on disk are checked field by field against what each fake recorded as
sent, converted here independently of the adapters (from the exchanges'
documented field meanings), so a parser bug cannot hide behind itself.
"""

from __future__ import annotations

import os
import pkgutil
import struct
import time
import uuid

import pytest

from mdlogger import records as rec
import mdlogger.exchanges
from mdlogger.exchanges import ADAPTERS, exchange_names, fake_class, fake_names
from mdlogger.reader import read_rows

from service import Service, fast_logger, wait_for
from test_service import assert_tables_whole, today

pytestmark = pytest.mark.slow


def f32(x) -> float:
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
AVAILABLE = [x for x in exchange_names() if x in SPECS]  # the exchanges this module has mappings for


def test_every_exchange_is_registered_and_has_a_fake():
    """Each module of mdlogger/exchanges/ registers the exchange it is named after, and each one has a fake
    in the mdlogger/fakes/ module of the same name: found by the registry, listed nowhere."""
    modules = [m.name for m in pkgutil.iter_modules(mdlogger.exchanges.__path__) if m.name not in ("base", "registry")]
    assert sorted(modules) == list(exchange_names())
    assert fake_names() == exchange_names()
    for name in exchange_names():
        assert ADAPTERS[name].name == name
        assert ADAPTERS[name].__module__ == "mdlogger.exchanges.%s" % name
        assert fake_class(name).__module__ == "mdlogger.fakes.%s" % name


def symbol_of(exchange: str, event) -> str:
    """The normalized symbol an event belongs to, from the fake's own table."""
    return SPECS[exchange]["owner"][SPECS[exchange]["name"](event)]


def start_fakes(names, mode="script"):
    fakes = {}
    for name in names:
        fake = fake_class(name)(symbols=SPECS[name]["symbols"], mode=mode, **SPECS[name]["fake"])
        fake.start()
        fakes[name] = fake
        owner = {}
        for st in fake.symbols.values():
            for guess in (st.symbol, st.base + st.quote, "t" + st.base + st.quote, st.base + "/" + st.quote,
                          ("XBT" if st.base == "BTC" else st.base) + "/" + st.quote, st.base + st.quote):
                owner[guess] = st.symbol
        SPECS[name]["owner"] = owner
    return fakes


def exchange_config(name, fake, **extra):
    cfg = {
        "enabled": True, "ws_endpoint": fake.ws_endpoint, "rest_endpoint": fake.url_http,
        "symbols": SPECS[name]["symbols"], "reconnect_delay_secs": 0.1, "max_reconnect_delay_secs": 0.5,
        "silence_timeout_secs": 10.0,
    }
    cfg.update(extra)
    return cfg


def check_rows(data_path, name, fake):
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


def records_by_exchange(svc):
    out = {}
    for s in svc.shards():
        out[s["exchange"]] = out.get(s["exchange"], 0) + s["records"]
    return out


def test_all_exchanges_at_once_rows_equal_what_was_sent(tmp_path):
    fakes = start_fakes(AVAILABLE)
    data = os.path.join(str(tmp_path), "data")
    config = {"logger": fast_logger(data),
              "exchanges": {name: exchange_config(name, fake) for name, fake in fakes.items()}}
    svc = Service(tmp_path, config)
    try:
        svc.wait_all_connected(len(fakes), timeout=60)
        time.sleep(1.0)  # subscription acks and snapshots settle
        before = {name: (len(f.sent_trades), len(f.sent_tickers)) for name, f in fakes.items()}
        for i in range(20):
            for name, fake in fakes.items():
                for sym in SPECS[name]["symbols"]:
                    fake.push_trade(sym)
                    if i % 5 == 0:
                        fake.push_ticker(sym)
        for name, fake in fakes.items():
            assert len(fake.sent_trades) - before[name][0] == 40, "%s: trades not delivered" % name

        def all_in():
            got = records_by_exchange(svc)
            return all(got.get(n, 0) >= len(f.sent_trades) + len(f.sent_tickers) for n, f in fakes.items())

        wait_for(all_in, timeout=30, what="every record received")
        assert svc.stop() == 0
        for name, fake in fakes.items():
            check_rows(data, name, fake)
        assert_tables_whole(data)
    finally:
        svc.ensure_dead()
        for fake in fakes.values():
            fake.stop()


@pytest.mark.parametrize("name", AVAILABLE)
def test_connection_killed_mid_stream_resubscribes_without_duplicates(tmp_path, name):
    fakes = start_fakes([name])
    fake = fakes[name]
    data = os.path.join(str(tmp_path), "data")
    config = {"logger": fast_logger(data), "exchanges": {name: exchange_config(name, fake)}}
    svc = Service(tmp_path, config)
    try:
        svc.wait_all_connected(1, timeout=60)
        for _ in range(10):
            for sym in SPECS[name]["symbols"]:
                fake.push_trade(sym)
        wait_for(lambda: records_by_exchange(svc).get(name, 0) >= len(fake.sent_trades), what="first trades")
        fake.drop_all(abort=True)
        wait_for(lambda: svc.shards()[0]["reconnects"] >= 1 and svc.shards()[0]["connected"], what="reconnected")
        wait_for(lambda: SPECS[name]["symbols"][0] in fake.subscribed("trades") and len(fake.open_connections()) == 1,
                 what="resubscribed")
        time.sleep(1.0)  # the snapshot of past trades arrives on the new connection
        for _ in range(10):
            for sym in SPECS[name]["symbols"]:
                fake.push_trade(sym)
        wait_for(lambda: svc.health()[1]["writer"]["rows_trades"] >= len(fake.sent_trades), timeout=30,
                 what="rows written")
        assert svc.stop() == 0
        for sym in SPECS[name]["symbols"]:
            want = [SPECS[name]["trade"](e) for e in fake.sent_trades if symbol_of(name, e) == sym]
            got = read_rows(data, name, sym, "TRADES", today())
            assert got == want, "%s %s: rows differ after the reconnect (duplicates or gaps)" % (name, sym)
    finally:
        svc.ensure_dead()
        fake.stop()


def test_a_symbol_the_exchange_refuses_is_reported_and_the_shard_keeps_going(tmp_path):
    from mdlogger.fakes.coinbase import FakeCoinbase

    with FakeCoinbase(symbols=["BTC-USD", "ETH-USD"], mode="steady", rate=20, refuse={"ETH-USD"}) as fake:
        data = os.path.join(str(tmp_path), "data")
        cfg = {"enabled": True, "ws_endpoint": fake.ws_endpoint, "rest_endpoint": fake.url_http,
               "symbols": ["BTC-USD", "ETH-USD"]}
        svc = Service(tmp_path, {"logger": fast_logger(data), "exchanges": {"coinbase": cfg}})
        try:
            svc.wait_all_connected(1)
            doc = wait_for(lambda: (lambda d: d if d["exchanges"]["coinbase"]["refused_by_exchange"] else None)(
                svc.health()[1]), what="the refusal on /health")
            assert doc["exchanges"]["coinbase"]["refused_by_exchange"] == ["ETH-USD"]
            assert doc["shards"][0]["refused_symbols"] == ["ETH-USD"]
            assert doc["exchanges"]["coinbase"]["refused_by_reason"]["exchange_error"] >= 1
            rows = doc["writer"]["rows_trades"]
            wait_for(lambda: svc.health()[1]["writer"]["rows_trades"] > rows + 10, what="BTC-USD still captured")
            assert svc.shards()[0]["restarts"] == 0 and svc.shards()[0]["reconnects"] == 0
            assert "ETH-USD is not a valid product" in svc.log_text()
            assert svc.stop() == 0
        finally:
            svc.ensure_dead()
