"""Batches of packed records from a worker to the writer, over one pipe per slot.

Why not one shared ``multiprocessing.Queue``: every producer of a Queue shares
its write lock, and a producer SIGKILLed while its feeder thread holds it (most
likely exactly when the pipe is full because the writer is slow) leaves the
lock held forever, so every other worker stalls. A consumer killed inside
``get()`` poisons the read lock the same way, and a message cut in half leaves
the next reader blocked in ``recv`` for the rest of it. So:

* each worker slot has its **own pipe** (``multiprocessing.Pipe``, the
  transport under ``multiprocessing.Queue``), created once by the supervisor,
  kept open by it for the life of the slot, handed to each incarnation of the
  worker, and its read end passed to each incarnation of the writer;
* a batch is one **frame** of at most ``PIPE_BUF`` bytes written with a single
  non-blocking ``write``: POSIX makes such a write all-or-nothing, so a worker
  killed at any moment never leaves half a frame, and there is no lock at all;
* the worker never blocks on the pipe: frames that do not fit wait in a
  bounded local buffer, and what exceeds it is dropped and counted;
* every frame starts with a magic word and carries a CRC32 of its records, so
  a writer that died holding half a frame is followed by one that resyncs on
  the next good frame, counting the bytes it skipped.

Frame layout (little-endian)::

    magic  4s   b"MDL\\x01"
    kind   u8   1 = MD, 2 = TRADES, 3 = snapshot trades, 4 = resume markers (records.KIND_*)
    -      u8   reserved: written 0, ignored
    count  u16  number of records
    crc    u32  zlib.crc32 of the records
    records     count * records.WIRE[kind].size bytes

A frame does not name its exchange: a pipe belongs to one worker slot, and the
writer learns each slot's exchange from the supervisor's ``add`` message that
hands it the pipe. The byte that once carried an exchange code is kept,
reserved, so the header stays 12 bytes and the batch sizes (48 trades, 78
tickers) and the magic stay what they were; frames in a pipe are only ever
read by the writer of the same installation, so nothing else depends on it.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import math
import os
import select
import struct
import time
import zlib
from typing import Iterator

from .polling import writable
from .records import KIND_MD, KIND_RESUME, KIND_SNAPSHOT, KIND_TRADES, TRADE_WIRE, WIRE

MAGIC = b"MDL\x01"
HEADER = struct.Struct("<4sBBHI")
FRAME_MAX = select.PIPE_BUF  # 4096 on Linux
MAX_RECORDS = {kind: (FRAME_MAX - HEADER.size) // wire.size for kind, wire in WIRE.items()}
PIPE_SIZE = 1 << 20  # ask the kernel for 1 MiB pipes (the unprivileged maximum)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_TRADE_TIME = struct.Struct("<II")
_TRADE_TIME_AT = struct.calcsize("<24sQ")  # offset of time/nanos in a TRADE_WIRE record


def set_pipe_size(fd: int, size: int = PIPE_SIZE) -> int:
    """Grow a pipe's kernel buffer; returns the size granted (0 if refused)."""
    try:
        return fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except OSError:
        return 0


def pending_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    import termios

    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def encode_frame(kind: int, records: bytes) -> bytes:
    count = len(records) // WIRE[kind].size
    return HEADER.pack(MAGIC, kind, 0, count, zlib.crc32(records)) + records


