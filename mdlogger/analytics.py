"""Market figures per exchange and symbol, from the rows the writer stored.

A thread of the supervisor (:class:`AnalyticsThread`) reads the rows
appended to today's TRADES files (read-only, through the storage's one column
reader, ``storage.read_columns``), so the figures come from exactly what is
on disk. It reads only the tables the writer's "written" feed names, from
its offset up to the row total the writer gives: the writer sends one small
datagram a second at most and never waits for it.

:class:`Analytics` is the pure engine: per symbol, for the current reporting
interval (aligned to multiples of ``interval_secs`` of trade time), the last
complete one, and the UTC day so far: trade count, VWAP, high, low, buy and
sell volume (by the taker's side) and their ratio, and large trades. A large
trade is one whose notional (price x size) reaches a threshold, global or per
symbol, or whose size reaches a multiple of the symbol's recent median size.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import json
import logging
import math
import operator
import socket
import threading
import time
from dataclasses import dataclass, field

from . import records as rec
from .backoff import Backoff
from .exchanges.registry import is_exchange
from .logs import Throttle, escape
from .polling import readable
from .storage import KIND_BY_TABLE, TableKey, iter_tables, read_columns, whole_rows

log = logging.getLogger("mdlogger.analytics")

MEDIAN_WINDOW = 500  # recent sizes kept per symbol for the median rule
LARGE_KEPT = 10  # large trades listed per window
FIGURE_COLUMNS = ("time", "price", "size", "side")  # the TRADES columns the figures are made of


@dataclass
class Window:
    """Figures over one span of trade time."""

    start: int = 0
    count: int = 0
    notional: float = 0.0
    volume: float = 0.0
    high: float = -math.inf
    low: float = math.inf
    buy_volume: float = 0.0
    sell_volume: float = 0.0
    large: list = field(default_factory=list)
    large_count: int = 0

    def add(self, sec: int, price: float, size: float, side: int, large: bool) -> None:
        self.count += 1
        self.notional += price * size
        self.volume += size
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        if side == rec.SIDE_BUY:
            self.buy_volume += size
        elif side == rec.SIDE_SELL:
            self.sell_volume += size
        if large:
            self.add_large(sec, price, size, side)

    def add_block(self, block: "Block", times, prices, sizes, sides, large: list) -> None:
        """Many trades at once: their sums, computed once by :meth:`Block.of` for every window they fall in."""
        self.count += block.count
        self.notional += block.notional
        self.volume += block.volume
        self.high = max(self.high, block.high)
        self.low = min(self.low, block.low)
        self.buy_volume += block.buy_volume
        self.sell_volume += block.sell_volume
        for i in large:
            self.add_large(times[i], prices[i], sizes[i], sides[i])

    def add_large(self, sec: int, price: float, size: float, side: int) -> None:
        self.large_count += 1
        self.large.append({"time": sec, "price": price, "size": size, "side": side, "notional": round(price * size, 8)})
        del self.large[:-LARGE_KEPT]

    def figures(self) -> dict:
        if not self.count:
            return {"start": self.start, "trades": 0}
        return {
            "start": self.start,
            "trades": self.count,
            "vwap": ratio(self.notional, self.volume),
            "high": self.high,
            "low": self.low,
            "volume": self.volume,
            "buy_volume": self.buy_volume,
            "sell_volume": self.sell_volume,
            "buy_sell_ratio": ratio(self.buy_volume, self.sell_volume),
            "large_trades": self.large_count,
            "large": list(self.large),
        }


@dataclass(frozen=True)
class Block:
    """The sums of a run of trades, made with C-level loops, once, then added to each window they fall in."""

    count: int
    notional: float
    volume: float
    high: float
    low: float
    buy_volume: float
    sell_volume: float

    @classmethod
    def of(cls, prices, sizes, sides, notionals) -> "Block":
        return cls(
            len(prices), math.fsum(notionals), math.fsum(sizes), max(prices), min(prices),
            math.fsum(itertools.compress(sizes, map(rec.SIDE_BUY.__eq__, sides))),
            math.fsum(itertools.compress(sizes, map(rec.SIDE_SELL.__eq__, sides))),
        )


def ratio(a: float, b: float) -> float | None:
    """``a / b``, or None when it has no meaning (``b`` zero, or either side not finite).

    Every division of the figures goes through here: rows stored before values
    were checked (a size of 1e-50 became 0.0 in float32) must not make a report fail.
    """
    if not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    q = a / b
    return q if math.isfinite(q) else None


def usable(price: float, size: float) -> bool:
    """A row the figures can take: price and size finite and above zero (NaN fails too)."""
    return 0.0 < price < math.inf and 0.0 < size < math.inf


class SymbolStats:
    def __init__(self, interval: int):
        self.interval = interval
        self.current = Window()
        self.previous = Window()
        self.day = Window()
        self.sizes: collections.deque = collections.deque(maxlen=MEDIAN_WINDOW)
        self._sorted: list[float] | None = []  # self.sizes sorted; None: to be sorted again when asked
        self.last_price = math.nan

    @property
    def sorted_sizes(self) -> list[float]:
        if self._sorted is None:
            self._sorted = sorted(self.sizes)
        return self._sorted

    def median_size(self) -> float:
        s = self.sorted_sizes
        if not s:
            return math.nan
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2

    def _remember_size(self, size: float) -> None:
        """One size, the sorted list kept up to date (the median rule asks for it on every trade)."""
        s = self.sorted_sizes
        if len(self.sizes) == self.sizes.maxlen:
            del s[bisect.bisect_left(s, self.sizes[0])]
        self.sizes.append(size)
        bisect.insort(s, size)

    def remember_sizes(self, sizes) -> None:
        """Many sizes at once (the fast path: no median rule): sorted again only when the median is asked for."""
        self.sizes.extend(sizes[-MEDIAN_WINDOW:])
        self._sorted = None


class Analytics:
    def __init__(self, interval_secs: int = 60, large_notional: float = 0.0, large_median_multiple: float = 0.0,
                 per_symbol_notional: dict | None = None):
        self.interval = max(1, int(interval_secs))
        self.unusable_rows = 0  # rows left out of the figures: a price or size not finite and above zero
        self.large_notional = large_notional
        self.large_median_multiple = large_median_multiple
        self.per_symbol_notional = dict(per_symbol_notional or {})  # "exchange:SYMBOL" -> notional
        self.symbols: dict[tuple[str, str], SymbolStats] = {}
        self.lock = threading.Lock()

    def set_thresholds(self, large_notional: float, large_median_multiple: float, per_symbol_notional: dict) -> None:
        """New large-trade thresholds (a configuration reload); they apply to trades from now on."""
        with self.lock:
            self.large_notional = large_notional
            self.large_median_multiple = large_median_multiple
            self.per_symbol_notional = dict(per_symbol_notional)

    def is_large(self, key: tuple[str, str], stats: SymbolStats, price: float, size: float) -> bool:
        threshold = self.per_symbol_notional.get("%s:%s" % key, self.large_notional)
        if threshold and price * size >= threshold:
            return True
        if self.large_median_multiple and stats.sorted_sizes:
            return size >= self.large_median_multiple * stats.median_size()
        return False

    def add(self, exchange: str, symbol: str, rows) -> None:
        """Take trades ``(time, nanos, price, size, side)`` in the order they were stored."""
        key = (exchange, symbol)
        with self.lock:
            stats = self.symbols.get(key)
            if stats is None:
                stats = self.symbols[key] = SymbolStats(self.interval)
            for sec, _nanos, price, size, side in rows:
                if usable(price, size):
                    self._add_one(key, stats, sec, price, size, side)
                else:
                    self.unusable_rows += 1

    def add_columns(self, exchange: str, symbol: str, times, prices, sizes, sides) -> None:
        """Take trades as columns. When they all fall in the running interval and day and only
        the notional rule applies, the figures are updated with C-level loops; otherwise row by row."""
        if not prices:
            return
        # (C-level checks of the common case; a NaN or inf makes a sum NaN or inf)
        if not (min(prices) > 0.0 and min(sizes) > 0.0 and math.isfinite(sum(prices)) and math.isfinite(sum(sizes))):
            keep = [i for i in range(len(prices)) if usable(prices[i], sizes[i])]
            self.unusable_rows += len(prices) - len(keep)
            if not keep:
                return
            times, prices, sizes, sides = ([col[i] for i in keep] for col in (times, prices, sizes, sides))
        key = (exchange, symbol)
        with self.lock:
            stats = self.symbols.get(key)
            if stats is None:
                stats = self.symbols[key] = SymbolStats(self.interval)
            lo, hi = min(times), max(times)
            start, day_start = lo - lo % self.interval, lo - lo % 86400
            fast = (hi < start + self.interval and hi < day_start + 86400 and not self.large_median_multiple
                    and start >= stats.current.start and day_start >= stats.day.start)
            if fast:
                self._roll(stats, start, day_start)  # (the first rows of a symbol, or of a new interval)
            else:
                for row in zip(times, prices, sizes, sides):
                    self._add_one(key, stats, *row)
                return
            notionals = list(map(operator.mul, prices, sizes))
            threshold = self.per_symbol_notional.get("%s:%s" % key, self.large_notional)
            block = Block.of(prices, sizes, sides, notionals)
            large = list(itertools.compress(range(len(prices)), map(threshold.__le__, notionals))) if threshold else []
            stats.current.add_block(block, times, prices, sizes, sides, large)
            stats.day.add_block(block, times, prices, sizes, sides, large)
            stats.remember_sizes(sizes)
            stats.last_price = prices[-1]

    def _roll(self, stats: SymbolStats, start: int, day_start: int) -> None:
        """Move a symbol's windows on to the interval starting at ``start`` and the day at ``day_start``."""
        if start > stats.current.start:
            # a new interval: the current one becomes the last complete one
            stats.previous = stats.current if stats.current.start + self.interval == start else Window(start - self.interval)
            stats.current = Window(start)
        if day_start > stats.day.start:
            stats.day = Window(day_start)

    def _add_one(self, key, stats: SymbolStats, sec: int, price: float, size: float, side: int) -> None:
        start = sec - sec % self.interval
        day_start = sec - sec % 86400
        self._roll(stats, start, day_start)
        large = self.is_large(key, stats, price, size)
        if start == stats.current.start:
            stats.current.add(sec, price, size, side, large)
        elif start == stats.previous.start:
            stats.previous.add(sec, price, size, side, large)  # a late trade of the last interval
        if day_start == stats.day.start:
            stats.day.add(sec, price, size, side, large)
        stats._remember_size(size)
        stats.last_price = price

    def report(self, now: float | None = None) -> dict:
        """Figures per exchange and symbol: the last complete interval, the current one, and today."""
        now = time.time() if now is None else now
        current_start = int(now) - int(now) % self.interval
        out: dict = {}
        with self.lock:
            for (exchange, symbol), stats in sorted(self.symbols.items()):
                last, cur = stats.previous, stats.current
                if cur.start < current_start:  # no trade yet in the running interval
                    last = cur if cur.start == current_start - self.interval else Window(current_start - self.interval)
                    cur = Window(current_start)
                day = stats.day if stats.day.start == int(now) - int(now) % 86400 else Window(int(now) - int(now) % 86400)
                median = stats.median_size()
                out.setdefault(exchange, {})[symbol] = {
                    "last_price": None if math.isnan(stats.last_price) else stats.last_price,
                    "median_size": None if math.isnan(median) else median,
                    "interval": last.figures(),
                    "current_interval": cur.figures(),
                    "today": day.figures(),
                }
        return {"interval_secs": self.interval, "generated": now, "exchanges": out}

    def most_active(self, n: int = 10, now: float | None = None, report: dict | None = None) -> list[tuple[str, str, dict]]:
        """The ``n`` symbols with most trades in the last complete interval (of ``report`` when given)."""
        rep = report if report is not None else self.report(now)
        rows = [(x, s, f["interval"]) for x, syms in rep["exchanges"].items() for s, f in syms.items()]
        rows.sort(key=lambda r: -r[2]["trades"])
        return [r for r in rows[:n] if r[2]["trades"]]


