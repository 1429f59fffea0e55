"""The supervisor: the one loop that starts, watches, restarts and stops every process.

::

                          +------------------- supervisor process -------------------+
     SIGTERM/INT/HUP ---> | signal handlers only record (+ wakeup fd)                 |
                          | main loop: signals (stop, reload) -> discovery results -> |
                          |            reap -> hand retired pipes to the writer ->    |
                          |            heartbeats -> start due slots -> publish view  |
                          | threads (never fork, never kill):                         |
                          |   log receiver   discovery (REST, one per exchange)       |
                          |   Flask /health /metrics /analytics (read-only)           |
                          |   analytics (reads new rows of today's TRADES files)      |
                          +--------------------------+--------------------------------+
                                                     | forkserver (started first,
                                                     | while single-threaded)
               +-------------------------------------+---------------------+
               v                                     v                     v
       worker binance#0 -- slot pipe 0 --+   worker binance#1 -- pipe 1 --+  ...
                                         v                                v
                                   writer process (owns every data file)
                                   control socket: add/remove slot fds, drain

Every child gets its inputs as explicit arguments (settings, spec, pipe,
shared counter block). Each slot (shard) and the writer have a state machine:

    STARTING --(alive start_secs)--> RUNNING --(exit)--> BACKOFF --(delay)--> STARTING
    STARTING/RUNNING --(exit code EXIT_FATAL)--> FATAL   (never retried)
    RUNNING --(healthy_run_secs)--> backoff reset

Backoff is capped and jittered and never gives up on anything but FATAL.
A worker whose heartbeat stops is SIGKILLed and restarted. Shutdown goes in
order: workers first, then the writer drains every pipe, flushes and fsyncs.

SIGHUP re-reads the configuration (mdlogger.reload decides what changed).
A refused file changes nothing. Shards no longer wanted are retired:

    any --(reload drops the shard)--> RETIRING --(exit)--> RETIRED --> removed
    (SIGTERM; the worker hands its last batches to its pipe, then the writer
     reads that pipe dry before the slot is forgotten)

Shards whose symbols and connection settings did not change keep running.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from . import transport
from .analytics import AnalyticsThread, engine_from_settings, thresholds_from_settings
from .backoff import Backoff
from .exchanges import adapter_for
from .exchanges.base import SymbolInfo, reshard, resolve_symbols
from .logs import LogReceiver
from .reload import plan_reload
from .backfill import rest_bucket
from .rest import RestClient, RestError
from .settings import ConfigError, Settings
from .stats import WORKER_FIELDS, WRITER_FIELDS, Block, Note
from .worker import EXIT_FATAL, WorkerSpec, worker_main
from .writer import writer_main

log = logging.getLogger("mdlogger.supervisor")

STARTING, RUNNING, BACKOFF, FATAL, STOPPED = "starting", "running", "backoff", "fatal", "stopped"
RETIRING, RETIRED = "retiring", "retired"  # a reload dropped the shard: stopping, then gone for good
START_SECS = 1.0
LOOP_SECS = 0.25
PRELOAD = ["mdlogger.worker", "mdlogger.writer", "websocket", "orjson"]


@dataclass
class ProcessState:
    """The state machine of one supervised process (a worker slot or the writer).

    Pure bookkeeping: it never forks or kills, so it is tested without processes.
    """

    name: str
    backoff: Backoff
    state: str = STOPPED
    restarts: int = 0
    started_at: float = 0.0  # monotonic
    running_since: float = 0.0
    next_start: float = 0.0  # monotonic; when BACKOFF ends
    last_exit: int | None = None
    reason: str = ""
    backoff_reset: bool = False

    def due(self, now: float) -> bool:
        return self.state in (STOPPED, BACKOFF) and now >= self.next_start

    def on_started(self, now: float) -> None:
        # STOPPED/BACKOFF -> STARTING
        if self.state == BACKOFF:
            self.restarts += 1
        self.state = STARTING
        self.started_at = now
        self.backoff_reset = False

    def on_tick(self, now: float, healthy_run: float) -> None:
        if self.state == STARTING and now - self.started_at >= START_SECS:
            # STARTING -> RUNNING
            self.state = RUNNING
            self.running_since = now
        if self.state == RUNNING and not self.backoff_reset and now - self.running_since >= healthy_run:
            self.backoff.reset()
            self.backoff_reset = True

    def retire(self, alive: bool) -> None:
        """Any state -> RETIRING (the process is still to stop) or RETIRED: never started again."""
        self.state = RETIRING if alive else RETIRED
        self.reason = "retired by a configuration reload"

    def on_exit(self, code: int | None, now: float, fatal_code: int | None = EXIT_FATAL) -> float:
        """Record an exit; returns the delay before the next start (inf when FATAL or retired)."""
        self.last_exit = code
        if self.state == RETIRING:
            # RETIRING -> RETIRED
            self.state = RETIRED
            return float("inf")
        if fatal_code is not None and code == fatal_code:
            # STARTING/RUNNING -> FATAL
            self.state = FATAL
            self.reason = "exited with code %s: cannot start" % code
            return float("inf")
        # STARTING/RUNNING -> BACKOFF
        delay = self.backoff.next_delay()
        self.state = BACKOFF
        self.next_start = now + delay
        self.reason = _describe_exit(code)
        return delay


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return "killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return "exited with code %d" % code


@dataclass
class Slot:
    """One shard: a worker process slot with its own pipe and counter block."""

    id: int
    spec: WorkerSpec
    machine: ProcessState
    stats: Block
    pipe_r: multiprocessing.connection.Connection
    pipe_w: multiprocessing.connection.Connection
    note: Note  # symbols the exchange refused on this shard
    process: multiprocessing.process.BaseProcess | None = None
    killed_for: str = ""
    retire_by: float = 0.0  # monotonic; a retiring worker still alive then is killed


@dataclass
class ExchangeStatus:
    name: str
    state: str = "discovering"  # discovering, running, fatal
    error: str = ""
    symbols: int = 0
    uncovered: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    generation: int = 0  # discovery results of an older generation (before a reload) are ignored
    replace_shards: bool = False  # the next plan replaces every shard instead of keeping unchanged ones
    discovery_stop: threading.Event = field(default_factory=threading.Event)


class DiscoveryThread(threading.Thread):
    """Fetch one exchange's symbols over REST, retrying until it works or we stop."""

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


