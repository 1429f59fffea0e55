"""Loopback fake exchanges that speak each exchange's real protocol.

Used by the tests, the demo (`mdlogger-supervisor demo`) and the benchmark.
Run one on its own with ``python -m mdlogger.fakes binance --port 0``.
"""

from __future__ import annotations


def fake_class(exchange: str):
    """The fake server class for an exchange name."""
    from .binance import FakeBinance

    fakes = {"binance": FakeBinance}
    try:
        return fakes[exchange]
    except KeyError:
        raise ValueError("no fake for exchange %r (have: %s)" % (exchange, ", ".join(sorted(fakes)))) from None
