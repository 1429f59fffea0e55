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

from ..exchanges import registry

_loaded = False


def load_fakes() -> None:
    """Import every module of this package once (their fake classes register themselves)."""
    global _loaded
    if not _loaded:
        registry.import_package(__name__, __path__)
        _loaded = True


def fake_class(exchange: str):
    """The fake server class of an exchange."""
    load_fakes()
    try:
        return registry.FAKES[exchange]
    except KeyError:
        raise ValueError("no fake for exchange %r (have: %s)" % (exchange, ", ".join(sorted(registry.FAKES)))) from None


def fake_names() -> tuple[str, ...]:
    """Every exchange that has a fake, in name order."""
    load_fakes()
    return tuple(sorted(registry.FAKES))


def __getattr__(name: str):
    if name == "FAKES":  # {exchange: fake class}, every fake module loaded
        load_fakes()
        return registry.FAKES
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
