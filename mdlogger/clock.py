"""How far the local clock is from each exchange's: receive time minus event time.

A worker hands every trade it parses to :meth:`ClockSampler.sample` with the
wall-clock time the frame was received (``time.time_ns()``) and the trade's
own time. The sampler keeps at most one offset per ``min_interval_secs`` and
only those of the last ``window_secs``, so a busy connection costs one
comparison per trade; about once a second the worker calls :meth:`publish`,
which sorts the window once and writes the median, the 99th percentile and
the sample count into its shared stats block (``clock_offset_p50``,
``clock_offset_p99``, ``clock_samples``).

An offset is network delay plus the exchange's own delay plus the error of
the local clock. The first two are small and positive (milliseconds to a
second), so a median of many seconds, or any negative median beyond a few
hundred milliseconds, points at the local clock. That matters because the
parsers refuse rows whose time is far from the local clock (``bad_time``);
:func:`clock_note` says so in words when the median offset explains them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Iterable

from .exchanges.base import MAX_FUTURE_SECS, MAX_PAST_SECS

NS = 1_000_000_000
# A note is given once the median offset reaches this share of a refusal limit.
WARN_FRACTION = 0.5


class ClockSampler:
    """The last minute of clock offsets of one connection (one writer: the worker's loop)."""

    __slots__ = ("window_ns", "interval_ns", "_samples", "_last_ns")

    def __init__(self, window_secs: float = 60.0, min_interval_secs: float = 0.01, max_samples: int | None = None):
        if window_secs <= 0 or min_interval_secs < 0:
            raise ValueError("window_secs must be > 0 and min_interval_secs >= 0")
        self.window_ns = int(window_secs * NS)
        self.interval_ns = int(min_interval_secs * NS)
        if max_samples is None:
            # one per interval over the window, and never unbounded
            max_samples = int(window_secs / min_interval_secs) + 1 if min_interval_secs > 0 else 10_000
        self._samples: deque = deque(maxlen=max(1, int(max_samples)))  # (recv_ns, offset_secs), oldest first
        self._last_ns = -(1 << 62)

    def sample(self, recv_ns: int, sec: int, nanos: int) -> bool:
        """Take one trade's offset unless one was taken less than ``min_interval_secs`` ago.

        Returns whether it was taken. A receive time earlier than the last
        sample's means the local clock was stepped back: the window is
        dropped, since its offsets were measured against the old clock.
        """
        last = self._last_ns
        if recv_ns - last < self.interval_ns:
            if recv_ns >= last:
                return False
            self._samples.clear()
        self._last_ns = recv_ns
        self._samples.append((recv_ns, (recv_ns - sec * NS - nanos) / NS))
        return True

    def _prune(self, now_ns: int) -> None:
        cutoff = now_ns - self.window_ns
        samples = self._samples
        while samples and samples[0][0] < cutoff:
            samples.popleft()

    def figures(self, now_ns: int | None = None) -> tuple[float, float, int]:
        """``(p50, p99, n)`` in seconds over the last window; ``(0.0, 0.0, 0)`` without samples."""
        self._prune(time.time_ns() if now_ns is None else now_ns)
        values = sorted(offset for _t, offset in self._samples)
        if not values:
            return 0.0, 0.0, 0
        return quantile(values, 0.5), quantile(values, 0.99), len(values)

    def publish(self, block, now_ns: int | None = None) -> tuple[float, float, int]:
        """Write the figures into a worker's stats block (call about once a second)."""
        p50, p99, n = self.figures(now_ns)
        block.set("clock_offset_p50", p50)
        block.set("clock_offset_p99", p99)
        block.set("clock_samples", float(n))
        return p50, p99, n


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (linear interpolation between the closest ranks)."""
    if not values:
        raise ValueError("no values")
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def combine(figures: Iterable[tuple[float, float, int]]) -> tuple[float | None, float | None, int]:
    """One exchange's figures from its shards' ``(p50, p99, n)``.

    The median of the medians of the shards that have samples, the largest of
    their 99th percentiles, and the total count; ``(None, None, 0)`` when no
    shard has a sample.
    """
    taken = [(p50, p99, n) for p50, p99, n in figures if n > 0]
    if not taken:
        return None, None, 0
    return (statistics.median(p50 for p50, _p99, _n in taken), max(p99 for _p50, p99, _n in taken),
            int(sum(n for _p50, _p99, n in taken)))


def clock_note(p50: float | None, bad_time: int, limit_past: float = MAX_PAST_SECS,
               limit_future: float = MAX_FUTURE_SECS, warn_fraction: float = WARN_FRACTION) -> str | None:
    """A sentence blaming the LOCAL clock when the median offset refuses rows, or soon will; else None.

    ``p50`` is the median of receive time minus event time (positive: the
    local clock is ahead of the exchange's, so trades look old; negative: it
    is behind, so trades look to come from the future). Rows are refused as
    ``bad_time`` when more than ``limit_past`` seconds in the past or
    ``limit_future`` seconds in the future; a note is given from
    ``warn_fraction`` of the limit on. ``bad_time`` is how many rows were
    refused so far for that reason (it is quoted, not used to decide).
    """
    if p50 is None or not math.isfinite(p50) or p50 == 0:
        return None
    if p50 > 0:
        direction, limit, looks = "ahead of", limit_past, "in the past"
    else:
        direction, limit, looks = "behind", limit_future, "in the future"
    offset = abs(p50)
    if offset < warn_fraction * limit:
        return None
    if offset >= limit:
        fate = "so trades arrive looking more than %d s %s and are refused as bad_time" % (limit, looks)
    else:
        fate = "so trades arrive looking about %d s %s, close to the %d s limit beyond which they are " \
               "refused as bad_time" % (round(offset), looks, limit)
    refused = " (%d refused so far)" % bad_time if bad_time else ""
    return ("the local clock is likely wrong: it is about %d s %s the exchange's clock, %s%s; "
            "synchronise it (NTP, chrony)" % (round(offset), direction, fate, refused))
