"""Market figures per exchange and symbol, from the rows the writer stored.

A thread of the supervisor (:class:`AnalyticsThread`) reads the rows
appended to today's TRADES files since its last pass (read-only, through the
storage's one column reader, ``storage.read_columns``), so the figures come
from exactly what is on disk and the write path does no extra work at all.

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
import logging
import math
import operator
import threading
import time
from dataclasses import dataclass, field

from . import records as rec
from .backoff import Backoff
from .logs import Throttle, escape
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

    def add_many(self, times, prices, sizes, sides, notionals, large_threshold: float) -> None:
        """Many trades at once with C-level loops (the common case: one interval, one day)."""
        self.count += len(prices)
        self.notional += math.fsum(notionals)
        self.volume += math.fsum(sizes)
        self.high = max(self.high, max(prices))
        self.low = min(self.low, min(prices))
        self.buy_volume += math.fsum(itertools.compress(sizes, map(rec.SIDE_BUY.__eq__, sides)))
        self.sell_volume += math.fsum(itertools.compress(sizes, map(rec.SIDE_SELL.__eq__, sides)))
        if large_threshold:
            for i in itertools.compress(range(len(prices)), map(large_threshold.__le__, notionals)):
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
        self.sorted_sizes: list[float] = []
        self.last_price = math.nan

    def median_size(self) -> float:
        s = self.sorted_sizes
        if not s:
            return math.nan
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2

    def _remember_size(self, size: float) -> None:
        if len(self.sizes) == self.sizes.maxlen:
            old = self.sizes[0]
            del self.sorted_sizes[bisect.bisect_left(self.sorted_sizes, old)]
        self.sizes.append(size)
        bisect.insort(self.sorted_sizes, size)


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
            start = lo - lo % self.interval
            fast = (hi < start + self.interval and start == stats.current.start
                    and lo - lo % 86400 == stats.day.start and not self.large_median_multiple)
            if not fast:
                for row in zip(times, prices, sizes, sides):
                    self._add_one(key, stats, *row)
                return
            notionals = list(map(operator.mul, prices, sizes))
            threshold = self.per_symbol_notional.get("%s:%s" % key, self.large_notional)
            stats.current.add_many(times, prices, sizes, sides, notionals, threshold)
            stats.day.add_many(times, prices, sizes, sides, notionals, threshold)
            for size in sizes[-MEDIAN_WINDOW:]:
                stats._remember_size(size)
            stats.last_price = prices[-1]

    def _add_one(self, key, stats: SymbolStats, sec: int, price: float, size: float, side: int) -> None:
        start = sec - sec % self.interval
        if start > stats.current.start:
            # a new interval: the current one becomes the last complete one
            stats.previous = stats.current if stats.current.start + self.interval == start else Window(start - self.interval)
            stats.current = Window(start)
        day_start = sec - sec % 86400
        if day_start > stats.day.start:
            stats.day = Window(day_start)
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

    A pass never ends the thread: files that cannot be read are read again at
    the next pass, after a capped backoff; rows the engine fails on are left
    out (the same rows would fail again: the engine is a function of them) and
    counted. Either way the failure is logged at most once a minute per kind,
    with the count held back (an unexpected one with its traceback), and counted
    in ``errors``. A thread that ends anyway (the supervisor's loop checks) is
    replaced by one given this one's ``offsets``, so no row is counted twice.
    """

    POLL_SECS = 1.0
    MAX_RETRY_SECS = 60.0

    def __init__(self, data_path: str, engine: Analytics, stop: threading.Event, clock=time.time,
                 offsets: dict | None = None):
        super().__init__(name="analytics", daemon=True)
        self.data_path = data_path
        self.engine = engine
        self.stop_event = stop
        self.clock = clock
        self.offsets: dict[TableKey, int] = dict(offsets or {})
        self.last_log = clock()
        self.errors = 0  # failed passes and tables the engine failed on
        self.skipped_rows = 0  # rows of those tables, left out of the figures
        self._backoff = Backoff(self.POLL_SECS, self.MAX_RETRY_SECS)
        self._lines = Throttle(60.0, 10)

    def run(self) -> None:
        delay = self.POLL_SECS
        while not self.stop_event.wait(delay):
            delay = self.step()

    def step(self) -> float:
        """One pass (read new rows, log the table when due); returns the seconds to the next one."""
        try:
            self.poll()
            self.log_table()
        except OSError as exc:
            return self._failed("cannot read the files: %s" % (exc,), exc, with_traceback=False)
        except Exception as exc:  # noqa: BLE001 - the last resort: a pass never ends the thread
            return self._failed("unexpected %s: %s" % (type(exc).__name__, exc), exc, with_traceback=True)
        self._backoff.reset()
        return self.POLL_SECS

    def _failed(self, what: str, exc: BaseException, with_traceback: bool) -> float:
        self.errors += 1
        delay = self._backoff.next_delay()
        said = self._lines.admit(type(exc).__name__)
        if said is not None:
            held = " (%d more like it in the last %.0f s)" % said if said[0] else ""
            log.warning("analytics: %s%s; next try in %.1f s", escape(what), held, delay,
                        exc_info=exc if with_traceback else None)
        return delay

    def log_table(self) -> None:
        if self.clock() - self.last_log >= self.engine.interval:
            self.last_log = self.clock()  # (first: a table that fails is not tried again at once)
            rows = self.engine.most_active(10)
            if rows:
                log.info("most active symbols over the last %d s:\n%s", self.engine.interval, format_table(rows))

    def poll(self) -> int:
        """Read what was appended since the last poll; returns the rows taken."""
        today = rec.day_string(int(self.clock()))
        taken = 0
        for key in iter_tables(self.data_path, {today}):
            if key.kind != KIND_BY_TABLE["TRADES"]:
                continue
            rows = whole_rows(self.data_path, key)
            done = self.offsets.get(key, 0)
            if rows > done:
                columns = read_columns(self.data_path, key, FIGURE_COLUMNS, done, rows)  # (OSError: read again)
                try:
                    self.engine.add_columns(key.exchange, key.symbol, *columns)
                except Exception as exc:  # noqa: BLE001 - the same rows would fail again: leave them out
                    self.skipped_rows += rows - done
                    self._failed("%d rows of %s/%s left out: %s: %s" % (rows - done, key.exchange, key.symbol,
                                                                        type(exc).__name__, exc), exc, True)
                self.offsets[key] = rows
                taken += rows - done
        return taken


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

