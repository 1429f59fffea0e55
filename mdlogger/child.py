"""One supervised child process (a worker slot or the writer) behind one object.

A :class:`Child` owns everything about its process: the state machine, the
spawn, the kill, the reap with its exit handling and backoff, and the
heartbeat check. The supervisor's loop calls the same methods on every child
(``due``/``start``, ``reap``, ``check``, ``tick``, ``stop``); what differs
between a worker and the writer lives in :class:`WorkerChild` and
:class:`WriterChild`.

Every state change goes through :meth:`ProcessState.go`, which refuses a
transition the table below does not list, so no code can set a state
directly. Forking and signalling go through one :class:`Launcher`, so the
state machine and the children are tested with a fake one, without forking.

    STOPPED  --(start)-------------------------> STARTING
    BACKOFF  --(delay over: start)-------------> STARTING    (restarts + 1)
    STARTING --(alive START_SECS)--------------> RUNNING
    STARTING/RUNNING --(exit)------------------> BACKOFF     (capped, jittered delay)
    STARTING/RUNNING --(exit code fatal_code)--> FATAL       (never retried)
    STARTING/RUNNING --(reload drops it)-------> RETIRING --(exit)--> RETIRED
    STOPPED/BACKOFF/FATAL --(reload drops it)--> RETIRED     (never started again)
    STARTING/RUNNING --(shutdown)--------------> STOPPING --(exit)--> STOPPED
    BACKOFF --(shutdown)-----------------------> STOPPED
    RUNNING for healthy_run_secs: the backoff resets (no state change)

The states' values are the lowercase words ``/health`` shows.
"""

from __future__ import annotations

import json
import logging
import multiprocessing.connection
import multiprocessing.util
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterable

from . import transport
from .backoff import Backoff
from .budget import RUNTIME_DIR
from .stats import WORKER_FIELDS, Block, Note
from .worker import EXIT_FATAL, WorkerSpec, worker_main
from .writer import writer_main

log = logging.getLogger("mdlogger.supervisor")

START_SECS = 1.0  # alive this long after a start: RUNNING


class State(Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"  # shutdown: asked to stop, not yet reaped
    FATAL = "fatal"
    RETIRING = "retiring"  # a reload dropped it: asked to stop, not yet reaped
    RETIRED = "retired"  # gone for good


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.STARTING, S.RETIRED}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.FATAL, S.RETIRING, S.STOPPING}),
    S.RUNNING: frozenset({S.BACKOFF, S.FATAL, S.RETIRING, S.STOPPING}),
    S.BACKOFF: frozenset({S.STARTING, S.RETIRED, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.FATAL: frozenset({S.RETIRED}),
    S.RETIRING: frozenset({S.RETIRED}),
    S.RETIRED: frozenset(),
}
ALIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING, S.RETIRING})  # states that have a process


class InvalidTransition(RuntimeError):
    pass


