"""Loopback fake exchanges that speak each exchange's real protocol.

Used by the tests, the demo (`mdlogger-supervisor demo`) and the benchmark.
Run one on its own with ``python -m mdlogger.fakes binance --port 0``.

A fake is a subclass of :class:`mdlogger.fakes.base.FakeExchange` whose
``name`` is the exchange it fakes; it registers itself in the exchange
registry (mdlogger/exchanges/registry.py) when its class is created. Every
module of this package is imported the first time a fake is looked up, so a
new fake is found without being listed anywhere.
"""

from __future__ import annotations


def fake_class(exchange: str):
    """The fake server class for an exchange name."""
    from ..exchanges.registry import fake_class as lookup

    return lookup(exchange)


def __getattr__(name: str):
    if name == "FAKES":  # {exchange: fake class}, every fake module loaded
        from ..exchanges import registry

        registry.load_fakes()
        return registry.FAKES
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
