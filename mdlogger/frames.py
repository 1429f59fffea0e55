"""From complete text messages to parsed records: the one text-message dispatch.

::

    socket --recv 256 KiB--> wsframes.WsReader.messages (pings answered, fragments joined,
                                 |                           binary refused, bad frames close)
        complete text message ---+--> deliver(session, sink, payload)
                                          |
                                  session.on_message(payload, recv_ns) --records--> sink
                                  Refused(reason) --------------------------------> sink.refuse
                                  any other exception --------------> sink.refuse("parser_error")

:func:`deliver` is the only place a complete text message is handed to a
session (the worker's receive loop inlines the same steps, see
``Worker._receive``; the overlap reads through :func:`read_one`; the
``test`` command calls it directly). A message the adapter refuses is
counted on the sink by reason and never stops the connection (a message
longer than the adapter's ``max_frame_bytes`` never gets here from a
worker's connection: the reader closes the connection from the frame's
header, see mdlogger/wsframes.py; :func:`deliver` still refuses one, as
``oversized``, for other callers). Nor does anything else an adapter
raises on a frame (a bug, or a frame of a shape nobody foresaw): it is counted
as ``parser_error`` with the exception and the frame's start as the sample.
Only the session's orders to the loop (``Reconnect``, ``Rotate``, ``Pause``)
and I/O errors (the sink's pipe) go on to the caller: :data:`PASS_THROUGH`.
"""

from __future__ import annotations

import time

import websocket

from .exchanges.base import Pause, Reconnect, Refused

OPCODE_TEXT = websocket.ABNF.OPCODE_TEXT  # (for the test command, which reads with websocket-client)
OPCODE_BINARY = websocket.ABNF.OPCODE_BINARY

# What may leave a session's on_message besides Refused: the session's orders to
# the connection loop (Rotate is a Reconnect), and I/O errors, which are never
# the adapter's (it does no I/O) but the sink's. Anything else is a parser_error.
PASS_THROUGH = (Reconnect, Pause, OSError)
PARSER_ERROR = "parser_error"


class ConnectionLost(Exception):
    """The connection ended (closed, silent, a bad frame: see mdlogger/wsframes.py)."""


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


def read_one(link, sink, max_bytes: int, timeout: float) -> int:
    """Read at most one message of ``link`` within about ``timeout`` and hand it on; returns the messages completed.

    The link's :class:`~mdlogger.wsframes.WsReader` answers pings, joins fragments and refuses
    binary messages itself; it raises :class:`ConnectionLost` on a close frame or a bad frame.
    """
    reader = link.reader
    reader.settimeout(timeout)
    try:
        data = next(reader.messages)
    except StopIteration:  # the connection ended before (its reason was raised then)
        raise ConnectionLost(str(reader.ended or "connection over")) from None
    if data is None:
        return 0
    deliver(link.session, sink, data, max_bytes, time.time_ns())
    return 1


def close_reason(data: bytes) -> str:
    if len(data) >= 2:
        return "code %d %s" % (int.from_bytes(data[:2], "big"), data[2:].decode("utf-8", "replace"))
    return "no code"
