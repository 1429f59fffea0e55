"""Backfill threads of the writer: fetch the trades of open gaps over REST.

::

    GapEngine.request(gap) --> Backfiller.submit --> one queue per exchange (biggest gap first)
                                                        |
                                       thread "backfill-<exchange>": adapter.fetch_history
                                       through a HistoryClient on the exchange's shared REST
                                       budget (mdlogger/budget.py: the same bucket the
                                       supervisor's discovery spends)
                                                        |
    Writer loop <-- results queue + a wake-up pipe <----+

The threads never touch a file or the gap engine: they only fetch, and the
writer's loop applies what they return. One thread per exchange, so one
exchange's REST calls are sequential and a slow exchange never delays another.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time

from .budget import SharedBucket, runtime_dir
from .exchanges import ADAPTERS, adapter_for
from .exchanges.base import SymbolInfo
from .history import HistoryClient, HistoryDeadline, HistoryError
from .logs import escape

log = logging.getLogger("mdlogger.backfill")


def rest_bucket(data_path: str, adapter) -> SharedBucket:
    """The exchange's one REST budget, shared by every process."""
    spec = adapter.history
    return SharedBucket(os.path.join(runtime_dir(data_path), "%s.rest" % adapter.name), spec.rest_rate,
                        spec.rest_burst)


class Backfiller:
    def __init__(self, settings, wake_fd: int):
        self.settings = settings
        self.wake_fd = wake_fd
        self.results: queue.Queue = queue.Queue()
        self.queues: dict[str, queue.PriorityQueue] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.symbols: dict[str, dict[str, SymbolInfo]] = {}  # exchange -> symbol -> listing entry
        self.calls: dict[str, int] = {}
        self.stop = threading.Event()
        self._order = itertools.count()

    def know(self, exchange: str, infos) -> None:
        """Listing entries of the symbols a slot captures (their exchange spellings)."""
        book = self.symbols.setdefault(exchange, {})
        for info in infos:
            book[info.symbol] = info

    def submit(self, exchange: str, og) -> None:
        """Fetch an open gap's trades (the result arrives on ``results``)."""
        gap = og.gap
        info = self.symbols.get(exchange, {}).get(gap.symbol)
        if info is None or exchange not in ADAPTERS:
            self._answer(("failed", exchange, gap.gap, "the symbol's exchange spelling is unknown to the writer"))
            return
        if exchange not in self.queues:
            self.queues[exchange] = queue.PriorityQueue()
            thread = threading.Thread(target=self._run, args=(exchange,), name="backfill-" + exchange, daemon=True)
            self.threads[exchange] = thread
            thread.start()
        size = (gap.to_id - gap.from_id) if gap.to_id and gap.from_id else (gap.to_sec - gap.from_sec) * 10
        self.queues[exchange].put((-size, next(self._order), (info, og)))

    def close(self) -> None:
        self.stop.set()
        for q in self.queues.values():
            q.put((float("-inf"), -1, None))

    # -- the threads ----------------------------------------------------------
    def _answer(self, item) -> None:
        self.results.put(item)
        try:
            os.write(self.wake_fd, b"b")
        except (BlockingIOError, BrokenPipeError):
            pass  # the pipe is full (the loop will look anyway) or the writer is closing

    def _run(self, exchange: str) -> None:
        xs = self.settings.exchange(exchange)
        adapter = adapter_for(xs)
        bucket = rest_bucket(self.settings.logger.data_path, adapter)
        client = HistoryClient(adapter, bucket, timeout=xs.rest_timeout_secs, stop=self.stop)
        q = self.queues[exchange]
        try:
            while not self.stop.is_set():
                _, _, job = q.get()
                if job is None:
                    return
                self._fetch(exchange, adapter, client, *job)
        finally:
            bucket.close()

    def _fetch(self, exchange: str, adapter, client, info: SymbolInfo, og) -> None:
        gap = og.gap
        before_calls = client.calls
        deadline = og.deadline - 0.5  # leave the loop time to store the rows before the hold ends
        try:
            rows = adapter.fetch_history(client, info, og.after, og.before, deadline)
        except HistoryDeadline as exc:
            rows = getattr(exc, "rows", None)
            reason = "stopped" if getattr(exc, "stopped", False) else "not fetched within backfill_hold_secs"
            item = ("partial", exchange, gap.gap, (rows, reason)) if rows else ("failed", exchange, gap.gap, reason)
        except HistoryError as exc:
            item = ("failed", exchange, gap.gap, "REST: %s" % escape(str(exc)))
        except Exception as exc:  # noqa: BLE001 - an adapter bug must not end the thread; counted as the gap's fate
            log.exception("%s: backfill of %s failed", exchange, gap.symbol)
            item = ("failed", exchange, gap.gap, "%s: %s" % (type(exc).__name__, escape(str(exc))))
        else:
            item = ("filled", exchange, gap.gap, rows)
        self.calls[exchange] = self.calls.get(exchange, 0) + client.calls - before_calls
        self._answer(item)


def wall_ms() -> int:
    return int(time.time() * 1000)
