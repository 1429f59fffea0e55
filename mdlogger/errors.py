"""Errors shared by modules that must not import each other (settings and the exchange registry)."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, rendered as one line: where it comes from, the key, what was expected."""

    def __init__(self, source: str, key: str, message: str):
        super().__init__("%s: %s: %s" % (source, key, message))
        self.source = source
        self.key = key
        self.message = message
