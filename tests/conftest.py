"""Shared fixtures; tests/ on sys.path, so test modules import what they share from ``helpers``."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mdlogger.exchanges import base  # noqa: E402


@pytest.fixture
def old_times(monkeypatch):
    """Captured and documented messages are years old: accept their times."""
    monkeypatch.setattr(base, "MAX_PAST_SECS", 10 * 365 * 86400)
