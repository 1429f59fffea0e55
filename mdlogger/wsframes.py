"""Our own RFC 6455 frame reader: the receive side of a worker's WebSocket after the handshake.

websocket-client still connects, does the handshake and sends (subscribe
messages, pongs, close frames: ``ws.send``, ``ws.pong``, ``ws.send_close``).
Once the handshake is done, :class:`WsReader` owns the socket's receive
side::

    socket (plain or TLS) --recv_into(CHUNK = 256 KiB)--> buf: one bytes object, read from pos
                                                      |
        hot path: FIN text frame, unmasked, 7/16-bit length, whole in buf
            --> yield buf[start:stop] ------------------------------> Worker._receive / frames.read_one
        careful path (everything else, one frame at a time):
            header checked as soon as its bytes are there (before any payload is awaited)
            ping --> ws.pong(same payload)         pong --> liveness only
            close --> close echoed, ConnectionLost("closed by the exchange: code ...")
            binary message --> on_binary(data)     fragments --> joined, then yielded (text)
            bad frame --> close 1002 / 1009 / 1008 sent, on_fault(kind, sample), ConnectionLost
        nothing whole in buf --> keep the partial frame, recv again;
            a socket timeout (the worker's tick / batch delay) or a recv that did not
            complete the frame yields None, so the caller keeps its timing

:attr:`WsReader.messages` is a generator: each ``next()`` gives the next
complete text message (``bytes``) or ``None`` (nothing complete this time:
the buffer is used up and a recv comes next, a socket timeout, a frame still
arriving, a control frame handled). The ``None`` before each recv is what
lets the worker seal its batch exactly when no more messages are at hand. Its
state (buffer, position, fragments) lives in the generator's locals, so the
common frame costs a few index operations, one slice and one ``yield``:
no object per frame, no method call, no attribute access.

Rules it enforces (each broken rule closes the connection and raises a
:class:`~mdlogger.frames.ConnectionLost` subclass naming the reason):

* **protocol** (close 1002, :class:`ProtocolError`, kind ``protocol_error``):
  a masked server frame; RSV bits (we negotiate no extension); an unknown
  opcode; a control frame longer than 125 bytes or fragmented; a 64-bit length
  with its top bit set; a continuation without a message begun, or a new data
  frame while one is still in progress; a close frame of one byte or with a
  code that may not be sent.
* **size** (close 1009, :class:`FrameTooLarge`, kind ``oversized``): a data
  frame, or a fragmented message in total, longer than ``max_bytes`` (the
  adapter's ``max_frame_bytes``). Checked from the header, before the payload
  is awaited: an announced 600 MiB frame costs nothing but its header.
* **time** (close 1008, :class:`FrameStalled`, kind ``stalled``): a frame (or
  fragmented message) whose first bytes arrived must be complete within
  :data:`FRAME_DEADLINE_SECS`; a frame dripping one byte at a time ends there.
* **memory**: what a connection holds is bounded by ``max_bytes`` plus one
  :data:`CHUNK` (plus a 14-byte header): the partial frame (at most
  ``max_bytes``, its header was checked) and one recv's worth past it.
  :attr:`WsReader.peak` records the most it ever held.

Text payloads are not checked for UTF-8 (the adapters' JSON parsers do that,
as with ``skip_utf8_validation`` before); a 64-bit length under 126 is
accepted (websocket-client accepts it too). Timeouts are the socket's own
(``settimeout``), never a ``select`` on the descriptor, so data already
decrypted inside an ``SSLSocket`` is never missed.
"""

from __future__ import annotations

import mmap
import ssl
import struct
import time

import websocket

from .frames import ConnectionLost, close_reason

