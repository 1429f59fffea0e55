"""The per-process state machine, the backoff and the children, without forking anything; and the
forkserver's socket directory (the one test that starts the real service: a long TMPDIR)."""

import json
import logging
import multiprocessing.connection
import multiprocessing.util
import os
import random
import re
import shutil
import signal
import socket
import tempfile

import pytest

from mdlogger import child as child_module
from mdlogger.backoff import Backoff
from mdlogger.child import (SOCKET_PATH_MAX, TRANSITIONS, InvalidTransition, Launcher, ProcessState, SocketDirError,
                            State, WorkerChild, WriterChild, forkserver_socket_dir, join_all)
from mdlogger.exchanges.base import SymbolInfo
from mdlogger.planning import ExchangeState, ExchangeStatus, free_shard_number, plan_shards, split_shards
from mdlogger.stats import WORKER_FIELDS, WRITER_FIELDS, Block, Note
from mdlogger.worker import EXIT_FATAL, WorkerSpec, worker_main
from mdlogger.writer import writer_main


def machine(base=1.0, cap=8.0):
    return ProcessState("t", Backoff(base, cap, random.Random(1)))


def test_backoff_grows_capped_and_jittered():
    b = Backoff(1.0, 8.0, random.Random(7))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for d, c in zip(delays, ceilings):
        assert c / 2 <= d <= c
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay() <= 1.0


def test_state_values_are_what_health_shows():
    assert [s.value for s in State] == ["stopped", "starting", "running", "backoff", "stopping", "fatal",
                                        "retiring", "retired"]
    assert [s.value for s in ExchangeState] == ["discovering", "running", "fatal"]
    assert ExchangeStatus("x").state is ExchangeState.DISCOVERING


@pytest.mark.parametrize("old", list(State))
def test_only_listed_transitions_are_allowed(old):
    for new in State:
        m = machine()
        m.state = old
        if new in TRANSITIONS[old]:
            m.go(new)
            assert m.state is new
        else:
            with pytest.raises(InvalidTransition):
                m.go(new)
            assert m.state is old


def test_terminal_states():
    assert TRANSITIONS[State.RETIRED] == frozenset()
    assert TRANSITIONS[State.FATAL] == {State.RETIRED}  # FATAL is left only by a reload that drops or replaces it


def test_starting_running_backoff_cycle_and_reset_after_healthy_run():
    m = machine()
    assert m.state is State.STOPPED and m.due(0)
    m.on_started(0.0)
    assert m.state is State.STARTING
    m.on_tick(0.5, healthy_run=10)
    assert m.state is State.STARTING
    m.on_tick(1.5, healthy_run=10)
    assert m.state is State.RUNNING
    d1 = m.on_exit(-9, 2.0)
    assert m.state is State.BACKOFF and 0.5 <= d1 <= 1.0 and "SIGKILL" in m.reason
    assert not m.due(2.0) and m.due(2.0 + d1)
    m.on_started(3.0)
    assert m.restarts == 1
    d2 = m.on_exit(1, 3.1)
    assert 1.0 <= d2 <= 2.0  # grew
    m.on_started(10.0)
    m.on_tick(11.5, healthy_run=10)
    m.on_tick(21.6, healthy_run=10)  # healthy for 10 s: backoff resets
    assert m.on_exit(1, 22.0) <= 1.0


def test_a_running_process_cannot_be_started_again():
    m = machine()
    m.on_started(0.0)
    with pytest.raises(InvalidTransition):
        m.on_started(0.1)


def test_fatal_exit_is_never_retried():
    m = machine()
    m.on_started(0.0)
    assert m.on_exit(EXIT_FATAL, 0.1) == float("inf")
    assert m.state is State.FATAL and not m.due(1e9)


def test_writer_has_no_fatal_code():
    m = machine()
    m.on_started(0.0)
    m.on_exit(EXIT_FATAL, 0.1, fatal_code=None)
    assert m.state is State.BACKOFF


def test_network_style_failures_keep_retrying_at_the_cap():
    m = machine(cap=4.0)
    t = 0.0
    for _ in range(50):
        m.on_started(t)
        t += m.on_exit(1, t + 0.1) + 0.1
    assert m.state is State.BACKOFF and m.backoff.ceiling() == 4.0


