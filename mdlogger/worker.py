"""A worker process: one WebSocket connection for one shard of one exchange.

::

    exchange --frames--> websocket-client (BufferedSocket under it)
                             |  recv_data_frame: data, ping (auto-pong), pong, close
                             v
                         Session.on_message (the exchange adapter) --records--> WorkerSink
                                                                                 |
                             FrameSender: batches of packed records, one frame    |
                             per <= PIPE_BUF write, bounded spill, drop counted <-+
                                   |
                                   v  slot pipe --> writer process

The loop is exchange-agnostic: what differs between exchanges is in the
adapter (URL, subscribe messages, parsing, keepalive text, limits) and in two
exceptions a session may raise (``Reconnect``, ``Pause``). Network failures
never end the process: it reconnects with capped, jittered backoff for as long
as the service runs. A connection that is open but silent (no frame of any
kind, pings included) past ``silence_timeout_secs`` is treated as dead.
Silence is per connection, never per symbol.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Sequence

import websocket

from . import records as rec
from .backoff import Backoff
from .budget import SharedBucket, runtime_dir
from .clock import ClockSampler, clock_note
from .exchanges import adapter_for
from .exchanges.base import Pause, Reconnect, Refused, Rotate, Sink, SymbolInfo
from .logs import configure_child
from .settings import Settings
from .stats import DROP_REASONS, WORKER_FIELDS, Block, Note
from .transport import FrameSender

log = logging.getLogger("mdlogger.worker")

EXIT_OK = 0
EXIT_FATAL = 3  # cannot start at all (bad symbols, no adapter): the supervisor must not retry
TICK_SECS = 0.25
RATE_LOG_SECS = 60.0  # each worker logs its message rate this often
RATE_WINDOW_SECS = 5.0  # the rate on /health is measured over this window
SAMPLE_MAX = 300
OVERLAP_SECS = 3.0  # both connections are read this long when one replaces the other
OVERLAP_POLL_SECS = 0.01
CONNECT_BURST = 3.0  # connection attempts an exchange's shards may make at once from a full bucket
RECONNECT_JITTER_SECS = 0.25  # after a connection that delivered data, the next attempt waits at most this
CLOCK_SAMPLE_SECS = 0.01  # at most one clock-offset sample per this many seconds
CLOCK_PUBLISH_SECS = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the settings, decided by the supervisor."""

    slot: int
    exchange: str
    shard: int  # index of this shard within its exchange
    symbols: tuple[SymbolInfo, ...]

    @property
    def label(self) -> str:
        return "%s#%d" % (self.exchange, self.shard)


class ConnectionLost(Exception):
    """The connection ended (closed, silent, or too old)."""


class Link:
    """One open WebSocket with its parsing session and send pacing."""

    def __init__(self, ws, session, limiter: "SendLimiter"):
        self.ws = ws
        self.session = session
        self.limiter = limiter
        self.opened = time.monotonic()
        self.fragments: list = []

    def close(self) -> None:
        try:
            self.ws.close(timeout=0.5)
        except (websocket.WebSocketException, OSError):
            pass
        self.ws.shutdown()


class BufferedSocket:
    """Serve websocket-client's small reads from one large ``recv``.

    websocket-client asks the socket for each frame's header, extended length
    and payload separately: about three system calls per frame. This wrapper
    reads up to 256 KiB at once and hands out slices, so a burst of frames
    costs one system call. It is installed on ``WebSocket.sock`` after the
    handshake; everything but ``recv`` passes through to the real socket.
    """

    CHUNK = 1 << 18

    def __init__(self, sock):
        self._sock = sock
        self._timeout = sock.gettimeout()
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            end = pos + bufsize
            self._pos = end
            return buf[pos:end]
        data = self._sock.recv(self.CHUNK)
        if len(data) <= bufsize:
            self._buf, self._pos = b"", 0
            return data
        self._buf, self._pos = data, bufsize
        return data[:bufsize]

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    # websocket-client asks for the timeout on every read: answer from a cache.
    def gettimeout(self):
        return self._timeout

    def settimeout(self, value) -> None:
        self._sock.settimeout(value)
        self._timeout = value

    def __getattr__(self, name):
        return getattr(self._sock, name)


