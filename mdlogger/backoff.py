"""Capped, jittered exponential backoff that resets after a healthy run."""

from __future__ import annotations

import random


class Backoff:
    """Delays ``base * 2**n`` capped at ``cap``, each drawn in [d/2, d] (equal jitter).

    Never gives up: callers retry at the capped delay for as long as the
    service runs. ``reset()`` after a healthy run starts again from ``base``.
    """

    def __init__(self, base: float, cap: float, rng: random.Random | None = None):
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap, got base=%r cap=%r" % (base, cap))
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The un-jittered delay of the next attempt."""
        return min(self.cap, self.base * (2 ** min(self.failures, 62)))

    def next_delay(self) -> float:
        d = self.ceiling()
        self.failures += 1
        return d / 2 + self._rng.random() * d / 2

    def reset(self) -> None:
        self.failures = 0