class FrameSender:
    """Worker side: accumulate records into frames and write them without blocking.

    ``add_md``/``add_trade`` append one packed record; a full batch becomes a
    frame at once, a partial one when :meth:`seal` is called (the worker does
    so once ``seal_at`` has passed: ``batch_delay`` after the oldest record). :meth:`pump` writes waiting frames until the
    pipe is full. ``max_buffer_bytes`` bounds what waits; past it new frames are
    dropped and counted in ``dropped_records``.
    """

    def __init__(self, fd: int, max_buffer_bytes: int, batch_delay: float = 0.005):
        self.fd = fd
        self.max_buffer_bytes = max_buffer_bytes
        self.batch_delay = batch_delay
        os.set_blocking(fd, False)
        self._trades = bytearray()
        self._ntrades = 0
        self._md = bytearray()
        self._nmd = 0
        self._snap = bytearray()
        self._nsnap = 0
        self._max_trades = MAX_RECORDS[KIND_TRADES]
        self._max_md = MAX_RECORDS[KIND_MD]
        # monotonic time by which the oldest unsealed record must be sent
        # (inf when nothing waits): one comparison per message in the worker.
        self.seal_at = math.inf
        self._frames: collections.deque[bytes] = collections.deque()
        self._frame_records: collections.deque[int] = collections.deque()
        self.buffered_bytes = 0
        self.dropped_records = 0
        self.frames_sent = 0
        self.records_sent = 0
        self.trades_added = 0
        self.md_added = 0
        self.broken = False  # the reading side is gone (EPIPE)

    # -- building batches -------------------------------------------------
    def add_trade(self, record: bytes) -> None:
        if self._nsnap:
            self._seal_snapshot()  # live and snapshot trades reach the writer in order
        if self.seal_at == math.inf:
            self.seal_at = time.monotonic() + self.batch_delay
        self._trades += record
        self._ntrades += 1
        self.trades_added += 1
        if self._ntrades >= self._max_trades:
            self._seal_trades()

    def add_md(self, record: bytes) -> None:
        if self.seal_at == math.inf:
            self.seal_at = time.monotonic() + self.batch_delay
        self._md += record
        self._nmd += 1
        self.md_added += 1
        if self._nmd >= self._max_md:
            self._seal_md()

    def add_snapshot(self, record: bytes) -> None:
        if self._ntrades:
            self._seal_trades()
        if self.seal_at == math.inf:
            self.seal_at = time.monotonic() + self.batch_delay
        self._snap += record
        self._nsnap += 1
        self.trades_added += 1
        if self._nsnap >= self._max_trades:
            self._seal_snapshot()

    def add_resume(self, records: list[bytes]) -> None:
        """Queue resume markers now, after every trade added before them (order is what they mean)."""
        if self._nsnap:
            self._seal_snapshot()
        if self._ntrades:
            self._seal_trades()
        per = self._max_trades
        for i in range(0, len(records), per):
            chunk = records[i : i + per]
            self._queue(KIND_RESUME, b"".join(chunk), len(chunk))

    def last_trade_time(self) -> tuple[int, int] | None:
        """``(sec, nanos)`` of the last trade added, while it still waits in a batch."""
        buf = self._trades if self._ntrades else (self._snap if self._nsnap else None)
        if not buf:
            return None
        return _TRADE_TIME.unpack_from(buf, len(buf) - TRADE_WIRE.size + _TRADE_TIME_AT)

    def add(self, kind: int, record: bytes) -> None:
        {KIND_TRADES: self.add_trade, KIND_MD: self.add_md, KIND_SNAPSHOT: self.add_snapshot}[kind](record)

    def has_partial(self) -> bool:
        return bool(self._ntrades or self._nmd or self._nsnap)

    def seal(self) -> None:
        if self._nsnap:
            self._seal_snapshot()
        if self._ntrades:
            self._seal_trades()
        if self._nmd:
            self._seal_md()

    def _seal_snapshot(self) -> None:
        records, count = bytes(self._snap), self._nsnap
        self._snap = bytearray()
        self._nsnap = 0
        self._queue(KIND_SNAPSHOT, records, count)

    def _seal_trades(self) -> None:
        records, count = bytes(self._trades), self._ntrades
        self._trades = bytearray()
        self._ntrades = 0
        self._queue(KIND_TRADES, records, count)

    def _seal_md(self) -> None:
        records, count = bytes(self._md), self._nmd
        self._md = bytearray()
        self._nmd = 0
        self._queue(KIND_MD, records, count)

    def _queue(self, kind: int, records: bytes, count: int) -> None:
        if not (self._ntrades or self._nmd or self._nsnap):
            self.seal_at = math.inf
        frame = encode_frame(kind, records)
        if kind == KIND_RESUME:
            count = 0  # markers, not records: they do not count as records sent or dropped
        if self.buffered_bytes + len(frame) > self.max_buffer_bytes:
            self.dropped_records += count
            return
        self._frames.append(frame)
        self._frame_records.append(count)
        self.buffered_bytes += len(frame)
        self.pump()

    # -- writing ----------------------------------------------------------
    def pump(self) -> bool:
        """Write waiting frames until the pipe is full; True when none wait."""
        frames = self._frames
        while frames:
            frame = frames[0]
            try:
                os.write(self.fd, frame)
            except BlockingIOError:
                return False
            except BrokenPipeError:
                self.broken = True
                return False
            frames.popleft()
            self.buffered_bytes -= len(frame)
            self.frames_sent += 1
            self.records_sent += self._frame_records.popleft()
        return True

    def drain(self, timeout: float) -> bool:
        """Seal and write everything, waiting up to ``timeout``; True if all went."""
        self.seal()
        deadline = time.monotonic() + timeout
        while not self.pump():
            if self.broken:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            writable([self.fd], min(left, 0.1))
        return True

    def discard_waiting(self) -> int:
        """Drop every frame still waiting (counted); returns the records dropped."""
        self.seal()
        lost = sum(self._frame_records)
        self._frames.clear()
        self._frame_records.clear()
        self.buffered_bytes = 0
        self.dropped_records += lost
        return lost


class FrameReader:
    """Writer side: read a slot's pipe without blocking and yield whole frames."""

    READ_CHUNK = 1 << 20

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self._buf = bytearray()
        self.corrupt_bytes = 0
        self.frames = 0

    def fill(self, limit: int = 4 << 20) -> int:
        """Read what the pipe holds, up to ``limit`` bytes; returns bytes read."""
        total = 0
        while total < limit:
            try:
                chunk = os.read(self.fd, self.READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not chunk:
                break
            self._buf += chunk
            total += len(chunk)
        return total

    def buffered(self) -> int:
        return len(self._buf)

    def frames_ready(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(kind, records)`` for every whole, valid frame."""
        buf = self._buf
        pos = 0
        end = len(buf)
        hsize = HEADER.size
        while end - pos >= hsize:
            if buf[pos : pos + 4] != MAGIC:
                nxt = buf.find(MAGIC, pos + 1)
                skip_to = nxt if nxt >= 0 else max(pos + 1, end - 3)
                self.corrupt_bytes += skip_to - pos
                pos = skip_to
                continue
            _, kind, _reserved, count, crc = HEADER.unpack_from(buf, pos)
            wire = WIRE.get(kind)
            if wire is None or count == 0 or hsize + count * wire.size > FRAME_MAX:
                self.corrupt_bytes += 1
                pos += 1
                continue
            stop = pos + hsize + count * wire.size
            if stop > end:
                break  # the rest of this frame has not arrived yet
            records = bytes(buf[pos + hsize : stop])
            if zlib.crc32(records) != crc:
                self.corrupt_bytes += 1
                pos += 1
                continue
            pos = stop
            self.frames += 1
            yield kind, records
        del buf[:pos]
