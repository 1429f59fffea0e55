"""Exchange adapters, one module per exchange, each registering itself by name.

Importing this package imports every module in it, then the modules named in
``MDLOGGER_EXCHANGE_MODULES`` (see mdlogger/exchanges/registry.py): adding an
exchange is adding its adapter module (and its fake in mdlogger/fakes/), and
nothing else; docs/ARCHITECTURE.md has the checklist.
"""

from __future__ import annotations

from . import registry
from .base import Exchange
from .registry import ADAPTERS, adapter_class, exchange_names

__all__ = ["ADAPTERS", "Exchange", "adapter_class", "adapter_for", "exchange_names"]

registry.import_package(__name__, __path__)
registry.import_extra_modules()


def adapter_for(settings) -> Exchange:
    """The adapter instance for one exchange's settings."""
    return adapter_class(settings.name)(settings)
