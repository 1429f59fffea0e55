"""A sixth exchange, added by this test alone: an adapter and a fake, and nothing else anywhere.

The toy exchange's module (``TOY_SOURCE`` below: a discovery route, a subscribe
message, a session parsing a trivial JSON trade and ticker, and a fake that
speaks the same) is written to a folder of its own. The test imports it (its
classes register themselves), runs the fake in-process, and runs the real
service as a subprocess with that folder on ``PYTHONPATH`` and
``MDLOGGER_EXCHANGE_MODULES=toy_exchange``, the documented way to load an
exchange kept outside the package. No other file knows the toy: settings
take its endpoints from the adapter, the writer names its directory from the
slot it reads, /health lists it with its gap counters, ``dump`` offers it,
``verify`` checks it.

The module is written out from text rather than defined here because
defining its classes registers them: done at collection, every other test
of the session would see a sixth exchange.
"""

from __future__ import annotations

import importlib
import os
import struct
import subprocess
import sys
import textwrap
from collections import defaultdict

import pytest

from mdlogger import records as rec
from mdlogger.exchanges import ADAPTERS, exchange_names, registry
from mdlogger.fakes import fake_class
from mdlogger.exchanges.base import Exchange, HistorySpec, Session
from mdlogger.reader import read_rows
from mdlogger.settings import ConfigError, load_settings
from mdlogger.verify import consecutive_ids_by_exchange, verify_day

from helpers import fast_logger, service, wait_for