def test_shutdown_stops_live_and_waiting_processes_and_leaves_the_rest():
    live = machine()
    live.on_started(0.0)
    live.stop()
    assert live.state is State.STOPPING and not live.due(1e9)
    assert live.on_exit(0, 1.0) == float("inf") and live.state is State.STOPPED
    waiting = machine()
    waiting.on_started(0.0)
    waiting.on_exit(1, 0.1)
    waiting.stop()
    assert waiting.state is State.STOPPED
    fatal = machine()
    fatal.on_started(0.0)
    fatal.on_exit(EXIT_FATAL, 0.1)
    fatal.stop()
    assert fatal.state is State.FATAL


def test_split_shards_within_limits():
    syms = [SymbolInfo("S%d-USDT" % i, "S%dUSDT" % i, "S%d" % i, "USDT") for i in range(25)]
    shards, uncovered = split_shards(syms, per_connection=10, max_connections=5)
    assert len(shards) == 3 and all(len(s) <= 10 for s in shards) and not uncovered
    assert sorted(s.symbol for sh in shards for s in sh) == sorted(s.symbol for s in syms)
    shards, uncovered = split_shards(syms, per_connection=4, max_connections=3)
    assert len(shards) == 3 and sum(map(len, shards)) == 12 and len(uncovered) == 13


# -- planning: a pure function of the listing and the shards running now -------------------------


def sym(name, active=True):
    base, quote = name.split("-")
    return SymbolInfo(name, base + quote, base, quote, active)


def test_plan_keeps_unchanged_shards_and_starts_new_ones():
    listed = [sym("A-X"), sym("B-X"), sym("C-X"), sym("D-X", active=False)]
    current = [(sym("A-X"),), (sym("Z-X"),)]
    plan = plan_shards(None, listed, ["A-X", "B-X", "C-X", "D-X", "NOPE-X"], current, 2, 5)
    assert plan.problems == [("D-X", "inactive"), ("NOPE-X", "unknown")]
    assert (sym("A-X"),) in plan.shards and plan.retire == [(sym("Z-X"),)]
    assert sorted(s.symbol for shard in plan.start for s in shard) == ["B-X", "C-X"]
    assert plan.symbols == 3 and not plan.uncovered
    status = ExchangeStatus("x")
    status.take(plan, 2, 5)
    assert status.state is ExchangeState.RUNNING and status.symbols == 3 and status.problems == plan.problems


def test_plan_with_nothing_to_capture_makes_the_exchange_fatal():
    plan = plan_shards(None, [sym("A-X", active=False)], ["A-X"], [(sym("A-X"),)], 2, 5)
    assert plan.shards == [] and plan.retire == [(sym("A-X"),)]
    status = ExchangeStatus("x")
    status.take(plan, 2, 5)
    assert status.state is ExchangeState.FATAL and status.error == "no symbol to capture"


def test_free_shard_number_fills_the_lowest_hole():
    assert free_shard_number(set()) == 0
    assert free_shard_number({0, 2}) == 1
    assert free_shard_number({0, 1}) == 2


# -- children, with a launcher that never forks --------------------------------------------------


class FakeProcess:
    def __init__(self, pid, target, args, kwargs):
        self.pid, self.target, self.args, self.kwargs = pid, target, args, kwargs
        self.exitcode = None
        self.closed = False

    def join(self, timeout=None):
        pass

    def close(self):
        self.closed = True


class FakeLauncher(Launcher):
    """Records every spawn and signal; forks nothing."""

    def __init__(self):
        super().__init__(ctx=None, log_level=0)
        self.spawned, self.signals = [], []

    def spawn(self, target, name, args, kwargs=None):
        # A forked child holds its own copy of each socket it is given, as after a fork.
        args = tuple(a.dup() if isinstance(a, socket.socket) else a for a in args)
        kwargs = {k: v.dup() if isinstance(v, socket.socket) else v for k, v in (kwargs or {}).items()}
        p = FakeProcess(1000 + len(self.spawned), target, args + (self.log_conn, self.log_level), kwargs)
        self.spawned.append(p)
        return p

    def kill(self, pid, sig):
        self.signals.append((pid, sig))