@dataclass
class ProcessState:
    """The state machine of one supervised process: pure bookkeeping, never forks or kills."""

    name: str
    backoff: Backoff
    state: State = S.STOPPED
    restarts: int = 0
    started_at: float = 0.0  # monotonic
    running_since: float = 0.0
    next_start: float = 0.0  # monotonic; when BACKOFF ends
    last_exit: int | None = None
    reason: str = ""
    backoff_reset: bool = False

    def go(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition("%s: %s -> %s is not a transition" % (self.name, self.state.name, new.name))
        self.state = new

    def due(self, now: float) -> bool:
        return self.state in (S.STOPPED, S.BACKOFF) and now >= self.next_start

    def on_started(self, now: float) -> None:
        if self.state is S.BACKOFF:
            self.restarts += 1
        self.go(S.STARTING)  # STOPPED/BACKOFF -> STARTING
        self.started_at = now
        self.backoff_reset = False

    def on_tick(self, now: float, healthy_run: float) -> None:
        if self.state is S.STARTING and now - self.started_at >= START_SECS:
            self.go(S.RUNNING)  # STARTING -> RUNNING
            self.running_since = now
        if self.state is S.RUNNING and not self.backoff_reset and now - self.running_since >= healthy_run:
            self.backoff.reset()
            self.backoff_reset = True

    def retire(self) -> None:
        """A reload dropped it: never started again (RETIRING while its process is still to stop)."""
        self.go(S.RETIRING if self.state in ALIVE else S.RETIRED)
        self.reason = "retired by a configuration reload"

    def stop(self) -> None:
        """Shutdown: a live process is STOPPING until reaped; a waiting one is STOPPED at once.

        Either way it is not started again."""
        self.next_start = float("inf")
        if self.state in (S.STARTING, S.RUNNING):
            self.go(S.STOPPING)
        elif self.state is S.BACKOFF:
            self.go(S.STOPPED)
        # STOPPED, FATAL, RETIRED stay; RETIRING and STOPPING are already stopping

    def on_exit(self, code: int | None, now: float, fatal_code: int | None = EXIT_FATAL) -> float:
        """Record an exit; returns the delay before the next start (inf when it will not start again)."""
        self.last_exit = code
        if self.state is S.RETIRING:
            self.go(S.RETIRED)  # RETIRING -> RETIRED
            return float("inf")
        if self.state is S.STOPPING:
            self.go(S.STOPPED)  # STOPPING -> STOPPED
            return float("inf")
        if fatal_code is not None and code == fatal_code:
            self.go(S.FATAL)  # STARTING/RUNNING -> FATAL
            self.reason = "exited with code %s: cannot start" % code
            return float("inf")
        delay = self.backoff.next_delay()
        self.go(S.BACKOFF)  # STARTING/RUNNING -> BACKOFF
        self.next_start = now + delay
        self.reason = describe_exit(code)
        return delay


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return "killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return "exited with code %d" % code


SOCKET_PATH_MAX = 107  # bytes of a Unix socket path: sun_path holds 108 with the terminating NUL
# What multiprocessing puts under the temp directory for the forkserver's listening socket:
# util.get_temp_dir() makes "pymp-XXXXXXXX" under tempfile.gettempdir(), and
# connection.arbitrary_address() names the socket "listener-XXXXXXXX" in it.
FORKSERVER_DIR_NAME = "pymp-XXXXXXXX"
FORKSERVER_SOCKET_NAME = "listener-XXXXXXXX"
SHORT_DIR_PREFIX = "mdlogger-"  # + 8 random characters (tempfile.mkdtemp)
SHORT_DIR_BASES = ("/tmp",)  # where a private directory is made first (then the data directory's .run)


class SocketDirError(Exception):
    """No directory short enough for the forkserver's socket: a one-line message for the operator."""


def forkserver_socket_dir(data_path: str, bases: Iterable[str] | None = None) -> str | None:
    """Make sure the forkserver's Unix socket path fits; call before the forkserver starts.

    The forkserver binds its socket under ``tempfile.gettempdir()`` (TMPDIR),
    two names deep; with a long TMPDIR (about 75 characters or more) the bind
    fails with "AF_UNIX path too long" and no child can start. When the path
    would not fit, a private directory (``tempfile.mkdtemp``: mode 0700, a
    random name) is made under the first of ``bases`` where the path fits and
    that can be written: ``/tmp`` (where the socket goes with the usual
    TMPDIR; under systemd's ``PrivateTmp`` it is the service's own), else the
    data directory's ``.run`` (the service can always write there), and
    multiprocessing is pointed at it: it is the directory
    ``multiprocessing.util.get_temp_dir()`` returns, kept in the process's
    ``_config["tempdir"]`` (CPython's own place for it; the rest of the
    process keeps TMPDIR). It is removed at exit, like multiprocessing's own.

    Returns the directory chosen, or None when the usual one fits. Raises
    :class:`SocketDirError` when no base gives a path that fits.
    """
    config = multiprocessing.current_process()._config
    current = config.get("tempdir")  # already made (a shared-memory heap may have needed it)
    usual = current or os.path.join(tempfile.gettempdir(), FORKSERVER_DIR_NAME)
    if _socket_path_fits(usual):
        return None
    if bases is None:
        bases = (*SHORT_DIR_BASES, os.path.join(data_path, RUNTIME_DIR))
    tried = []
    for base in bases:
        base = os.path.abspath(base)
        if not _socket_path_fits(os.path.join(base, SHORT_DIR_PREFIX + "XXXXXXXX")):
            tried.append("%s (too long)" % base)
            continue
        try:
            os.makedirs(base, 0o750, exist_ok=True)  # (the data directory's .run, if not made yet)
            chosen = tempfile.mkdtemp(prefix=SHORT_DIR_PREFIX, dir=base)  # 0700
        except OSError as exc:
            tried.append("%s (%s)" % (base, exc.strerror or exc))
            continue
        config["tempdir"] = chosen
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(chosen,), kwargs={"ignore_errors": True},
                                      exitpriority=-100)
        return chosen
    raise SocketDirError(
        "the forkserver's Unix socket would be %s (%d bytes, more than the %d a socket path may hold) and no "
        "shorter directory could be made (tried %s); set TMPDIR to a shorter directory"
        % (os.path.join(usual, FORKSERVER_SOCKET_NAME), _socket_path_len(usual), SOCKET_PATH_MAX,
           ", ".join(tried) or "nothing"))