class Supervisor:
    def __init__(self, settings: Settings, log_level: int = logging.INFO, reload_settings=None):
        self.settings = settings
        self.reload_settings = reload_settings  # () -> Settings, re-reading the configuration (SIGHUP)
        self.log_level = log_level
        self.ctx = multiprocessing.get_context("forkserver")
        self.slots: dict[int, Slot] = {}
        self.exchanges = {x.name: ExchangeStatus(x.name) for x in settings.enabled_exchanges()}
        self.writer_machine = ProcessState(
            "writer", Backoff(settings.logger.restart_delay_secs, settings.logger.max_restart_delay_secs)
        )
        self.writer_stats = Block.shared(self.ctx, WRITER_FIELDS)
        self.writer_process = None
        self.writer_control: socket.socket | None = None
        self.started = time.time()
        self.stopping = False
        self.signals: list[int] = []
        self.discovered: queue.Queue = queue.Queue()
        self.stop_threads = threading.Event()
        self.view: dict = {"slots": (), "writer": {}, "exchanges": {}}
        self.analytics = engine_from_settings(settings)
        self.health_server = None
        self.notify = None  # optional callable(state: str), e.g. sd_notify
        self._next_slot = 0

    # -- set-up ----------------------------------------------------------------
    def _setup_pipes(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        log_r, log_w = os.pipe()
        transport.set_pipe_size(log_r)
        self.log_r = log_r
        self.log_conn = multiprocessing.connection.Connection(log_w, readable=False)

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _on_signal(self, signum, _frame) -> None:
        # Only record: all work happens in the main loop.
        self.signals.append(signum)

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass

    # -- the main loop -------------------------------------------------------------
    def run(self) -> int:
        self._setup_pipes()
        self._install_signals()
        self.ctx.set_forkserver_preload(PRELOAD)
        # The forkserver starts with the first child, while this process has
        # no other thread: every later child is forked from it, never from us.
        self._start_writer(time.monotonic())
        self.log_receiver = LogReceiver(self.log_r)
        self.log_receiver.start()
        self._publish_view()  # /health must have a whole view to read from its first request
        self._start_health()
        self.analytics_thread = AnalyticsThread(self.settings.logger.data_path, self.analytics, self.stop_threads)
        self.analytics_thread.start()
        for name in self.exchanges:
            self._discover(name)
        log.info("supervisor %d running; data in %s", os.getpid(), self.settings.logger.data_path)
        ready_sent = False
        while not self.stopping:
            self._handle_signals()
            if self.stopping:
                break
            now = time.monotonic()
            self._take_discoveries(now)
            self._reap(now)
            self._collect_retired()
            self._watch_heartbeats(now)
            self._start_due(now)
            self._publish_view()
            if not ready_sent and self._all_running():
                ready_sent = True
                self._notify("READY=1\nSTATUS=capturing")
            self._notify("WATCHDOG=1")
            self._wait(LOOP_SECS)
        return self._shutdown()

    def _notify(self, text: str) -> None:
        if self.notify is not None:
            self.notify(text)

    def _wait(self, timeout: float) -> None:
        handles = [self.wake_r] + [s.process.sentinel for s in self.slots.values() if s.process is not None]
        if self.writer_process is not None:
            handles.append(self.writer_process.sentinel)
        ready = multiprocessing.connection.wait(handles, timeout)
        if self.wake_r in ready:
            try:
                while os.read(self.wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self.stopping = True
            elif signum == signal.SIGHUP and not self.stopping:
                self._reload(time.monotonic())

    # -- discovery and shards ------------------------------------------------------
    def _discover(self, name: str) -> None:
        """(Re)start the symbol discovery of an exchange; earlier rounds' results become stale."""
        status = self.exchanges[name]
        status.discovery_stop.set()
        status.discovery_stop = threading.Event()
        status.generation += 1
        DiscoveryThread(self.settings.exchange(name), status.generation, self.discovered, self.wake,
                        status.discovery_stop, self.settings.logger.data_path).start()

    def _take_discoveries(self, now: float) -> None:
        while True:
            try:
                name, generation, listed, error = self.discovered.get_nowait()
            except queue.Empty:
                return
            status = self.exchanges.get(name)
            if status is None or generation != status.generation:
                continue  # the exchange was disabled or reconfigured since this discovery began
            if listed is None:
                status.error = error
                continue
            self._plan_exchange(name, listed, now)

    def _plan_exchange(self, name: str, listed: list[SymbolInfo], now: float) -> None:
        xs = self.settings.exchange(name)
        adapter = adapter_for(xs)
        status = self.exchanges[name]
        chosen, problems = resolve_symbols(adapter, listed, xs.symbols)
        for symbol, what in problems:
            log.error("%s: configured symbol %s is %s on the exchange; not captured", name, symbol, what)
        status.problems = problems
        # Shards still wanted keep their worker, unless a reload changed how they connect;
        # a FATAL one is given a new start. (With nothing kept, reshard is split_shards.)
        for slot in [s for s in self._live_slots(name) if status.replace_shards or s.machine.state == FATAL]:
            self._retire(slot, now)
        status.replace_shards = False
        live = self._live_slots(name)
        current = [s.spec.symbols for s in live]
        shards, uncovered = reshard(current, chosen, adapter.max_symbols_per_connection(), xs.max_connections)
        if uncovered:
            log.error(
                "%s: %d symbols do not fit in %d connections of %d symbols; not captured: %s",
                name, len(uncovered), xs.max_connections, adapter.max_symbols_per_connection(),
                ", ".join(s.symbol for s in uncovered[:20]) + (" ..." if len(uncovered) > 20 else ""),
            )
        status.uncovered = [s.symbol for s in uncovered]
        kept = {s.spec.symbols: s for s in live}
        wanted = [tuple(symbols) for symbols in shards]
        for slot in live:
            if slot.spec.symbols not in wanted:
                self._retire(slot, now)
        if not shards:
            status.state = FATAL
            status.error = "no symbol to capture"
            log.error("%s: no valid symbol to capture; exchange disabled", name)
            return
        status.state = RUNNING
        status.error = ""
        status.symbols = sum(len(s) for s in shards)
        # The shards' connection attempts draw on one shared bucket per exchange (the worker paces itself).
        new = [symbols for symbols in wanted if symbols not in kept]
        for symbols in new:
            spec = WorkerSpec(self._next_slot, name, self._free_shard_number(name), symbols)
            self._add_slot(spec, now)
        log.info("%s: %d symbols in %d shards (%d kept running, %d started)", name, status.symbols, len(shards),
                 len(shards) - len(new), len(new))

    def _live_slots(self, exchange: str) -> list[Slot]:
        """The exchange's shards that are not being (or have not been) retired."""
        return [s for s in self.slots.values() if s.spec.exchange == exchange and s.machine.state not in (RETIRING, RETIRED)]

    def _free_shard_number(self, exchange: str) -> int:
        taken = {s.spec.shard for s in self.slots.values() if s.spec.exchange == exchange}
        return min(set(range(len(taken) + 1)) - taken)

    # -- configuration reload ------------------------------------------------------------
    def _reload(self, now: float) -> None:
        """SIGHUP: re-read the configuration; restart only the shards it changes."""
        if self.reload_settings is None:
            log.warning("received SIGHUP: this supervisor has no configuration file to re-read; ignored")
            return
        self._notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        try:
            new = self.reload_settings()
        except ConfigError as exc:
            log.error("received SIGHUP: new configuration refused, still running the old one: %s", exc)
            self._notify("READY=1\nSTATUS=reload refused: %s" % exc)
            return
        plan = plan_reload(self.settings, new)
        if plan.empty:
            log.info("received SIGHUP: configuration unchanged")
            self._notify("READY=1")
            return
        log.info("received SIGHUP: configuration changes: %s", ", ".join(plan.changes))
        for key in plan.ignored:
            log.warning("reload: %s changed but applies only when the service restarts; keeping the running value", key)
        self.settings = plan.settings
        self.analytics.set_thresholds(*thresholds_from_settings(self.settings))
        for name in plan.stopped:
            log.info("reload: %s disabled; stopping its shards", name)
            for slot in self._live_slots(name):
                self._retire(slot, now)
            self.exchanges.pop(name).discovery_stop.set()
        for name in plan.started:
            log.info("reload: %s enabled; discovering its symbols", name)
            self.exchanges[name] = ExchangeStatus(name)
            self._discover(name)
        for name in plan.reshard + plan.replace:
            status = self.exchanges[name]
            status.replace_shards = name in plan.replace
            log.info("reload: %s changed; discovering its symbols again, then %s", name,
                     "replacing every shard" if status.replace_shards else "restarting only shards whose symbols changed")
            self._discover(name)
        self._notify("READY=1\nSTATUS=capturing")

    def _retire(self, slot: Slot, now: float) -> None:
        """Stop a shard for good: its worker ends gracefully, the writer reads its pipe dry, then it is removed."""
        alive = slot.process is not None
        slot.machine.retire(alive)
        slot.retire_by = now + self.settings.logger.shutdown_timeout_secs
        if alive:
            log.info("stopping %s (pid %d): retired by a configuration reload", slot.spec.label, slot.process.pid)
            _kill(slot.process.pid, signal.SIGTERM)

    def _collect_retired(self) -> None:
        """Hand retired shards' pipes back to the writer to read dry, then forget them."""
        if self.writer_process is None:
            return  # a restarted writer is given every slot again, retired ones included
        for slot in [s for s in self.slots.values() if s.machine.state == RETIRED]:
            if not self._send_writer({"op": "remove", "slot": slot.id}, []):
                return
            slot.pipe_w.close()
            slot.pipe_r.close()
            del self.slots[slot.id]
            log.info("%s removed", slot.spec.label)

    def _add_slot(self, spec: WorkerSpec, start_at: float) -> Slot:
        r, w = os.pipe()
        transport.set_pipe_size(w)
        ls = self.settings.logger
        slot = Slot(
            id=spec.slot,
            spec=spec,
            machine=ProcessState(spec.label, Backoff(ls.restart_delay_secs, ls.max_restart_delay_secs),
                                 next_start=start_at),
            stats=Block.shared(self.ctx, WORKER_FIELDS),
            pipe_r=multiprocessing.connection.Connection(r, writable=False),
            pipe_w=multiprocessing.connection.Connection(w, readable=False),
            note=Note.shared(self.ctx),
        )
        self.slots[slot.id] = slot
        self._next_slot += 1
        self._send_writer(_add_message(slot), [slot.pipe_r.fileno()])
        return slot

    # -- processes ------------------------------------------------------------------
    def _start_due(self, now: float) -> None:
        if self.writer_machine.due(now):
            self._start_writer(now)
        for slot in self.slots.values():
            if slot.machine.due(now):
                self._start_worker(slot, now)
            slot.machine.on_tick(now, self.settings.logger.healthy_run_secs)
        self.writer_machine.on_tick(now, self.settings.logger.healthy_run_secs)

    def _start_worker(self, slot: Slot, now: float) -> None:
        slot.stats.set("heartbeat", now)
        slot.stats.set("connected", 0)
        process = self.ctx.Process(
            target=worker_main,
            name="worker-" + slot.spec.label,
            args=(slot.spec, self.settings, slot.pipe_w, slot.stats.array, slot.note.array, self.log_conn,
                  self.log_level),
            daemon=False,
        )
        process.start()
        slot.process = process
        slot.killed_for = ""
        slot.machine.on_started(now)
        log.info("started %s as pid %d (restart %d)", slot.spec.label, process.pid, slot.machine.restarts)

    def _start_writer(self, now: float) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.writer_stats.set("heartbeat", now)
        process = self.ctx.Process(
            target=writer_main,
            name="writer",
            args=(self.settings, theirs, self.writer_stats.array, self.log_conn, self.log_level),
            daemon=False,
        )
        process.start()
        theirs.close()
        if self.writer_control is not None:
            self.writer_control.close()
        self.writer_control = mine
        self.writer_process = process
        self.writer_machine.on_started(now)
        log.info("started writer as pid %d (restart %d)", process.pid, self.writer_machine.restarts)
        for slot in self.slots.values():
            self._send_writer(_add_message(slot), [slot.pipe_r.fileno()])

    def _send_writer(self, msg: dict, fds: list[int]) -> bool:
        if self.writer_control is None:
            return False
        try:
            socket.send_fds(self.writer_control, [json.dumps(msg).encode()], fds)
            return True
        except OSError as exc:
            log.warning("writer control: %s (will resend on its restart)", exc)
            return False

    def _reap(self, now: float) -> None:
        for slot in self.slots.values():
            p = slot.process
            if p is not None and p.exitcode is not None:
                p.join(0)
                slot.process = None
                slot.stats.set("connected", 0)
                if not slot.stats.get("down_since") or slot.stats.get("connected_since") > slot.stats.get("down_since"):
                    slot.stats.set("down_since", time.time())
                delay = slot.machine.on_exit(p.exitcode, now)
                reason = slot.killed_for or slot.machine.reason
                if slot.machine.state == RETIRED:
                    log.info("%s (pid %d) stopped (retired)", slot.spec.label, p.pid)
                elif slot.machine.state == FATAL:
                    log.error("%s (pid %d) %s; not restarting (FATAL)", slot.spec.label, p.pid, reason)
                elif not self.stopping:
                    log.warning("%s (pid %d) %s; restarting in %.1f s", slot.spec.label, p.pid, reason, delay)
                p.close()
        p = self.writer_process
        if p is not None and p.exitcode is not None:
            p.join(0)
            self.writer_process = None
            delay = self.writer_machine.on_exit(p.exitcode, now, fatal_code=None)
            log.error("writer (pid %d) %s; restarting in %.1f s", p.pid, self.writer_machine.reason, delay)
            p.close()
        if os.getpid() == 1:
            _reap_orphans()

    def _watch_heartbeats(self, now: float) -> None:
        limit = self.settings.logger.heartbeat_timeout_secs
        for slot in self.slots.values():
            p = slot.process
            if p is None or slot.killed_for:
                continue
            if slot.machine.state == RETIRING:
                if now > slot.retire_by:
                    slot.killed_for = "killed: did not stop in time after being retired"
                    log.error("%s (pid %d): did not stop after being retired; killing it", slot.spec.label, p.pid)
                    _kill(p.pid, signal.SIGKILL)
                continue
            silent = now - slot.stats.get("heartbeat")
            if silent > limit:
                slot.killed_for = "killed after its heartbeat stopped for %.0f s" % silent
                log.error("%s (pid %d): heartbeat stopped %.0f s ago; killing it", slot.spec.label, p.pid, silent)
                _kill(p.pid, signal.SIGKILL)
        p = self.writer_process
        if p is not None and now - self.writer_stats.get("heartbeat") > limit:
            log.error("writer (pid %d): heartbeat stopped; killing it", p.pid)
            _kill(p.pid, signal.SIGKILL)

    def _all_running(self) -> bool:
        if any(x.state == "discovering" for x in self.exchanges.values()):
            return False
        return all(s.machine.state in (RUNNING, FATAL, RETIRING, RETIRED) for s in self.slots.values())

    # -- shutdown -------------------------------------------------------------------
    def _shutdown(self) -> int:
        timeout = self.settings.logger.shutdown_timeout_secs
        began = time.monotonic()
        deadline = began + timeout
        self._notify("STOPPING=1")
        self.stop_threads.set()
        for status in self.exchanges.values():
            status.discovery_stop.set()
        workers = [s.process for s in self.slots.values() if s.process is not None]
        for p in workers:
            _kill(p.pid, signal.SIGTERM)
        # Workers get half the time to hand their last batches to the pipes.
        self._join_all(workers, time.monotonic() + timeout / 2, "worker")
        for slot in self.slots.values():
            slot.machine.state = STOPPED
        if self.writer_process is not None:
            self._send_writer({"op": "drain"}, [])
            self._join_all([self.writer_process], deadline - 0.2, "writer")
        self._stop_health()
        code = 0
        if self.writer_process is not None and self.writer_process.exitcode not in (0, None):
            code = 1
        log.info("supervisor stopped in %.1f s", time.monotonic() - began)
        self.log_receiver.stop()
        return code

    def _join_all(self, processes, deadline: float, what: str) -> None:
        pending = [p for p in processes if p.exitcode is None]
        while pending and time.monotonic() < deadline:
            multiprocessing.connection.wait([p.sentinel for p in pending], max(0.0, deadline - time.monotonic()))
            pending = [p for p in pending if p.exitcode is None]
        for p in pending:
            log.error("%s pid %d did not stop in time; killing it", what, p.pid)
            _kill(p.pid, signal.SIGKILL)
        for p in processes:
            p.join(2.0)

    # -- health ------------------------------------------------------------------------
    def _start_health(self) -> None:
        from .health import start_health_server

        self.health_server = start_health_server(self, self.settings.logger.health_check_host,
                                                 self.settings.logger.health_check_port)

    def _stop_health(self) -> None:
        if self.health_server is not None:
            self.health_server.shutdown()

    def _publish_view(self) -> None:
        """Publish an immutable snapshot for the health thread (one reference swap)."""
        slots = tuple(
            {
                "slot": s.id,
                "exchange": s.spec.exchange,
                "shard": s.spec.shard,
                "symbols": len(s.spec.symbols),
                "symbol_names": tuple(x.symbol for x in s.spec.symbols),
                "state": s.machine.state,
                "restarts": s.machine.restarts,
                "reason": s.machine.reason,
                "stats": s.stats,
                "note": s.note,
            }
            for s in self.slots.values()
        )
        exchanges = {
            name: {
                "state": x.state,
                "error": x.error,
                "symbols": x.symbols,
                "uncovered_symbols": len(x.uncovered),
                "refused_symbols": ["%s (%s)" % p for p in x.problems],
            }
            for name, x in self.exchanges.items()
        }
        writer = {
            "state": self.writer_machine.state,
            "restarts": self.writer_machine.restarts,
            "reason": self.writer_machine.reason,
            "backlog_bytes": self._backlog(),
        }
        self.view = {"slots": slots, "writer": writer, "exchanges": exchanges}

    def _backlog(self) -> int:
        total = 0
        for slot in self.slots.values():
            try:
                total += transport.pending_bytes(slot.pipe_r.fileno())
            except OSError:
                pass
        return total


def _add_message(slot: Slot) -> dict:
    """The writer's "add" command: the slot, its exchange, and its symbols with their exchange spellings."""
    return {"op": "add", "slot": slot.id, "exchange": slot.spec.exchange,
            "symbols": [[s.symbol, s.exchange_name] for s in slot.spec.symbols]}


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap_orphans() -> None:
    """As PID 1 (in a container) reap whatever was reparented to us."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
