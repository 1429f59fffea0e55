"""From WebSocket frames to parsed messages: the one text-message dispatch.

::

    socket --recv 256 KiB--> BufferedSocket --frames--> websocket-client recv_frame
                                                          |
        complete text frame --------------------------> deliver(session, sink, payload)
        ping / pong / close / binary / fragments --> other_frame --joined text--^
                                                          |
                                  session.on_message(payload, recv_ns) --records--> sink
                                  Refused(reason) --------------------------------> sink.refuse
                                  any other exception --------------> sink.refuse("parser_error")

:func:`deliver` is the only place a complete text message is handed to a
session (the worker's receive loop inlines the same steps, see
``Worker._receive``; the overlap reads through :func:`read_one`; the
``test`` command calls it directly). A message the adapter refuses, or one
longer than the adapter's ``max_frame_bytes``, is counted on the sink by
reason and never stops the connection. Nor does anything else an adapter
raises on a frame (a bug, or a frame of a shape nobody foresaw): it is counted
as ``parser_error`` with the exception and the frame's start as the sample.
Only the session's orders to the loop (``Reconnect``, ``Rotate``, ``Pause``)
and I/O errors (the sink's pipe) go on to the caller: :data:`PASS_THROUGH`.
"""

from __future__ import annotations

import time

import websocket

from .exchanges.base import Pause, Reconnect, Refused

OPCODE_TEXT = websocket.ABNF.OPCODE_TEXT
OPCODE_BINARY = websocket.ABNF.OPCODE_BINARY
OPCODE_CONT = websocket.ABNF.OPCODE_CONT
OPCODE_PING = websocket.ABNF.OPCODE_PING
OPCODE_PONG = websocket.ABNF.OPCODE_PONG
OPCODE_CLOSE = websocket.ABNF.OPCODE_CLOSE

# What may leave a session's on_message besides Refused: the session's orders to
# the connection loop (Rotate is a Reconnect), and I/O errors, which are never
# the adapter's (it does no I/O) but the sink's. Anything else is a parser_error.
PASS_THROUGH = (Reconnect, Pause, OSError)
PARSER_ERROR = "parser_error"


class ConnectionLost(Exception):
    """The connection ended (closed, silent, or too old)."""


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


def deliver(session, sink, payload: bytes, max_bytes: int, recv_ns: int) -> None:
    """Hand one complete text message to ``session``; a refusal is counted on ``sink``."""
    try:
        if len(payload) > max_bytes:
            raise Refused("oversized", payload[:64])
        session.on_message(payload, recv_ns)
    except Refused as exc:
        sink.refuse(exc.reason, exc.detail or payload)
    except PASS_THROUGH:
        raise
    except Exception as exc:  # noqa: BLE001 - a frame never ends a worker (module docstring)
        sink.refuse(PARSER_ERROR, failure_sample(exc, payload))


def failure_sample(exc: BaseException, payload: bytes) -> str:
    """What a parser_error's log line shows: the exception and the start of the frame (both escaped)."""
    try:
        what = str(exc)
    except Exception:  # noqa: BLE001
        what = ""
    return "%s: %r on frame %r" % (type(exc).__name__, what[:200], bytes(payload[:200]))


def other_frame(ws, frame, fragments: list, session, sink, max_bytes: int) -> int:
    """Control frames, binary frames and fragmented messages (rare); returns the messages completed (0 or 1).

    ``fragments`` holds the connection's message in progress between calls.
    Raises :class:`ConnectionLost` on a close frame or a continuation without a start.
    """
    op = frame.opcode
    if op == OPCODE_PING:
        ws.pong(frame.data)  # echo the payload, as Binance requires
        return 0
    if op == OPCODE_PONG:
        return 0  # liveness only
    if op == OPCODE_CLOSE:
        raise ConnectionLost("closed by the exchange: %s" % close_reason(frame.data))
    if op not in (OPCODE_TEXT, OPCODE_BINARY, OPCODE_CONT):
        return 0
    if op != OPCODE_CONT and frame.fin:  # a whole binary frame (whole text frames go to deliver)
        sink.refuse("binary", frame.data[:64])
        return 1
    if op != OPCODE_CONT:
        fragments.clear()
    elif not fragments:
        raise ConnectionLost("continuation frame without a start")
    fragments.append(frame)
    if sum(len(f.data) for f in fragments) > max_bytes:
        fragments.clear()
        sink.refuse("oversized", frame.data[:64])
        return 1
    if not frame.fin:
        return 0
    first = fragments[0]
    data = b"".join(f.data for f in fragments)
    fragments.clear()
    if first.opcode == OPCODE_BINARY:
        sink.refuse("binary", data[:64])
    else:
        deliver(session, sink, data, max_bytes, time.time_ns())
    return 1


def read_one(link, sink, max_bytes: int, timeout: float) -> int:
    """Read and handle at most one frame of ``link`` within ``timeout``; returns the messages completed."""
    ws = link.ws
    ws.settimeout(timeout)
    try:
        frame = ws.recv_frame()
    except websocket.WebSocketTimeoutException:
        return 0
    if frame.opcode == OPCODE_TEXT and frame.fin:
        deliver(link.session, sink, frame.data, max_bytes, time.time_ns())
        return 1
    return other_frame(ws, frame, link.fragments, link.session, sink, max_bytes)


def close_reason(data: bytes) -> str:
    if len(data) >= 2:
        return "code %d %s" % (int.from_bytes(data[:2], "big"), data[2:].decode("utf-8", "replace"))
    return "no code"