@pytest.fixture
def launcher():
    return FakeLauncher()


@pytest.fixture
def new_worker(launcher):
    """A factory of worker children on real pipes (closed after the test)."""
    made = []

    def make(shard=0, next_start=0.0):
        r, w = os.pipe()
        spec = WorkerSpec(shard, "binance", shard, (sym("A-X"), sym("B-X")))
        worker = WorkerChild(spec, launcher, Backoff(1.0, 8.0, random.Random(1)), Block(WORKER_FIELDS), Note(),
                             multiprocessing.connection.Connection(r, writable=False),
                             multiprocessing.connection.Connection(w, readable=False), next_start)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close_pipes()


def test_worker_child_start_passes_explicit_arguments(launcher, new_worker):
    worker = new_worker()
    assert worker.due(0.0)
    worker.stats.set("connected", 1)
    worker.start(5.0, settings="SETTINGS")
    p = launcher.spawned[0]
    assert worker.process is p and worker.state is State.STARTING
    assert p.target is worker_main and p.args[:3] == (worker.spec, "SETTINGS", worker.pipe_w)
    assert worker.stats.get("heartbeat") == 5.0 and worker.stats.get("connected") == 0
    worker.tick(6.5, healthy_run=10)
    assert worker.state is State.RUNNING


def test_worker_child_reaped_after_a_crash_backs_off(launcher, new_worker):
    worker = new_worker()
    worker.start(0.0, None)
    worker.stats.set("connected", 1)
    assert worker.reap(0.5) is None  # still running
    p = worker.process
    p.exitcode = -signal.SIGSEGV
    assert worker.reap(1.0) == -signal.SIGSEGV
    assert worker.process is None and p.closed and worker.state is State.BACKOFF
    assert worker.machine.reason == "killed by SIGSEGV"
    assert worker.stats.get("connected") == 0 and worker.stats.get("down_since") > 0
    assert not worker.due(1.0) and worker.due(1.0 + 1.0)


def test_worker_child_that_cannot_start_is_fatal(launcher, new_worker):
    worker = new_worker()
    worker.start(0.0, None)
    worker.process.exitcode = EXIT_FATAL
    worker.reap(0.1)
    assert worker.state is State.FATAL and not worker.due(1e9)


def test_silent_heartbeat_kills_once_and_the_exit_is_a_restart(launcher, new_worker):
    worker = new_worker()
    worker.start(0.0, None)
    pid = worker.process.pid
    worker.check(1.0, heartbeat_limit=2.0)
    assert launcher.signals == []
    worker.check(3.0, heartbeat_limit=2.0)
    worker.check(3.5, heartbeat_limit=2.0)
    assert launcher.signals == [(pid, signal.SIGKILL)]
    assert worker.killed_for.startswith("killed after its heartbeat stopped")
    worker.process.exitcode = -signal.SIGKILL
    worker.reap(4.0)
    assert worker.state is State.BACKOFF
    worker.start(10.0, None)
    assert worker.killed_for == "" and worker.machine.restarts == 1


def test_retired_worker_gets_sigterm_then_sigkill_after_the_grace(launcher, new_worker):
    worker = new_worker()
    worker.start(0.0, None)
    worker.tick(1.5, healthy_run=10)
    pid = worker.process.pid
    worker.retire(2.0, grace=5.0)
    assert worker.state is State.RETIRING and launcher.signals == [(pid, signal.SIGTERM)]
    worker.check(6.0, heartbeat_limit=100)
    assert launcher.signals == [(pid, signal.SIGTERM)]
    worker.check(7.5, heartbeat_limit=100)
    assert launcher.signals[-1] == (pid, signal.SIGKILL)
    worker.process.exitcode = -signal.SIGKILL
    worker.reap(8.0)
    assert worker.state is State.RETIRED and not worker.due(1e9)


def test_idle_worker_retires_without_a_signal(launcher, new_worker):
    worker = new_worker(next_start=100.0)
    worker.retire(0.0, grace=5.0)
    assert worker.state is State.RETIRED and launcher.signals == []