def format_table(rows) -> str:
    lines = ["%-10s %-14s %7s %14s %14s %14s %12s %12s %7s %5s" % (
        "exchange", "symbol", "trades", "vwap", "high", "low", "buy vol", "sell vol", "b/s", "large")]
    for exchange, symbol, f in rows:
        bs = f["buy_sell_ratio"]
        lines.append("%-10s %-14s %7d %14s %14s %14s %12s %12s %7s %5d" % (
            exchange, symbol, f["trades"], _g(f["vwap"]), _g(f["high"]), _g(f["low"]), _g(f["buy_volume"]),
            _g(f["sell_volume"]), "-" if bs is None else "%.2f" % bs, f["large_trades"]))
    return "\n".join(lines)


def _g(x) -> str:
    return "-" if x is None else "%.6g" % x


class AnalyticsThread(threading.Thread):
    """Reads new TRADES rows of today's files and feeds the engine; logs a table each interval.

    Which rows: the writer says which tables it appended to. Its "written"
    feed (a SEQPACKET socket; ``docs/ARCHITECTURE.md``, "Analytics") carries,
    at most once a second, datagrams ``{"op": "written", "tables": [[exchange,
    symbol, day, rows_on_disk_total], ...]}``; the thread waits on it (and on
    its wake-up socket: a stop, a new feed) and reads each named table of today
    from its offset up to the total given: no directory is listed and no file
    stat'ed for a table that did not change. At its start, and whenever it is
    given a new feed (a writer (re)start: that writer, or the one before it,
    may have written rows no datagram will name), it walks today's tables once
    to catch up (:meth:`poll`), and once more when the feed ends (the writer's
    last rows). A thread made without a feed and with ``fed`` false walks on
    every pass instead (a thread used on its own, as in some tests).

    A pass never ends the thread: files that cannot be read are read again at
    the next pass, after a capped backoff (named tables stay named until they
    are read); rows the engine fails on are left out (the same rows would fail
    again: the engine is a function of them) and counted. Either way the
    failure is logged at most once a minute per kind, with the count held back
    (an unexpected one with its traceback), and counted in ``errors``. A
    malformed datagram is counted (``bad_datagrams``, and in ``errors``), logged
    the same way and ignored: totals are cumulative, so the next datagram or
    walk covers its tables. A thread that ends anyway (the supervisor's loop
    checks) is replaced by one given this one's ``offsets`` and feed, so no row
    is counted twice. At a new UTC day the offsets of other days are dropped.
    """

    POLL_SECS = 1.0
    MAX_RETRY_SECS = 60.0
    FEED_MAX = 1 << 17  # largest datagram read (the writer sends at most 60 KiB); longer ones are malformed
    FEED_BATCH = 256  # datagrams read per pass at most (the rest wait for the next pass, at once)

    def __init__(self, data_path: str, engine: Analytics, stop: threading.Event, clock=time.time,
                 offsets: dict | None = None, feed: socket.socket | None = None, fed: bool | None = None):
        super().__init__(name="analytics", daemon=True)
        self.data_path = data_path
        self.engine = engine
        self.stop_event = stop
        self.clock = clock
        self.offsets: dict[TableKey, int] = dict(offsets or {})
        self.fed = feed is not None if fed is None else fed  # rows are read as the feed names them
        self.feed: socket.socket | None = None  # the thread's own: only it reads and closes it
        self.named: dict[TableKey, int] = {}  # tables the feed named, not read yet -> rows on disk
        self.catch_up_due = True  # walk today's tables once (start, new feed, feed ended)
        self.day = ""  # the UTC day of the last pass
        self.last_log = clock()
        self.errors = 0  # failed passes, tables the engine failed on, malformed datagrams
        self.skipped_rows = 0  # rows of those tables, left out of the figures
        self.bad_datagrams = 0
        self.failing = False  # the last pass failed: wait out the backoff, feed or not
        self._backoff = Backoff(self.POLL_SECS, self.MAX_RETRY_SECS)
        self._lines = Throttle(60.0, 10)
        self._feed_lock = threading.Lock()
        self._new_feed: socket.socket | None = feed  # handed over, taken by the next pass
        self._wake_r: socket.socket | None = None  # made by run(): a thread never started holds no socket
        self._wake_w: socket.socket | None = None

    # -- the supervisor's calls (any thread) -----------------------------------------
    def set_feed(self, feed: socket.socket) -> None:
        """A new writer's feed: the next pass closes the old one, walks to catch up, then follows this one."""
        with self._feed_lock:
            unread, self._new_feed = self._new_feed, feed
        if unread is not None:
            unread.close()  # (a newer writer's feed replaces one never taken)
        self.wake()

    def take_feed(self) -> socket.socket | None:
        """The newest feed, for the thread that replaces this one (call only once this one has ended)."""
        with self._feed_lock:
            feed, self._new_feed = self._new_feed, None
        if feed is None:
            feed, self.feed = self.feed, None
        elif self.feed is not None:
            self.feed.close()
            self.feed = None
        return feed

    def close_feed(self) -> None:
        """Close the feed (once the thread has ended and the writer has exited: the service's stop)."""
        feed = self.take_feed()
        if feed is not None:
            feed.close()

    def wake(self) -> None:
        """Cut the current wait short (a new feed; a stop)."""
        wake = self._wake_w
        try:
            if wake is not None:
                wake.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (the thread has ended)
            pass

    # -- the thread -------------------------------------------------------------------
    def run(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            delay = 0.0  # the first pass at once: catch up
            while not self._wait(delay):
                delay = self.step()
        finally:
            # The feed stays open: a writer still draining must not meet a closed socket (the supervisor
            # closes it once the writer has exited: close_feed), and a replacement thread takes it over.
            self._wake_w.close()
            self._wake_r.close()

    def _wait(self, delay: float) -> bool:
        """Until the feed has datagrams, a wake-up comes or ``delay`` passes; True when the thread must stop.

        After a failed pass only a wake-up cuts the backoff short: the feed may stay readable."""
        if self.stop_event.is_set():
            return True
        listen = [self._wake_r] if self.feed is None or self.failing else [self._wake_r, self.feed]
        readable(listen, max(0.0, delay))
        try:
            while self._wake_r.recv(512):
                pass
        except OSError:
            pass
        return self.stop_event.is_set()

    def step(self) -> float:
        """One pass (read new rows, log the table when due); returns the seconds to the next one."""
        try:
            self._new_day()
            if self.fed:
                self._adopt_feed()
                self.read_feed()
                if self.catch_up_due:
                    self.poll()
                    self.catch_up_due = False
                self.follow()
            else:
                self.poll()
            self.log_table()
        except OSError as exc:
            return self._failed("cannot read the files: %s" % (exc,), exc, with_traceback=False)
        except Exception as exc:  # noqa: BLE001 - the last resort: a pass never ends the thread
            return self._failed("unexpected %s: %s" % (type(exc).__name__, exc), exc, with_traceback=True)
        self._backoff.reset()
        self.failing = False
        return self.POLL_SECS

    def _failed(self, what: str, exc: BaseException, with_traceback: bool) -> float:
        self.errors += 1
        self.failing = True
        delay = self._backoff.next_delay()
        said = self._lines.admit(type(exc).__name__)
        if said is not None:
            held = " (%d more like it in the last %.0f s)" % said if said[0] else ""
            log.warning("analytics: %s%s; next try in %.1f s", escape(what), held, delay,
                        exc_info=exc if with_traceback else None)
        return delay

    def _note(self, key: str, what: str) -> None:
        """Log a problem that is not a failed pass, at most once a minute per kind (with the count held back)."""
        said = self._lines.admit(key)
        if said is not None:
            held = " (%d more like it in the last %.0f s)" % said if said[0] else ""
            log.warning("analytics: %s%s", escape(what), held)

    def _new_day(self) -> None:
        """At a new UTC day, forget the offsets and named tables of other days (never read again)."""
        today = rec.day_string(int(self.clock()))
        if today != self.day:
            if self.day:
                self.offsets = {k: v for k, v in self.offsets.items() if k.day == today}
                self.named = {k: v for k, v in self.named.items() if k.day == today}
            self.day = today

    def _adopt_feed(self) -> None:
        with self._feed_lock:
            new, self._new_feed = self._new_feed, None
        if new is None:
            return
        if self.feed is not None:
            self.feed.close()
        new.setblocking(False)
        self.feed = new
        self.catch_up_due = True  # rows written before this feed existed are named by no datagram

    def read_feed(self) -> int:
        """Take the datagrams waiting on the feed into ``named``; returns how many were read.

        The feed's end (its writer exited) or an error on it: the feed is closed and a catch-up walk is due
        (the writer's last rows); the supervisor hands over the next writer's feed."""
        feed = self.feed
        count = 0
        while feed is not None and count < self.FEED_BATCH:
            try:
                data, _ancillary, flags, _address = feed.recvmsg(self.FEED_MAX)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._note("feed", "the writer's feed failed (%s); reading it no more" % (exc,))
                data, flags = b"", 0
            if not data:  # the end: the writer exited
                feed.close()
                self.feed = feed = None
                self.catch_up_due = True
                break
            count += 1
            tables = None if flags & socket.MSG_TRUNC else parse_written(data)
            if tables is None:
                self.bad_datagrams += 1
                self.errors += 1
                self._note("datagram", "malformed datagram on the writer's feed ignored (%d bytes): %r"
                           % (len(data), data[:80]))
                continue
            for key, total in tables:
                if total > self.named.get(key, -1):
                    self.named[key] = total
        return count

    def follow(self) -> int:
        """Read the rows of the tables the feed named (today's), each from its offset to the total given;
        returns the rows taken. A table that cannot be read (OSError) stays named for the next pass."""
        taken = 0
        for key, total in list(self.named.items()):
            if key.day == self.day:
                done = self.offsets.get(key, 0)
                if total > done:
                    try:
                        columns = read_columns(self.data_path, key, FIGURE_COLUMNS, done, total)
                    except OSError:
                        raise  # (the pass fails; the table stays named)
                    except Exception as exc:  # noqa: BLE001 - e.g. fewer rows on disk than the feed said
                        del self.named[key]
                        self.catch_up_due = True  # the walk reads what the files really hold
                        self.errors += 1
                        self._note("feed-table", "rows %d..%d of %s/%s named by the writer's feed cannot be read "
                                   "(%s: %s); walking today's tables instead" % (done, total, key.exchange,
                                                                                 key.symbol, type(exc).__name__, exc))
                        continue
                    self._take(key, done, total, columns)
                    taken += total - done
            del self.named[key]
        return taken

    def log_table(self) -> None:
        if self.clock() - self.last_log >= self.engine.interval:
            self.last_log = self.clock()  # (first: a table that fails is not tried again at once)
            rows = self.engine.most_active(10)
            if rows:
                log.info("most active symbols over the last %d s:\n%s", self.engine.interval, format_table(rows))

    def poll(self) -> int:
        """Walk every TRADES table of today and read what was appended since the last read (the catch-up
        walk: listdir of every table directory, a stat of every column); returns the rows taken."""
        today = rec.day_string(int(self.clock()))
        taken = 0
        for key in iter_tables(self.data_path, {today}):
            if key.kind != KIND_BY_TABLE["TRADES"]:
                continue
            rows = whole_rows(self.data_path, key)
            done = self.offsets.get(key, 0)
            if rows > done:
                columns = read_columns(self.data_path, key, FIGURE_COLUMNS, done, rows)  # (OSError: read again)
                self._take(key, done, rows, columns)
                taken += rows - done
        return taken

    def _take(self, key: TableKey, done: int, rows: int, columns) -> None:
        """Rows ``done..rows`` of a table to the engine; the offset moves on even if the engine fails on them."""
        try:
            self.engine.add_columns(key.exchange, key.symbol, *columns)
        except Exception as exc:  # noqa: BLE001 - the same rows would fail again: leave them out
            self.skipped_rows += rows - done
            self._failed("%d rows of %s/%s left out: %s: %s" % (rows - done, key.exchange, key.symbol,
                                                                type(exc).__name__, exc), exc, True)
        self.offsets[key] = rows


def parse_written(data: bytes) -> list[tuple[TableKey, int]] | None:
    """The TRADES tables and row totals of one "written" datagram, or None when it is malformed (not
    JSON, another op, or any entry not ``[registered exchange, valid symbol, day string, int >= 0]``)."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(msg, dict) or msg.get("op") != "written" or not isinstance(msg.get("tables"), list):
        return None
    out = []
    for entry in msg["tables"]:
        if not isinstance(entry, list) or len(entry) != 4:
            return None
        exchange, symbol, day, total = entry
        if not (is_exchange(exchange) and isinstance(symbol, str) and rec.valid_symbol(symbol)
                and isinstance(day, str) and type(total) is int and total >= 0):
            return None
        out.append((TableKey(exchange, symbol, rec.KIND_TRADES, day), total))
    return out


def thresholds_from_settings(settings) -> tuple[float, float, dict]:
    """``(global notional, median multiple, {"exchange:SYMBOL": notional})`` from the settings."""
    lg = settings.logger
    per_symbol = {}
    for x in settings.exchanges:
        for symbol, notional in dict(x.large_trade_notional).items():
            per_symbol["%s:%s" % (x.name, symbol)] = notional
    return lg.large_trade_notional, lg.large_trade_median_multiple, per_symbol


def engine_from_settings(settings) -> Analytics:
    return Analytics(settings.logger.analytics_interval_secs, *thresholds_from_settings(settings))

