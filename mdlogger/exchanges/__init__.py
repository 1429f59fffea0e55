"""Exchange adapters, one module per exchange, registered by name."""

from __future__ import annotations

from .base import Exchange
from .binance import Binance
from .bitfinex import Bitfinex
from .coinbase import Coinbase
from .kraken import Kraken
from .okx import Okx

ADAPTERS: dict[str, type[Exchange]] = {cls.name: cls for cls in (Coinbase, Binance, Bitfinex, Kraken, Okx)}


def adapter_for(settings) -> Exchange:
    """The adapter instance for one exchange's settings."""
    try:
        cls = ADAPTERS[settings.name]
    except KeyError:
        raise ValueError("no adapter for exchange %r" % (settings.name,)) from None
    return cls(settings)