CHUNK = 1 << 18  # bytes asked of each recv: a burst of small frames costs one system call
# A frame (or fragmented message) begun must be complete within this. 5 s is 20 worker ticks, longer
# than a few TCP retransmissions (0.2 + 0.4 + 0.8 + 1.6 s), and an exchange writes its frames, all
# under the 1 MiB limit, in one go; a frame trickling slower than that is a dead or hostile peer.
# Far below silence_timeout_secs (30 s) and the supervisor's heartbeat timeout.
FRAME_DEADLINE_SECS = 5.0
CLOSE_WAIT_SECS = 0.5  # how long a close we start waits for the exchange's close frame

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPS = (OP_CONT, OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)
_TIMEOUTS = (TimeoutError, BlockingIOError, ssl.SSLWantReadError)
_SEND_ERRORS = (websocket.WebSocketException, OSError, ValueError)
_LEN64 = struct.Struct("!Q")

CLOSE_NORMAL, CLOSE_PROTOCOL, CLOSE_POLICY, CLOSE_TOO_BIG = 1000, 1002, 1008, 1009


def valid_close_code(code: int) -> bool:
    """Whether a peer may send this close code (RFC 6455 7.4 and the IANA registry; 1004-1006 and 1015 never)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameFault(ConnectionLost):
    """We closed the connection because of a frame; ``kind`` names the counter, ``code`` the close we sent."""

    kind = "protocol_error"
    code = CLOSE_PROTOCOL


class ProtocolError(FrameFault):
    """A frame that breaks RFC 6455 (the base's kind and close code, 1002)."""


class FrameTooLarge(FrameFault):
    kind = "oversized"
    code = CLOSE_TOO_BIG


class FrameStalled(FrameFault):
    kind = "stalled"
    code = CLOSE_POLICY


# What each kind of fault is counted as, in the worker's stats block (stats.WORKER_FIELDS).
FAULT_COUNTERS = {"oversized": "oversized_closes", "protocol_error": "protocol_errors", "stalled": "stalled_frames"}
FAULT_KINDS = tuple(FAULT_COUNTERS)


def _ignore(_data) -> None:
    pass


class WsReader:
    """Reads the frames of one WebSocket after websocket-client's handshake (module docstring).

    ``ws`` is the connected ``websocket.WebSocket`` (its ``sock`` is read here,
    its send methods answer pings and close); ``max_bytes`` the largest
    message accepted; ``on_binary(data)`` gets each complete binary message;
    ``on_fault(kind, sample)`` is told once when the reader closes the
    connection for a bad frame (``kind`` in :data:`FAULT_KINDS`, ``sample``
    the start of the offending bytes).
    """

    def __init__(self, ws, max_bytes: int, on_binary=None, on_fault=None, deadline: float | None = None):
        self.ws = ws
        self.max_bytes = max_bytes
        self.on_binary = on_binary or _ignore
        self.on_fault = on_fault
        self.deadline = FRAME_DEADLINE_SECS if deadline is None else deadline
        self.frame_at = time.monotonic()  # when the last frame the careful path handled was complete
        self.peak = 0  # the most bytes held at once (buffer and fragments)
        self.held = 0  # bytes held after the last recv
        self.ended: ConnectionLost | None = None  # why the connection is over, once it is
        self.close_sent = False
        self.messages = self._messages()

    def settimeout(self, seconds: float | None) -> None:
        """The longest one ``next(messages)`` blocks in a recv (the socket's timeout: sends use it too)."""
        self.ws.settimeout(seconds)

    # -- the frames ---------------------------------------------------------------
    def _messages(self):
        # recv_into one buffer kept for the connection, then a copy of what came: a plain recv(CHUNK)
        # makes the allocator map, shrink and unmap 256 KiB for every message (three system calls
        # more than the recv itself, at real rates where messages come one at a time). The buffer is
        # an anonymous mapping, not a bytearray (which zero-fills, so owns, all 256 KiB at once): a
        # page is only backed once a recv reaches it, so a quiet connection holds a page or two and
        # only a burst's recv makes the whole buffer resident.
        recv_into = self.ws.sock.recv_into
        landing = mmap.mmap(-1, CHUNK)
        landed = memoryview(landing)
        limit = self.max_bytes
        monotonic = time.monotonic
        buf = b""
        pos = end = 0
        parts: list | None = None  # the payloads of a fragmented message in progress
        part_op = part_size = 0
        frame_since = msg_since = None  # when the partial frame / the fragmented message began
        hot = 0x81  # the first byte the hot path takes: FIN + text; none (-1) inside a fragmented message
        while True:
            # The hot path: final, unmasked text frames with a 7- or 16-bit length, whole in buf.
            # (An IndexError is the end of buf within a header: the careful path below sorts it out.)
            try:
                while True:
                    b1 = buf[pos]
                    n = buf[pos + 1]
                    if n == 126:
                        n = buf[pos + 2] << 8 | buf[pos + 3]
                        start = pos + 4
                    elif n < 126:
                        start = pos + 2
                    else:
                        break
                    stop = start + n
                    if b1 != hot or stop > end or n > limit:
                        break
                    pos = stop
                    yield buf[start:stop]
            except IndexError:
                pass

            # The careful path: one frame, whatever it is, or how many bytes are wanted.
            want = 2
            if end - pos >= 2:
                b1 = buf[pos]
                b2 = buf[pos + 1]
                op = b1 & 0x0F
                fin = b1 & 0x80
                n = b2 & 0x7F
                if b2 & 0x80:
                    raise self._fault(ProtocolError, "masked frame from the server", buf[pos:pos + 16])
                if b1 & 0x70:
                    raise self._fault(ProtocolError, "reserved bits set (no extension was negotiated)",
                                      buf[pos:pos + 16])
                if op >= 8:
                    if op not in _CONTROL_OPS:
                        raise self._fault(ProtocolError, "unknown opcode %d" % op, buf[pos:pos + 16])
                    if n > 125 or not fin:
                        raise self._fault(ProtocolError, "control frame %s" % (
                            "fragmented" if not fin else "longer than 125 bytes"), buf[pos:pos + 16])
                elif op not in _DATA_OPS:
                    raise self._fault(ProtocolError, "unknown opcode %d" % op, buf[pos:pos + 16])
                elif op == OP_CONT and parts is None:
                    raise self._fault(ProtocolError, "continuation frame without a start", buf[pos:pos + 16])
                elif op != OP_CONT and parts is not None:
                    raise self._fault(ProtocolError, "new message before the fragmented one ended",
                                      buf[pos:pos + 16])
                start = pos + 2
                if n == 126:
                    start = pos + 4
                    n = buf[pos + 2] << 8 | buf[pos + 3] if end >= start else -1
                elif n == 127:
                    start = pos + 10
                    if end >= start:
                        n = _LEN64.unpack_from(buf, pos + 2)[0]
                        if n >> 63:
                            raise self._fault(ProtocolError, "64-bit length with its top bit set",
                                              buf[pos:pos + 16])
                    else:
                        n = -1
                if n < 0:
                    want = start - pos  # the rest of the header
                elif op < 8 and n + part_size > limit:
                    raise self._fault(FrameTooLarge, "a %s of %d bytes, the limit is %d" % (
                        "frame" if parts is None else "fragmented message", n + part_size, limit),
                        buf[pos:start + 64])
                elif start + n > end:
                    want = start + n - pos  # the payload
                else:
                    # A whole frame other than the hot path's.
                    stop = start + n
                    payload = buf[start:stop]
                    pos = stop
                    self.frame_at = now = monotonic()
                    if op == OP_TEXT and fin:
                        yield payload  # (with a 64-bit length: not the hot path's)
                    elif op == OP_PING:
                        if not self.close_sent:
                            self.ws.pong(payload)  # echo the payload, as Binance requires
                    elif op == OP_PONG:
                        pass  # liveness only
                    elif op == OP_CLOSE:
                        self._peer_close(payload)
                    elif op != OP_CONT:
                        if fin:
                            self.on_binary(payload)
                        else:
                            parts, part_op, part_size, msg_since, hot = [payload], op, n, now, -1
                    else:
                        parts.append(payload)
                        part_size += n
                        if fin:
                            message = b"".join(parts)
                            parts, part_size, msg_since, hot = None, 0, None, 0x81
                            if part_op == OP_TEXT:
                                yield message
                            else:
                                self.on_binary(message)
                    continue

            # More bytes are needed. Say so once before blocking (None: the worker seals its batch now,
            # so a message that came alone is written at once, with no timer and no second wake-up),
            # then keep what is left of buf and recv until there are `want` of them.
            yield None
            now = monotonic()
            if pos < end:
                if pos or frame_since is None:
                    frame_since = now  # a new partial frame (nothing of buf was used up: the same one)
                rest = [buf[pos:]]
            else:
                frame_since = None
                rest = []
            have = end - pos
            buf = b""
            pos = end = 0
            while True:
                begun = msg_since if msg_since is not None else frame_since
                if begun is not None and now - begun > self.deadline:
                    raise self._fault(FrameStalled, "frame incomplete after %g s" % self.deadline,
                                      b"".join(rest)[:64])
                try:
                    got = recv_into(landing)
                    chunk = landed[:got].tobytes() if got else b""
                except _TIMEOUTS:
                    chunk = None
                if chunk:
                    rest.append(chunk)
                    have += len(chunk)
                    held = self.held = have + part_size
                    if held > self.peak:
                        self.peak = held
                    if have >= want:
                        break
                    if frame_since is None:
                        frame_since = monotonic()
                elif chunk is not None:
                    raise self._end(ConnectionLost("the exchange closed the TCP connection without a close frame"))
                yield None
                now = monotonic()
            buf = rest[0] if len(rest) == 1 else b"".join(rest)
            rest = None
            end = have

    # -- endings --------------------------------------------------------------------
    def _end(self, exc: ConnectionLost) -> ConnectionLost:
        if self.ended is None:
            self.ended = exc
        return exc

    def _send_close(self, code: int, reason: str = "") -> None:
        if self.close_sent or not self.ws.connected:
            return
        self.close_sent = True
        try:
            self.ws.send_close(code, reason.encode("utf-8")[:123])
        except _SEND_ERRORS:
            pass

    def _fault(self, cls, reason: str, sample: bytes) -> ConnectionLost:
        """Close the connection for a bad frame: count it, send the close, return the exception to raise."""
        exc = self._end(cls(reason))  # (the reader's state first: whoever sees the count or the close sees it ended)
        if self.on_fault is not None:
            self.on_fault(cls.kind, bytes(sample))
        self._send_close(cls.code, reason)
        return exc

    def _peer_close(self, payload: bytes):
        """The exchange's close frame: echo its code (RFC 6455 5.5.1) and end."""
        if len(payload) == 1:
            raise self._fault(ProtocolError, "close frame of one byte", payload)
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if not valid_close_code(code):
                raise self._fault(ProtocolError, "close frame with code %d" % code, payload[:64])
        exc = self._end(ConnectionLost("closed by the exchange: %s" % close_reason(payload)))
        self._send_close(code if payload else CLOSE_NORMAL)
        raise exc

    def close(self, code: int = CLOSE_NORMAL, timeout: float = CLOSE_WAIT_SECS) -> None:
        """Start the close handshake and wait at most ``timeout`` for the exchange's close frame
        (messages meanwhile are dropped); nothing to wait for after a fault or the exchange's close."""
        if self.ended is not None:
            return
        self._send_close(code)
        self._end(ConnectionLost("closed by us"))
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.settimeout(left)
                next(self.messages)
        except (ConnectionLost, StopIteration, websocket.WebSocketException, OSError):
            return