class SendLimiter:
    """Space outgoing messages at least ``1/rate`` seconds apart (no bursts)."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self.next_at = 0.0

    def wait(self) -> None:
        now = self.clock()
        if now < self.next_at:
            self.sleep(self.next_at - now)
            now = self.next_at
        self.next_at = now + self.interval


class WorkerSink(Sink):
    """Packs parsed records into the sender and counts what was refused."""

    def __init__(self, sender: FrameSender, stats: Block, label: str, note: Note | None = None):
        self.sender = sender
        self.stats = stats
        self.label = label
        self.note = note or Note()
        self.refused_symbols: set[str] = set()
        self._logged_reasons: set[str] = set()
        self.clock: ClockSampler | None = None
        self._md_pack = rec.MD_WIRE.pack
        self._trade_pack = rec.TRADE_WIRE.pack
        self._add_md = sender.add_md
        self._add_snapshot = sender.add_snapshot
        self.raw_trade = sender.add_trade

    @property
    def trades(self) -> int:
        return self.sender.trades_added

    @property
    def md(self) -> int:
        return self.sender.md_added

    def trade(self, symbol, trade_id, sec, nanos, price, size, side, maker=rec.ZERO_ID, taker=rec.ZERO_ID,
              snapshot=False):
        record = self._trade_pack(symbol, trade_id, sec, nanos, price, size, side, maker, taker)
        (self._add_snapshot if snapshot else self.raw_trade)(record)

    def ticker(self, symbol, sec, nanos, price, volume, side, bid, ask):
        self._add_md(self._md_pack(symbol, sec, nanos, price, volume, side, bid, ask))

    def refuse(self, reason: str, sample) -> None:
        if reason not in DROP_REASONS:
            reason = "unknown_type"
        if reason == "bad_time" and self.clock is not None and isinstance(sample, str) and sample.isdigit():
            self.clock.sample(time.time_ns(), int(sample), 0)  # a refused time still tells how far off the clocks are
        self.stats.add("drop_" + reason)
        self.stats.add("parse_errors")
        if reason not in self._logged_reasons:
            self._logged_reasons.add(reason)
            log.warning("%s: first message refused as %s (counted on /health from now on): %s",
                        self.label, reason, _sample(sample))

    def exchange_error(self, text: str, symbol: str | None = None) -> None:
        self.stats.add("drop_exchange_error")
        self.stats.add("parse_errors")
        if symbol and symbol not in self.refused_symbols:
            self.refused_symbols.add(symbol)
            self.stats.set("refused_symbols", len(self.refused_symbols))
            self.note.set(",".join(sorted(self.refused_symbols)))
        log.error("%s: the exchange says: %s", self.label, text)


class OverlapSink(Sink):
    """A connection's sink while two connections overlap.

    The old connection stays the source of truth (``hold=False``: its records
    pass through and the newest trade per symbol is remembered). The new
    connection's trades are held (``hold=True``); at the switch, only those
    newer than what the old one delivered are forwarded, in order, so the
    overlap neither duplicates nor loses a trade. Its tickers are dropped
    (the old connection still delivers them).
    """

    def __init__(self, inner: WorkerSink, hold: bool):
        self.inner = inner
        self.hold = hold
        self.held: list[bytes] = []
        self.newest: dict[bytes, tuple[int, int, int]] = {}
        self.raw_trade = self._raw

    def _raw(self, record: bytes, snapshot: bool = False) -> None:
        if self.hold:
            self.held.append(record)
            return
        sym, tid, sec, nanos = _TRADE_HEAD.unpack_from(record)
        self.newest[sym] = max(self.newest.get(sym, (0, 0, 0)), (tid, sec, nanos))
        (self.inner._add_snapshot if snapshot else self.inner.raw_trade)(record)

    def trade(self, symbol, trade_id, sec, nanos, price, size, side, maker=rec.ZERO_ID, taker=rec.ZERO_ID,
              snapshot=False):
        self._raw(rec.TRADE_WIRE.pack(symbol, trade_id, sec, nanos, price, size, side, maker, taker), snapshot)

    def ticker(self, *args):
        if not self.hold:
            self.inner.ticker(*args)

    def refuse(self, reason, sample):
        self.inner.refuse(reason, sample)

    def exchange_error(self, text, symbol=None):
        self.inner.exchange_error(text, symbol)

    def release(self, newest: dict) -> tuple[int, int]:
        """Forward held trades newer than ``newest`` per symbol; returns (forwarded, skipped)."""
        sent = skipped = 0
        for record in self.held:
            sym, tid, sec, nanos = _TRADE_HEAD.unpack_from(record)
            last = newest.get(sym)
            if last is None or (tid > last[0] if tid and last[0] else (sec, nanos) > last[1:]):
                self.inner.raw_trade(record)
                sent += 1
            else:
                skipped += 1
        self.held.clear()
        return sent, skipped


_TRADE_HEAD = struct.Struct("<%dsQII" % rec.SYMBOL_FIELD)


def _sample(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:SAMPLE_MAX]).decode("utf-8", "replace")
    text = str(value)
    return text if len(text) <= SAMPLE_MAX else text[:SAMPLE_MAX] + "..."


class Worker:
    def __init__(self, spec: WorkerSpec, settings: Settings, data_fd: int, stats: Block, note: Note | None = None):
        self.spec = spec
        self.settings = settings
        self.xsettings = settings.exchange(spec.exchange)
        self.adapter = adapter_for(self.xsettings)
        self.stats = stats
        self.sender = FrameSender(data_fd, rec.EXCHANGE_CODES[spec.exchange], settings.logger.worker_buffer_bytes,
                                  settings.logger.batch_max_delay_ms / 1000.0)
        self.sink = WorkerSink(self.sender, stats, spec.label, note)
        self.clock = self.sink.clock = ClockSampler(min_interval_secs=CLOCK_SAMPLE_SECS)
        self.backoff = Backoff(self.xsettings.reconnect_delay_secs, self.xsettings.max_reconnect_delay_secs)
        self.stop_requested = False
        self.parent = os.getppid()
        self.batch_delay = settings.logger.batch_max_delay_ms / 1000.0
        # One bucket of connection attempts per exchange, shared by all its shards (every process).
        self.connects = SharedBucket(os.path.join(runtime_dir(settings.logger.data_path), "%s.connect" % spec.exchange),
                                     self.adapter.connect_rate, CONNECT_BURST)
        self.first_connection = True  # a resume after it means a restart, after later ones a reconnect
        self._next_clock_publish = 0.0
        self._last_clock_note = 0.0
        self.messages = 0
        self._published = {"messages": 0, "md": 0, "trades": 0, "dropped": 0, "frames": 0, "records": 0}
        self._rate_mark = (time.monotonic(), 0)
        self._last_rate_log = time.monotonic()
        self._next_tick = 0.0

    # -- lifecycle ----------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self.stop_requested = True

    def run(self) -> int:
        log.info("%s: starting with %d symbols", self.spec.label, len(self.spec.symbols))
        while not self.stop_requested:
            self._pace_connect()
            if self.stop_requested:
                break
            delay = None
            records_before = self.sink.md + self.sink.trades
            try:
                self._connection()
            except Pause as exc:
                delay = exc.seconds
                log.warning("%s: exchange maintenance (%s); pausing %.0f s", self.spec.label, exc, delay)
            except Reconnect as exc:
                log.info("%s: reconnecting as the exchange asked: %s", self.spec.label, exc)
            except ConnectionLost as exc:
                log.warning("%s: connection lost: %s", self.spec.label, exc)
                delay = self._retry_delay(records_before)
            except (websocket.WebSocketException, OSError, ssl.SSLError) as exc:
                level = logging.INFO if self.stop_requested else logging.WARNING
                log.log(level, "%s: connection failed: %s: %s", self.spec.label, type(exc).__name__, exc)
                delay = self._retry_delay(records_before)
            self._disconnected()
            if delay and not self.stop_requested:
                log.info("%s: reconnecting in %.1f s", self.spec.label, delay)
                self._sleep(delay)
        return self._shutdown()

    def _shutdown(self) -> int:
        self._publish()
        ok = self.sender.drain(timeout=max(1.0, self.settings.logger.shutdown_timeout_secs / 3))
        if not ok:
            lost = self.sender.discard_waiting()
            log.error("%s: the writer did not take %d records before shutdown", self.spec.label, lost)
        self._publish()
        self.connects.close()
        log.info("%s: stopped after %d messages", self.spec.label, self.messages)
        return EXIT_OK

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop_requested:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, TICK_SECS))
            self._tick(time.monotonic())

    def _retry_delay(self, records_before: int) -> float:
        """How long to wait before the next attempt.

        A connection that subscribed and delivered data worked: the exchange
        dropped it (load shedding, a flapping network), so the backoff starts
        again and the next attempt goes out at once, with a little jitter.
        Only attempts that failed before any data escalate the backoff.
        """
        if self.sink.md + self.sink.trades > records_before:
            self.backoff.reset()
            return random.uniform(0.0, min(RECONNECT_JITTER_SECS, self.xsettings.reconnect_delay_secs))
        return self.backoff.next_delay()

    def _pace_connect(self) -> None:
        """Wait for a token of the exchange's shared connection budget (ticking meanwhile)."""
        while not self.stop_requested:
            wait = self.connects.try_acquire()
            if wait <= 0:
                return
            self._sleep(min(wait, 1.0))

    def _disconnected(self) -> None:
        if self.stats.get("connected"):
            self.stats.set("connected", 0)
            self.stats.set("down_since", time.time())
            self.stats.add("reconnects")

    # -- one connection -------------------------------------------------------
    def _open(self, sink: Sink) -> "Link":
        """Connect and subscribe; the caller closes the link."""
        symbols = self.spec.symbols
        url = self.adapter.ws_url(symbols)
        ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=False)
        log.debug("%s: connecting to %s", self.spec.label, url)
        link = Link(ws, self.adapter.new_session(symbols, sink), SendLimiter(self.adapter.send_rate))
        try:
            ws.connect(url, timeout=self.xsettings.connect_timeout_secs, suppress_origin=True)
            ws.sock = BufferedSocket(ws.sock)
            link.opened = time.monotonic()
            for message in self.adapter.subscribe_messages(symbols):
                link.limiter.wait()
                ws.send(message)
        except BaseException:
            link.close()
            raise
        log.info("%s: connected to %s, subscribed %d symbols", self.spec.label, url, len(symbols))
        return link

    def _resume_markers(self) -> None:
        """Tell the writer a connection (re)started for every symbol, after all that came before."""
        sec, nanos = divmod(time.time_ns(), 1_000_000_000)
        first = 1 if self.first_connection else 0
        self.first_connection = False
        pack = rec.TRADE_WIRE.pack
        self.sender.add_resume([pack(rec.symbol_bytes(info.symbol), first, sec, nanos, 0.0, 0.0, 0, rec.ZERO_ID,
                                     rec.ZERO_ID) for info in self.spec.symbols])

    def _connection(self) -> None:
        link = self._open(self.sink)
        self._resume_markers()
        try:
            self.stats.set("connected", 1)
            self.stats.set("connected_since", time.time())
            self.stats.set("last_message", time.time())
            while True:
                try:
                    self._receive(link.ws, link.session, link.limiter, link.opened)
                    return
                except Rotate as exc:
                    link = self._rotate(link, exc)
        finally:
            link.close()

    def _rotate(self, old: "Link", why: Exception) -> "Link":
        """Open the next connection before the old one goes, so coverage has no gap.

        Both connections are read for up to OVERLAP_SECS (or until the old one
        ends); see :class:`OverlapSink` for how trades are kept exactly once.
        """
        log.info("%s: %s: opening the next connection before this one closes", self.spec.label, why)
        held = OverlapSink(self.sink, hold=True)
        try:
            new = self._open(held)
        except (websocket.WebSocketException, OSError, ssl.SSLError) as exc:
            log.warning("%s: could not open the next connection (%s); reconnecting plainly", self.spec.label, exc)
            raise Reconnect(str(why)) from exc
        passing = OverlapSink(self.sink, hold=False)
        old.session.rebind(passing)
        deadline = time.monotonic() + OVERLAP_SECS
        old_alive = True
        while old_alive and time.monotonic() < deadline and not self.stop_requested:
            try:
                self._read_one(old)
            except (ConnectionLost, Reconnect, websocket.WebSocketException, OSError) as exc:
                log.info("%s: old connection ended during the overlap: %s", self.spec.label, exc)
                old_alive = False
            try:
                self._read_one(new)
            except (ConnectionLost, Reconnect, websocket.WebSocketException, OSError):
                new.close()
                raise
            self._tick(time.monotonic())
        old.close()
        sent, skipped = held.release(passing.newest)
        new.session.rebind(self.sink)
        self.stats.add("reconnects")
        log.info("%s: switched to the new connection (%d overlap trades kept, %d already had)",
                 self.spec.label, sent, skipped)
        return new

    def _read_one(self, link: "Link") -> None:
        """Read and handle at most one frame from a link (used only during an overlap)."""
        ws = link.ws
        ws.settimeout(OVERLAP_POLL_SECS)
        try:
            frame = ws.recv_frame()
        except websocket.WebSocketTimeoutException:
            return
        if frame.opcode == websocket.ABNF.OPCODE_TEXT and frame.fin:
            self.messages += 1
            try:
                link.session.on_message(frame.data, time.time_ns())
            except Refused as exc:
                self.sink.refuse(exc.reason, exc.detail or frame.data)
        else:
            self._other_frame(ws, frame, link.fragments, link.session, self.adapter.max_frame_bytes)

    def _receive(self, ws, session, limiter: SendLimiter, opened: float) -> None:
        """The hot loop: one iteration per frame, everything else once per tick."""
        sink = self.sink
        sender = self.sender
        silence = self.xsettings.silence_timeout_secs
        max_frame = self.adapter.max_frame_bytes
        max_age = self.adapter.max_connection_age
        healthy = self.settings.logger.healthy_run_secs
        batch_delay = self.batch_delay
        on_message = session.on_message
        recv_frame = ws.recv_frame  # frames as they come: we answer pings and join fragments ourselves
        op_text = websocket.ABNF.OPCODE_TEXT
        monotonic, time_ns = time.monotonic, time.time_ns
        clock = self.clock
        next_sample = 0.0
        last_frame = monotonic()
        timeout = TICK_SECS
        ws.settimeout(timeout)
        backoff_reset = False
        fragments: list[websocket.ABNF] = []
        while not self.stop_requested:
            try:
                frame = recv_frame()
            except websocket.WebSocketTimeoutException:
                frame = None
            now = monotonic()
            if frame is not None:
                last_frame = now
                if frame.opcode == op_text and frame.fin:
                    self.messages += 1
                    data = frame.data
                    try:
                        if len(data) > max_frame:
                            raise Refused("oversized", data[:64])
                        if now < next_sample:
                            on_message(data, time_ns())
                        else:
                            before = sender.trades_added
                            recv_ns = time_ns()
                            on_message(data, recv_ns)
                            if sender.trades_added != before:
                                taken = sender.last_trade_time()
                                if taken is not None:
                                    clock.sample(recv_ns, *taken)
                                    next_sample = now + CLOCK_SAMPLE_SECS
                    except Refused as exc:
                        sink.refuse(exc.reason, exc.detail or data)
                else:
                    self._other_frame(ws, frame, fragments, session, max_frame)
            elif now - last_frame > silence:
                raise ConnectionLost("silent for %.0f s" % (now - last_frame))
            else:
                ping = session.keepalive(now - last_frame)
                if ping is not None:
                    limiter.wait()
                    ws.send(ping)
            if now >= sender.seal_at:
                sender.seal()
            elif timeout != batch_delay and sender.seal_at != math.inf:
                timeout = batch_delay  # a partial batch waits: do not block longer than its delay
                ws.settimeout(timeout)
            if now >= self._next_tick:
                self._tick(now)
                self.stats.set("last_message", time.time() - (now - last_frame))
                if timeout != TICK_SECS and sender.seal_at == math.inf:
                    timeout = TICK_SECS
                    ws.settimeout(timeout)
                if not backoff_reset and now - opened >= healthy:
                    self.backoff.reset()
                    backoff_reset = True
                if max_age and now - opened >= max_age:
                    raise Rotate("connection is %.1f h old" % ((now - opened) / 3600))

    def _other_frame(self, ws, frame, fragments: list, session, max_frame: int) -> None:
        """Control frames, binary frames and fragmented messages (rare)."""
        op = frame.opcode
        ABNF = websocket.ABNF
        if op == ABNF.OPCODE_PING:
            ws.pong(frame.data)  # echo the payload, as Binance requires
        elif op == ABNF.OPCODE_PONG:
            pass  # liveness only
        elif op == ABNF.OPCODE_CLOSE:
            raise ConnectionLost("closed by the exchange: %s" % _close_reason(frame.data))
        elif op in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY) and frame.fin:
            self.messages += 1
            self.sink.refuse("binary", frame.data[:64])
        elif op in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY, ABNF.OPCODE_CONT):
            if op != ABNF.OPCODE_CONT:
                fragments.clear()
            elif not fragments:
                raise ConnectionLost("continuation frame without a start")
            fragments.append(frame)
            size = sum(len(f.data) for f in fragments)
            if size > max_frame:
                fragments.clear()
                self.messages += 1
                self.sink.refuse("oversized", frame.data[:64])
            elif frame.fin:
                first = fragments[0]
                data = b"".join(f.data for f in fragments)
                fragments.clear()
                self.messages += 1
                if first.opcode == ABNF.OPCODE_BINARY:
                    self.sink.refuse("binary", data[:64])
                    return
                try:
                    session.on_message(data, time.time_ns())
                except Refused as exc:
                    self.sink.refuse(exc.reason, exc.detail or data)

    # -- bookkeeping -----------------------------------------------------------
    def _tick(self, now: float) -> None:
        self._next_tick = now + TICK_SECS
        self.sender.pump()
        self._publish()
        self.stats.set("heartbeat", now)
        if os.getppid() != self.parent:
            log.error("%s: the supervisor is gone; exiting", self.spec.label)
            self.stop_requested = True
        since, count = self._rate_mark
        if now - since >= RATE_WINDOW_SECS:
            self.stats.set("rate", (self.messages - count) / (now - since))
            self._rate_mark = (now, self.messages)
        if now >= self._next_clock_publish:
            self._next_clock_publish = now + CLOCK_PUBLISH_SECS
            p50, _, n = self.clock.publish(self.stats)
            note = clock_note(p50, int(self.stats.get("drop_bad_time"))) if n else None
            if note and now - self._last_clock_note >= RATE_LOG_SECS:
                self._last_clock_note = now
                log.warning("%s: %s", self.spec.label, note)
        if now - self._last_rate_log >= RATE_LOG_SECS:
            self._last_rate_log = now
            log.info("%s: %.1f msg/s, %d messages, %d records, %d dropped, %d refused",
                     self.spec.label, self.stats.get("rate"), self.messages, self.sink.md + self.sink.trades,
                     self.sender.dropped_records, int(self.stats.get("parse_errors")))

    def _publish(self) -> None:
        """Move local counters into the shared block (cheap; a few times a second)."""
        p = self._published
        s = self.stats
        for key, value, field in (
            ("messages", self.messages, "messages"),
            ("md", self.sink.md, "records_md"),
            ("trades", self.sink.trades, "records_trades"),
            ("records", self.sender.records_sent, "records"),
            ("dropped", self.sender.dropped_records, "dropped_records"),
            ("frames", self.sender.frames_sent, "frames_sent"),
        ):
            if value != p[key]:
                s.add(field, value - p[key])
                p[key] = value


