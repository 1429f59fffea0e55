"""``ServiceView``: the frozen picture of the service that the web layer renders.

The supervisor's main loop builds a new view at the end of every pass and
publishes it with one reference swap (``Supervisor.view``); the web thread
(``web.py``) takes the latest one and hands it to the renderers (``health.py``,
``metrics.py``, ``statuspage.py``), which are plain functions of the view and
the time. Nothing here is ever changed after it is built, so the web thread
needs no lock and never sees half a pass.

The only live parts are the counter blocks (``stats.Block``) and the refused
symbols note (``stats.Note``) of each slot and the writer: lock-free shared
memory that each child writes and everybody else only reads (see stats.py).

This module imports nothing from the web modules nor from the supervisor.
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import Block, Note


@dataclass(frozen=True)
class SlotView:
    """One worker slot (a shard of an exchange) as the supervisor last saw it."""

    slot: int
    exchange: str
    shard: int
    symbol_names: tuple[str, ...]
    state: str  # the slot's state machine: starting, running, backoff, fatal, retiring...
    restarts: int
    reason: str  # why the last process exited ("" if none did)
    stats: Block  # the worker's counters (live, lock-free)
    note: Note  # symbols the exchange refused on this shard (live, lock-free)

    @property
    def symbols(self) -> int:
        return len(self.symbol_names)


@dataclass(frozen=True)
class WriterView:
    """The writer process: its state machine, the bytes waiting in the slot pipes, its counters."""

    state: str
    restarts: int
    reason: str
    backlog_bytes: int  # bytes waiting in every slot pipe, not yet read by the writer
    stats: Block  # the writer's counters, gap counters per exchange included (live, lock-free)
    last_io_error: float = 0.0  # wall clock when the supervisor last saw io_errors change (0: never)
    stalled_since: float = 0.0  # wall clock since when rows wait and none was written (0: not stalled)
    stall_limit_secs: float = 60.0  # stalled for this long: the writer is not writing (HTTP 503)


@dataclass(frozen=True)
class ExchangeView:
    """An enabled exchange: discovery and planning state (its shards are slots)."""

    name: str
    state: str  # discovering, running, fatal
    error: str  # the last discovery error ("" if none)
    symbols: int  # symbols planned into shards
    uncovered_symbols: int  # symbols left out by the connection limits
    refused_symbols: tuple[str, ...]  # "SYMBOL (why)" for symbols refused at discovery
    down_since: float = 0.0  # wall clock since when it has no shard plan: discovering or fatal (0: it has one)
    discovery_errors: int = 0  # failed discovery rounds
    listing_skipped: tuple[tuple[str, int], ...] = ()  # the last listing's entries left out, (reason, count)


@dataclass(frozen=True)
class ThreadView:
    """A thread of the supervisor that its loop watches (analytics, log receiver, discovery)."""

    name: str
    alive: bool  # (discovery: a round is running; its thread ends with an answer)
    restarts: int  # found dead and started again by the loop
    errors: int  # failures it caught and retried (it lives on)


@dataclass(frozen=True)
class ServiceView:
    """Everything ``/``, ``/health`` and ``/metrics`` show, as of one pass of the main loop."""

    started: float  # wall-clock time the supervisor started
    pid: int  # the supervisor's pid
    stall_timeout_secs: float  # a shard silent for longer is not "receiving" (logger.stall_timeout_secs)
    slots: tuple[SlotView, ...]
    writer: WriterView
    exchanges: tuple[ExchangeView, ...]  # enabled exchanges, in settings order
    threads: tuple[ThreadView, ...] = ()

    def slots_of(self, exchange: str) -> tuple[SlotView, ...]:
        return tuple(s for s in self.slots if s.exchange == exchange)
