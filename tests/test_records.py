"""Exact time arithmetic and record layouts."""

import struct

import pytest

from mdlogger import records as rec


def test_decimal_seconds_exact():
    assert rec.from_decimal_seconds("1795544258.898149") == (1795544258, 898149000)
    assert rec.from_decimal_seconds("1618678145.715785") == (1618678145, 715785000)
    assert rec.from_decimal_seconds("1618678145") == (1618678145, 0)
    assert rec.from_decimal_seconds("1618678145.123456789") == (1618678145, 123456789)


@pytest.mark.parametrize("bad", ["", "abc", "1.2.3", "-5.1", "1e9", " 12.5", None, 12.5])
def test_decimal_seconds_refuses_garbage(bad):
    with pytest.raises(ValueError):
        rec.from_decimal_seconds(bad)


def test_millis_and_micros():
    assert rec.from_millis(1672515782136) == (1672515782, 136000000)
    assert rec.from_millis("1652459224956") == (1652459224, 956000000)
    assert rec.from_micros(1672515782136123) == (1672515782, 136123000)


def test_iso8601_exact():
    assert rec.from_iso8601("2022-12-01T00:00:00.122581Z") == (1669852800, 122581000)
    assert rec.from_iso8601("2021-04-17T16:43:37.089723Z") == (1618677817, 89723000)
    assert rec.from_iso8601("1970-01-01T00:00:00Z") == (0, 0)
    assert rec.from_iso8601("2024-02-29T23:59:59.999999999Z") == (1709251199, 999999999)
    assert rec.from_iso8601("2022-12-01T02:00:00.5+02:00") == (1669852800, 500000000)


@pytest.mark.parametrize("bad", ["2022-13-01T00:00:00Z", "yesterday", "2022-12-01", "", None])
def test_iso8601_refuses_garbage(bad):
    with pytest.raises(ValueError):
        rec.from_iso8601(bad)


def test_day_strings_are_utc():
    assert rec.day_string(1669852800) == "01.12.22"
    assert rec.day_string(1669852799) == "30.11.22"
    assert rec.day_string(1795544258) == "24.11.26"  # 2026-11-24T18:17:38Z
    assert rec.date_to_day_string("2026-11-24") == "24.11.26"
    assert rec.day_index("24.11.26") * 86400 <= 1795478400 < (rec.day_index("24.11.26") + 1) * 86400


def test_symbol_rules():
    assert rec.symbol_bytes("BTC-USDT") == b"BTC-USDT"
    for bad in ["../../x", "", "btc-usdt", "BTC_USDT", "BTC-USDT-X", "ÄBC-USD", "BTC-", "-USD", "A" * 20 + "-" + "B" * 10]:
        with pytest.raises(ValueError):
            rec.symbol_bytes(bad)


def test_wire_layouts_follow_the_columns():
    assert rec.TRADE_WIRE.size == 24 + 8 + 4 + 4 + 4 + 4 + 4 + 16 + 16
    assert rec.MD_WIRE.size == 24 + 4 + 4 + 4 + 4 + 4 + 4 + 4
    assert [c.width for c in rec.TRADE_COLUMNS] == [8, 4, 4, 4, 4, 4, 16, 16]
    assert [c.width for c in rec.MD_COLUMNS] == [4] * 7
    row = rec.TRADE_WIRE.pack(b"BTC-USDT", 7, 1, 2, 1.5, 2.5, 1, b"m" * 16, b"t" * 16)
    assert struct.unpack_from("<Q", row, 24)[0] == 7
