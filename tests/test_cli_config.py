"""Bad configuration: one line naming the file, the key and what was expected; exit 2; nothing started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import yaml


def run_cli(tmp_path, config, *args, env=None):
    path = os.path.join(str(tmp_path), "bad.yaml")
    with open(path, "w") as fh:
        if isinstance(config, str):
            fh.write(config)
        else:
            yaml.safe_dump(config, fh)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LOGGER_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "mdlogger", "--config", path, *args],
                          capture_output=True, text=True, timeout=60, env=full_env)
    return proc, path


def good(tmp_path, **logger):
    lg = {"data_path": os.path.join(str(tmp_path), "data"), "health_check_port": 0}
    lg.update(logger)
    return {"logger": lg, "exchanges": {"binance": {"enabled": True, "symbols": ["BTC-USDT"]}}}


def with_binance(tmp_path, **binance):
    cfg = good(tmp_path)
    cfg["exchanges"]["binance"].update(binance)
    return cfg


CASES = [
    ("unknown top key", lambda t: dict(good(t), extra=1), "extra", "unknown key"),
    ("unknown logger key", lambda t: good(t, buffer_sise=5), "logger.buffer_sise", "unknown key"),
    ("unknown exchange key", lambda t: with_binance(t, max_conections=3), "exchanges.binance.max_conections", "unknown key"),
    ("unknown exchange", lambda t: dict(good(t), exchanges={"nyse": {"enabled": True}}), "exchanges.nyse", "unknown exchange"),
    ("string for int", lambda t: good(t, buffer_size="big"), "logger.buffer_size", "expected a positive integer"),
    ("bool for int", lambda t: with_binance(t, max_connections=True), "exchanges.binance.max_connections", "integer"),
    ("float for int", lambda t: with_binance(t, max_connections=2.5), "exchanges.binance.max_connections", "integer"),
    ("int for bool", lambda t: with_binance(t, enabled=1), "exchanges.binance.enabled", "true or false"),
    ("zero limit", lambda t: with_binance(t, max_connections=0), "exchanges.binance.max_connections", "positive"),
    ("negative limit", lambda t: with_binance(t, symbols_per_connection=-3), "exchanges.binance.symbols_per_connection", "positive"),
    ("non-positive delay", lambda t: with_binance(t, reconnect_delay_secs=0), "exchanges.binance.reconnect_delay_secs", "positive"),
    ("non-positive flush", lambda t: good(t, flush_interval_secs=-1), "logger.flush_interval_secs", "positive"),
    ("malformed ws url", lambda t: with_binance(t, ws_endpoint="http//x"), "exchanges.binance.ws_endpoint", "ws:// or wss://"),
    ("wrong ws scheme", lambda t: with_binance(t, ws_endpoint="https://stream.binance.com"), "exchanges.binance.ws_endpoint", "ws://"),
    ("malformed rest url", lambda t: with_binance(t, rest_endpoint="api.binance.com"), "exchanges.binance.rest_endpoint", "http://"),
    ("symbols not a list", lambda t: with_binance(t, symbols="BTC-USDT"), "exchanges.binance.symbols", "list"),
    ("max below min delay", lambda t: with_binance(t, reconnect_delay_secs=5, max_reconnect_delay_secs=1),
     "exchanges.binance.max_reconnect_delay_secs", "at least"),
    ("nothing enabled", lambda t: {"logger": good(t)["logger"], "exchanges": {"binance": {"enabled": False}}}, "exchanges", "at least one"),
]


@pytest.mark.parametrize("name,make,key,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_with_one_line(tmp_path, name, make, key, expected):
    proc, path = run_cli(tmp_path, make(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert path in lines[0] and key + ":" in lines[0] and expected in lines[0], lines[0]
    assert not os.path.exists(os.path.join(str(tmp_path), "data", "binance"))


def test_invalid_yaml(tmp_path):
    proc, path = run_cli(tmp_path, "logger: [unclosed\n")
    assert proc.returncode == 2 and path in proc.stderr and "invalid YAML" in proc.stderr


def test_file_that_is_not_utf8(tmp_path):
    path = os.path.join(str(tmp_path), "latin1.yaml")
    with open(path, "wb") as fh:
        fh.write(b"logger:\n  data_path: caf\xe9\n")
    proc = subprocess.run([sys.executable, "-m", "mdlogger", "--config", path], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and path in proc.stderr and "expected UTF-8 text, got byte 0xe9" in proc.stderr


def test_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mdlogger", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and "no such file" in proc.stderr


def test_unwritable_data_path(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc, path = run_cli(tmp_path, good(tmp_path, data_path=str(afile / "sub")))
    assert proc.returncode == 2
    assert path in proc.stderr and "logger.data_path" in proc.stderr and "writable" in proc.stderr


def test_port_in_use(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    try:
        proc, path = run_cli(tmp_path, good(tmp_path, health_check_port=port))
    finally:
        sock.close()
    assert proc.returncode == 2
    assert "logger.health_check_port" in proc.stderr and "port %d on 127.0.0.1 is in use" % port in proc.stderr


def test_bad_environment_value_names_the_variable(tmp_path):
    proc, _ = run_cli(tmp_path, good(tmp_path), env={"LOGGER_EXCHANGES_BINANCE_MAX_CONNECTIONS": "three"})
    assert proc.returncode == 2
    assert "environment variable LOGGER_EXCHANGES_BINANCE_MAX_CONNECTIONS" in proc.stderr
    assert "exchanges.binance.max_connections" in proc.stderr


def test_unknown_environment_variable(tmp_path):
    proc, _ = run_cli(tmp_path, good(tmp_path), env={"LOGGER_BUFER_SIZE": "5"})
    assert proc.returncode == 2 and "LOGGER_BUFER_SIZE" in proc.stderr and "unknown key" in proc.stderr


def test_unknown_exchange_on_the_command_line(tmp_path):
    proc, _ = run_cli(tmp_path, good(tmp_path), "run", "--exchanges", "binance,nyse")
    assert proc.returncode == 2 and "--exchanges" in proc.stderr and "nyse" in proc.stderr
