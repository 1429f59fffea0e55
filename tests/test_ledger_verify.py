"""The gap ledger, sealed days (manifests) and the ``verify`` / ``gaps`` commands."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mdlogger import records as rec
from mdlogger.cli import main
from mdlogger.ledger import Gap, GapLedger, iso_nanos, ledger_path, read_gaps
from mdlogger.seal import days_to_seal, is_sealed, manifest_path, seal_day
from mdlogger.storage import TableFiles, TableKey, column_path, pack_column
from mdlogger.verify import consecutive_ids_by_exchange, verify_day

DAY0 = 1795478400  # 2026-11-24T00:00:00Z
DAY = "24.11.26"
DATE = "2026-11-24"
MAKER = bytes(range(16))
TAKER = bytes(range(16, 32))
TRADES = rec.KIND_TRADES
CONSECUTIVE = consecutive_ids_by_exchange()  # as the adapters declare: binance, coinbase, okx True


def write_trades(root, exchange, symbol, rows, day=DAY):
    """Append TRADES rows ``(id, sec, nanos)`` (price etc. filled in) to one table-day."""
    full = [(i, sec, nanos, 100.0 + n, 0.5, 1 + n % 2, MAKER, TAKER) for n, (i, sec, nanos) in enumerate(rows)]
    key = TableKey(exchange, symbol, TRADES, day)
    files = TableFiles(str(root), key)
    try:
        files.append([pack_column(c, v) for c, v in zip(rec.TRADE_COLUMNS, zip(*full))], len(full))
    finally:
        files.close()
    return key


def write_md(root, exchange, symbol, times, day=DAY):
    rows = [(sec, nanos, 1.5, 2.5, 0, 1.0, 2.0) for sec, nanos in times]
    key = TableKey(exchange, symbol, rec.KIND_MD, day)
    files = TableFiles(str(root), key)
    try:
        files.append([pack_column(c, v) for c, v in zip(rec.MD_COLUMNS, zip(*rows))], len(rows))
    finally:
        files.close()
    return key


def id_rows(ids, start=DAY0 + 3600):
    return [(i, start + n, n * 1000) for n, i in enumerate(ids)]


def gap(exchange="binance", symbol="BTC-USDT", from_id=5, to_id=9, from_sec=DAY0 + 3604, to_sec=DAY0 + 3605, **kw):
    base = dict(gap="g-%s-%d" % (symbol, from_id), exchange=exchange, symbol=symbol, from_id=from_id, from_sec=from_sec,
                from_nanos=4000, to_id=to_id, to_sec=to_sec, to_nanos=5000, why="reconnect", detected_at=DAY0 + 3606.5)
    base.update(kw)
    return Gap(**base)


def clean_day(root):
    write_trades(root, "binance", "BTC-USDT", id_rows(range(1, 11)))
    write_trades(root, "kraken", "ETH-USD", [(0, DAY0 + 10 + n // 3, n) for n in range(9)])  # equal seconds, nanos rising
    write_md(root, "binance", "BTC-USDT", [(DAY0 + 5, 0), (DAY0 + 4, 0)])  # MD rows: receive order, not checked


def run_cli(args, env=None):
    return CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)


@pytest.fixture(autouse=True)
def no_config(tmp_path, monkeypatch):
    """No config file anywhere: the commands must live on --data-path alone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MDLOGGER_CONFIG", raising=False)
    monkeypatch.delenv("LOGGER_DATA_PATH", raising=False)


# --------------------------------------------------------------------------
# The ledger


def test_gap_line_has_iso_times_with_nanos_and_raw_numbers():
    g = gap(from_sec=DAY0 + 36000, to_sec=DAY0 + 36001)
    g.from_nanos = 123456789
    d = json.loads(g.to_json())
    assert "\n" not in g.to_json()
    assert d["from"] == "2026-11-24T10:00:00.123456789Z" and d["to"] == "2026-11-24T10:00:01.000005000Z"
    assert (d["from_id"], d["from_sec"], d["from_nanos"]) == (5, DAY0 + 36000, 123456789)
    assert d["fate"] == "pending" and d["missing"] is None and d["trades"] == 0
    assert Gap.from_dict(d) == g
    assert iso_nanos(0, 7) == "1970-01-01T00:00:00.000000007Z"