def _socket_path_len(directory: str) -> int:
    return len(os.fsencode(os.path.join(directory, FORKSERVER_SOCKET_NAME)))


def _socket_path_fits(directory: str) -> bool:
    return _socket_path_len(directory) <= SOCKET_PATH_MAX


class Launcher:
    """Every fork and signal of the supervisor: children are forked from the forkserver.

    ``log_conn`` (the shared log pipe) is set once the supervisor has made it;
    every child gets it and the log level as its last two arguments.
    """

    def __init__(self, ctx, log_level: int):
        self.ctx = ctx
        self.log_level = log_level
        self.log_conn = None

    def spawn(self, target, name: str, args: tuple, kwargs: dict | None = None):
        process = self.ctx.Process(target=target, name=name, args=args + (self.log_conn, self.log_level),
                                   kwargs=kwargs or {}, daemon=False)
        process.start()
        return process

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Child:
    """A supervised process: its state machine, spawn, kill, reap and heartbeat."""

    fatal_code: int | None = None  # an exit code that means "cannot start": FATAL, never retried
    exit_level = logging.WARNING  # how loudly an unexpected exit is logged
    process_name: str  # the name the process is given

    def __init__(self, label: str, launcher: Launcher, backoff: Backoff, stats: Block, next_start: float = 0.0):
        self.label = label
        self.launcher = launcher
        self.machine = ProcessState(label, backoff, next_start=next_start)
        self.stats = stats  # the child's counter block; "heartbeat" is checked here
        self.process = None
        self.killed_for = ""  # why the supervisor killed the running process ("" if it did not)
        self.stop_by = 0.0  # monotonic; a retiring process still alive then is killed

    @property
    def state(self) -> State:
        return self.machine.state

    def due(self, now: float) -> bool:
        return self.machine.due(now)

    # -- hooks -----------------------------------------------------------------------
    def prepare(self, settings) -> tuple:
        """Get ready for a new process; returns its target, arguments (log pipe and level follow) and
        keyword arguments."""
        raise NotImplementedError

    def started(self) -> None:
        """The new process is running."""

    def exited(self) -> None:
        """The process was reaped."""

    def stop(self) -> None:
        """Shutdown: ask the process to end (the supervisor waits, then reaps)."""
        raise NotImplementedError

    # -- the loop's calls ---------------------------------------------------------------
    def start(self, now: float, settings) -> None:
        self.stats.set("heartbeat", now)
        target, args, kwargs = self.prepare(settings)
        self.process = self.launcher.spawn(target, self.process_name, args, kwargs)
        self.killed_for = ""
        self.machine.on_started(now)
        log.info("started %s as pid %d (restart %d)", self.label, self.process.pid, self.machine.restarts)
        self.started()

    def tick(self, now: float, healthy_run: float) -> None:
        self.machine.on_tick(now, healthy_run)

    def reap(self, now: float) -> int | None:
        """If the process has ended: record it, log it, and return its exit code (else None)."""
        p = self.process
        if p is None or p.exitcode is None:
            return None
        p.join(0)
        code = p.exitcode
        self.process = None
        self.exited()
        delay = self.machine.on_exit(code, now, self.fatal_code)
        reason = self.killed_for or self.machine.reason
        if self.state is S.RETIRED:
            log.info("%s (pid %d) stopped (retired)", self.label, p.pid)
        elif self.state is S.FATAL:
            log.error("%s (pid %d) %s; not restarting (FATAL)", self.label, p.pid, reason)
        elif self.state is S.STOPPED:
            log.debug("%s (pid %d) stopped (%s)", self.label, p.pid, describe_exit(code))
        else:
            log.log(self.exit_level, "%s (pid %d) %s; restarting in %.1f s", self.label, p.pid, reason, delay)
        p.close()
        return code

    def check(self, now: float, heartbeat_limit: float) -> None:
        """Kill (SIGKILL) a process whose heartbeat stopped, or a retired one that overstays."""
        p = self.process
        if p is None or self.killed_for:
            return
        if self.state is S.RETIRING:
            if now > self.stop_by:
                self.kill("killed: did not stop in time after being retired", "did not stop after being retired")
            return
        silent = now - self.stats.get("heartbeat")
        if silent > heartbeat_limit:
            self.kill("killed after its heartbeat stopped for %.0f s" % silent,
                      "heartbeat stopped %.0f s ago" % silent)

    def kill(self, reason: str, what: str) -> None:
        self.killed_for = reason
        log.error("%s (pid %d): %s; killing it", self.label, self.process.pid, what)
        self.launcher.kill(self.process.pid, signal.SIGKILL)

    def retire(self, now: float, grace: float) -> None:
        """Stop for good: SIGTERM now, SIGKILL if still alive after ``grace`` seconds."""
        self.machine.retire()
        self.stop_by = now + grace
        if self.process is not None:
            log.info("stopping %s (pid %d): retired by a configuration reload", self.label, self.process.pid)
            self.launcher.kill(self.process.pid, signal.SIGTERM)


