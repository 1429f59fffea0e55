"""Which symbols each exchange captures, and on which shards: discovery and shard planning.

::

    DiscoveryThread (one per exchange, REST on the exchange's shared bucket)
        |  (name, generation, listing or None, error)  -> results queue, wake the loop
        v
    take_discoveries(): drops stale generations, records errors   } called by the
    plan_shards(): resolve_symbols -> reshard -> keep/retire/start } supervisor's loop
    ExchangeStatus.take(plan): the exchange's state for /health   }

Nothing here forks, kills or touches a worker: :func:`plan_shards` is a pure
function of the listing, the configured names, the symbols of the shards
running now and the connection limits, and the supervisor carries out its
answer (retire these shards, start those).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence

from .backfill import rest_bucket
from .backoff import Backoff
from .exchanges import adapter_for
from .exchanges.base import Exchange, SymbolInfo
from .logs import Throttle, escape
from .rest import RestClient, RestError

log = logging.getLogger("mdlogger.supervisor")

Shard = tuple[SymbolInfo, ...]


class ExchangeState(Enum):
    DISCOVERING = "discovering"  # no listing yet
    RUNNING = "running"  # planned into shards
    FATAL = "fatal"  # no symbol to capture


@dataclass
class ShardPlan:
    """What one listing means for an exchange's shards."""

    problems: list[tuple[str, str]]  # (configured name, "unknown" or "inactive")
    shards: list[Shard]  # every shard wanted
    uncovered: list[SymbolInfo]  # symbols beyond the connection limits
    retire: list[Shard]  # current shards no longer wanted
    start: list[Shard]  # wanted shards no current one is

    @property
    def symbols(self) -> int:
        return sum(len(s) for s in self.shards)


def plan_shards(adapter: Exchange, listed: Sequence[SymbolInfo], wanted: Sequence[str], current: Sequence[Shard],
                per_connection: int, max_connections: int) -> ShardPlan:
    """Shards for the configured names that keep as many ``current`` shards as the limits allow."""
    chosen, problems = resolve_symbols(adapter, listed, wanted)
    shards, uncovered = reshard(current, chosen, per_connection, max_connections)
    shards = [tuple(s) for s in shards]
    return ShardPlan(problems=problems, shards=shards, uncovered=uncovered,
                     retire=[s for s in current if s not in shards],
                     start=[s for s in shards if s not in current])


@dataclass
class ExchangeStatus:
    name: str
    state: ExchangeState = ExchangeState.DISCOVERING
    error: str = ""
    symbols: int = 0
    uncovered: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    generation: int = 0  # discovery results of an older generation (before a reload) are ignored
    replace_shards: bool = False  # the next plan replaces every shard instead of keeping unchanged ones
    discovery_stop: threading.Event = field(default_factory=threading.Event)
    down_since: float = field(default_factory=time.time)  # wall clock since when it has no plan (0: it has)
    discovery_errors: int = 0  # failed discovery rounds
    listing_skipped: dict = field(default_factory=dict)  # the last listing's entries left out, by reason
    thread: "DiscoveryThread | None" = None  # the current round's thread
    thread_restarts: int = 0  # discovery threads found dead before giving an answer, and started again

    def discover(self, xsettings, results: queue.Queue, wake: Callable[[], None], data_path: str) -> None:
        """(Re)start the symbol discovery; earlier rounds' results become stale."""
        self.discovery_stop.set()
        self.discovery_stop = threading.Event()
        self.generation += 1
        self._start(xsettings, results, wake, data_path)

    def _start(self, xsettings, results, wake, data_path: str) -> None:
        self.thread = DiscoveryThread(xsettings, self.generation, results, wake, self.discovery_stop, data_path)
        self.thread.start()

    def check_thread(self, xsettings, results: queue.Queue, wake: Callable[[], None], data_path: str) -> bool:
        """Start the discovery again (same generation) when its thread ended without an answer.

        The thread catches everything it can; this is for what it cannot (an error
        raised by the logging of an error, MemoryError). Returns True when it restarted one.
        """
        thread = self.thread
        if thread is None or thread.is_alive() or thread.answered or self.discovery_stop.is_set():
            return False
        self.thread_restarts += 1
        log.error("%s: the discovery thread ended without an answer%s; starting it again", self.name,
                  " (%s)" % thread.died_of if thread.died_of else "")
        self._start(xsettings, results, wake, data_path)
        return True

    def take(self, plan: ShardPlan, per_connection: int, max_connections: int) -> None:
        """Record (and log) a plan: refused and uncovered symbols, RUNNING or FATAL."""
        for symbol, what in plan.problems:
            log.error("%s: configured symbol %s is %s on the exchange; not captured", self.name, symbol, what)
        self.problems = plan.problems
        if plan.uncovered:
            log.error(
                "%s: %d symbols do not fit in %d connections of %d symbols; not captured: %s",
                self.name, len(plan.uncovered), max_connections, per_connection,
                ", ".join(s.symbol for s in plan.uncovered[:20]) + (" ..." if len(plan.uncovered) > 20 else ""),
            )
        self.uncovered = [s.symbol for s in plan.uncovered]
        if not plan.shards:
            if self.state is ExchangeState.RUNNING or not self.down_since:
                self.down_since = time.time()
            self.state = ExchangeState.FATAL
            self.error = "no symbol to capture"
            log.error("%s: no valid symbol to capture; exchange disabled", self.name)
            return
        self.state = ExchangeState.RUNNING
        self.error = ""
        self.down_since = 0.0
        self.symbols = plan.symbols
        log.info("%s: %d symbols in %d shards (%d kept running, %d started)", self.name, self.symbols,
                 len(plan.shards), len(plan.shards) - len(plan.start), len(plan.start))


