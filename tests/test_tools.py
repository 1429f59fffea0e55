"""Operator commands against the fake: check_symbols.py, symbols, test, dump."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from mdlogger.fakes import fake_class, fake_names
from mdlogger.fakes.binance import FakeBinance

from helpers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake():
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT"], mode="steady", rate=50, ping_interval=1.0) as server:
        yield server


def config(tmp_path, fake, symbols):
    path = tmp_path / "logger.yaml"
    path.write_text(yaml.safe_dump({
        "logger": {"data_path": str(tmp_path / "data"), "health_check_port": 0},
        "exchanges": {"binance": fake.config_section(symbols)},
    }))
    return str(path)


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_check_symbols_all_ok(tmp_path, fake):
    proc = run("scripts/check_symbols.py", "binance", "--config", config(tmp_path, fake, ["BTC-USDT", "ETHUSDT"]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["BTC-USDT", "ok", "BTCUSDT"]
    assert lines[2].split() == ["ETHUSDT", "ok", "ETHUSDT"]


def test_check_symbols_reports_unknown_and_inactive(tmp_path, fake):
    proc = run("scripts/check_symbols.py", "binance", "--config", config(tmp_path, fake, ["BTC-USDT", "NOPE-USDT", "OLD-BTC"]))
    assert proc.returncode == 1
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:]}
    assert rows == {"BTC-USDT": ["ok", "BTCUSDT"], "NOPE-USDT": ["unknown", "-"], "OLD-BTC": ["inactive", "OLDBTC"]}


def test_check_symbols_unreachable_exchange(tmp_path, fake):
    cfg = config(tmp_path, fake, ["BTC-USDT"])
    fake.rest_status_override = 404
    proc = run("scripts/check_symbols.py", "binance", "--config", cfg)
    assert proc.returncode == 3 and "HTTP 404" in proc.stderr


def test_symbols_command(tmp_path, fake):
    proc = run("-m", "mdlogger", "--config", config(tmp_path, fake, []), "symbols", "binance")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["symbol", "exchange", "name"]
    btc = next(line.split() for line in lines if line.startswith("BTC-USDT"))
    assert btc == ["BTC-USDT", "BTCUSDT", "BTC", "USDT", "yes", "0.01000000", "0.00001000"]
    assert any(line.split()[4] == "no" for line in lines[1:])


def test_test_command_prints_records(tmp_path, fake):
    proc = run("-m", "mdlogger", "--config", config(tmp_path, fake, ["BTC-USDT", "ETH-USDT"]), "test", "binance",
               "--count", "5", "--timeout", "10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("TRADES") + proc.stdout.count("MD ") >= 5 and "OK: " in proc.stdout


def test_test_command_fails_when_nothing_arrives(tmp_path):
    with FakeBinance(symbols=["BTC-USDT"], mode="idle", ping_interval=1.0) as idle:
        proc = run("-m", "mdlogger", "--config", config(tmp_path, idle, ["BTC-USDT"]), "test", "binance", "--timeout", "2")
    assert proc.returncode == 1 and "nothing parsed within 2 s" in proc.stdout


def test_test_command_fails_when_unreachable(tmp_path, fake):
    cfg = config(tmp_path, fake, ["BTC-USDT"])
    text = open(cfg).read().replace(fake.url_ws, "ws://127.0.0.1:1")
    open(cfg, "w").write(text)
    proc = run("-m", "mdlogger", "--config", cfg, "test", "binance", "--timeout", "2")
    assert proc.returncode == 1 and "cannot connect" in proc.stdout


def test_dump_unknown_table_day(tmp_path):
    proc = run("-m", "mdlogger", "dump", "binance", "BTC-USDT", "TRADES", "2026-01-01", "--data-path", str(tmp_path))
    assert proc.returncode == 1 and "no such column file" in proc.stderr


def test_demo_runs_every_simulated_exchange(tmp_path):
    """The README's first command: the service on the built-in fakes, files appear, /health answers."""
    import re
    import signal

    from mdlogger.fakes import FAKES

    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mdlogger", "demo", "--health-port", "0", "--rate", "20",
                                 "--data-path", str(tmp_path / "demo-data")], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
    try:
        port = int(wait_for(lambda: re.search(r"health on http://[\d.]+:(\d+)/health", log.read_text()),
                            timeout=30, what="health server").group(1))

        def healthy():
            import json
            import urllib.error
            import urllib.request

            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError:
                return None

        doc = wait_for(healthy, timeout=60, what="HTTP 200")
        assert sorted(doc["exchanges"]) == sorted(FAKES)
        def trades_stored(exchange):
            return any(p.stat().st_size for p in (tmp_path / "demo-data" / exchange).glob("*/TRADES/price.*.bin"))

        wait_for(lambda: all(trades_stored(x) for x in FAKES), timeout=30, what="trades of every exchange on disk")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    from mdlogger.storage import iter_tables, table_rows

    tables = list(iter_tables(str(tmp_path / "demo-data")))
    assert {key.exchange for key in tables} == set(FAKES)
    for key in tables:  # a clean stop leaves every table whole
        assert len(set(table_rows(str(tmp_path / "demo-data"), key).values())) == 1, key


@pytest.mark.parametrize("exchange", fake_names())
def test_symbols_and_test_commands_on_every_exchange(tmp_path, exchange):
    with fake_class(exchange)(mode="steady", rate=50) as server:
        path = tmp_path / "logger.yaml"
        symbols = list(server.symbols)[:2]
        path.write_text(yaml.safe_dump({
            "logger": {"data_path": str(tmp_path / "data"), "health_check_port": 0},
            "exchanges": {exchange: server.config_section(symbols)},
        }))
        listed = run("-m", "mdlogger", "--config", str(path), "symbols", exchange)
        assert listed.returncode == 0, listed.stderr
        assert {line.split()[0] for line in listed.stdout.splitlines()[1:]} >= set(symbols)
        proc = run("-m", "mdlogger", "--config", str(path), "test", exchange, "--count", "4", "--timeout", "15")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "OK: " in proc.stdout


def test_check_symbols_runs_in_the_installed_environment_from_a_bare_python(tmp_path):
    """Started by an interpreter without mdlogger's dependencies, it re-runs itself with the checkout's venv."""
    script = os.path.join(ROOT, "scripts", "check_symbols.py")
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.access(venv_python, os.X_OK):
        pytest.skip("no .venv in the checkout (the README's set-up makes one)")
    env = {k: v for k, v in os.environ.items() if k != "MDLOGGER_REEXEC"}
    # -S: no site-packages, so requests and yaml are missing, as under a bare system python3.
    proc = subprocess.run([sys.executable, "-S", script, "nosuchexchange"], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr  # argparse ran: the dependencies loaded
    env["MDLOGGER_REEXEC"] = "1"  # as if the venv had been tried already: a clear message, exit 2 (not 1)
    proc = subprocess.run([sys.executable, "-S", script, "binance"], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "is not installed" in proc.stderr
