"""Configuration reload (SIGHUP): the pure rules, then the real service against loopback fakes."""

from __future__ import annotations

import dataclasses
import os
import random
import signal

import pytest
import yaml

from mdlogger.backoff import Backoff
from mdlogger.child import ProcessState, State
from mdlogger.exchanges.base import SymbolInfo
from mdlogger.fakes.binance import FakeBinance
from mdlogger.fakes.coinbase import FakeCoinbase
from mdlogger.planning import reshard, split_shards
from mdlogger.reader import read_rows
from mdlogger.reload import plan_reload
from mdlogger.settings import load_settings

from helpers import Service, assert_tables_whole, binance_trade, fast_logger, fast_section, service, today, wait_for


def sym(name: str, exchange_name: str = "") -> SymbolInfo:
    base, quote = name.split("-")
    return SymbolInfo(name, exchange_name or base + quote, base, quote)


def names(shards) -> list[list[str]]:
    return [[s.symbol for s in shard] for shard in shards]


# -- reshard: keep every shard the new symbol list allows ------------------------------------------


def test_reshard_unchanged_symbols_keep_every_shard():
    current = [[sym("A-X"), sym("C-X")], [sym("B-X")]]
    shards, uncovered = reshard(current, [sym("A-X"), sym("B-X"), sym("C-X")], 2, 5)
    assert names(shards) == [["A-X", "C-X"], ["B-X"]] and uncovered == []


def test_reshard_new_symbols_go_to_new_shards_while_connections_are_free():
    current = [[sym("A-X"), sym("B-X")]]
    shards, uncovered = reshard(current, [sym(s) for s in ("A-X", "B-X", "C-X", "D-X", "E-X")], 2, 5)
    assert names(shards) == [["A-X", "B-X"], ["C-X", "E-X"], ["D-X"]] and uncovered == []


def test_reshard_removed_symbol_changes_only_its_shard():
    current = [[sym("A-X"), sym("B-X")], [sym("C-X")]]
    shards, _ = reshard(current, [sym("A-X"), sym("C-X")], 2, 5)
    assert names(shards) == [["A-X"], ["C-X"]]
    shards, _ = reshard(current, [sym("A-X"), sym("B-X")], 2, 5)
    assert names(shards) == [["A-X", "B-X"]]  # C-X's shard is gone, not emptied


def test_reshard_at_the_connection_limit_fills_the_roomiest_shard_then_leaves_the_rest_uncovered():
    current = [[sym("A-X"), sym("B-X"), sym("C-X")], [sym("D-X")]]
    wanted = [sym(s) for s in ("A-X", "B-X", "C-X", "D-X", "E-X", "F-X", "G-X")]
    shards, uncovered = reshard(current, wanted, 3, 2)
    assert names(shards) == [["A-X", "B-X", "C-X"], ["D-X", "E-X", "F-X"]]
    assert [s.symbol for s in uncovered] == ["G-X"]


def test_reshard_tighter_limits_trim_shards():
    current = [[sym("A-X"), sym("B-X"), sym("C-X")], [sym("D-X")], [sym("E-X")]]
    wanted = [sym(s) for s in ("A-X", "B-X", "C-X", "D-X", "E-X")]
    shards, uncovered = reshard(current, wanted, 2, 2)
    assert names(shards) == [["A-X", "B-X"], ["D-X", "C-X"]]
    assert [s.symbol for s in uncovered] == ["E-X"]


def test_reshard_of_nothing_running_is_the_balanced_split():
    wanted = [sym("S%d-X" % i) for i in range(11)]
    assert reshard([], wanted, 4, 5) == split_shards(wanted, 4, 5)
    assert reshard([], wanted, 2, 3) == split_shards(wanted, 2, 3)


def test_reshard_a_symbol_relisted_differently_changes_its_shard():
    current = [[sym("A-X", "AX-OLD")]]
    shards, _ = reshard(current, [sym("A-X", "AX-NEW")], 2, 5)
    assert tuple(shards[0]) != tuple(current[0])


# -- plan_reload ---------------------------------------------------------------------------------


def settings_from(tmp_path, doc: dict, name="logger.yaml"):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh)
    return load_settings(path, {}, None, check_resources=False)


def base_doc(tmp_path) -> dict:
    return {
        "logger": {"data_path": os.path.join(str(tmp_path), "data")},
        "exchanges": {
            "binance": {"enabled": True, "symbols": ["BTC-USDT"]},
            "coinbase": {"enabled": True, "symbols": ["BTC-USD"]},
            "kraken": {"enabled": False},
        },
    }