def test_record_appends_lines_and_read_gaps_keeps_the_latest_state(tmp_path):
    clock = iter([100.0, 200.0, 300.0, 400.0])
    ledger = GapLedger(str(tmp_path), clock=lambda: next(clock))
    first = gap()
    # starts at 23:59:59 of the day, ends the next day: it belongs to the day of its start
    second = gap(symbol="ETH-USDT", from_id=70, to_id=90, from_sec=DAY0 + 86399, to_sec=DAY0 + 86400 + 30, why="id_jump")
    ledger.record(first)
    ledger.record(second)
    first.fate, first.trades, first.missing, first.detail = "filled", 3, 0, "rest 1 page"
    first.updated_at = 300.0  # the caller stamps a change; 0 would be stamped with the ledger's clock
    ledger.record(first)
    ledger.sync()
    ledger.record(gap(exchange="okx", symbol="BTC-USDT"))
    ledger.close()
    path = ledger_path(str(tmp_path), "binance", DAY)
    assert path == os.path.join(str(tmp_path), "binance", "gaps.24.11.26.jsonl")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert len(open(path).read().splitlines()) == 3
    got = read_gaps(str(tmp_path), "binance", DAY)
    assert [g["gap"] for g in got] == [first.gap, second.gap]
    assert (got[0]["fate"], got[0]["trades"], got[0]["missing"], got[0]["updated_at"]) == ("filled", 3, 0, 300.0)
    assert got[1]["fate"] == "pending" and got[1]["updated_at"] == 200.0
    assert read_gaps(str(tmp_path), "binance", DATE) == got
    assert [g["exchange"] for g in read_gaps(str(tmp_path), "okx", DAY)] == ["okx"]
    assert read_gaps(str(tmp_path), "coinbase", DAY) == []