MODULE = "toy_exchange"
SYMBOLS = ["BTC-USD", "ETH-USD"]
TOY_SOURCE = textwrap.dedent('''
    """The toy exchange: spelling ``btc_usd``; REST ``GET /symbols``; WebSocket
    ``{"op": "subscribe", "symbols": [...]}`` answered by ``{"type": "subscribed"}``, then
    ``{"type": "trade", "symbol", "id", "ts" (ms), "price", "size", "side" (the taker's)}`` and
    ``{"type": "ticker", "symbol", "ts", "last", "volume", "bid", "ask"}``."""

    import json

    import orjson

    from mdlogger import records as rec
    from mdlogger.exchanges.base import (Exchange, HistorySpec, Refused, Session, SymbolInfo, loads, millis,
                                         optional_size, price, size, trade_id)
    from mdlogger.fakes.base import FakeExchange, now_ms

    SIDES = {"buy": rec.SIDE_BUY, "sell": rec.SIDE_SELL}


    def spelling(symbol):
        return symbol.lower().replace("-", "_")


    class ToySession(Session):
        def on_message(self, payload, recv_ns):
            msg = loads(payload)
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "trade":
                sec, nanos = millis(msg["ts"])
                self.sink.trade(self.symbol(msg["symbol"]), trade_id(msg["id"]), sec, nanos, price(msg["price"]),
                                size(msg["size"]), SIDES[msg["side"]])
            elif kind == "ticker":
                sec, nanos = millis(msg["ts"])
                self.sink.ticker(self.symbol(msg["symbol"]), sec, nanos, price(msg["last"]),
                                 optional_size(msg.get("volume")), rec.SIDE_UNKNOWN, price(msg["bid"]),
                                 price(msg["ask"]))
            elif kind != "subscribed":
                raise Refused("unknown_type", payload[:200])


    class Toy(Exchange):
        name = "toy"
        default_ws_endpoint = "wss://ws.toy.invalid"
        default_rest_endpoint = "https://api.toy.invalid"
        default_settings = {"symbols_per_connection": 10}
        channels = ("trades", "ticker")
        max_channels_per_connection = 20
        connect_rate = 5.0
        send_rate = 5.0
        session_class = ToySession
        history = HistorySpec(consecutive_ids=True, has_ids=True, rest_rate=5.0, rest_burst=5.0,
                              default_pause=1.0, page_limit=100)

        def discover(self, rest):
            out = []
            for item in rest.get_json(self.rest_url("/symbols")):
                symbol = self.normalize(item["name"])
                if rec.valid_symbol(symbol):
                    out.append(SymbolInfo(symbol, item["name"], *symbol.split("-"), active=item["active"]))
            return out

        def normalize(self, name):
            return name.upper().replace("_", "-")

        def subscribe_messages(self, symbols):
            return [orjson.dumps({"op": "subscribe", "symbols": [s.exchange_name for s in symbols]}).decode()]


    class FakeToy(FakeExchange):
        name = "toy"
        default_symbols = ("BTC-USD", "ETH-USD")

        def rest_routes(self):
            return {"/symbols": lambda query: (200, [{"name": spelling(s), "active": True} for s in self.symbols])}

        def on_open(self, conn):
            conn.state["subs"] = set()
            return True

        def on_client_message(self, conn, payload):
            req = json.loads(payload)
            wanted = [n.upper().replace("_", "-") for n in req.get("symbols", ())]
            conn.state["subs"] |= {(c, s) for s in wanted if s in self.symbols for c in ("trades", "ticker")}
            self.send(conn, {"type": "subscribed", "symbols": req.get("symbols", [])})

        def make_trade(self, st, **fields):
            tid, px, qty, bought = st.step()
            event = {"type": "trade", "symbol": spelling(st.symbol), "id": tid, "ts": self.clock_ns() // 10**6,
                     "price": "%.2f" % px, "size": "%.5f" % qty, "side": "buy" if bought else "sell"}
            event.update(fields)
            return event

        def make_ticker(self, st, **fields):
            event = {"type": "ticker", "symbol": spelling(st.symbol), "ts": now_ms(), "last": "%.2f" % st.price,
                     "volume": "%.5f" % st.last_qty, "bid": "%.2f" % (st.price * 0.999),
                     "ask": "%.2f" % (st.price * 1.001)}
            event.update(fields)
            return event

        def trade_key(self, event):
            return event["id"]

        def frame_trade(self, conn, st, event):
            return json.dumps(event) if self.wants(conn, st, "trades") else None

        def frame_ticker(self, conn, st, event):
            return json.dumps(event) if self.wants(conn, st, "ticker") else None
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy module written out and imported (registered) here; its folder, for the service's PYTHONPATH.
    Forgotten again afterwards, so no other test sees a sixth exchange."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / (MODULE + ".py")).write_text(TOY_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    try:
        yield importlib.import_module(MODULE), str(folder)
    finally:
        registry.unregister("toy")
        sys.modules.pop(MODULE, None)


def f32(x) -> float:
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def trade_row(e: dict) -> tuple:
    return (e["id"], *rec.from_millis(e["ts"]), f32(e["price"]), f32(e["size"]), {"buy": 1, "sell": 2}[e["side"]],
            rec.ZERO_ID, rec.ZERO_ID)


def ticker_row(e: dict) -> tuple:
    return (*rec.from_millis(e["ts"]), f32(e["last"]), f32(e["volume"]), 0, f32(e["bid"]), f32(e["ask"]))


def by_day(events: list, row) -> dict:
    """``{(symbol, YYYY-MM-DD): [row, ...]}`` of the events, in order (a run may cross midnight UTC)."""
    out = defaultdict(list)
    for e in events:
        sec = rec.from_millis(e["ts"])[0]
        day = "20%s-%s-%s" % tuple(reversed(rec.day_string(sec).split(".")))
        out[e["symbol"].upper().replace("_", "-"), day].append(row(e))
    return out


def test_registered_by_its_module_alone(toy):
    module, _ = toy
    assert "toy" in exchange_names() and ADAPTERS["toy"] is module.Toy and fake_class("toy") is module.FakeToy
    settings = load_settings(None, {}, {"exchanges.toy.enabled": True}, check_resources=False)
    xs = settings.exchange("toy")
    assert (xs.ws_endpoint, xs.rest_endpoint, xs.symbols_per_connection) == (
        "wss://ws.toy.invalid", "https://api.toy.invalid", 10)
    assert consecutive_ids_by_exchange()["toy"] is True


@pytest.mark.slow
def test_a_toy_sixth_exchange_runs_end_to_end(tmp_path, toy):
    _, folder = toy
    data = str(tmp_path / "data")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p),
           registry.MODULES_ENV: MODULE}
    with fake_class("toy")(symbols=SYMBOLS, mode="script") as fake:
        config = {"logger": fast_logger(data), "exchanges": {"toy": fake.config_section(
            reconnect_delay_secs=0.1, max_reconnect_delay_secs=0.5)}}
        with service(tmp_path, config, env=env) as svc:
            svc.wait_all_connected(1, timeout=60)
            wait_for(lambda: fake.subscribed("trades") == set(SYMBOLS), what="the toy subscriptions")
            for i in range(30):
                if i == 20:  # ten BTC-USD ids never sent: a gap, which the toy cannot fill (no REST history)
                    fake.symbols["BTC-USD"].next_id += 10
                for sym in SYMBOLS:
                    fake.push_trade(sym)
                    if i % 10 == 0:
                        fake.push_ticker(sym)
            sent = len(fake.sent_trades) + len(fake.sent_tickers)
            assert len(fake.sent_trades) == 60 and len(fake.sent_tickers) == 6
            wait_for(lambda: sum(s["records"] for s in svc.shards()) >= sent, timeout=30, what="every record")
            doc = wait_for(lambda: (lambda d: d if d["exchanges"]["toy"]["gaps"]["unrecoverable"] else None)(
                svc.health()[1]), timeout=30, what="the toy's gap settled")
            assert [(s["exchange"], s["state"]) for s in doc["shards"]] == [("toy", "running")]
            # the writer keeps counters for the toy (its block is laid out from the registry)
            assert doc["exchanges"]["toy"]["gaps"]["detected"] == doc["exchanges"]["toy"]["gaps"]["unrecoverable"] == 1
            assert svc.stop() == 0
    trades, tickers = by_day(fake.sent_trades, trade_row), by_day(fake.sent_tickers, ticker_row)
    for (sym, day), want in trades.items():
        assert read_rows(data, "toy", sym, "TRADES", day) == want, sym
    for (sym, day), want in tickers.items():
        assert read_rows(data, "toy", sym, "MD", day) == want, sym
    for sym, day in trades:
        assert verify_day(data, rec.date_to_day_string(day), consecutive_ids_by_exchange()) == []
        listed = subprocess.run([sys.executable, "-m", "mdlogger", "dump", "toy", sym, "TRADES", day,
                                 "--data-path", data], capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, **env))
        assert listed.returncode == 0, listed.stderr
        assert len(listed.stdout.splitlines()) == 1 + len(trades[sym, day])


@pytest.fixture
def kept_registry():
    """Whatever a test registers is forgotten afterwards."""
    adapters, fakes = dict(registry.ADAPTERS), dict(registry.FAKES)
    yield
    registry.ADAPTERS.clear()
    registry.ADAPTERS.update(adapters)
    registry.FAKES.clear()
    registry.FAKES.update(fakes)


def test_an_adapter_is_refused_without_its_data_a_good_name_or_a_name_of_its_own(kept_registry):
    before = exchange_names()
    with pytest.raises(TypeError, match="must declare default_ws_endpoint, default_rest_endpoint, channels"):
        type("Half", (Exchange,), {"name": "half"})
    data = {"default_ws_endpoint": "wss://x.invalid", "default_rest_endpoint": "https://x.invalid",
            "channels": ("trades",), "max_channels_per_connection": 2, "connect_rate": 1.0, "send_rate": 1.0,
            "session_class": Session, "history": HistorySpec(False, True, 1.0, 1.0, 1.0, 10)}
    for bad in ("Toy", "to-y", "to_y", "9toy", "x" * 33):
        with pytest.raises(ValueError, match="expected lowercase letters and digits"):
            type("Bad", (Exchange,), dict(data, name=bad))
    with pytest.raises(ValueError, match="the adapter of exchange 'binance' is mdlogger.exchanges.binance.Binance"):
        type("Impostor", (Exchange,), dict(data, name="binance"))
    type("Quick", (ADAPTERS["binance"],), {"connect_rate": 99.0})  # no name of its own: a variant, not registered
    assert exchange_names() == before and ADAPTERS["binance"].__name__ == "Binance"


def test_extra_modules_that_do_not_import_or_register_nothing_are_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="MDLOGGER_EXCHANGE_MODULES: no_such_module: cannot import it"):
        registry.import_extra_modules({registry.MODULES_ENV: "no_such_module"})
    with pytest.raises(ConfigError, match="json: expected a module that defines an exchange adapter or fake"):
        registry.import_extra_modules({registry.MODULES_ENV: " json "})
    assert registry.import_extra_modules({registry.MODULES_ENV: ""}) == []
    proc = subprocess.run([sys.executable, "-m", "mdlogger", "run", "--data-path", str(tmp_path)],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **{registry.MODULES_ENV: "no_such_module"}))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["mdlogger-supervisor: config error: environment variable "
                                        "MDLOGGER_EXCHANGE_MODULES: no_such_module: cannot import it "
                                        "(ModuleNotFoundError: No module named 'no_such_module')"]
