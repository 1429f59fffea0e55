"""The supervisor: the one loop that starts, reaps, restarts and stops every process.

::

                          +------------------- supervisor process -------------------+
     SIGTERM/INT/HUP ---> | signal handlers only record (+ wakeup fd)                 |
                          | main loop: signals (stop, reload) -> discovery results -> |
                          |            reap -> hand retired pipes to the writer ->    |
                          |            heartbeats -> start due slots -> publish view  |
                          | threads (never fork, never kill):                         |
                          |   log receiver   discovery (REST, one per exchange)       |
                          |   Flask / /health /metrics /analytics (read-only)         |
                          |   analytics (reads the TRADES tables the feed names)      |
                          +--------------------------+--------------------------------+
                                                     | forkserver (started first,
                                                     | while single-threaded)
               +-------------------------------------+---------------------+
               v                                     v                     v
       worker binance#0 -- slot pipe 0 --+   worker binance#1 -- pipe 1 --+  ...
                                         v                                v
                                   writer process (owns every data file)
                                   control socket: add/remove slot fds, drain
                                   feed socket: tables written -> analytics

One pass of the loop, and what flows where:

* signals: SIGTERM/SIGINT end the loop; SIGHUP re-reads the configuration
  (``reload.plan_reload`` says what changed) and rediscovers what it must;
* discovery results (``planning``): a listing becomes a ``ShardPlan``; the
  loop retires the shards it drops and adds a ``WorkerChild`` (with its own
  pipe, announced to the writer with an ``add``) for each shard it starts;
* every child, the writer first, the same way (``child.Child``): reap an
  ended process (-> BACKOFF, FATAL, RETIRED), check its heartbeat (SIGKILL
  when it stopped), start it when due, tick its state machine;
* retired shards whose worker has ended: the writer reads their pipe dry
  (``remove``), then they are forgotten;
* a writer just (re)started: its "written" feed goes to the analytics
  thread, which reads only the tables the writer names;
* threads (analytics, log receiver, discovery): each catches and retries its
  own failures; one that ended anyway is logged, counted (``thread_restarts``
  on /health and /metrics) and started again; the writer's I/O error and
  written-rows counters are watched for /health's "degraded" reasons;
* publish a frozen ``ServiceView`` for the web thread (one reference swap).

Every child gets its inputs as explicit arguments (settings, spec, pipe,
shared counter block). The state machine is in ``child.py``; backoff is
capped and jittered and never gives up on anything but FATAL. Shutdown goes
in order: workers first (SIGTERM; they hand their last batches to their
pipes), then the writer drains every pipe, flushes and fsyncs. Shards whose
symbols and connection settings did not change keep running across a reload.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import tempfile
import threading
import time

from . import transport
from .analytics import AnalyticsThread, engine_from_settings, thresholds_from_settings
from .backoff import Backoff
from .child import (Child, Launcher, SocketDirError, State, WorkerChild, WriterChild, forkserver_socket_dir, join_all,
                    reap_orphans)
from .exchanges import adapter_for
from .logs import LogReceiver
from .planning import ExchangeState, ExchangeStatus, free_shard_number, plan_shards, take_discoveries
from .reload import plan_reload
from .settings import ConfigError, Settings
from .stats import WRITER_FIELDS, Block
from .view import ExchangeView, ServiceView, SlotView, ThreadView, WriterView
from .worker import WorkerSpec

log = logging.getLogger("mdlogger.supervisor")

LOOP_SECS = 0.25
WRITE_STALL_SECS = 60.0  # rows waiting this long (at least 3 flush intervals) with none written: not writing
PRELOAD = ["mdlogger.worker", "mdlogger.writer", "websocket", "orjson"]
EXIT_NO_SOCKET_DIR = 2  # no directory short enough for the forkserver's socket (nothing was started)


class Supervisor:
    def __init__(self, settings: Settings, log_level: int = logging.INFO, reload_settings=None):
        self.settings = settings
        self.reload_settings = reload_settings  # () -> Settings, re-reading the configuration (SIGHUP)
        self.launcher = Launcher(multiprocessing.get_context("forkserver"), log_level)
        self.workers: dict[int, WorkerChild] = {}  # by slot
        self.writer = WriterChild(self.launcher, self._backoff(), Block.shared(self.launcher.ctx, WRITER_FIELDS),
                                  lambda: list(self.workers.values()))
        self.exchanges = {x.name: ExchangeStatus(x.name) for x in settings.enabled_exchanges()}
        self.started = time.time()
        self.stopping = False
        self.signals: list[int] = []
        self.discovered: queue.Queue = queue.Queue()
        self.stop_threads = threading.Event()
        self.view: ServiceView | None = None  # published by the loop before the web server starts
        self.analytics = engine_from_settings(settings)
        self.health_server = None
        self.notify = None  # optional callable(state: str), e.g. sd_notify
        self._next_slot = 0
        self.analytics_thread: AnalyticsThread | None = None
        self.log_receiver: LogReceiver | None = None
        self.thread_restarts = {"analytics": 0, "log-receiver": 0}  # (discovery: on each ExchangeStatus)
        self.analytics_errors = 0  # failures caught by analytics threads that ended (the live one counts its own)
        # what the loop saw of the writer's counters, for /health's "degraded" reasons
        self._seen_io_errors = 0.0
        self._seen_rows = 0.0
        self.last_io_error = 0.0
        self.write_stalled_since = 0.0

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.logger.restart_delay_secs, self.settings.logger.max_restart_delay_secs)

    def children(self) -> list[Child]:
        """The writer first (a new writer is handed every slot before workers start), then every worker."""
        return [self.writer, *self.workers.values()]

    # -- set-up ----------------------------------------------------------------
    def _setup_pipes(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        log_r, log_w = os.pipe()
        transport.set_pipe_size(log_r)
        self.log_r = log_r
        self.launcher.log_conn = multiprocessing.connection.Connection(log_w, readable=False)

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
        try:
            short_dir = forkserver_socket_dir(self.settings.logger.data_path)
        except SocketDirError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_NO_SOCKET_DIR
        if short_dir is not None:
            log.info("the temporary directory %s is too long for the forkserver's Unix socket; using %s "
                     "(removed at exit)", tempfile.gettempdir(), short_dir)
        self._setup_pipes()
        self._install_signals()
        self.launcher.ctx.set_forkserver_preload(PRELOAD)
        # The forkserver starts with the first child, while this process has
        # no other thread: every later child is forked from it, never from us.
        self.writer.start(time.monotonic(), self.settings)
        self.log_receiver = LogReceiver(self.log_r)
        self.log_receiver.start()
        self._publish_view()  # /health must have a whole view to read from its first request
        self._start_health()
        # The analytics thread follows the writer's "written" feed (a new one from each writer start).
        self.analytics_thread = AnalyticsThread(self.settings.logger.data_path, self.analytics, self.stop_threads,
                                                feed=self.writer.take_feed(), fed=True)
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
            for name, listed in take_discoveries(self.discovered, self.exchanges):
                self._plan(name, listed, now)
            self._supervise(now)
            self._check_threads()
            self._watch_writer()
            self._publish_view()
            if not ready_sent and self._all_running():
                ready_sent = True
                self._notify("READY=1\nSTATUS=capturing")
            self._notify("WATCHDOG=1")
            self._wait(LOOP_SECS)
        return self._shutdown()

    def _supervise(self, now: float) -> None:
        """Reap, hand retired pipes to the writer, check heartbeats, start what is due: every child alike."""
        for child in self.children():
            child.reap(now)
        if os.getpid() == 1:
            reap_orphans()
        self._collect_retired()
        lg = self.settings.logger
        for child in self.children():
            child.check(now, lg.heartbeat_timeout_secs)
        for child in self.children():
            if child.due(now):
                child.start(now, self.settings)
            child.tick(now, lg.healthy_run_secs)
        self._hand_feed()

    def _hand_feed(self) -> None:
        """A writer (re)started: hand its "written" feed to the analytics thread (which closes the old one)."""
        feed = self.writer.take_feed()
        if feed is None:
            return
        if self.analytics_thread is not None:
            self.analytics_thread.set_feed(feed)
        else:
            feed.close()  # (no thread yet: run() gives it the next writer's feed)

    def _check_threads(self) -> None:
        """Start again any thread of ours that ended while the service runs (logged and counted).

        Each thread catches and retries its own failures; this is for what it
        cannot catch. A new analytics thread goes on from the old one's offsets
        and follows its feed (after one catch-up walk).
        """
        if self.stopping:
            return
        old = self.analytics_thread
        if old is not None and not old.is_alive():
            self.thread_restarts["analytics"] += 1
            self.analytics_errors += old.errors
            log.error("the analytics thread ended; starting it again (restart %d)", self.thread_restarts["analytics"])
            self.analytics_thread = AnalyticsThread(self.settings.logger.data_path, self.analytics, self.stop_threads,
                                                    offsets=old.offsets, feed=old.take_feed(), fed=True)
            self.analytics_thread.start()
        receiver = self.log_receiver
        if receiver is not None and not receiver.is_alive():
            self.thread_restarts["log-receiver"] += 1
            self.log_receiver = LogReceiver(self.log_r)
            self.log_receiver.start()
            log.error("the log receiver thread ended; started it again (restart %d)",
                      self.thread_restarts["log-receiver"])
        for name, status in self.exchanges.items():
            status.check_thread(self.settings.exchange(name), self.discovered, self.wake,
                                self.settings.logger.data_path)

    def _watch_writer(self) -> None:
        """Note when the writer's I/O errors last grew, and since when rows wait without any written."""
        stats = self.writer.stats
        now = time.time()
        io_errors, rows, pending = stats.get("io_errors"), stats.get("rows"), stats.get("pending_rows")
        if io_errors != self._seen_io_errors:
            self._seen_io_errors = io_errors
            self.last_io_error = now
        if rows != self._seen_rows or pending <= 0:
            self._seen_rows = rows
            self.write_stalled_since = 0.0
        elif not self.write_stalled_since:
            self.write_stalled_since = now

    def _close_feed(self) -> None:
        """At the stop, once the writer has exited: close the analytics thread's feed (it ends within a
        second of the stop; one still running keeps the feed until the process exits)."""
        thread = self.analytics_thread
        if thread is not None:
            thread.join(thread.POLL_SECS + 1.0)
            if not thread.is_alive():
                thread.close_feed()

    def _notify(self, text: str) -> None:
        if self.notify is not None:
            self.notify(text)

    def _wait(self, timeout: float) -> None:
        handles = [self.wake_r] + [c.process.sentinel for c in self.children() if c.process is not None]
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

    def _all_running(self) -> bool:
        if any(x.state is ExchangeState.DISCOVERING for x in self.exchanges.values()):
            return False
        return all(w.state in (State.RUNNING, State.FATAL, State.RETIRING, State.RETIRED)
                   for w in self.workers.values())

    # -- discovery and shards (planning.py decides; the loop carries it out) --------------
    def _discover(self, name: str) -> None:
        self.exchanges[name].discover(self.settings.exchange(name), self.discovered, self.wake,
                                      self.settings.logger.data_path)

    def _plan(self, name: str, listed, now: float) -> None:
        xs = self.settings.exchange(name)
        adapter = adapter_for(xs)
        status = self.exchanges[name]
        # Shards still wanted keep their worker, unless a reload changed how they connect;
        # a FATAL one is given a new start. (With nothing kept, reshard is split_shards.)
        for worker in self._live_workers(name):
            if status.replace_shards or worker.state is State.FATAL:
                self._retire(worker, now)
        status.replace_shards = False
        live = self._live_workers(name)
        per_connection = adapter.max_symbols_per_connection()
        plan = plan_shards(adapter, listed, xs.symbols, [w.spec.symbols for w in live], per_connection,
                           xs.max_connections)
        for worker in live:
            if worker.spec.symbols in plan.retire:
                self._retire(worker, now)
        status.take(plan, per_connection, xs.max_connections)
        # The shards' connection attempts draw on one shared bucket per exchange (the worker paces itself).
        for symbols in plan.start:
            taken = {w.spec.shard for w in self.workers.values() if w.spec.exchange == name}
            self._add_worker(WorkerSpec(self._next_slot, name, free_shard_number(taken), symbols), now)

    def _live_workers(self, exchange: str) -> list[WorkerChild]:
        """The exchange's shards that are not being (or have not been) retired."""
        return [w for w in self.workers.values()
                if w.spec.exchange == exchange and w.state not in (State.RETIRING, State.RETIRED)]

    def _add_worker(self, spec: WorkerSpec, start_at: float) -> None:
        worker = WorkerChild.create(spec, self.launcher, self._backoff(), start_at)
        self.workers[worker.id] = worker
        self._next_slot += 1
        self.writer.add(worker)

    def _retire(self, worker: WorkerChild, now: float) -> None:
        """Stop a shard for good: its worker ends gracefully, the writer reads its pipe dry, then it is removed."""
        worker.retire(now, self.settings.logger.shutdown_timeout_secs)

    def _collect_retired(self) -> None:
        """Hand retired shards' pipes back to the writer to read dry, then forget them."""
        if self.writer.process is None:
            return  # a restarted writer is given every slot again, retired ones included
        for worker in [w for w in self.workers.values() if w.state is State.RETIRED]:
            if not self.writer.send({"op": "remove", "slot": worker.id}, []):
                return
            worker.close_pipes()
            del self.workers[worker.id]
            log.info("%s removed", worker.label)

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
            for worker in self._live_workers(name):
                self._retire(worker, now)
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

    # -- shutdown -------------------------------------------------------------------
    def _shutdown(self) -> int:
        timeout = self.settings.logger.shutdown_timeout_secs
        began = time.monotonic()
        deadline = began + timeout
        self._notify("STOPPING=1")
        self.stop_threads.set()
        if self.analytics_thread is not None:
            self.analytics_thread.wake()
        for status in self.exchanges.values():
            status.discovery_stop.set()
        # Workers first, with half the time to hand their last batches to the pipes...
        workers = list(self.workers.values())
        for worker in workers:
            worker.stop()
        join_all(workers, time.monotonic() + timeout / 2, self.launcher)
        for worker in workers:
            worker.reap(time.monotonic())
        # ... then the writer reads every pipe dry, flushes and fsyncs.
        self.writer.stop()
        join_all([self.writer], deadline - 0.2, self.launcher)
        writer_exit = self.writer.reap(time.monotonic())
        self._close_feed()
        self._stop_health()
        code = 1 if writer_exit not in (0, None) else 0
        log.info("supervisor stopped in %.1f s", time.monotonic() - began)
        self.log_receiver.stop()
        return code

    # -- health ------------------------------------------------------------------------
    def _start_health(self) -> None:
        """Serve /, /health, /metrics and /analytics from the views this loop publishes (web.py)."""
        from .web import start_health_server  # Flask is loaded here, in the supervisor only

        self.health_server = start_health_server(lambda: self.view, self.analytics,
                                                 self.settings.logger.health_check_host,
                                                 self.settings.logger.health_check_port)

    def _stop_health(self) -> None:
        if self.health_server is not None:
            self.health_server.shutdown()

    def _publish_view(self) -> None:
        """Publish a frozen ServiceView for the web thread (one reference swap)."""
        slots = tuple(
            SlotView(slot=w.id, exchange=w.spec.exchange, shard=w.spec.shard,
                     symbol_names=tuple(x.symbol for x in w.spec.symbols), state=w.state.value,
                     restarts=w.machine.restarts, reason=w.machine.reason, stats=w.stats, note=w.note)
            for w in self.workers.values()
        )
        exchanges = tuple(
            ExchangeView(name=name, state=x.state.value, error=x.error, symbols=x.symbols,
                         uncovered_symbols=len(x.uncovered),
                         refused_symbols=tuple("%s (%s)" % p for p in x.problems),
                         down_since=x.down_since if x.state is not ExchangeState.RUNNING else 0.0,
                         discovery_errors=x.discovery_errors, listing_skipped=tuple(sorted(x.listing_skipped.items())))
            for name, x in self.exchanges.items()
        )
        lg = self.settings.logger
        writer = WriterView(state=self.writer.state.value, restarts=self.writer.machine.restarts,
                            reason=self.writer.machine.reason,
                            backlog_bytes=sum(w.backlog() for w in self.workers.values()), stats=self.writer.stats,
                            last_io_error=self.last_io_error, stalled_since=self.write_stalled_since,
                            stall_limit_secs=max(WRITE_STALL_SECS, 3 * lg.flush_interval_secs))
        analytics = self.analytics_thread
        threads = (
            ThreadView("analytics", alive=analytics is not None and analytics.is_alive(),
                       restarts=self.thread_restarts["analytics"],
                       errors=self.analytics_errors + (analytics.errors if analytics is not None else 0)),
            ThreadView("log-receiver", alive=self.log_receiver is not None and self.log_receiver.is_alive(),
                       restarts=self.thread_restarts["log-receiver"], errors=0),
            ThreadView("discovery", alive=any(x.thread is not None and x.thread.is_alive()
                                              for x in self.exchanges.values()),
                       restarts=sum(x.thread_restarts for x in self.exchanges.values()),
                       errors=sum(x.discovery_errors for x in self.exchanges.values())),
        )
        self.view = ServiceView(started=self.started, pid=os.getpid(), stall_timeout_secs=lg.stall_timeout_secs,
                                slots=slots, writer=writer, exchanges=exchanges, threads=threads)
