"""Columnar files: layout, all-or-nothing appends, repair of torn tables, the reader."""

import os
import struct

import pytest

from mdlogger import records as rec
from mdlogger.reader import dump_csv, open_table, read_rows
from mdlogger.storage import (TableFiles, TableKey, column_path, last_trades, pack_column, read_columns,
                              record_columns, repair_all, repair_table, table_rows)


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


def write_trades(tmp_path, n):
    key = TableKey("binance", "BTC-USDT", rec.KIND_TRADES, "24.11.26")
    rows = [(100 + i, 1795478400 + i, i, 10.5 + i, 0.25, 1 + i % 2, bytes([i]) * 16, rec.ZERO_ID) for i in range(n)]
    files = TableFiles(str(tmp_path), key)
    files.append([pack_column(c, v) for c, v in zip(rec.TRADE_COLUMNS, zip(*rows))], n)
    files.close()
    return key, rows


def test_one_column_reader_for_storage_reader_and_analytics(tmp_path):
    key, rows = write_trades(tmp_path, 6)
    ids, makers = read_columns(str(tmp_path), key, ("id", "maker_order_id"), 2, 5)
    assert ids == (102, 103, 104) and makers == (b"\2" * 16, b"\3" * 16, b"\4" * 16)
    assert read_columns(str(tmp_path), key, ("price",), 6, 6) == [()]
    assert read_rows(str(tmp_path), "binance", "BTC-USDT", "TRADES", "24.11.26") == rows
    with open_table(str(tmp_path), "binance", "BTC-USDT", "TRADES", "24.11.26", numpy=False) as t:
        assert [tuple(t[c.name][i] for c in rec.TRADE_COLUMNS) for i in range(t.rows)] == rows  # the mapped view agrees
    assert last_trades(str(tmp_path), key, 2) == [(104, 1795478404, 4), (105, 1795478405, 5)]
    assert last_trades(str(tmp_path), key, 10, ("side",)) == [(r[5],) for r in rows]


def test_read_rows_of_a_missing_table_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such column file"):
        read_rows(str(tmp_path), "binance", "BTC-USDT", "TRADES", "24.11.26")
    with pytest.raises(ValueError):
        read_rows(str(tmp_path), "binance", "BTC-USDT", "BOOK", "24.11.26")


@pytest.mark.parametrize("kind", [rec.KIND_TRADES, rec.KIND_MD])
@pytest.mark.parametrize("n", [1, 2, 3, 48, 1000])
def test_record_columns_are_the_packed_columns_of_the_rows(kind, n):
    import random

    rnd = random.Random(n)
    wire = rec.WIRE[kind]

    def value(code):
        if code == "f":
            return rnd.choice((0.1, 1e30, -2.5, float("inf"), float("nan"), 3.0))
        if code == "16s":
            return rnd.randbytes(16)
        return rnd.getrandbits(64 if code == "Q" else 32)

    rows = [(b"BTC-USDT",) + tuple(value(c.code) for c in rec.COLUMNS[kind]) for _ in range(n)]
    records = bytearray(b"".join(wire.pack(*r) for r in rows))
    got = [bytes(memoryview(c).cast("B")) for c in record_columns(kind, records)]
    unpacked = list(zip(*wire.iter_unpack(records)))[1:]
    assert got == [pack_column(c, v) for c, v in zip(rec.COLUMNS[kind], unpacked)]
    with pytest.raises(ValueError):
        record_columns(kind, records + b"\0")