def test_worker_stop_sends_sigterm_and_ends_stopped(launcher, new_worker):
    worker = new_worker()
    worker.start(0.0, None)
    pid = worker.process.pid
    worker.stop()
    assert worker.state is State.STOPPING and launcher.signals == [(pid, signal.SIGTERM)]
    worker.process.exitcode = 0
    join_all([worker], deadline=0.0, launcher=launcher)  # already ended: nothing to kill
    assert launcher.signals == [(pid, signal.SIGTERM)]
    assert worker.reap(1.0) == 0 and worker.state is State.STOPPED and not worker.due(1e9)


def test_join_all_kills_what_did_not_stop(launcher, new_worker):
    worker = new_worker()
    worker.start(0.0, None)
    join_all([worker], deadline=0.0, launcher=launcher)
    assert launcher.signals == [(worker.process.pid, signal.SIGKILL)]


def recv(sock):
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 4)
    for fd in fds:
        os.close(fd)
    return json.loads(data), len(fds)


def test_writer_child_is_handed_every_slot_on_each_start(launcher, new_worker):
    workers = [new_worker(0), new_worker(1)]
    writer = WriterChild(launcher, Backoff(1.0, 8.0, random.Random(1)), Block(WRITER_FIELDS), lambda: workers)
    writer.start(0.0, "SETTINGS")
    p = launcher.spawned[-1]
    assert p.target is writer_main and p.args[0] == "SETTINGS" and p.args[2] is writer.stats.array
    theirs = p.args[1]
    try:
        msg, nfds = recv(theirs)
        assert msg == {"op": "add", "slot": 0, "exchange": "binance", "symbols": [["A-X", "AX"], ["B-X", "BX"]]}
        assert nfds == 1 and recv(theirs)[0]["slot"] == 1
        # A writer exit is never FATAL, whatever its code; the next writer gets a new control socket.
        p.exitcode = EXIT_FATAL
        writer.reap(0.5)
        assert writer.state is State.BACKOFF
        writer.start(5.0, "SETTINGS")
        assert launcher.spawned[-1].args[1] is not theirs and writer.machine.restarts == 1
        assert recv(launcher.spawned[-1].args[1])[0]["slot"] == 0
        writer.stop()
        assert writer.state is State.STOPPING
    finally:
        close_writer(writer, launcher)


def close_writer(writer, launcher):
    """Close every socket a WriterChild test made (ours and the fake children's copies)."""
    for p in launcher.spawned:
        if p.target is writer_main:
            p.args[1].close()
            p.kwargs["feed"].close()
    writer.control.close()
    feed = writer.take_feed()
    if feed is not None:
        feed.close()


def test_writer_child_heartbeat(launcher):
    writer = WriterChild(launcher, Backoff(1.0, 8.0, random.Random(1)), Block(WRITER_FIELDS), lambda: [])
    writer.start(0.0, None)
    try:
        writer.check(5.0, heartbeat_limit=2.0)
        assert launcher.signals == [(writer.process.pid, signal.SIGKILL)]
    finally:
        close_writer(writer, launcher)


def test_each_writer_start_makes_a_feed_for_analytics(launcher):
    """The writer's end goes to writer_main as ``feed=``; ours is taken once, and a new writer gets a new pair."""
    writer = WriterChild(launcher, Backoff(1.0, 8.0, random.Random(1)), Block(WRITER_FIELDS), lambda: [])
    writer.start(0.0, "SETTINGS")
    taken = []
    try:
        p = launcher.spawned[-1]
        theirs = p.kwargs["feed"]
        assert theirs.type == socket.SOCK_SEQPACKET and theirs.family == socket.AF_UNIX
        assert writer._their_feed is None  # our copy of the writer's end is closed once it started
        ours = writer.take_feed()
        taken.append(ours)
        assert ours is not None and writer.take_feed() is None  # taken once
        theirs.send(b'{"op": "written", "tables": []}')
        assert ours.recv(100) == b'{"op": "written", "tables": []}'
        # A new writer: a new pair; the old writer's end closing reads as the end on ours.
        p.exitcode = 1
        writer.reap(0.5)
        writer.start(5.0, "SETTINGS")
        new_theirs = launcher.spawned[-1].kwargs["feed"]
        assert new_theirs is not theirs
        new_ours = writer.take_feed()
        taken.append(new_ours)
        new_theirs.send(b"x")
        assert new_ours.recv(10) == b"x"
        theirs.close()
        assert ours.recv(10) == b""  # the end
    finally:
        close_writer(writer, launcher)
        for sock in taken:
            sock.close()