def test_record_refuses_unknown_values(tmp_path):
    with GapLedger(str(tmp_path)) as ledger:
        with pytest.raises(ValueError):
            ledger.record(gap(why="because"))
        with pytest.raises(ValueError):
            ledger.record(gap(fate="lost"))
        with pytest.raises(ValueError):
            ledger.record(gap(exchange="../x"))


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_a_new_line(tmp_path):
    with GapLedger(str(tmp_path)) as ledger:
        ledger.record(gap())
    path = ledger_path(str(tmp_path), "binance", DAY)
    whole = gap(symbol="ETH-USDT").to_json()
    with open(path, "a") as fh:  # a crash in the middle of a line
        fh.write(whole[: len(whole) // 2])
    assert [g["symbol"] for g in read_gaps(str(tmp_path), "binance", DAY)] == ["BTC-USDT"]
    with GapLedger(str(tmp_path)) as ledger:  # the writer again, after its restart
        ledger.record(gap(symbol="SOL-USDT"))
    assert [g["symbol"] for g in read_gaps(str(tmp_path), "binance", DAY)] == ["BTC-USDT", "SOL-USDT"]


# --------------------------------------------------------------------------
# Sealing


def test_seal_day_writes_a_complete_manifest(tmp_path):
    root = str(tmp_path)
    clean_day(tmp_path)
    write_trades(tmp_path, "binance", "ETH-USDT", [])  # a table with files but no rows
    with GapLedger(root) as ledger:
        ledger.record(gap())
    assert not is_sealed(root, "binance", DAY)
    path = seal_day(root, "binance", DAY, now=DAY0 + 86400 + 600)
    assert path == manifest_path(root, "binance", DAY) == os.path.join(root, "binance", "manifest.24.11.26.json")
    assert is_sealed(root, "binance", DATE) and not is_sealed(root, "kraken", DAY)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(os.path.dirname(path))) == ["BTC-USDT", "ETH-USDT", "gaps.24.11.26.jsonl", "manifest.24.11.26.json"]
    doc = json.load(open(path))
    assert (doc["exchange"], doc["day"], doc["sealed_at"]) == ("binance", DAY, DAY0 + 86400 + 600)
    tables = {(t["symbol"], t["table"]): t for t in doc["tables"]}
    assert sorted(tables) == [("BTC-USDT", "MD"), ("BTC-USDT", "TRADES"), ("ETH-USDT", "TRADES")]
    t = tables["BTC-USDT", "TRADES"]
    assert (t["rows"], t["first_id"], t["last_id"]) == (10, 1, 10)
    assert (t["first_sec"], t["first_nanos"], t["last_sec"], t["last_nanos"]) == (DAY0 + 3600, 0, DAY0 + 3609, 9000)
    assert t["first_time"] == "2026-11-24T01:00:00.000000000Z"
    assert [f["name"] for f in t["files"]] == ["%s.24.11.26.bin" % c.name for c in rec.TRADE_COLUMNS]
    id_file = column_path(root, TableKey("binance", "BTC-USDT", TRADES, DAY), rec.TRADE_COLUMNS[0])
    import hashlib

    assert t["files"][0] == {"name": "id.24.11.26.bin", "bytes": 80, "sha256": hashlib.sha256(open(id_file, "rb").read()).hexdigest()}
    md = tables["BTC-USDT", "MD"]
    assert md["rows"] == 2 and "first_id" not in md and md["first_sec"] == DAY0 + 5 and md["last_sec"] == DAY0 + 4
    empty = tables["ETH-USDT", "TRADES"]
    assert empty["rows"] == 0 and empty["first_id"] is None and empty["first_time"] is None
    assert [g["gap"] for g in doc["gaps"]] == ["g-BTC-USDT-5"]


def test_a_failed_seal_leaves_no_manifest_and_no_temp_file(tmp_path, monkeypatch):
    clean_day(tmp_path)
    root = str(tmp_path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        seal_day(root, "binance", DAY)
    assert not is_sealed(root, "binance", DAY)
    assert [n for n in os.listdir(os.path.join(root, "binance")) if n.startswith(".")] == []
    monkeypatch.undo()
    seal_day(root, "binance", DAY)
    first = open(manifest_path(root, "binance", DAY)).read()
    seal_day(root, "binance", DAY, now=1.0)  # sealing again replaces it whole
    assert json.loads(open(manifest_path(root, "binance", DAY)).read())["sealed_at"] == 1.0 != json.loads(first)["sealed_at"]


def test_days_to_seal_waits_for_the_end_of_the_day_plus_grace(tmp_path):
    root = str(tmp_path)
    for back in range(0, 10):  # today and the nine days before it
        d = DAY0 - back * 86400
        write_trades(tmp_path, "binance", "BTC-USDT", id_rows([1 + back], start=d + 60), day=rec.day_string(d))
    write_trades(tmp_path, "okx", "BTC-USDT", id_rows([1], start=DAY0 - 86400 + 60), day=rec.day_string(DAY0 - 86400))
    yesterday, before = rec.day_string(DAY0 - 86400), rec.day_string(DAY0 - 2 * 86400)
    got = days_to_seal(root, now=DAY0 + 599)  # yesterday ended 599 s ago: still in grace
    assert ("binance", yesterday) not in got and ("okx", yesterday) not in got
    assert got == [("binance", rec.day_string(DAY0 - b * 86400)) for b in range(7, 1, -1)]
    got = days_to_seal(root, now=DAY0 + 600)
    assert got == [("binance", rec.day_string(DAY0 - b * 86400)) for b in range(7, 0, -1)] + [("okx", yesterday)]
    seal_day(root, "binance", before)
    assert ("binance", before) not in days_to_seal(root, now=DAY0 + 600)
    assert days_to_seal(root, now=DAY0 + 600, days_back=1) == [("binance", yesterday), ("okx", yesterday)]
    assert days_to_seal(root, now=DAY0 + 30, grace_secs=60, days_back=1) == []


# --------------------------------------------------------------------------
# verify


def test_verify_clean_day_exits_0(tmp_path):
    clean_day(tmp_path)
    result = run_cli(["verify", "--data-path", str(tmp_path), DATE])
    assert result.exit_code == 0, result.output
    assert result.output == "ok: 3 tables on 2 exchanges checked\n"


def test_verify_sealed_clean_day_exits_0(tmp_path):
    clean_day(tmp_path)
    seal_day(str(tmp_path), "binance", DAY)
    seal_day(str(tmp_path), "kraken", DAY)
    result = run_cli(["verify", "--data-path", str(tmp_path), DATE])
    assert (result.exit_code, result.output) == (0, "ok: 3 tables on 2 exchanges checked\n")


def test_an_id_jump_needs_a_covering_gap_in_the_ledger(tmp_path):
    root = str(tmp_path)
    write_trades(tmp_path, "binance", "BTC-USDT", id_rows([1, 2, 3, 4, 5, 9, 10]))
    write_trades(tmp_path, "okx", "BTC-USDT", id_rows([1, 2, 5]))
    result = run_cli(["verify", "--data-path", root, DATE])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "binance/BTC-USDT/TRADES/id.24.11.26.bin: ids 6..8 missing (3 ids, rows 4-5) and no gap in the ledger covers them",
        "okx/BTC-USDT/TRADES/id.24.11.26.bin: ids 3..4 missing (2 ids, rows 1-2) and no gap in the ledger covers them",
    ]
    with GapLedger(root) as ledger:
        ledger.record(gap(symbol="ETH-USDT"))  # another symbol: does not count
        ledger.record(gap(from_id=5, to_id=8))  # does not reach id 9
    assert len(verify_day(root, DAY, CONSECUTIVE)) == 2
    with GapLedger(root) as ledger:
        ledger.record(gap(gap="covering", from_id=4, to_id=9, fate="unrecoverable", missing=3))
        ledger.record(gap(gap="okx", exchange="okx", from_id=2, to_id=5, fate="empty"))
    result = run_cli(["verify", "--data-path", root, DATE])
    assert (result.exit_code, result.output) == (0, "ok: 2 tables on 2 exchanges checked\n")
    # where ids are not consecutive (bitfinex), a jump is no problem
    assert verify_day(root, DAY, {"binance": False, "okx": False}) == []


def test_a_jump_from_the_previous_day_is_checked_and_a_gap_started_that_day_covers_it(tmp_path):
    root = str(tmp_path)
    prev = rec.day_string(DAY0 - 86400)
    write_trades(tmp_path, "binance", "BTC-USDT", id_rows([1, 2, 3], start=DAY0 - 10), day=prev)
    write_trades(tmp_path, "binance", "BTC-USDT", id_rows([7, 8], start=DAY0 + 100))
    assert verify_day(root, DAY, CONSECUTIVE) == [
        "binance/BTC-USDT/TRADES/id.24.11.26.bin: ids 4..6 missing (3 ids, row 0 after the last row of 23.11.26)"
        " and no gap in the ledger covers them"
    ]
    with GapLedger(root) as ledger:
        ledger.record(gap(from_id=3, to_id=7, from_sec=DAY0 - 8, to_sec=DAY0 + 100))
    assert os.path.exists(ledger_path(root, "binance", prev))
    assert verify_day(root, DAY, CONSECUTIVE) == []


def test_verify_finds_a_flipped_byte_in_a_sealed_day(tmp_path):
    root = str(tmp_path)
    clean_day(tmp_path)
    seal_day(root, "binance", DAY)
    price = column_path(root, TableKey("binance", "BTC-USDT", TRADES, DAY), rec.TRADE_COLUMNS[3])
    with open(price, "r+b") as fh:
        fh.seek(13)
        b = fh.read(1)
        fh.seek(13)
        fh.write(bytes([b[0] ^ 0x40]))
    result = run_cli(["verify", "--data-path", root, DATE])
    assert result.exit_code == 1
    assert result.output == ("binance/BTC-USDT/TRADES/price.24.11.26.bin: sha256 differs from"
                             " binance/manifest.24.11.26.json (changed since the day was sealed)\n")


def test_verify_compares_the_files_of_a_sealed_day_with_its_manifest(tmp_path):
    root = str(tmp_path)
    clean_day(tmp_path)
    seal_day(root, "binance", DAY)
    write_trades(tmp_path, "binance", "ETH-USDT", id_rows([1]))  # arrived after sealing
    md = TableKey("binance", "BTC-USDT", rec.KIND_MD, DAY)
    with open(column_path(root, md, rec.MD_COLUMNS[2]), "ab") as fh:  # grew after sealing
        fh.write(b"\0" * 4)
    problems = verify_day(root, DAY, CONSECUTIVE)
    assert "binance/BTC-USDT/MD/price.24.11.26.bin: 12 bytes, binance/manifest.24.11.26.json says 8" in problems
    assert "binance/ETH-USDT/TRADES/id.24.11.26.bin: on disk but not in binance/manifest.24.11.26.json" in problems
    assert "binance/BTC-USDT/MD/time.24.11.26.bin: 2 rows; the table's longest column holds 3" in problems
    os.unlink(column_path(root, TableKey("binance", "BTC-USDT", TRADES, DAY), rec.TRADE_COLUMNS[7]))
    problems = verify_day(root, DAY, CONSECUTIVE)
    assert ("binance/BTC-USDT/TRADES/taker_order_id.24.11.26.bin: listed in binance/manifest.24.11.26.json"
            " but not on disk") in problems
    assert ("binance/BTC-USDT/TRADES/taker_order_id.24.11.26.bin: missing (counts as 0 rows);"
            " the table's longest column holds 10") in problems
    with open(manifest_path(root, "binance", DAY), "w") as fh:
        fh.write('{"tables": [')
    problems = verify_day(root, DAY, CONSECUTIVE)
    assert problems[0].startswith("binance/manifest.24.11.26.json: unreadable manifest: ")


def test_verify_finds_a_truncated_column(tmp_path):
    root = str(tmp_path)
    clean_day(tmp_path)
    size = column_path(root, TableKey("binance", "BTC-USDT", TRADES, DAY), rec.TRADE_COLUMNS[4])
    os.truncate(size, 4 * 9 + 1)
    result = run_cli(["verify", "--data-path", root, DATE])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "binance/BTC-USDT/TRADES/size.24.11.26.bin: 37 bytes is not a whole number of 4-byte rows (9 rows and 1 bytes over)",
        "binance/BTC-USDT/TRADES/size.24.11.26.bin: 9 rows; the table's longest column holds 10",
    ]