def test_plan_sorts_each_exchange_change_into_its_kind(tmp_path):
    old = settings_from(tmp_path, base_doc(tmp_path), "old.yaml")
    doc = base_doc(tmp_path)
    doc["exchanges"]["binance"]["symbols"] = ["BTC-USDT", "ETH-USDT"]
    doc["exchanges"]["coinbase"]["silence_timeout_secs"] = 12.0
    doc["exchanges"]["kraken"]["enabled"] = True
    new = settings_from(tmp_path, doc, "new.yaml")
    plan = plan_reload(old, new)
    assert plan.reshard == ["binance"]
    assert plan.replace == ["coinbase"]
    assert plan.started == ["kraken"]
    assert plan.stopped == [] and plan.ignored == []
    assert plan.settings.exchange("binance").symbols == ("BTC-USDT", "ETH-USDT")
    assert "exchanges.coinbase.silence_timeout_secs" in plan.changes


def test_plan_stops_disabled_exchanges_and_touches_nothing_for_a_threshold(tmp_path):
    old = settings_from(tmp_path, base_doc(tmp_path), "old.yaml")
    doc = base_doc(tmp_path)
    doc["exchanges"]["coinbase"]["enabled"] = False
    doc["exchanges"]["binance"]["large_trade_notional"] = {"BTC-USDT": 1e6}
    plan = plan_reload(old, settings_from(tmp_path, doc, "new.yaml"))
    assert plan.stopped == ["coinbase"]
    assert plan.reshard == plan.replace == plan.started == []
    assert dict(plan.settings.exchange("binance").large_trade_notional) == {"BTC-USDT": 1e6}


def test_plan_applies_live_logger_keys_and_keeps_the_others_until_restart(tmp_path):
    old = settings_from(tmp_path, base_doc(tmp_path), "old.yaml")
    doc = base_doc(tmp_path)
    doc["logger"].update({"data_path": "/elsewhere", "health_check_port": 9999, "large_trade_notional": 5e5,
                          "stall_timeout_secs": 7.0})
    plan = plan_reload(old, settings_from(tmp_path, doc, "new.yaml"))
    assert sorted(plan.ignored) == ["logger.data_path", "logger.health_check_port"]
    lg = plan.settings.logger
    assert lg.data_path == old.logger.data_path and lg.health_check_port == old.logger.health_check_port
    assert lg.large_trade_notional == 5e5 and lg.stall_timeout_secs == 7.0


def test_plan_of_the_same_file_is_empty(tmp_path):
    old = settings_from(tmp_path, base_doc(tmp_path), "old.yaml")
    assert plan_reload(old, dataclasses.replace(old)).empty


def test_a_retired_process_is_never_started_again():
    m = ProcessState("t", Backoff(1.0, 8.0, random.Random(1)))
    m.on_started(0.0)
    m.on_tick(2.0, healthy_run=10)
    assert m.state is State.RUNNING
    m.retire()
    assert m.state is State.RETIRING and not m.due(1e9)
    assert m.on_exit(0, 3.0) == float("inf")
    assert m.state is State.RETIRED and not m.due(1e9) and m.restarts == 0
    idle = ProcessState("u", Backoff(1.0, 8.0, random.Random(1)))
    idle.retire()
    assert idle.state is State.RETIRED and not idle.due(1e9)


# -- the real service ----------------------------------------------------------------------------


@pytest.fixture
def fakes():
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT", "SOL-USDT"], mode="script", ping_interval=1.0) as binance, \
            FakeCoinbase(symbols=["BTC-USD"], mode="script") as coinbase:
        yield binance, coinbase


def write_config(svc: Service, config: dict) -> None:
    tmp = svc.config_path + ".new"
    with open(tmp, "w") as fh:
        yaml.safe_dump(config, fh)
    os.replace(tmp, svc.config_path)


def reload(svc: Service, config: dict | str) -> int:
    """Write the new config, SIGHUP, and wait until the supervisor has dealt with it; returns its log offset."""
    mark = len(svc.log_text())
    if isinstance(config, str):
        with open(svc.config_path, "w") as fh:
            fh.write(config)
    else:
        write_config(svc, config)
    svc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "received SIGHUP" in svc.log_text()[mark:], timeout=10, what="the reload to be logged")
    return mark


def shard_map(svc: Service) -> dict:
    """``{(exchange, symbols count, shard number): (pid, state)}``."""
    return {(s["exchange"], s["symbols"], s["shard"]): (s["pid"], s["state"]) for s in svc.shards()}


def push(fake, symbol: str, n: int) -> None:
    for _ in range(n):
        fake.push_trade(symbol)


