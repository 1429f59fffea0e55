"""Shared fixtures: adapters built from default settings, a permissive clock for old captures."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mdlogger.exchanges import adapter_for, base  # noqa: E402
from mdlogger.exchanges.base import SymbolInfo  # noqa: E402
from mdlogger.settings import load_settings  # noqa: E402


def make_adapter(name: str):
    """An exchange's adapter with its default settings."""
    settings = load_settings(None, {}, {"exchanges.%s.enabled" % name: True}, check_resources=False)
    return adapter_for(settings.exchange(name))


def normalized_session(adapter, names, sink):
    """A session for symbols given in the exchange's spelling (normalized by the adapter)."""
    syms = [SymbolInfo(adapter.normalize(n), n, *adapter.normalize(n).split("-")) for n in names]
    return adapter.new_session(syms, sink)


@pytest.fixture
def old_times(monkeypatch):
    """Captured and documented messages are years old: accept their times."""
    monkeypatch.setattr(base, "MAX_PAST_SECS", 10 * 365 * 86400)