def test_verify_finds_a_duplicated_row(tmp_path):
    root = str(tmp_path)
    write_trades(tmp_path, "binance", "BTC-USDT", id_rows(list(range(1, 11)) + [5]))
    write_trades(tmp_path, "coinbase", "BTC-USD", id_rows([1, 2, 2, 3]))
    result = run_cli(["verify", "--data-path", root, DATE])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "binance/BTC-USDT/TRADES/id.24.11.26.bin: 1 rows out of order by id (first: row 10, id 5 after 10)",
        "binance/BTC-USDT/TRADES/id.24.11.26.bin: 1 duplicate ids (1 extra rows; e.g. id 5 at rows 4 and 10)",
        "coinbase/BTC-USD/TRADES/id.24.11.26.bin: 1 duplicate ids (1 extra rows; e.g. id 2 at rows 1 and 2)",
    ]


def test_verify_orders_rows_without_ids_by_time(tmp_path):
    root = str(tmp_path)
    write_trades(tmp_path, "kraken", "BTC-USD", [(0, DAY0 + 5, 10), (0, DAY0 + 5, 10), (0, DAY0 + 5, 9), (0, DAY0 + 6, 0)])
    write_trades(tmp_path, "bitfinex", "BTC-USD", [(5, DAY0 + 5, 0), (0, DAY0 + 6, 0), (9, DAY0 + 7, 0)])
    assert verify_day(root, DAY, CONSECUTIVE) == [
        "bitfinex/BTC-USD/TRADES/id.24.11.26.bin: 1 rows with id 0 among rows with ids (first at row 1)",
        "bitfinex/BTC-USD/TRADES/id.24.11.26.bin: 1 rows out of order by id (first: row 1, id 0 after 5)",
        "kraken/BTC-USD/TRADES/time.24.11.26.bin: 1 rows out of order by time"
        " (first: row 2, 1795478405.000000009 after 1795478405.000000010)",
    ]


