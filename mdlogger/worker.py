"""A worker process: one WebSocket connection for one shard of one exchange.

::

    exchange <--handshake, subscribe, pong, close-- websocket-client (connect and send only)
       |
       +--frames--> wsframes.WsReader.messages (recv 256 KiB; pings answered, fragments joined,
                       |  binary refused; oversized / malformed / stalled frames close the connection,
                       |  counted: oversized_closes, protocol_errors, stalled_frames)
                       v  complete text messages (None on a socket timeout: the loop's timing)
                   Worker._receive --> Session.on_message (the exchange adapter) --records--> WorkerSink
                                                                                                |
                             FrameSender: batches of packed records, one frame                  |
                             per <= PIPE_BUF write, bounded spill, drop counted <---------------+
                                   |
                                   v  slot pipe --> writer process

The loop is exchange-agnostic: what differs between exchanges is in the
adapter (URL, subscribe messages, parsing, keepalive text, limits) and in
three exceptions a session may raise: ``Reconnect`` (connect again now),
``Rotate`` (a closing announced in advance: the next connection is opened
before this one goes, see mdlogger/rotation.py) and ``Pause`` (maintenance:
wait, then connect). Network failures never end the process: it reconnects
with capped, jittered backoff for as long as the service runs. A connection
that is open but silent (no frame of any kind, pings included) past
``silence_timeout_secs`` is treated as dead. Silence is per connection, never
per symbol.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import signal
import ssl
import time
from dataclasses import dataclass
from typing import Sequence

import websocket
from setproctitle import setproctitle

from . import records as rec
from .backoff import Backoff
from .budget import SharedBucket, runtime_dir
from .clock import ClockSampler, clock_note
from .exchanges import adapter_for
from .exchanges.base import Pause, Reconnect, Refused, Rotate, Sink, SymbolInfo
from .frames import PARSER_ERROR, PASS_THROUGH, ConnectionLost, failure_sample, read_one
from .logs import Throttle, configure_child, escape
from .rotation import OVERLAP_POLL_SECS, Link, rotate
from .settings import Settings
from .stats import DROP_REASONS, WORKER_FIELDS, Block, Note
from .transport import FrameSender
from .wsframes import FAULT_COUNTERS

log = logging.getLogger("mdlogger.worker")

EXIT_OK = 0
EXIT_FATAL = 3  # cannot start at all (no adapter for the exchange): the supervisor must not retry
TICK_SECS = 0.25
RATE_LOG_SECS = 60.0  # each worker logs its message rate this often
RATE_WINDOW_SECS = 5.0  # the rate on /health is measured over this window
SAMPLE_MAX = 300
REFUSAL_LOG_SECS = 60.0  # refusals of one reason are logged at most this often, with their count
MAX_REFUSED_SYMBOLS = 200  # symbols the exchange refused, remembered per worker (the note holds 2 KiB anyway)
MAX_ERROR_KINDS = 20  # kinds of exchange error logged apart per REFUSAL_LOG_SECS (the rest: one line with a count)
_DIGITS = re.compile(r"[0-9]+")
CONNECT_BURST = 3.0  # connection attempts an exchange's shards may make at once from a full bucket
RECONNECT_JITTER_SECS = 0.25  # after a connection that delivered data, the next attempt waits at most this
CLOCK_SAMPLE_SECS = 0.1  # at most one clock-offset sample per this many seconds (600 in the minute's window)
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


class WorkerSink(Sink):
    """Packs parsed records into the sender and counts what was refused."""

    def __init__(self, sender: FrameSender, stats: Block, label: str, note: Note | None = None):
        self.sender = sender
        self.stats = stats
        self.label = label
        self.note = note or Note()
        self.refused_symbols: set[str] = set()
        self._logged_at: dict[str, float] = {}  # reason -> monotonic time of its last log line
        self._unlogged: dict[str, int] = {}  # reason -> refusals since that line
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
        if (reason == "bad_time" and self.clock is not None and isinstance(sample, str) and len(sample) <= 12
                and sample.isascii() and sample.isdigit()):
            self.clock.sample(time.time_ns(), int(sample), 0)  # a refused time still tells how far off the clocks are
        self.stats.add("drop_" + reason)
        self.stats.add("parse_errors")
        # One log line per reason per REFUSAL_LOG_SECS at most (a hostile feed must not flood the log).
        now = time.monotonic()
        last = self._logged_at.get(reason)
        if last is None:
            self._logged_at[reason] = now
            log.warning("%s: first message refused as %s (counted on /health from now on): %s",
                        self.label, reason, _sample(sample))
        elif now - last >= REFUSAL_LOG_SECS:
            count = self._unlogged.pop(reason, 0) + 1
            self._logged_at[reason] = now
            log.warning("%s: %d messages refused as %s in the last %.0f s, the latest: %s",
                        self.label, count, reason, now - last, _sample(sample))
        else:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1

    def exchange_error(self, text: str, symbol: str | None = None) -> None:
        self.stats.add("drop_exchange_error")
        self.stats.add("parse_errors")
        # (bounded: a feed naming thousands of symbols must not make each error cost a sort of them all)
        # (shown on /health: BASE-QUOTE only)
        symbol = symbol if isinstance(symbol, str) and rec.valid_symbol(symbol) else None
        if symbol and symbol not in self.refused_symbols and len(self.refused_symbols) < MAX_REFUSED_SYMBOLS:
            self.refused_symbols.add(symbol)
            self.stats.set("refused_symbols", len(self.refused_symbols))
            self.note.set(",".join(sorted(self.refused_symbols)))
        # One line per kind of error per REFUSAL_LOG_SECS, with the count held back (as refuse() does):
        # the kind is the text without the symbol it names and without numbers (request ids), and
        # the Throttle bounds how many kinds are told apart.
        text = escape(text)
        kind = _DIGITS.sub("#", text.replace(symbol, "*") if symbol else text)[:80]
        lines = self.__dict__.get("_error_lines")
        if lines is None:
            lines = self._error_lines = Throttle(REFUSAL_LOG_SECS, MAX_ERROR_KINDS)
        said = lines.admit(kind)
        if said is None:
            return
        held, since = said
        if held:
            log.error("%s: the exchange says: %s (and %d more errors like it in the last %.0f s)",
                      self.label, text, held, since)
        else:
            log.error("%s: the exchange says: %s", self.label, text)


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
        self.sender = FrameSender(data_fd, settings.logger.worker_buffer_bytes, settings.logger.batch_max_delay_ms / 1000.0)
        self.sink = WorkerSink(self.sender, stats, spec.label, note)
        self.clock = self.sink.clock = ClockSampler(min_interval_secs=CLOCK_SAMPLE_SECS)
        self.backoff = Backoff(self.xsettings.reconnect_delay_secs, self.xsettings.max_reconnect_delay_secs)
        self.stop_requested = False
        self.parent = os.getppid()
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
    def _open(self, sink: Sink) -> Link:
        """Connect and subscribe; the caller closes the link."""
        symbols = self.spec.symbols
        url = self.adapter.ws_url(symbols)
        log.debug("%s: connecting to %s", self.spec.label, url)
        link = Link.open(self.adapter, symbols, sink, self.xsettings.connect_timeout_secs,
                         on_fault=self._frame_fault, on_binary=self._binary)
        log.info("%s: connected to %s, subscribed %d symbols", self.spec.label, url, len(symbols))
        return link

    def _frame_fault(self, kind: str, sample: bytes) -> None:
        """The reader closed the connection for a bad frame: count it (an oversized one is a refusal too)."""
        self.stats.add(FAULT_COUNTERS[kind])
        if kind == "oversized":
            self.sink.refuse("oversized", sample)

    def _binary(self, data: bytes) -> None:
        self.messages += 1
        self.sink.refuse("binary", data[:64])

    def _resume_markers(self) -> None:
        """Tell the writer a connection (re)started for every symbol, after all that came before."""
        sec, nanos = divmod(time.time_ns(), 1_000_000_000)
        first = 1 if self.first_connection else 0
        self.first_connection = False
        pack = rec.TRADE_WIRE.pack
        # The symbols were validated where they entered (the adapter's discovery): trusted here.
        self.sender.add_resume([pack(info.symbol.encode("ascii"), first, sec, nanos, 0.0, 0.0, 0, rec.ZERO_ID,
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
                    self._receive(link)
                    return
                except Rotate as exc:
                    link = rotate(link, exc, self.sink, self._open, self._read_one,
                                  lambda: self._tick(time.monotonic()), lambda: self.stop_requested, self.spec.label)
                    self.stats.add("reconnects")
        finally:
            link.close()

    def _read_one(self, link: Link) -> None:
        """Read and handle at most one frame from a link (used only during an overlap)."""
        self.messages += read_one(link, self.sink, self.adapter.max_frame_bytes, OVERLAP_POLL_SECS)

    def _receive(self, link: Link) -> None:
        """The hot loop: one iteration per message, everything else once per tick.

        ``link.reader.messages`` yields each complete text message, or None
        when no message is at hand: before each recv (the partial batch is
        sealed then, so a batch never waits for the network), when a recv
        timed out (the socket timeout is the tick) or a frame is still
        arriving. Silence, keepalives and the rest of the timing run at the
        tick, so a wake-up that brings a message or two costs no more than
        handling them and sealing their batch. Within a long burst a batch
        is sealed when full or ``batch_max_delay_ms`` after its first record. Pings, fragments, binary messages and bad
        frames are the reader's (mdlogger/wsframes.py). A message is handled
        inline: the steps of frames.deliver (on_message, Refused counted on
        the sink, any other exception but frames.PASS_THROUGH counted as
        parser_error; keep the two alike), plus a clock sample. Calling
        deliver instead costs a Python call per frame, measured at about 1%
        of this loop's throughput (in-process Binance trade frames, 40
        alternating pairs of 200,000 frames, slower in 36: ~25 ns a frame).
        The message count is kept in a local and published at each tick.
        """
        reader, session, limiter, opened = link.reader, link.session, link.limiter, link.opened
        sink = self.sink
        sender = self.sender
        silence = self.xsettings.silence_timeout_secs
        max_age = self.adapter.max_connection_age
        healthy = self.settings.logger.healthy_run_secs
        on_message = session.on_message
        monotonic, time_ns = time.monotonic, time.time_ns
        inf = math.inf
        clock = self.clock
        next_sample = 0.0
        next_tick = self._next_tick
        last_frame = monotonic()
        reader.settimeout(TICK_SECS)  # (never changed: a partial batch is sealed before every recv)
        backoff_reset = False
        count = 0
        try:
            for data in reader.messages:
                now = monotonic()
                if data is not None:
                    last_frame = now
                    count += 1
                    try:
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
                    except PASS_THROUGH:
                        raise
                    except Exception as exc:  # noqa: BLE001 - a frame never ends a worker (frames.deliver)
                        sink.refuse(PARSER_ERROR, failure_sample(exc, data))
                else:
                    # None: no message at hand (the reader is about to recv, or a recv timed out).
                    # A partial batch goes now: a message that came alone reaches the writer at
                    # once, and no timer wakes the worker again for it.
                    if sender.seal_at != inf:
                        sender.seal()
                    if self.stop_requested:
                        return
                if now >= sender.seal_at:
                    sender.seal()  # (a long burst: a batch is not held past its delay meanwhile)
                if now >= next_tick:
                    # Silence and keepalives by the tick, not at every wake-up: a recv times out after
                    # TICK_SECS, so a silent connection still comes here at least that often.
                    if reader.frame_at > last_frame:
                        last_frame = reader.frame_at  # a control frame, a fragment, a binary message
                    if now - last_frame > silence:
                        raise ConnectionLost("silent for %.0f s" % (now - last_frame))
                    ping = session.keepalive(now - last_frame)
                    if ping is not None:
                        limiter.wait()
                        link.ws.send(ping)
                    self.messages += count
                    count = 0
                    self._tick(now)
                    next_tick = self._next_tick
                    if self.stop_requested:
                        return
                    self.stats.set("last_message", time.time() - (now - max(last_frame, reader.frame_at)))
                    if not backoff_reset and now - opened >= healthy:
                        self.backoff.reset()
                        backoff_reset = True
                    if max_age and now - opened >= max_age:
                        raise Rotate("connection is %.1f h old" % ((now - opened) / 3600))
        finally:
            self.messages += count
        # The reader's generator ended earlier (its reason was raised then): the connection is over.
        raise ConnectionLost(str(reader.ended or "connection over"))

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


def worker_main(spec: WorkerSpec, settings: Settings, data_conn, stats_array, note_array, log_conn,
                log_level: int) -> None:
    """Entry point of a worker process; every input is an explicit argument.

    ``data_conn`` and ``log_conn`` are write-only ``multiprocessing`` connections
    wrapping the slot pipe and the shared log pipe (they carry the descriptors
    into the child); the worker writes raw frames and log lines to them.
    """
    setproctitle("mdlogger: worker " + spec.label)  # what ps and top show
    configure_child(log_conn.fileno(), log_level, "worker-" + spec.label)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to act on
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stats = Block(WORKER_FIELDS, stats_array)
    stats.set("pid", os.getpid())
    stats.set("started", time.time())
    stats.set("heartbeat", time.monotonic())
    stats.set("connected", 0)
    try:  # (spec.symbols come from the adapter's discovery, which validated them: not checked again)
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