class WorkerChild(Child):
    """One shard: a worker process slot with its own pipe, counter block and note, kept across restarts."""

    fatal_code = EXIT_FATAL

    def __init__(self, spec: WorkerSpec, launcher: Launcher, backoff: Backoff, stats: Block, note: Note,
                 pipe_r: multiprocessing.connection.Connection, pipe_w: multiprocessing.connection.Connection,
                 next_start: float = 0.0):
        super().__init__(spec.label, launcher, backoff, stats, next_start)
        self.spec = spec
        self.note = note  # symbols the exchange refused on this shard
        self.pipe_r = pipe_r  # handed to the writer
        self.pipe_w = pipe_w  # handed to each worker incarnation

    @classmethod
    def create(cls, spec: WorkerSpec, launcher: Launcher, backoff: Backoff, next_start: float) -> "WorkerChild":
        """A new slot: its pipe (grown to the transport's size) and its shared counters."""
        r, w = os.pipe()
        transport.set_pipe_size(w)
        return cls(spec, launcher, backoff, Block.shared(launcher.ctx, WORKER_FIELDS), Note.shared(launcher.ctx),
                   multiprocessing.connection.Connection(r, writable=False),
                   multiprocessing.connection.Connection(w, readable=False), next_start)

    @property
    def id(self) -> int:
        return self.spec.slot

    @property
    def process_name(self) -> str:
        return "worker-" + self.spec.label

    def prepare(self, settings) -> tuple:
        self.stats.set("connected", 0)
        return worker_main, (self.spec, settings, self.pipe_w, self.stats.array, self.note.array), {}

    def exited(self) -> None:
        self.stats.set("connected", 0)
        if not self.stats.get("down_since") or self.stats.get("connected_since") > self.stats.get("down_since"):
            self.stats.set("down_since", time.time())

    def stop(self) -> None:
        self.machine.stop()
        if self.process is not None:
            self.launcher.kill(self.process.pid, signal.SIGTERM)

    def add_message(self) -> dict:
        """The writer's "add" command: the slot, its exchange, and its symbols with their exchange spellings."""
        return {"op": "add", "slot": self.id, "exchange": self.spec.exchange,
                "symbols": [[s.symbol, s.exchange_name] for s in self.spec.symbols]}

    def backlog(self) -> int:
        """Bytes waiting in the pipe, not yet read by the writer."""
        try:
            return transport.pending_bytes(self.pipe_r.fileno())
        except OSError:
            return 0

    def close_pipes(self) -> None:
        self.pipe_w.close()
        self.pipe_r.close()