def test_a_feed_never_taken_is_closed_by_the_next_start(launcher):
    writer = WriterChild(launcher, Backoff(1.0, 8.0, random.Random(1)), Block(WRITER_FIELDS), lambda: [])
    writer.start(0.0, None)
    first = writer.feed
    try:
        launcher.spawned[-1].exitcode = 1
        writer.reap(0.5)
        writer.start(5.0, None)
        assert first.fileno() == -1 and writer.feed is not first
    finally:
        close_writer(writer, launcher)


def test_health_answers_json_before_the_first_loop(tmp_path):
    """The view is published before the health server starts: no 500 at start-up."""
    from mdlogger.settings import load_settings
    from mdlogger.web import build_app
    from mdlogger.supervisor import Supervisor

    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    sup = Supervisor(settings)
    sup._publish_view()
    resp = build_app(lambda: sup.view, sup.analytics).test_client().get("/health")
    assert resp.status_code == 503 and resp.get_json()["exchanges"]["binance"]["state"] == "discovering"
    assert resp.get_json()["writer"]["state"] == "stopped"


def test_the_supervisor_hands_each_writers_feed_to_the_analytics_thread(tmp_path):
    """On every writer (re)start the new feed goes to the analytics thread; a replacement thread takes it over."""
    from mdlogger.analytics import AnalyticsThread
    from mdlogger.settings import load_settings
    from mdlogger.supervisor import Supervisor

    from helpers import wait_for

    settings = load_settings(None, {}, {"logger.data_path": str(tmp_path), "exchanges.binance.enabled": True},
                             check_resources=False)
    sup = Supervisor(settings)
    launcher = FakeLauncher()
    sup.writer.launcher = launcher
    thread = sup.analytics_thread = AnalyticsThread(str(tmp_path), sup.analytics, sup.stop_threads, fed=True)
    try:
        sup._supervise(0.0)  # the writer starts; its feed goes to the thread
        first = thread.take_feed()
        assert first is not None and sup.writer.feed is None
        thread.set_feed(first)
        launcher.spawned[-1].kwargs["feed"].send(b"hello")
        launcher.spawned[-1].exitcode = -9
        sup._supervise(0.5)  # reaped; restarts once its backoff is over
        sup._supervise(5.0)
        assert len(launcher.spawned) == 2 and first.fileno() == -1  # the untaken old feed is closed
        second = thread._new_feed
        launcher.spawned[-1].kwargs["feed"].send(b"again")
        assert second.recv(10) == b"again"
        # The thread ended (here: never started); its replacement gets the feed and the offsets.
        thread.run = lambda: None
        thread.start()
        thread.join()
        sup._check_threads()
        fresh = sup.analytics_thread
        assert fresh is not thread and fresh.fed
        wait_for(lambda: fresh.feed is second, what="the replacement thread following the same feed")
    finally:
        sup.stop_threads.set()
        for status in sup.exchanges.values():
            status.discovery_stop.set()
        sup.analytics_thread.wake()
        sup.analytics_thread.join(5)
        sup.analytics_thread.close_feed()
        close_writer(sup.writer, launcher)


# -- the forkserver's socket directory (a long TMPDIR) -------------------------------------------------------