@pytest.mark.slow
def test_sighup_restarts_only_changed_shards_and_refuses_a_bad_config(tmp_path, fakes):
    binance, coinbase = fakes
    data = os.path.join(str(tmp_path), "data")
    config = {"logger": fast_logger(data),
              "exchanges": {"binance": fast_section(binance, ["BTC-USDT", "ETH-USDT"], symbols_per_connection=2),
                            "coinbase": fast_section(coinbase)}}
    with service(tmp_path, config) as svc:
        svc.wait_all_connected(2)
        before = shard_map(svc)
        assert set(before) == {("binance", 2, 0), ("coinbase", 1, 0)}
        coinbase_conns = coinbase.accepted
        push(binance, "BTC-USDT", 5)

        # 1. A symbol added: a new shard for it; the running shards are not touched.
        config["exchanges"]["binance"]["symbols"] = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
        reload(svc, config)
        svc.wait_all_connected(3)
        after = shard_map(svc)
        assert after[("binance", 2, 0)] == before[("binance", 2, 0)]
        assert after[("coinbase", 1, 0)] == before[("coinbase", 1, 0)]
        assert after[("binance", 1, 1)][1] == "running"
        wait_for(lambda: "solusdt@trade" in binance.subscribed_streams(), what="SOL-USDT subscribed")
        assert coinbase.accepted == coinbase_conns  # not even a reconnect
        push(binance, "BTC-USDT", 5)
        push(binance, "SOL-USDT", 3)

        # 2. A bad file is refused, named, and changes nothing.
        mark = reload(svc, "logger:\n  bogus_key: 1\n")
        wait_for(lambda: "new configuration refused" in svc.log_text()[mark:], what="the refusal")
        assert "bogus_key" in svc.log_text()[mark:]
        assert shard_map(svc) == after
        assert svc.proc.poll() is None

        # 3. A connection setting changed: that exchange's every shard is replaced, even with the same symbols.
        config["exchanges"]["coinbase"]["silence_timeout_secs"] = 12.0
        reload(svc, config)
        wait_for(lambda: shard_map(svc).get(("coinbase", 1, 1), (0, ""))[1] == "running"
                 and ("coinbase", 1, 0) not in shard_map(svc), what="coinbase's shard replaced")
        assert coinbase.accepted > coinbase_conns
        replaced = shard_map(svc)
        assert replaced[("coinbase", 1, 1)][0] != after[("coinbase", 1, 0)][0]
        assert {k: v for k, v in replaced.items() if k[0] == "binance"} == {
            k: v for k, v in after.items() if k[0] == "binance"}
        after = replaced

        # 4. An exchange disabled, a symbol dropped, a key that needs a restart.
        config["exchanges"]["coinbase"]["enabled"] = False
        config["exchanges"]["binance"]["symbols"] = ["BTC-USDT", "SOL-USDT"]
        config["logger"]["flush_interval_secs"] = 0.3
        mark = reload(svc, config)
        svc.wait_all_connected(2)
        final = shard_map(svc)
        # BTC-USDT's shard was replaced (a new number: the old one was still stopping when it started).
        assert set(final) == {("binance", 1, 1), ("binance", 1, 2)}
        assert final[("binance", 1, 1)] == after[("binance", 1, 1)]  # SOL-USDT's shard kept running
        assert "coinbase" not in svc.health()[1]["exchanges"]
        wait_for(lambda: not coinbase.open_connections(), what="coinbase connection closed")
        assert "logger.flush_interval_secs changed but applies only when the service restarts" in svc.log_text()[mark:]
        wait_for(lambda: binance.subscribed_streams() >= {"btcusdt@trade", "solusdt@trade"}
                 and "ethusdt@trade" not in binance.subscribed_streams(), what="binance streams after the reload")
        push(binance, "BTC-USDT", 5)
        push(binance, "SOL-USDT", 3)
        sent = {s: [t for t in binance.sent_trades if t["s"] == s.replace("-", "")] for s in ("BTC-USDT", "SOL-USDT")}
        wait_for(lambda: sum(s["records"] for s in svc.shards() if s["symbols"] == 1) >= 8, what="last trades")
        assert svc.stop() == 0
        log_text = svc.log_text()
        assert "Traceback" not in log_text and "restart 1" not in log_text  # nothing crashed on the way
        # Every trade of the shard kept running is on disk, in order, once; so are the restarted shard's.
        for symbol, trades in sent.items():
            assert read_rows(data, "binance", symbol, "TRADES", today()) == [binance_trade(t) for t in trades]
        assert_tables_whole(data)