class WriterChild(Child):
    """The writer process, its control socket (add/remove slot fds, drain) and its "written" feed.

    A new writer is handed every slot again (``workers()``), retired ones
    included, so it reads their pipes dry. Each start also makes a new feed,
    a SEQPACKET socket pair: the writer's end goes to ``writer_main`` as the
    keyword argument ``feed`` (it names the TRADES tables it appended to), and
    ours waits in ``feed`` until the supervisor takes it for the analytics
    thread (:meth:`take_feed`). One pair per writer, so a new writer's
    datagrams never mix with a dead one's, and the old end reads as ended.
    """

    exit_level = logging.ERROR
    process_name = "writer"

    def __init__(self, launcher: Launcher, backoff: Backoff, stats: Block,
                 workers: Callable[[], Iterable[WorkerChild]]):
        super().__init__("writer", launcher, backoff, stats)
        self.workers = workers
        self.control: socket.socket | None = None
        self.feed: socket.socket | None = None  # our end of the newest writer's feed, until taken
        self._theirs: socket.socket | None = None
        self._their_feed: socket.socket | None = None

    def prepare(self, settings) -> tuple:
        self._close_theirs()  # (left from a start that failed)
        mine, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.control is not None:
            self.control.close()
        self.control = mine
        feed, self._their_feed = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.feed is not None:
            self.feed.close()  # (never taken: its writer did not live to be followed)
        self.feed = feed
        return writer_main, (settings, self._theirs, self.stats.array), {"feed": self._their_feed}

    def started(self) -> None:
        self._close_theirs()  # the writer holds its own copies now
        for worker in self.workers():
            self.add(worker)

    def _close_theirs(self) -> None:
        for end in (self._theirs, self._their_feed):
            if end is not None:
                end.close()
        self._theirs = self._their_feed = None

    def take_feed(self) -> socket.socket | None:
        """Our end of the newest writer's feed, once (then it is the taker's to close); None if taken."""
        feed, self.feed = self.feed, None
        return feed

    def stop(self) -> None:
        self.machine.stop()
        if self.process is not None:
            self.send({"op": "drain"}, [])

    def add(self, worker: WorkerChild) -> bool:
        return self.send(worker.add_message(), [worker.pipe_r.fileno()])

    def send(self, msg: dict, fds: list[int]) -> bool:
        if self.control is None:
            return False
        try:
            socket.send_fds(self.control, [json.dumps(msg).encode()], fds)
            return True
        except OSError as exc:
            log.warning("writer control: %s (will resend on its restart)", exc)
            return False


def join_all(children: list[Child], deadline: float, launcher: Launcher) -> None:
    """Wait for the children's processes to end until ``deadline``; SIGKILL the rest."""
    processes = [c.process for c in children if c.process is not None]
    pending = [p for p in processes if p.exitcode is None]
    while pending and time.monotonic() < deadline:
        multiprocessing.connection.wait([p.sentinel for p in pending], max(0.0, deadline - time.monotonic()))
        pending = [p for p in pending if p.exitcode is None]
    for child in children:
        if child.process is not None and child.process in pending:
            log.error("%s pid %d did not stop in time; killing it", child.label, child.process.pid)
            launcher.kill(child.process.pid, signal.SIGKILL)
    for p in processes:
        p.join(2.0)


def reap_orphans() -> None:
    """As PID 1 (in a container) reap whatever was reparented to us."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