def test_verify_without_data_or_with_a_bad_day(tmp_path):
    result = run_cli(["verify", "--data-path", str(tmp_path), DATE])
    assert result.exit_code == 1 and "no tables for 2026-11-24" in result.output
    result = run_cli(["verify", "--data-path", str(tmp_path / "nope"), DATE])
    assert result.exit_code == 1 and "no data directory" in result.output
    result = run_cli(["verify", "--data-path", str(tmp_path), "24.11.26"])
    assert result.exit_code == 2 and "YYYY-MM-DD" in result.output


def test_verify_reads_the_data_path_of_a_config_with_no_exchange_enabled(tmp_path):
    clean_day(tmp_path / "data")
    config = tmp_path / "logger.yaml"
    config.write_text("logger:\n  data_path: %s\n  health_check_port: 99999999\n" % (tmp_path / "data"))
    result = run_cli(["--config", str(config), "verify", DATE])
    assert (result.exit_code, result.output) == (0, "ok: 3 tables on 2 exchanges checked\n")
    result = run_cli(["verify", DATE], env={"LOGGER_DATA_PATH": str(tmp_path / "data")})
    assert result.exit_code == 0


def test_python_m_mdlogger_verify(tmp_path):
    clean_day(tmp_path)
    write_trades(tmp_path, "binance", "ETH-USDT", id_rows([1, 3]))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.pop("MDLOGGER_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "mdlogger", "verify", "--data-path", str(tmp_path), DATE],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ("binance/ETH-USDT/TRADES/id.24.11.26.bin: ids 2..2 missing (1 ids, rows 0-1)"
                           " and no gap in the ledger covers them\n")