def take_discoveries(results: queue.Queue, exchanges: dict[str, ExchangeStatus]) -> list[tuple[str, list]]:
    """The listings waiting in ``results`` that are still current; errors are recorded on the status."""
    fresh = []
    while True:
        try:
            name, generation, listed, error = results.get_nowait()
        except queue.Empty:
            return fresh
        status = exchanges.get(name)
        if status is None or generation != status.generation:
            continue  # the exchange was disabled or reconfigured since this discovery began
        if listed is None:
            status.error = error
            status.discovery_errors += 1
        else:
            status.listing_skipped = dict(getattr(listed, "skipped", None) or {})
            fresh.append((name, listed))


def free_shard_number(taken: set[int]) -> int:
    """The lowest shard number not in use (replacement shards never reuse a live one's)."""
    return min(set(range(len(taken) + 1)) - taken)


class DiscoveryThread(threading.Thread):
    """Fetch one exchange's symbols over REST, retrying until it works or we stop.

    Its calls draw on the exchange's shared REST bucket, like the writer's backfill.
    Every round that fails, whatever the reason, is reported (one log line that says
    its cause, and the error on /health) and retried after a capped, jittered backoff:
    expected failures (the network, the exchange's answer) by name, anything else as
    a last resort with its traceback, logged at most once a minute. The thread ends
    only with an answer (``answered``) or when told to stop; if it ends otherwise,
    ``died_of`` says why and the supervisor's loop starts another
    (``ExchangeStatus.check_thread``).
    """

    EXPECTED = (RestError, ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError, OSError)

    def __init__(self, settings, generation: int, results: queue.Queue, wake, stop: threading.Event,
                 data_path: str):
        super().__init__(name="discover-" + settings.name, daemon=True)
        self.xsettings = settings
        self.data_path = data_path
        self.generation = generation
        self.results = results
        self.wake = wake
        self.stop_event = stop
        self.wait = stop.wait  # (tests give their own)
        self.answered = False
        self.died_of = ""
        self.tracebacks = Throttle(60.0, 10)  # an unexpected failure's traceback: once a minute per kind

    def run(self) -> None:
        try:
            self._rounds()
        except BaseException as exc:  # noqa: BLE001 - said here and by the loop, which starts another
            self.died_of = "%s: %s" % (type(exc).__name__, escape(str(exc), 200))
            try:
                log.error("%s: the discovery thread failed: %s", self.xsettings.name, self.died_of, exc_info=exc)
            except BaseException:  # noqa: BLE001 - the loop still sees died_of
                pass

    def _rounds(self) -> None:
        name = self.xsettings.name
        backoff = Backoff(self.xsettings.reconnect_delay_secs, self.xsettings.max_reconnect_delay_secs)
        adapter = rest = bucket = None
        try:
            while not self.stop_event.is_set():
                try:
                    if rest is None:  # (inside the loop: a bucket file that cannot be opened is retried too)
                        adapter = adapter_for(self.xsettings)
                        bucket = rest_bucket(self.data_path, adapter)
                        rest = RestClient(timeout=self.xsettings.rest_timeout_secs,
                                          retries=self.xsettings.rest_retries, bucket=bucket,
                                          cost=adapter.history.discovery_cost)
                    listed = adapter.discover(rest)
                except self.EXPECTED as exc:
                    error = "%s" % escape(str(exc) or type(exc).__name__, 500)
                    if not isinstance(exc, (RestError, ValueError)):
                        error = "%s: %s" % (type(exc).__name__, error)
                    self._failed(name, error, backoff.next_delay(), None)
                    continue
                except Exception as exc:  # noqa: BLE001 - the last resort: never a silent end
                    error = "unexpected %s: %s" % (type(exc).__name__, escape(str(exc), 300))
                    self._failed(name, error, backoff.next_delay(), exc)
                    continue
                skipped = getattr(listed, "summary", lambda: "")()
                if skipped:
                    log.warning("%s: symbol listing: %s", name, skipped)
                self.answered = True
                self.results.put((name, self.generation, listed, ""))
                self.wake()
                return
            self.answered = True  # told to stop: no answer is wanted
        finally:
            for thing in (rest, bucket):
                if thing is not None:
                    try:
                        thing.close()
                    except Exception:  # noqa: BLE001 - closing must not hide what happened
                        pass

    def _failed(self, name: str, error: str, delay: float, exc: BaseException | None) -> None:
        """One round failed: one log line with its cause, the error for /health, then wait."""
        if exc is not None and self.tracebacks.admit(type(exc).__name__) is not None:
            log.error("%s: symbol discovery failed: %s; retrying in %.1f s", name, error, delay, exc_info=exc)
        else:
            log.error("%s: symbol discovery failed: %s; retrying in %.1f s", name, error, delay)
        self.results.put((name, self.generation, None, error))
        self.wake()
        self.wait(delay)


