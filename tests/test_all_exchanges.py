"""Every exchange at once, and each one's reconnect, against the loopback fakes.

Rows on disk are checked field by field against what each fake recorded as
sent, converted independently of the adapters (from the exchanges' documented
field meanings, in tests/helpers/rows.py), so a parser bug cannot hide behind itself.
"""

from __future__ import annotations

import os
import pkgutil

import pytest

import mdlogger.exchanges
from mdlogger.exchanges import ADAPTERS, exchange_names
from mdlogger.fakes import fake_class, fake_names
from mdlogger.reader import read_rows

from helpers import (SPECS, all_subscribed, assert_tables_whole, check_rows, fast_logger, service, service_config,
                     started_fakes, symbol_of, today, wait_for)

pytestmark = pytest.mark.slow

AVAILABLE = [x for x in exchange_names() if x in SPECS]  # the exchanges helpers/rows.py has mappings for


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


def test_all_exchanges_at_once_rows_equal_what_was_sent(tmp_path):
    data = os.path.join(str(tmp_path), "data")
    with started_fakes(AVAILABLE) as fakes, service(tmp_path, service_config(data, fakes.values())) as svc:
        svc.wait_all_connected(len(fakes), timeout=60)
        wait_for(lambda: all(all_subscribed(f, channels=("trades", "ticker")) for f in fakes.values()),
                 what="every symbol subscribed on every fake")
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
            return all(svc.records(n) >= len(f.sent_trades) + len(f.sent_tickers) for n, f in fakes.items())

        wait_for(all_in, timeout=30, what="every record received")
        assert svc.stop() == 0
        for name, fake in fakes.items():
            check_rows(data, name, fake)
        assert_tables_whole(data)


@pytest.mark.parametrize("name", AVAILABLE)
def test_connection_killed_mid_stream_resubscribes_without_duplicates(tmp_path, name):
    data = os.path.join(str(tmp_path), "data")
    with started_fakes([name]) as fakes, service(tmp_path, service_config(data, fakes.values())) as svc:
        fake = fakes[name]
        svc.wait_all_connected(1, timeout=60)
        wait_for(lambda: all_subscribed(fake), what="subscribed")
        for _ in range(10):
            for sym in SPECS[name]["symbols"]:
                fake.push_trade(sym)
        wait_for(lambda: svc.records(name) >= len(fake.sent_trades), what="first trades")
        fake.drop_all(abort=True)
        wait_for(lambda: svc.shards()[0]["reconnects"] >= 1 and svc.shards()[0]["connected"], what="reconnected")
        # Every symbol resubscribed: the snapshot of past trades went out on the new connection before
        # anything pushed from here (the fake sends both under one lock).
        wait_for(lambda: all_subscribed(fake) and len(fake.open_connections()) == 1, what="resubscribed")
        for _ in range(10):
            for sym in SPECS[name]["symbols"]:
                fake.push_trade(sym)
        assert len(fake.sent_trades) == 40  # all delivered: 10 per symbol before the drop, 10 after
        wait_for(lambda: svc.writer()["rows_trades"] >= len(fake.sent_trades), timeout=30, what="rows written")
        assert svc.stop() == 0
        for sym in SPECS[name]["symbols"]:
            want = [SPECS[name]["trade"](e) for e in fake.sent_trades if symbol_of(name, e) == sym]
            got = read_rows(data, name, sym, "TRADES", today())
            assert got == want, "%s %s: rows differ after the reconnect (duplicates or gaps)" % (name, sym)


def test_a_symbol_the_exchange_refuses_is_reported_and_the_shard_keeps_going(tmp_path):
    from mdlogger.fakes.coinbase import FakeCoinbase

    with FakeCoinbase(symbols=["BTC-USD", "ETH-USD"], mode="steady", rate=20, refuse={"ETH-USD"}) as fake, \
            service(tmp_path, {"logger": fast_logger(tmp_path / "data"),
                               "exchanges": {"coinbase": fake.config_section()}}) as svc:
        svc.wait_all_connected(1)
        doc = wait_for(lambda: (lambda d: d if d["exchanges"]["coinbase"]["refused_by_exchange"] else None)(
            svc.health()[1]), what="the refusal on /health")
        assert doc["exchanges"]["coinbase"]["refused_by_exchange"] == ["ETH-USD"]
        assert doc["shards"][0]["refused_symbols"] == ["ETH-USD"]
        assert doc["exchanges"]["coinbase"]["refused_by_reason"]["exchange_error"] >= 1
        rows = doc["writer"]["rows_trades"]
        wait_for(lambda: svc.writer()["rows_trades"] > rows + 10, what="BTC-USD still captured")
        assert svc.shards()[0]["restarts"] == 0 and svc.shards()[0]["reconnects"] == 0
        assert "ETH-USD is not a valid product" in svc.log_text()
        assert svc.stop() == 0