# --------------------------------------------------------------------------
# gaps


def test_gaps_prints_the_ledger_as_an_aligned_table(tmp_path):
    root = str(tmp_path)
    with GapLedger(root, clock=lambda: 1.0) as ledger:
        g = gap(from_sec=DAY0 + 36000, to_sec=DAY0 + 36060)
        ledger.record(g)
        g.fate, g.trades, g.missing, g.detail = "filled", 3, 0, "1 page"
        ledger.record(g)
        ledger.record(gap(gap="k", exchange="kraken", symbol="ETH-USD", from_id=0, to_id=0, why="restart",
                          from_sec=DAY0 + 7200, to_sec=DAY0 + 7300, fate="unrecoverable", detail="REST gave nothing"))
    result = run_cli(["gaps", "--data-path", root, DATE])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "exchange  symbol    from                               to                                 why        fate           trades  missing  detail",
        "binance   BTC-USDT  2026-11-24T10:00:00.000004000Z #5  2026-11-24T10:01:00.000005000Z #9  reconnect  filled              3        0  1 page",
        "kraken    ETH-USD   2026-11-24T02:00:00.000004000Z     2026-11-24T02:01:40.000005000Z     restart    unrecoverable       0        -  REST gave nothing",
    ]
    result = run_cli(["gaps", "--data-path", root, "--exchange", "kraken", DATE])
    assert [line.split()[0] for line in result.output.splitlines()] == ["exchange", "kraken"]
    result = run_cli(["gaps", "--data-path", root, "2026-11-25"])
    assert (result.exit_code, result.output) == (0, "no gaps recorded for 2026-11-25\n")
