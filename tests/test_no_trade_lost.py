"""No trade lost: all five exchanges keep trading while connections drop, and every trade lands once.

The fakes' markets trade whether or not anyone listens (as real ones do).
Rows on disk are compared, byte for byte through the independent converters
of tests/helpers/rows.py, with every trade each fake MADE: from the
first trade stored to the last, nothing missing, nothing twice, in order.
Trades missed while a connection was down come back from the fakes' REST
trade history (Coinbase's without order ids: zero bytes).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from mdlogger import records as rec
from mdlogger.ledger import read_gaps
from mdlogger.reader import read_rows

from helpers import SPECS, assert_tables_whole, service, service_config, started_fakes, today, wait_for

pytestmark = pytest.mark.slow

NAMES = ["binance", "coinbase", "okx", "bitfinex", "kraken"]
RATE = 10.0  # trades per second per symbol, every symbol of every fake


def config_for(data, fakes):
    return service_config(data, fakes.values(), logger={"flush_interval_secs": 0.05}, backfill_hold_secs=40.0,
                          silence_timeout_secs=5.0)


def made_rows(name, fake, sym):
    conv = SPECS[name]["trade"]
    return [conv(e) for e in fake.made_trades(sym)]


def same_trade(name, got, want) -> bool:
    if got == want:
        return True
    # A trade fetched from Coinbase's REST history has no order ids.
    return name == "coinbase" and got[:6] == want[:6] and got[6:] == (rec.ZERO_ID, rec.ZERO_ID)


def assert_every_made_trade_once(data, name, fake, sym, made_before: float):
    """Disk == the fake's made trades from the first one stored to the last, and none made before
    ``made_before`` (wall clock) after the first stored is missing."""
    got = read_rows(data, name, sym, "TRADES", today())
    made = made_rows(name, fake, sym)
    assert got, "%s %s: nothing stored" % (name, sym)
    start = next((i for i, m in enumerate(made) if same_trade(name, got[0], m)), None)
    assert start is not None, "%s %s: the first stored trade was never made" % (name, sym)
    want = made[start:start + len(got)]
    for i, (g, w) in enumerate(zip(got, want)):
        assert same_trade(name, g, w), "%s %s: row %d is %r, the fake made %r" % (name, sym, i, g, w)
    assert len(got) == len(want)
    settled = [m for m in made[start:] if m[1] + m[2] / 1e9 < made_before]
    assert len(got) >= len(settled), "%s %s: %d trades made before the end, %d stored" % (
        name, sym, len(settled), len(got))


def gaps_of(data, name):
    return read_gaps(data, name, rec.date_to_day_string(today()))


def pending_gaps(svc) -> int:
    return sum(x["gaps"]["pending"] for x in svc.health()[1]["exchanges"].values())


def caught_up(svc, fakes, data, since: float) -> bool:
    """Every symbol's stored trades reach past ``since`` (wall clock) and no gap is open."""
    if pending_gaps(svc):
        return False
    for name, fake in fakes.items():
        for sym in SPECS[name]["symbols"]:
            rows = read_rows(data, name, sym, "TRADES", today())
            if not rows or rows[-1][1] + rows[-1][2] / 1e9 < since:
                return False
    return True


def test_drops_and_an_outage_on_all_five_lose_nothing(tmp_path):
    data = os.path.join(str(tmp_path), "data")
    with started_fakes(NAMES, mode="steady", rate=RATE) as fakes, service(tmp_path, config_for(data, fakes)) as svc:
        svc.wait_all_connected(len(fakes), timeout=60)
        for fake in fakes.values():
            fake.drop_after(60)  # every connection is cut after 60 messages: every few seconds
        wait_for(lambda: all(s["reconnects"] >= 2 for s in svc.shards()), timeout=60, what="a few drops each")
        for fake in fakes.values():  # one outage of several seconds per exchange, REST still up
            fake.refuse_upgrades(7.0)
            fake.drop_all(abort=True)
        wait_for(lambda: all(s["connected"] for s in svc.shards()) and all(
            time.monotonic() >= f.refuse_until for f in fakes.values()), timeout=60, what="back after the outage")
        wait_for(lambda: all(s["reconnects"] >= 4 for s in svc.shards()), timeout=60, what="more drops")
        for fake in fakes.values():
            fake.drop_after(None)
        end = time.time()
        wait_for(lambda: caught_up(svc, fakes, data, end + 1.0), timeout=90, what="every gap filled")
        assert svc.stop() == 0
        for name, fake in fakes.items():
            for sym in SPECS[name]["symbols"]:
                assert_every_made_trade_once(data, name, fake, sym, end)
            gaps = gaps_of(data, name)
            assert gaps, "%s: no gap recorded" % name
            assert all(g["fate"] in ("filled", "empty") for g in gaps), [g for g in gaps if g["fate"] not in
                                                                          ("filled", "empty")]
            assert sum(g["trades"] for g in gaps) > 0, "%s: nothing was backfilled" % name
            assert not fake.violations, "%s: %s" % (name, fake.violations[:3])
        assert_tables_whole(data)


def test_sigkill_of_writer_workers_and_whole_tree_loses_nothing(tmp_path):
    names = ["binance", "coinbase", "kraken"]
    data = os.path.join(str(tmp_path), "data")
    with started_fakes(names, mode="steady", rate=RATE) as fakes:
        config = config_for(data, fakes)
        with service(tmp_path, config) as svc:
            svc.wait_all_connected(len(fakes), timeout=60)
            wait_for(lambda: svc.writer()["rows_trades"] > 100, what="rows")
            writer = svc.pids()["writer"]
            os.kill(writer, signal.SIGKILL)
            wait_for(lambda: (svc.writer()["pid"] or writer) != writer, what="a new writer")
            for name, pid in svc.pids().items():
                if name != "writer":
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda: all(s["restarts"] >= 1 and s["connected"] for s in svc.shards()), timeout=60,
                     what="workers restarted")
            svc.kill_tree()
        made = {n: len(f.made_trades(SPECS[n]["symbols"][0])) for n, f in fakes.items()}
        wait_for(lambda: all(len(f.made_trades(SPECS[n]["symbols"][0])) >= made[n] + 20 for n, f in fakes.items()),
                 what="the market trading on while nothing runs")
        with service(_again(tmp_path), config) as svc:
            svc.wait_all_connected(len(fakes), timeout=60)
            end = time.time()
            wait_for(lambda: caught_up(svc, fakes, data, end + 1.0), timeout=90, what="every gap filled")
            assert svc.stop() == 0
        for name, fake in fakes.items():
            for sym in SPECS[name]["symbols"]:
                assert_every_made_trade_once(data, name, fake, sym, end)
            gaps = gaps_of(data, name)
            assert {"writer_restart", "restart"} & {g["why"] for g in gaps}, gaps
            assert all(g["fate"] in ("filled", "empty") for g in gaps), gaps
        assert_tables_whole(data)


def _again(tmp_path):
    path = tmp_path / "again"
    path.mkdir(exist_ok=True)
    return path
