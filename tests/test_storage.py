"""Columnar files: layout, all-or-nothing appends, repair of torn tables, the reader."""

import os
import struct

import pytest

from mdlogger import records as rec
from mdlogger.reader import dump_csv, open_table, read_rows
from mdlogger.storage import TableFiles, TableKey, column_path, repair_all, repair_table, table_rows


def test_paths_follow_the_contract(tmp_path):
    key = TableKey("binance", "BTC-USDT", rec.KIND_TRADES, "24.11.26")
    path = column_path(str(tmp_path), key, rec.TRADE_COLUMNS[0])
    assert path == os.path.join(str(tmp_path), "binance", "BTC-USDT", "TRADES", "id.24.11.26.bin")
    with pytest.raises(ValueError):
        column_path(str(tmp_path), TableKey("binance", "../../x", rec.KIND_MD, "24.11.26"), rec.MD_COLUMNS[0])
    with pytest.raises(ValueError):
        column_path(str(tmp_path), TableKey("nyse", "BTC-USDT", rec.KIND_MD, "24.11.26"), rec.MD_COLUMNS[0])


def write_md(tmp_path, rows):
    key = TableKey("binance", "ETH-USDT", rec.KIND_MD, "24.11.26")
    files = TableFiles(str(tmp_path), key)
    cols = list(zip(*rows))
    blobs = [struct.pack("<%d%s" % (len(v), c.code), *v) for c, v in zip(rec.MD_COLUMNS, cols)]
    files.append(blobs, len(rows))
    files.close()
    return key


def test_append_and_read_back_exactly(tmp_path):
    rows = [(1795478400 + i, i * 1000, 100.5 + i, 0.25, 0, 100.0, 101.0) for i in range(10)]
    key = write_md(tmp_path, rows)
    with open_table(str(tmp_path), "binance", "ETH-USDT", "MD", "2026-11-24", numpy=False) as t:
        assert t.rows == 10
        assert list(t["time"]) == [r[0] for r in rows]
        assert list(t["price"]) == [r[2] for r in rows]
    assert table_rows(str(tmp_path), key) == {c.name: 10 for c in rec.MD_COLUMNS}


def test_numpy_columns(tmp_path):
    np = pytest.importorskip("numpy")
    write_md(tmp_path, [(1795478400, 5, 1.5, 2.5, 1, 1.0, 2.0)])
    with open_table(str(tmp_path), "binance", "ETH-USDT", "MD", "24.11.26", numpy=True) as t:
        assert t["price"].dtype == np.dtype("<f4") and t["price"][0] == 1.5


def test_repair_cuts_every_column_to_the_shortest_whole_row(tmp_path, caplog):
    key = write_md(tmp_path, [(1795478400 + i, 0, 1.0, 1.0, 0, 1.0, 1.0) for i in range(5)])
    # A crash mid-flush: one column got 2 more rows and half of a third, another one half a row.
    with open(column_path(str(tmp_path), key, rec.MD_COLUMNS[0]), "ab") as fh:
        fh.write(b"\1" * 10)
    with open(column_path(str(tmp_path), key, rec.MD_COLUMNS[3]), "ab") as fh:
        fh.write(b"\1" * 2)
    cut = repair_table(str(tmp_path), key)
    assert cut == {"time": 10, "volume": 2}
    assert set(table_rows(str(tmp_path), key).values()) == {5}
    assert repair_table(str(tmp_path), key) == {}
    assert repair_all(str(tmp_path)) == []


def test_missing_column_counts_as_zero_rows(tmp_path):
    key = write_md(tmp_path, [(1795478400, 0, 1.0, 1.0, 0, 1.0, 1.0)])
    os.unlink(column_path(str(tmp_path), key, rec.MD_COLUMNS[6]))
    repaired = repair_all(str(tmp_path), {"24.11.26"})
    assert len(repaired) == 1
    assert set(table_rows(str(tmp_path), key).values()) == {0}


def test_reader_ignores_a_torn_tail(tmp_path):
    key = write_md(tmp_path, [(1795478400, 0, 1.0, 1.0, 0, 1.0, 1.0)] * 3)
    with open(column_path(str(tmp_path), key, rec.MD_COLUMNS[2]), "ab") as fh:
        fh.write(b"\0" * 6)
    assert len(read_rows(str(tmp_path), "binance", "ETH-USDT", "MD", "24.11.26")) == 3


def test_dump_csv(tmp_path, capsys):
    import io

    write_md(tmp_path, [(1795478400, 7, 1.5, float("nan"), 2, 1.0, 2.0)])
    out = io.StringIO()
    assert dump_csv(str(tmp_path), "binance", "ETH-USDT", "MD", "2026-11-24", out) == 1
    assert out.getvalue().splitlines() == [
        "time,nanos,price,volume,side,best_bid,best_ask",
        "1795478400,7,1.5,nan,2,1.0,2.0",
    ]
