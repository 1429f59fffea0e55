"""A worker's connection (:class:`Link`) and make-before-break rotation.

When an exchange announces that a connection will close (Binance
``serverShutdown``, OKX notice 64008), or a connection reaches the adapter's
``max_connection_age``, the session raises ``Rotate`` and :func:`rotate`
replaces the connection without a gap::

    old link --records--> OverlapSink(hold=False) --> worker sink   (still the source of truth;
                                |                                    remembers each symbol's newest
                                | marks                              trade as a gaps.Mark)
    new link --records--> OverlapSink(hold=True): trades held, tickers dropped
                                |
          at the switch (old link ended, or OVERLAP_SECS passed):
          held trades the marks do not already cover --> worker sink, in order;
          the new link's session is rebound to the worker sink

"Already covered" is the writer's own dedupe rule (:meth:`mdlogger.gaps.Mark.is_duplicate`,
the held trades counting as replayed rows), so the overlap neither duplicates
nor loses a trade, by the same rule the writer applies to what is stored.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Callable

import websocket

from . import records as rec
from .exchanges.base import Reconnect, Sink
from .frames import ConnectionLost
from .gaps import Mark
from .wsframes import WsReader

log = logging.getLogger("mdlogger.worker")  # runs in the worker: its log lines are the worker's

OVERLAP_SECS = 3.0  # both connections are read this long when one replaces the other
OVERLAP_POLL_SECS = 0.01  # each connection is polled this long per turn during an overlap

_unpack_trade = rec.TRADE_WIRE.unpack


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


class Link:
    """One open WebSocket with its parsing session, its frame reader and send pacing.

    websocket-client (``ws``) connects, does the handshake and sends; after the
    handshake :class:`~mdlogger.wsframes.WsReader` (``reader``) owns the
    socket's receive side.
    """

    def __init__(self, ws, session, limiter: SendLimiter, reader: WsReader | None = None):
        self.ws = ws
        self.session = session
        self.limiter = limiter
        self.reader = reader
        self.opened = time.monotonic()

    @classmethod
    def open(cls, adapter, symbols, sink: Sink, timeout: float, on_fault=None, on_binary=None) -> "Link":
        """Connect and subscribe ``symbols`` with a new session of ``adapter`` on ``sink``; the caller closes it.

        ``on_fault(kind, sample)`` is told when the reader closes the connection for a bad frame;
        ``on_binary(data)`` gets binary messages (default: refused on ``sink`` as ``binary``).
        """
        ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=False)
        link = cls(ws, adapter.new_session(symbols, sink), SendLimiter(adapter.send_rate))
        if on_binary is None:
            def on_binary(data):
                sink.refuse("binary", data[:64])
        try:
            ws.connect(adapter.ws_url(symbols), timeout=timeout, suppress_origin=True)
            # websocket-client read the handshake answer a byte at a time: nothing of the frames is buffered yet.
            link.reader = WsReader(ws, adapter.max_frame_bytes, on_binary, on_fault)
            link.opened = time.monotonic()
            for message in adapter.subscribe_messages(symbols):
                link.limiter.wait()
                ws.send(message)
        except BaseException:
            link.close()
            raise
        return link

    def close(self) -> None:
        """The close handshake, bounded (wsframes.CLOSE_WAIT_SECS; none after a bad frame), then the socket."""
        try:
            if self.reader is not None:
                self.reader.close()
            else:
                self.ws.close(timeout=0.5)
        except (websocket.WebSocketException, OSError):
            pass
        self.ws.shutdown()


class OverlapSink(Sink):
    """A connection's sink while two connections overlap.

    The old connection stays the source of truth (``hold=False``: its records
    pass through and each symbol's newest trade is kept in :attr:`marks`). The
    new connection's trades are held (``hold=True``); at the switch,
    :meth:`release` forwards, in order, only those the marks do not cover.
    Its tickers are dropped (the old connection still delivers them).
    """

    def __init__(self, inner, hold: bool):
        self.inner = inner
        self.hold = hold
        self.held: list[bytes] = []
        self.marks: dict[bytes, Mark] = {}  # symbol field of the record -> the newest trade passed
        self.raw_trade = self._raw

    def _raw(self, record: bytes, snapshot: bool = False) -> None:
        if self.hold:
            self.held.append(record)
            return
        row = _unpack_trade(record)
        mark = self.marks.get(row[0])
        if mark is None:
            mark = self.marks[row[0]] = Mark()
        mark.advance(row)
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

    def release(self, marks: dict) -> tuple[int, int]:
        """Forward held trades ``marks`` do not cover (the writer's rule); returns (forwarded, skipped)."""
        sent = skipped = 0
        for record in self.held:
            row = _unpack_trade(record)
            mark = marks.get(row[0])
            if mark is not None and mark.is_duplicate(row, True):
                skipped += 1
            else:
                self.inner.raw_trade(record)
                sent += 1
        self.held.clear()
        return sent, skipped


_LOST = (ConnectionLost, Reconnect, websocket.WebSocketException, OSError)


def rotate(old: Link, why: Exception, sink, open_link: Callable[[Sink], Link], read_one: Callable[[Link], None],
           tick: Callable[[], None], stopping: Callable[[], bool], label: str,
           overlap_secs: float = OVERLAP_SECS, clock=time.monotonic) -> Link:
    """Open the next connection before ``old`` goes, so coverage has no gap; returns the new link.

    ``sink`` is the worker's sink; ``open_link(sink)`` connects and subscribes;
    ``read_one(link)`` handles at most one frame (polling briefly); ``tick()``
    is the worker's bookkeeping; ``stopping()`` ends the overlap early. Both
    connections are read for up to ``overlap_secs`` (or until the old one
    ends); the old one is closed, the held trades released, and the new
    link's session rebound to ``sink``. Raises ``Reconnect`` when the next
    connection cannot be opened; an error of the new one during the overlap
    closes it and propagates (``old`` is the caller's to close).
    """
    log.info("%s: %s: opening the next connection before this one closes", label, why)
    held = OverlapSink(sink, hold=True)
    try:
        new = open_link(held)
    except (websocket.WebSocketException, OSError, ssl.SSLError) as exc:
        log.warning("%s: could not open the next connection (%s); reconnecting plainly", label, exc)
        raise Reconnect(str(why)) from exc
    passing = OverlapSink(sink, hold=False)
    old.session.rebind(passing)
    deadline = clock() + overlap_secs
    old_alive = True
    while old_alive and clock() < deadline and not stopping():
        try:
            read_one(old)
        except _LOST as exc:
            log.info("%s: old connection ended during the overlap: %s", label, exc)
            old_alive = False
        try:
            read_one(new)
        except _LOST:
            new.close()
            raise
        tick()
    old.close()
    sent, skipped = held.release(passing.marks)
    new.session.rebind(sink)
    log.info("%s: switched to the new connection (%d overlap trades kept, %d already had)", label, sent, skipped)
    return new
