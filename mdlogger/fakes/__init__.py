"""Loopback fake exchanges that speak each exchange's real protocol.

Used by the tests, the demo (`mdlogger-supervisor demo`) and the benchmark.
Run one on its own with ``python -m mdlogger.fakes binance --port 0``.
"""

from __future__ import annotations

import importlib

FAKES = {
    "binance": ("binance", "FakeBinance"),
    "bitfinex": ("bitfinex", "FakeBitfinex"),
    "coinbase": ("coinbase", "FakeCoinbase"),
    "kraken": ("kraken", "FakeKraken"),
    "okx": ("okx", "FakeOkx"),
}


def fake_class(exchange: str):
    """The fake server class for an exchange name."""
    try:
        module, cls = FAKES[exchange]
    except KeyError:
        raise ValueError("no fake for exchange %r (have: %s)" % (exchange, ", ".join(sorted(FAKES)))) from None
    return getattr(importlib.import_module("." + module, __name__), cls)
