"""Waiting on facts: the one place a test polls."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float = 20.0, interval: float = 0.05, what: str = "", explain=None):
    """Call ``condition()`` until it returns something true, and return that.

    ``timeout`` bounds the wait; running out of it is a failure that names ``what`` (default: the condition's
    name) and the last value seen, never a reason to go on. ``interval`` is the pause between two calls
    (0 for a condition that blocks by itself, such as one that reads a socket with a timeout). ``explain``,
    if given, is called on a timeout and what it returns is added to the failure (a log, a page's state).
    """
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            message = "timed out after %.0f s waiting for %s (last: %r)" % (
                timeout, what or getattr(condition, "__name__", "a condition"), last)
            raise AssertionError(message + ("\n" + str(explain()) if explain else ""))
        if interval:
            time.sleep(interval)