# -- symbols and shards -----------------------------------------------------------------------


def resolve_symbols(adapter: Exchange, listed: Sequence[SymbolInfo], wanted: Sequence[str]):
    """Match configured symbols against the listing.

    Returns ``(chosen, problems)``: the active SymbolInfo to capture, and
    ``(configured name, status)`` pairs for names that are unknown or inactive.
    An empty ``wanted`` means every active listed symbol.
    """
    by_norm = {s.symbol: s for s in listed}
    by_name = {s.exchange_name: s for s in listed}
    if not wanted:
        return [s for s in listed if s.active], []
    chosen, problems, seen = [], [], set()
    for name in wanted:
        # (upper-cased only when ASCII: "btc-usſd".upper() would match BTC-USSD)
        info = by_norm.get(name) or by_name.get(name) or (by_norm.get(name.upper()) if name.isascii() else None)
        if info is None:
            problems.append((name, "unknown"))
        elif not info.active:
            problems.append((name, "inactive"))
        elif info.symbol not in seen:
            seen.add(info.symbol)
            chosen.append(info)
    return chosen, problems


def split_shards(symbols: Sequence[SymbolInfo], per_connection: int, max_connections: int):
    """Balanced shards within both limits; returns ``(shards, uncovered)``."""
    capacity = per_connection * max_connections
    covered, uncovered = list(symbols[:capacity]), list(symbols[capacity:])
    if not covered:
        return [], uncovered
    n = math.ceil(len(covered) / per_connection)
    shards = [covered[i::n] for i in range(n)]
    return shards, uncovered


def reshard(current: Sequence[Sequence[SymbolInfo]], symbols: Sequence[SymbolInfo], per_connection: int,
            max_connections: int):
    """Shards for ``symbols`` that leave as many ``current`` shards untouched as the limits allow.

    Used by a configuration reload, where every changed shard means a
    reconnect. Each current shard keeps the symbols it has that are still
    wanted (unchanged if it lost none). Symbols no shard holds go first into
    new shards (balanced, while connections are free), then into the current
    shards with the most room. Returns ``(shards, uncovered)`` like
    :func:`split_shards`; a shard equal to a current one can keep its worker.
    """
    wanted = {s.symbol: s for s in symbols}
    shards: list[list[SymbolInfo]] = []
    held: set[str] = set()
    for shard in current:
        if len(shards) == max_connections:
            break
        keep = [wanted[s.symbol] for s in shard if s.symbol in wanted and s.symbol not in held][:per_connection]
        if keep:
            shards.append(keep)
            held.update(s.symbol for s in keep)
    leftover = [s for s in symbols if s.symbol not in held]
    free = max_connections - len(shards)
    if leftover and free:
        fresh, leftover = split_shards(leftover, per_connection, free)
        shards.extend(fresh)
    for symbol in list(leftover):
        roomiest = min(shards, key=len, default=None)
        if roomiest is None or len(roomiest) >= per_connection:
            break
        roomiest.append(symbol)
        leftover.remove(symbol)
    return shards, leftover
