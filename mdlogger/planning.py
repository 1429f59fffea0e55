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
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence

from .backfill import rest_bucket
from .backoff import Backoff
from .exchanges import adapter_for
from .exchanges.base import Exchange, SymbolInfo
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

    def discover(self, xsettings, results: queue.Queue, wake: Callable[[], None], data_path: str) -> None:
        """(Re)start the symbol discovery; earlier rounds' results become stale."""
        self.discovery_stop.set()
        self.discovery_stop = threading.Event()
        self.generation += 1
        DiscoveryThread(xsettings, self.generation, results, wake, self.discovery_stop, data_path).start()

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
            self.state = ExchangeState.FATAL
            self.error = "no symbol to capture"
            log.error("%s: no valid symbol to capture; exchange disabled", self.name)
            return
        self.state = ExchangeState.RUNNING
        self.error = ""
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
        else:
            fresh.append((name, listed))


def free_shard_number(taken: set[int]) -> int:
    """The lowest shard number not in use (replacement shards never reuse a live one's)."""
    return min(set(range(len(taken) + 1)) - taken)


class DiscoveryThread(threading.Thread):
    """Fetch one exchange's symbols over REST, retrying until it works or we stop.

    Its calls draw on the exchange's shared REST bucket, like the writer's backfill.
    """

    def __init__(self, settings, generation: int, results: queue.Queue, wake, stop: threading.Event,
                 data_path: str):
        super().__init__(name="discover-" + settings.name, daemon=True)
        self.xsettings = settings
        self.data_path = data_path
        self.generation = generation
        self.results = results
        self.wake = wake
        self.stop_event = stop

    def run(self) -> None:
        adapter = adapter_for(self.xsettings)
        bucket = rest_bucket(self.data_path, adapter)
        rest = RestClient(timeout=self.xsettings.rest_timeout_secs, retries=self.xsettings.rest_retries,
                          bucket=bucket, cost=adapter.history.discovery_cost)
        backoff = Backoff(self.xsettings.reconnect_delay_secs, self.xsettings.max_reconnect_delay_secs)
        try:
            while not self.stop_event.is_set():
                try:
                    listed = adapter.discover(rest)
                except (RestError, ValueError, TypeError, AttributeError) as exc:
                    delay = backoff.next_delay()
                    log.error("%s: symbol discovery failed: %s; retrying in %.1f s", self.xsettings.name, exc, delay)
                    self.results.put((self.xsettings.name, self.generation, None, str(exc)))
                    self.wake()
                    self.stop_event.wait(delay)
                    continue
                self.results.put((self.xsettings.name, self.generation, listed, ""))
                self.wake()
                return
        finally:
            rest.close()
            bucket.close()


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
        info = by_norm.get(name) or by_name.get(name) or by_norm.get(name.upper())
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