def _close_reason(data: bytes) -> str:
    if len(data) >= 2:
        return "code %d %s" % (int.from_bytes(data[:2], "big"), data[2:].decode("utf-8", "replace"))
    return "no code"


def worker_main(spec: WorkerSpec, settings: Settings, data_conn, stats_array, note_array, log_conn,
                log_level: int) -> None:
    """Entry point of a worker process; every input is an explicit argument.

    ``data_conn`` and ``log_conn`` are write-only ``multiprocessing`` connections
    wrapping the slot pipe and the shared log pipe (they carry the descriptors
    into the child); the worker writes raw frames and log lines to them.
    """
    configure_child(log_conn.fileno(), log_level, "worker-" + spec.label)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to act on
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stats = Block(WORKER_FIELDS, stats_array)
    stats.set("pid", os.getpid())
    stats.set("started", time.time())
    stats.set("heartbeat", time.monotonic())
    stats.set("connected", 0)
    try:
        for info in spec.symbols:
            rec.symbol_bytes(info.symbol)
        worker = Worker(spec, settings, data_conn.fileno(), stats, Note(note_array))
    except ValueError as exc:
        log.error("%s: cannot start: %s", spec.label, exc)
        os._exit(EXIT_FATAL)
    signal.signal(signal.SIGTERM, worker.request_stop)
    code = worker.run()
    os._exit(code)


def sample_spec(exchange: str, symbols: Sequence[SymbolInfo]) -> WorkerSpec:
    """A one-shard spec (used by `mdlogger-supervisor test`)."""
    return WorkerSpec(slot=0, exchange=exchange, shard=0, symbols=tuple(symbols))