def long_dir(root, length=100) -> str:
    """A directory whose path is ``length`` characters long or more (a long TMPDIR)."""
    path = os.path.join(str(root), "t" * max(1, length - len(str(root)) - 1))
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture
def mp_tempdir(monkeypatch, tmp_path):
    """multiprocessing's temp directory not chosen yet, and TMPDIR long; both restored after the test."""
    monkeypatch.delitem(multiprocessing.current_process()._config, "tempdir", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", long_dir(tmp_path))
    return tmp_path


def test_a_long_tmpdir_gets_a_short_private_directory_for_the_forkserver(mp_tempdir):
    base = tempfile.mkdtemp(prefix="md-", dir="/tmp")
    try:
        chosen = forkserver_socket_dir(str(mp_tempdir / "data"), bases=[long_dir(mp_tempdir, 120), base])
        assert os.path.dirname(chosen) == base and os.stat(chosen).st_mode & 0o777 == 0o700
        assert multiprocessing.util.get_temp_dir() == chosen  # where the forkserver binds its socket
        address = multiprocessing.connection.arbitrary_address("AF_UNIX")
        assert address.startswith(chosen) and len(address) <= SOCKET_PATH_MAX
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(address)  # (what failed with "AF_UNIX path too long")
    finally:
        shutil.rmtree(base)


def test_a_short_tmpdir_is_left_alone(monkeypatch, tmp_path):
    monkeypatch.delitem(multiprocessing.current_process()._config, "tempdir", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert forkserver_socket_dir(str(tmp_path)) is None
    assert "tempdir" not in multiprocessing.current_process()._config


def test_the_data_directory_serves_when_tmp_cannot(mp_tempdir, monkeypatch):
    monkeypatch.setattr(child_module, "SHORT_DIR_BASES", (long_dir(mp_tempdir, 120),))
    data = tempfile.mkdtemp(prefix="md-", dir="/tmp")
    try:
        chosen = forkserver_socket_dir(data)
        assert os.path.dirname(chosen) == os.path.join(data, ".run")
    finally:
        shutil.rmtree(data)


def test_no_short_directory_is_one_line_and_the_supervisor_starts_nothing(mp_tempdir, monkeypatch, caplog):
    from mdlogger.settings import load_settings
    from mdlogger.supervisor import EXIT_NO_SOCKET_DIR, Supervisor

    monkeypatch.setattr(child_module, "SHORT_DIR_BASES", (long_dir(mp_tempdir, 120),))
    data = long_dir(mp_tempdir / "data", 120)
    with pytest.raises(SocketDirError) as err:
        forkserver_socket_dir(data)
    assert "\n" not in str(err.value) and "set TMPDIR to a shorter directory" in str(err.value)
    settings = load_settings(None, {}, {"logger.data_path": data, "exchanges.binance.enabled": True},
                             check_resources=False)
    sup = Supervisor(settings)
    with caplog.at_level(logging.ERROR, "mdlogger.supervisor"):
        assert sup.run() == EXIT_NO_SOCKET_DIR
    assert [r.getMessage().count("\n") for r in caplog.records] == [0] and "cannot start" in caplog.text
    assert sup.writer.process is None and sup.analytics_thread is None


@pytest.mark.slow
def test_the_service_runs_with_a_long_tmpdir(tmp_path):
    """With TMPDIR 100 characters long the forkserver's socket would not fit: the service uses a short
    private directory, says so, captures, and removes the directory at exit."""
    from mdlogger.fakes.binance import FakeBinance

    from helpers import service, service_config, wait_for

    tmpdir = long_dir(tmp_path, 100)
    private = None
    try:
        with FakeBinance(symbols=["BTC-USDT"], mode="steady", rate=20) as fake, \
                service(tmp_path, service_config(tmp_path / "data", [fake]), env={"TMPDIR": tmpdir}) as svc:
            m = wait_for(lambda: re.search(r"too long for the forkserver's Unix socket; using (\S+)", svc.log_text()),
                         what="the line saying which directory the forkserver uses")
            private = m.group(1)
            assert os.path.dirname(private) == "/tmp" and os.stat(private).st_mode & 0o777 == 0o700
            svc.wait_all_connected(1)
            wait_for(lambda: svc.writer()["rows_trades"] > 0, what="trades on disk",
                     explain=lambda: svc.log_text()[-3000:])
            assert svc.stop() == 0, svc.log_text()[-3000:]
        assert not os.path.exists(private)  # removed at exit
        assert "AF_UNIX path too long" not in svc.log_text() and "Traceback" not in svc.log_text()
    finally:
        if private is not None and os.path.isdir(private):  # (a test that failed: the tree was killed)
            shutil.rmtree(private)
