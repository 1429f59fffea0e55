"""What a new operator meets: the command line (--version, -h, --config anywhere, MDLOGGER_CONFIG, no
config file), read commands without an enabled exchange, dump's float32 text, the demo's temp file,
process titles, file modes, and the documents that must name every key, limit and pinned version."""

from __future__ import annotations

import configparser
import decimal
import os
import pathlib
import re
import signal
import stat
import struct
import subprocess
import sys

import pytest
import yaml
from helpers import service_for, wait_for

import mdlogger
from mdlogger import records as rec
from mdlogger import storage
from mdlogger.fakes.binance import FakeBinance
from mdlogger.ledger import Gap, GapLedger, ledger_path
from mdlogger.reader import float32_text
from mdlogger.seal import seal_day
from mdlogger.settings import EXCHANGE_RULES, LOGGER_RULES, ConfigError, load_settings
from mdlogger.storage import TableFiles, TableKey, pack_column

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY0 = 1795478400  # 2026-11-24T00:00:00Z
DATE, DAY = "2026-11-24", "24.11.26"


def cli(*args, cwd, env=None, timeout=60):
    """``python -m mdlogger ARGS`` from ``cwd`` on this checkout, without LOGGER_* or MDLOGGER_CONFIG from outside."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LOGGER_") and k != "MDLOGGER_CONFIG"}
    full["PYTHONPATH"] = ROOT
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "mdlogger", *args], cwd=str(cwd), env=full, capture_output=True,
                          text=True, timeout=timeout)


def write_config(path, data_path, enabled=()) -> str:
    path.write_text(yaml.safe_dump({"logger": {"data_path": str(data_path)},
                                    "exchanges": {"binance": {"enabled": "binance" in enabled}}}))
    return str(path)


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def write_trades(root, prices_sizes, symbol="BTC-USDT") -> None:
    rows = [(1 + n, DAY0 + 3600 + n, 0, price, size, 1, bytes(16), bytes(16))
            for n, (price, size) in enumerate(prices_sizes)]
    files = TableFiles(str(root), TableKey("binance", symbol, rec.KIND_TRADES, DAY))
    try:
        files.append([pack_column(c, v) for c, v in zip(rec.TRADE_COLUMNS, zip(*rows))], len(rows))
    finally:
        files.close()


# -- the command line ----------------------------------------------------------------------------------


def test_version_and_short_help(tmp_path):
    proc = cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "mdlogger-supervisor %s" % mdlogger.__version__
    for args in (["-h"], ["dump", "-h"], ["run", "-h"]):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), (args, proc.stderr)
    assert "--config" in cli("gaps", "-h", cwd=tmp_path).stdout


def test_config_after_the_command_and_from_mdlogger_config(tmp_path):
    a = write_config(tmp_path / "a.yaml", tmp_path / "data-a")
    b = write_config(tmp_path / "b.yaml", tmp_path / "data-b")
    proc = cli("gaps", DATE, "--config", a, cwd=tmp_path)
    assert proc.returncode == 1 and "no data directory %s" % (tmp_path / "data-a") in proc.stderr, proc.stderr
    proc = cli("--config", b, "verify", DATE, "--config", a, cwd=tmp_path)  # the later one wins
    assert proc.returncode == 1 and "no data directory %s" % (tmp_path / "data-a") in proc.stderr, proc.stderr
    proc = cli("gaps", DATE, cwd=tmp_path, env={"MDLOGGER_CONFIG": b})
    assert proc.returncode == 1 and "no data directory %s" % (tmp_path / "data-b") in proc.stderr, proc.stderr
    proc = cli("run", "--config", a, cwd=tmp_path)  # read: nothing is enabled in it
    assert proc.returncode == 2 and a in proc.stderr and "enabled: true" in proc.stderr


@pytest.mark.skipif(os.path.exists("/etc/mdlogger/logger.yaml"), reason="this machine has /etc/mdlogger/logger.yaml")
def test_run_without_a_configuration_file_says_where_it_looked(tmp_path):
    for args in ([], ["run"]):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "no configuration file found (looked in %s, /etc/mdlogger/logger.yaml)" \
            % (tmp_path / "etc" / "logger.yaml") in proc.stderr, proc.stderr
        assert "MDLOGGER_CONFIG" in proc.stderr and "enabled" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_read_commands_need_no_enabled_exchange_and_dump_prints_short_float32(tmp_path):
    data = tmp_path / "data"
    write_trades(data, [(87014.55, 0.2104), (131072.01, 1e-05), (0.1, 3.0)])
    config = write_config(tmp_path / "logger.yaml", data)  # binance: enabled: false, the only section
    dump = cli("dump", "binance", "BTC-USDT", "TRADES", DATE, "--config", config, cwd=tmp_path)
    assert dump.returncode == 0, dump.stderr
    lines = dump.stdout.splitlines()
    assert lines[0].split(",")[:5] == ["id", "time", "nanos", "price", "size"]
    assert [line.split(",")[3:5] for line in lines[1:]] == [["87014.55", "0.2104"], ["131072.02", "1e-05"],
                                                           ["0.1", "3.0"]]
    assert "87014.546875" not in dump.stdout and "0.2104000002" not in dump.stdout
    gaps = cli("gaps", DATE, "--config", config, cwd=tmp_path)
    assert gaps.returncode == 0 and "no gaps recorded" in gaps.stdout, gaps.stderr
    verify = cli("verify", DATE, "--config", config, cwd=tmp_path)
    assert verify.returncode == 0 and verify.stdout.startswith("ok: 1 tables"), verify.stdout + verify.stderr


def test_float32_text_is_the_shortest_decimal_that_round_trips():
    import random

    rng = random.Random(7)
    patterns = [rng.getrandbits(32) for _ in range(3000)] + [0x3F800000, 0x00000001, 0x7F7FFFFF, 0x80000000]
    for bits in patterns:
        value = struct.unpack("<I", struct.pack("<I", bits))[0]
        x = struct.unpack("<f", struct.pack("<I", value))[0]
        if x != x or x in (float("inf"), float("-inf")):
            continue
        text = float32_text(x)
        assert f32(float(text)) == x, (bits, text)
        digits = len(decimal.Decimal(text).normalize().as_tuple().digits)  # significant digits
        if digits > 1:  # one digit fewer never reads back as the same float32
            assert f32(float("%.*g" % (digits - 1, x))) != x, (bits, text)
    assert float32_text(f32(87014.55)) == "87014.55" and float32_text(f32(0.2104)) == "0.2104"
    assert float32_text(float("nan")) == "nan"


# -- the demo ----------------------------------------------------------------------------------------


def test_demo_leaves_nothing_in_the_temp_directory(tmp_path):
    tmp = tmp_path / "tmp"  # (however long: the supervisor finds a short directory for the forkserver's socket)
    tmp.mkdir()
    log = tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGGER_")}
    env.update(TMPDIR=str(tmp), PYTHONPATH=ROOT)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mdlogger", "demo", "--exchanges", "binance", "--health-port",
                                 "0", "--data-path", str(tmp_path / "demo-data")], stdout=out, stderr=subprocess.STDOUT,
                                cwd=str(tmp_path), env=env, start_new_session=True)
    try:
        wait_for(lambda: "health on http://" in log.read_text(), timeout=60, what="the demo's health server")
        assert list(tmp.glob("mdlogger-demo-*.yaml"))  # its configuration, while it runs
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert sorted(os.listdir(tmp)) == []


# -- a running service: process titles, file modes ------------------------------------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("svc")
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT"], mode="steady", rate=20, ping_interval=1.0) as fake, \
            service_for(tmp_path, fake) as svc:
        svc.wait_all_connected(1)
        yield svc
        assert svc.stop() == 0


def title(pid: int) -> str:
    with open("/proc/%d/cmdline" % pid, "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()


@pytest.mark.slow
def test_process_titles(running):
    pids = running.pids()
    assert title(running.proc.pid) == "mdlogger: supervisor"
    assert title(pids["writer"]) == "mdlogger: writer"
    assert title(pids["binance#0"]) == "mdlogger: worker binance#0"
    titles = [title(p.pid) for p in running.children()]
    assert "mdlogger: writer" in titles and "mdlogger: worker binance#0" in titles


@pytest.mark.slow
def test_data_files_are_0640_and_directories_0750(running):
    data = running.data_path
    wait_for(lambda: list(pathlib.Path(data, "binance").glob("*/TRADES/price.*.bin")), timeout=30,
             what="trades on disk")
    modes = {}
    for top, dirs, files in os.walk(data):
        for name in dirs + files:
            path = os.path.join(top, name)
            modes[os.path.relpath(path, data)] = stat.S_IMODE(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o750
    columns = [p for p in modes if p.endswith(".bin")]
    assert columns and all(modes[p] == 0o640 for p in columns), modes
    assert all(modes[p] == 0o640 for p in modes if os.path.isfile(os.path.join(data, p))), modes
    assert all(modes[p] == 0o750 for p in modes if os.path.isdir(os.path.join(data, p))), modes


def test_file_mode_applies_to_tables_ledger_and_manifests_whatever_the_umask(tmp_path):
    old_umask = os.umask(0o077)  # stricter than the mode asked for: the mode still wins
    try:
        storage.set_file_mode(0o660)
        write_trades(tmp_path, [(100.0, 1.0)])
        with GapLedger(str(tmp_path)) as ledger:
            ledger.record(Gap(gap="g1", exchange="binance", symbol="BTC-USDT", from_id=1, from_sec=DAY0 + 3600,
                              from_nanos=0, to_id=3, to_sec=DAY0 + 3601, to_nanos=0, why="reconnect",
                              detected_at=DAY0 + 3602.0))
        manifest = seal_day(str(tmp_path), "binance", DAY, now=DAY0 + 86400 + 600)
    finally:
        storage.set_file_mode(storage.DEFAULT_FILE_MODE)
        os.umask(old_umask)
    mode = lambda *p: stat.S_IMODE(os.stat(os.path.join(str(tmp_path), *p)).st_mode)  # noqa: E731
    assert mode("binance") == mode("binance", "BTC-USDT") == mode("binance", "BTC-USDT", "TRADES") == 0o770
    assert mode("binance", "BTC-USDT", "TRADES", "price.%s.bin" % DAY) == 0o660
    assert mode(ledger_path(str(tmp_path), "binance", DAY)) == 0o660
    assert mode(manifest) == 0o660


def test_file_mode_key(tmp_path):
    def load(value=None, env=None):
        path = tmp_path / "f.yaml"
        doc = {"exchanges": {"binance": {"enabled": True}}, "logger": {}}
        if value is not None:
            doc["logger"]["file_mode"] = value
        path.write_text(yaml.safe_dump(doc))
        return load_settings(str(path), env or {}, None, check_resources=False).logger.file_mode

    assert load() == 0o640
    assert load("0660") == 0o660 and load("644") == 0o644 and load("0o600") == 0o600
    assert load(env={"LOGGER_FILE_MODE": "0644"}) == 0o644
    assert storage.dir_mode_for(0o640) == 0o750 and storage.dir_mode_for(0o644) == 0o755
    assert storage.dir_mode_for(0o660) == 0o770 and storage.dir_mode_for(0o600) == 0o700
    for bad in ("0755", "0440", "04640", "rw-r-----", "", 416):
        with pytest.raises(ConfigError, match=r"logger\.file_mode: expected a quoted octal file mode"):
            load(bad)


# -- the documents ------------------------------------------------------------------------------------------


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as fh:
        return fh.read()


def test_readme_documents_every_setting_and_mdlogger_config():
    text = readme()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    first_cells = [line.split(" | ")[0] for line in rows]  # "| `logger.a` / `b`"

    def named(prefix: str) -> set:
        out = set()
        for cell in first_cells:
            names = re.findall(r"`([^`]+)`", cell)
            if names and names[0].startswith(prefix):
                out |= {n.rsplit(".", 1)[-1] for n in names}
        return out

    missing = sorted(set(LOGGER_RULES) - named("logger.")) + sorted(set(EXCHANGE_RULES) - named("exchanges."))
    assert not missing, missing
    assert "MDLOGGER_CONFIG" in table and "logger.file_mode" in table


def test_readme_commands_after_try_it_use_the_venv_or_say_how_to_activate_it():
    text = readme().split("## Try it", 1)[1]
    assert "source .venv/bin/activate" in text
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    bare = [line for block in blocks for line in block.splitlines()
            if re.match(r"\s*(sudo\s+)?(mdlogger-supervisor|pip|python)\b", line)]
    assert not bare, bare  # in code blocks: .venv/bin/..., /opt/mdlogger/bin/... or python3 -m venv


def test_unit_limits_are_set_and_documented():
    with open(os.path.join(ROOT, "etc", "mdlogger.service")) as fh:
        unit = fh.read()
    for key in ("MemoryMax", "TasksMax", "UMask", "StateDirectoryMode"):
        assert re.search(r"^%s=\S+" % key, unit, re.M), key
        assert key + "=" in readme(), key
    assert "UMask=0027" in unit


def test_constraints_pin_every_runtime_dependency_and_are_used():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    required = [re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
                for line in cfg["options"]["install_requires"].strip().splitlines() if line.strip()]
    with open(os.path.join(ROOT, "constraints.txt")) as fh:
        pins = dict(line.strip().split("==", 1) for line in fh if line.strip() and not line.startswith("#"))
    pinned = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pinned.values()), pins
    assert set(required) <= set(pinned), sorted(set(required) - set(pinned))
    assert "mdlogger" not in pinned and "pytest" not in pinned and "hypothesis" not in pinned
    with open(os.path.join(ROOT, "Dockerfile")) as fh:
        assert "constraints.txt" in fh.read()
    assert "pip install -c constraints.txt" in readme()
