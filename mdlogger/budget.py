"""One token bucket shared by every process and thread that opens the same file.

Rate limits are per IP, so every caller of one exchange must draw from the
same budget: the supervisor's discovery thread, the writer's backfill
threads, and (through a second bucket) every worker's WebSocket connection
attempts. :class:`SharedBucket` keeps the bucket's state in a small file::

    supervisor (discovery) --+
    writer (backfill threads) +--> <data_path>/.run/<exchange>.rest     (REST budget)
    workers (connect attempts) --> <data_path>/.run/<exchange>.connect  (connection budget)

Each take reads the state, refills it, takes tokens and writes it back while
holding an exclusive ``fcntl.lockf`` lock on the file (between processes)
and a ``threading.Lock`` (between threads of one process: POSIX record
locks belong to the process, not the thread). The kernel drops a record lock
when its holder dies, so a holder killed at any moment, even with SIGKILL,
never blocks the others. Nobody sleeps while holding the locks: a caller
that has to wait releases them and sleeps in short slices.

Times are ``time.monotonic()`` stamps: CLOCK_MONOTONIC is one clock for the
whole machine on Linux, so stamps written by one process mean the same in
another. The file also records the boot id, so state left over from before
a reboot (when the monotonic clock restarted) is not trusted.

A file that does not parse (new, empty, truncated, written by another boot)
starts full. Openers normally agree on ``rate`` and ``burst``; when they do
not, each opener refills with its own ``rate`` and caps at its own ``burst``
when it takes tokens (the file holds only the token count).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import struct
import threading
import time
import zlib

RUNTIME_DIR = ".run"
RUNTIME_DIR_MODE = 0o750
BUCKET_FILE_MODE = 0o640
SLICE_SECS = 0.25  # longest single sleep of a waiting acquire()
MAX_SANE_PAUSE_SECS = 7 * 86400.0  # a stored pause further away than this is garbage

_MAGIC = b"mdlbkt1\x00"
_STATE = struct.Struct("<8s16sddd")  # magic, boot id, tokens, refill stamp, paused_until
_CRC = struct.Struct("<I")
_FILE_BYTES = _STATE.size + _CRC.size


def runtime_dir(data_path: str) -> str:
    """``<data_path>/.run``, created on demand with mode 0750."""
    path = os.path.join(data_path, RUNTIME_DIR)
    if not os.path.isdir(path):
        os.makedirs(data_path, exist_ok=True)
        try:
            os.mkdir(path, RUNTIME_DIR_MODE)
        except FileExistsError:
            pass
        else:
            os.chmod(path, RUNTIME_DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def bucket_path(data_path: str, exchange: str, kind: str) -> str:
    """``<data_path>/.run/<exchange>.<kind>``; kind is ``rest`` or ``connect``."""
    if kind not in ("rest", "connect"):
        raise ValueError("bucket kind must be 'rest' or 'connect', got %r" % (kind,))
    return os.path.join(runtime_dir(data_path), "%s.%s" % (exchange, kind))


def _read_boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            text = f.read().strip().replace(b"-", b"")
        return bytes.fromhex(text.decode("ascii"))[:16].ljust(16, b"\x00")
    except (OSError, ValueError):
        return b"\x00" * 16


_BOOT_ID = _read_boot_id()


class _OpenFile:
    """One descriptor and one thread lock per bucket file per process.

    Shared by every SharedBucket of this process on the same file: POSIX
    record locks are dropped when the process closes ANY descriptor of the
    file, so two descriptors in one process would release each other's lock.
    """

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, BUCKET_FILE_MODE)
        self.lock = threading.Lock()
        self.users = 0


_files: dict[str, _OpenFile] = {}
_files_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A lock another thread held at fork time would never be released in the child.
    global _files_lock
    _files_lock = threading.Lock()
    for f in _files.values():
        f.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SharedBucket:
    """A token bucket of ``burst`` tokens refilled at ``rate`` tokens/s, shared through ``path``.

    ``clock`` must be the same clock for every opener of the file
    (``time.monotonic`` in production; tests inside one process may pass
    their own). Deadlines given to :meth:`acquire` are stamps of that clock.
    """

    def __init__(self, path: str, rate: float, burst: float, clock=time.monotonic):
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive number, got %r" % (rate,))
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError("burst must be at least 1, got %r" % (burst,))
        self.path = path
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self._key = os.path.realpath(path)
        with _files_lock:
            f = _files.get(self._key)
            if f is None:
                f = _files[self._key] = _OpenFile(path)
            f.users += 1
        self._file: _OpenFile | None = f

    # -- the locked state ----------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        f = self._file
        if f is None:
            raise ValueError("bucket %s is closed" % (self.path,))
        with f.lock:
            fcntl.lockf(f.fd, fcntl.LOCK_EX)
            try:
                yield f.fd
            finally:
                fcntl.lockf(f.fd, fcntl.LOCK_UN)

    def holding_lock(self):
        """Test hook: a context manager holding the bucket's locks (what a take holds briefly)."""
        return self._locked()

    def _load(self, fd: int, now: float) -> tuple[float, float, float]:
        """(tokens, refill stamp, paused_until); a full bucket when the file does not parse."""
        data = os.pread(fd, _FILE_BYTES + 1, 0)
        fresh = (self.burst, now, 0.0)
        if len(data) != _FILE_BYTES:
            return fresh
        body, (crc,) = data[: _STATE.size], _CRC.unpack(data[_STATE.size :])
        if zlib.crc32(body) != crc:
            return fresh
        magic, boot, tokens, stamp, paused_until = _STATE.unpack(body)
        if magic != _MAGIC or boot != _BOOT_ID:
            return fresh
        if not all(math.isfinite(x) for x in (tokens, stamp, paused_until)) or tokens < 0:
            return fresh
        if stamp > now + 1.0 or paused_until > now + MAX_SANE_PAUSE_SECS:
            return fresh  # not a stamp of this clock
        return tokens, stamp, paused_until

    @staticmethod
    def _store(fd: int, tokens: float, stamp: float, paused_until: float) -> None:
        body = _STATE.pack(_MAGIC, _BOOT_ID, tokens, stamp, paused_until)
        os.pwrite(fd, body + _CRC.pack(zlib.crc32(body)), 0)

    def _refilled(self, tokens: float, stamp: float, now: float) -> float:
        return min(self.burst, tokens + max(0.0, now - stamp) * self.rate)

    # -- API ------------------------------------------------------------------------------------
    def try_acquire(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens now if they are there and no pause is on: 0.0.
        Otherwise take nothing and return the seconds to wait before trying again."""
        if cost > self.burst:
            raise ValueError("cost %r is more than the burst %r: it could never be paid" % (cost, self.burst))
        with self._locked() as fd:
            now = self.clock()
            tokens, stamp, paused_until = self._load(fd, now)
            tokens = self._refilled(tokens, stamp, now)
            if paused_until > now:
                wait = paused_until - now
            elif tokens >= cost:
                self._store(fd, tokens - cost, now, paused_until)
                return 0.0
            else:
                wait = (cost - tokens) / self.rate
            self._store(fd, tokens, now, paused_until)
            return max(wait, 1e-6)

    def acquire(self, cost: float = 1.0, deadline: float | None = None, stop: threading.Event | None = None) -> bool:
        """Wait until ``cost`` tokens are taken: True. False when ``deadline`` (a stamp
        of the bucket's clock) passes or ``stop`` is set first; then nothing is taken."""
        while True:
            if stop is not None and stop.is_set():
                return False
            wait = self.try_acquire(cost)
            if wait == 0.0:
                return True
            if deadline is not None:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                wait = min(wait, left)
            wait = min(wait, SLICE_SECS)
            if stop is not None:
                if stop.wait(wait):
                    return False
            else:
                time.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Nobody takes tokens before now + ``seconds`` (the later of two pauses holds)."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError("pause must be a finite number of seconds >= 0, got %r" % (seconds,))
        with self._locked() as fd:
            now = self.clock()
            tokens, stamp, paused_until = self._load(fd, now)
            tokens = self._refilled(tokens, stamp, now)
            self._store(fd, tokens, now, max(paused_until, now + seconds))

    def paused_for(self) -> float:
        """Seconds left of the pause in force (0.0: none)."""
        with self._locked() as fd:
            now = self.clock()
            _, _, paused_until = self._load(fd, now)
        return max(0.0, paused_until - now)

    def tokens(self) -> float:
        """Tokens available now, by this opener's rate and burst (for status pages and tests)."""
        with self._locked() as fd:
            now = self.clock()
            tokens, stamp, _ = self._load(fd, now)
        return self._refilled(tokens, stamp, now)

    def close(self) -> None:
        with _files_lock:
            f, self._file = self._file, None
            if f is None:
                return
            f.users -= 1
            if f.users == 0:
                if _files.get(self._key) is f:
                    del _files[self._key]
                os.close(f.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "SharedBucket(%r, rate=%r, burst=%r)" % (self.path, self.rate, self.burst)
