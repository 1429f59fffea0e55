"""Logs of every process, gathered in the supervisor.

The product brief names multiprocessing-logging. We do not use it, on
purpose: it needs the ``fork`` start method (unsafe in our multithreaded
supervisor, pitfall 1 of docs/ARCHITECTURE.md) and it ships records over a
``multiprocessing.Queue`` whose write lock a SIGKILLed child can leave held,
hanging every process at its next log line (pitfall 2).

Instead every child writes each record as one JSON line of at most
``PIPE_BUF`` bytes, with one non-blocking ``write``, to a pipe shared by all
children. Such writes are atomic and take no lock, so a child killed at any
moment cannot tear a line or block another process; when the pipe is full
(the supervisor is not reading) the line is dropped and counted rather than
blocking a worker. A thread in the supervisor reads the pipe and re-emits the
records through the supervisor's own handlers, so one stream (stderr, and so
the journal under systemd) carries the logs of the whole tree.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import threading
import time

from .polling import readable

LINE_MAX = select.PIPE_BUF
FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"


_CONTROL = {c: "\\x%02x" % c for c in list(range(0x20)) + [0x7F]}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def escape(text: str, limit: int = 300) -> str:
    """Text from outside (an exchange's error, a REST body) made safe for one log line."""
    text = str(text).translate(_CONTROL)
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (a newline becomes ``\\n``), uncut."""
    return text.translate(_CONTROL)


class Throttle:
    """Which log lines to write when the same thing may happen thousands of times a minute.

    ``admit(key)`` says whether a line about ``key`` may be written now: the
    first time, then at most once per ``interval`` seconds, with the number of
    lines held back meanwhile. Keys come from outside (an exchange's error text,
    a symbol), so at most ``max_keys`` are tracked: once that many had a line
    in the last ``interval``, every new key shares one key, ``OTHER``. So a
    flood of distinct keys writes at most ``max_keys + 1`` lines per interval.
    """

    OTHER = "(other)"

    def __init__(self, interval: float = 60.0, max_keys: int = 20, clock=time.monotonic):
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._seen: dict = {}  # key -> [time of its last line, lines held back since]

    def admit(self, key) -> tuple[int, float] | None:
        """None: hold this line back (it is counted). Otherwise ``(lines held back since this
        key's last line, seconds since it)``, ``(0, 0.0)`` the first time; write the line."""
        now = self.clock()
        entry = self._seen.get(key)
        if entry is None and len(self._seen) >= self.max_keys:
            for old in [k for k, (t, held) in self._seen.items() if not held and now - t >= self.interval]:
                del self._seen[old]  # (nothing held back for it: nothing is lost)
            if len(self._seen) >= self.max_keys:
                key = self.OTHER
                entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [now, 0]
            return 0, 0.0
        last, held = entry
        if now - last < self.interval:
            entry[1] = held + 1
            return None
        entry[0], entry[1] = now, 0
        return held, now - last


def configure_root(level: int) -> None:
    """The supervisor's own logging: one stderr handler at ``level``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


class PipeHandler(logging.Handler):
    """A child's handler: one atomic, non-blocking write per record."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self.dropped = 0
        os.set_blocking(fd, False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # A child's message is one line: control characters in text that came from outside
            # (an exchange's error, a refused frame, a REST body) cannot forge another log line.
            # Only a traceback, appended below, keeps its newlines.
            message = one_line(record.getMessage())
            if record.exc_info:
                message += "\n" + self.formatException(record.exc_info)
        except (TypeError, ValueError) as exc:
            message = "unformattable log record %r: %s" % (record.msg, exc)
        line = _encode(record, message)
        try:
            os.write(self.fd, line)
        except (BlockingIOError, BrokenPipeError):
            self.dropped += 1

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return logging.Formatter().formatException(ei)


def _encode(record: logging.LogRecord, message: str) -> bytes:
    doc = {
        "n": record.name,
        "l": record.levelno,
        "p": record.processName,
        "i": record.process,
        "t": record.created,
        "m": message,
    }
    line = json.dumps(doc).encode() + b"\n"
    while len(line) > LINE_MAX:
        doc["m"] = doc["m"][: max(0, len(doc["m"]) - (len(line) - LINE_MAX) - 16)] + " [cut]"
        line = json.dumps(doc).encode() + b"\n"
    return line


def configure_child(fd: int, level: int, process_name: str) -> None:
    """Route a child's logging to the shared pipe; called first in every child."""
    import multiprocessing

    multiprocessing.current_process().name = process_name
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(PipeHandler(fd))
    root.setLevel(level)


class LogReceiver(threading.Thread):
    """Supervisor thread: read child log lines and hand them to local handlers."""

    def __init__(self, fd: int):
        super().__init__(name="log-receiver", daemon=True)
        self.fd = fd
        os.set_blocking(fd, False)  # a final read at stop must not wait for a line that never comes
        self._buf = b""
        self._stop_r, self._stop_w = os.pipe()

    def run(self) -> None:
        while True:
            ready = readable([self.fd, self._stop_r])
            if self.fd in ready and self._read_once():
                continue
            if self._stop_r in ready:
                while self._read_once():
                    pass
                return

    def _read_once(self) -> bool:
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            return False
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._handle(line)
        return True

    def _handle(self, line: bytes) -> None:
        try:
            doc = json.loads(line)
            record = logging.makeLogRecord(
                {
                    "name": doc["n"],
                    "levelno": doc["l"],
                    "levelname": logging.getLevelName(doc["l"]),
                    "processName": doc["p"],
                    "process": doc["i"],
                    "created": doc["t"],
                    "msecs": (doc["t"] % 1) * 1000,
                    "msg": doc["m"],
                }
            )
        except (ValueError, KeyError, TypeError):
            record = logging.makeLogRecord({"name": "mdlogger.child", "msg": one_line(line.decode("utf-8", "replace"))})
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)

    def stop(self, timeout: float = 2.0) -> None:
        os.write(self._stop_w, b"x")
        self.join(timeout)
