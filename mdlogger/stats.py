"""Lock-free shared counters between a child process and the supervisor.

Each worker slot and the writer own one block of float64 cells in shared
memory (``multiprocessing.RawArray``), created by the supervisor before the
child starts and handed to it as an explicit argument. Exactly one process
writes a block (the child), the supervisor and its health thread only read.
There is deliberately no lock: a child killed mid-update can never leave a
lock held, and a torn read of one aligned 8-byte cell cannot happen on the
platforms we run on. A restarted child takes over its slot's block, so
counters such as reconnects and drops keep counting across restarts.
"""

from __future__ import annotations

from typing import Iterable

# Reasons a message or record is refused. Every refused message is counted
# under exactly one of these, per slot, and shown on /health.
DROP_REASONS = (
    "json",  # malformed JSON
    "binary",  # a binary frame where text was expected
    "unknown_type",  # a message type the adapter does not know
    "missing_field",  # a required field absent or of the wrong type
    "bad_price",  # NaN, zero, negative, absurd
    "bad_size",
    "bad_time",  # unparseable or far from now
    "bad_symbol",  # would not normalize to BASE-QUOTE
    "unknown_symbol",  # not one this connection subscribed
    "oversized",  # a frame larger than the adapter allows
    "exchange_error",  # an error or notice message from the exchange
    "duplicate",  # a trade already stored (snapshot replay)
    "merged",  # a row of merged fills, fetched fill by fill from REST instead
    "parser_error",  # the adapter raised something unexpected on this frame (counted, sampled in the log)
)

WORKER_FIELDS = (
    "pid",
    "started",  # wall clock time the process started
    "heartbeat",  # time.monotonic() of the last loop tick
    "connected",  # 1 while a connection is open and subscribed
    "connected_since",  # wall clock
    "down_since",  # wall clock when the connection was last lost (0 = never)
    "last_message",  # wall clock of the last frame of any kind (incl. pings)
    "messages",  # data frames received
    "records",  # records sent to the writer
    "records_md",
    "records_trades",
    "reconnects",
    "parse_errors",  # sum of every DROP_REASONS counter
    "dropped_records",  # records the writer could not take in time
    "frames_sent",  # batches handed to the writer
    "rate",  # messages per second over the last reporting interval
    "refused_symbols",  # symbols the exchange refused
    "clock_offset_p50",  # seconds: local receive time minus exchange event time, median over the last minute
    "clock_offset_p99",  # the 99th percentile of the same (NaN-free: 0 when there are no samples)
    "clock_samples",  # how many trades the two figures above are taken from
    # connections the worker closed for a bad frame (mdlogger/wsframes.py):
    "oversized_closes",  # a frame (or fragmented message) announced over the adapter's max_frame_bytes (1009)
    "protocol_errors",  # a frame breaking RFC 6455: masked, RSV bits, unknown opcode, bad control frame (1002)
    "stalled_frames",  # a frame begun and not complete within wsframes.FRAME_DEADLINE_SECS (1008)
) + tuple("drop_" + r for r in DROP_REASONS)

# Per exchange, in the writer's block: what became of the gaps in its trades
# (see mdlogger/gaps.py). ``oldest_pending_gap`` is the wall-clock time the
# oldest gap still being filled was detected (0: none pending). One set per
# registered exchange, named by :func:`gap_field` (see :func:`writer_fields`).
GAP_FIELDS = (
    "gaps_detected",
    "gaps_filled",  # trades fetched and stored
    "gaps_empty",  # nothing traded in the gap
    "gaps_unrecoverable",
    "gaps_pending",
    "trades_backfilled",
    "rest_calls",  # REST requests made for backfill
    "oldest_pending_gap",
)


def gap_field(field: str, exchange: str) -> str:
    """The name of one exchange's gap counter in the writer's block."""
    return "%s_%s" % (field, exchange)


# The writer's own counters; :func:`writer_fields` adds the gap counters of every exchange.
WRITER_BASE_FIELDS = (
    "pid",
    "started",
    "heartbeat",
    "rows_md",
    "rows_trades",
    "rows",
    "last_flush",  # wall clock of the last completed flush
    "flush_seconds",  # duration of the last flush
    "io_errors",
    "bytes_written",
    "corrupt_bytes",  # bytes skipped while resynchronising a pipe
    "refused_records",  # records with an invalid symbol or day
    "dropped_records",  # rows given up after repeated I/O errors
    "repaired_tables",
    "duplicates",  # snapshot trades not newer than the last stored one
    "pending_rows",
    "open_tables",
    "held_rows",  # rows waiting for a gap before them to be filled
    "sealed_days",  # day manifests written
    "late_rows",  # rows for a day already sealed (refused, counted)
    # the writer's open tables (mdlogger/writer.py, "Open files"):
    "table_cache",  # tables it keeps open at most (from its RLIMIT_NOFILE)
    "table_opens",  # tables opened (each opens every column file)
    "evictions",  # tables closed to make room for another (never fsynced then)
    "reopened_tables",  # tables opened again after an eviction
    "fsyncs",  # fsync calls on column files (at the interval, at a seal, at exit)
)


def writer_fields(exchanges: Iterable[str] | None = None) -> tuple[str, ...]:
    """The cells of the writer's block: its own counters, then the gap counters of each exchange
    (default: every registered one, read now; the supervisor and the writer both call this after
    the adapters are imported, so they agree)."""
    if exchanges is None:
        from .exchanges import exchange_names

        exchanges = exchange_names()
    return WRITER_BASE_FIELDS + tuple(gap_field(f, x) for x in exchanges for f in GAP_FIELDS)


def __getattr__(name: str):
    # The older constants, derived from the registry when read.
    if name == "WRITER_FIELDS":
        return writer_fields()
    if name == "GAP_EXCHANGES":
        from .exchanges import exchange_names

        return exchange_names()
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


class Block:
    """Named float64 cells over a shared array (or a plain list in tests)."""

    __slots__ = ("_array", "_index")

    def __init__(self, fields: Iterable[str], array=None):
        fields = tuple(fields)
        self._index = {name: i for i, name in enumerate(fields)}
        self._array = array if array is not None else [0.0] * len(fields)

    @classmethod
    def shared(cls, ctx, fields: Iterable[str]) -> "Block":
        fields = tuple(fields)
        return cls(fields, ctx.RawArray("d", len(fields)))

    @property
    def array(self):
        return self._array

    def index(self, name: str) -> int:
        return self._index[name]

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> float:
        return self._array[self._index[name]]

    def set(self, name: str, value: float) -> None:
        self._array[self._index[name]] = value

    def add(self, name: str, value: float = 1.0) -> None:
        i = self._index[name]
        self._array[i] += value

    def as_dict(self) -> dict[str, float]:
        arr = self._array
        return {name: arr[i] for name, i in self._index.items()}

    def reasons(self) -> dict[str, int]:
        """Non-zero drop counters by reason."""
        arr = self._array
        out = {}
        for reason in DROP_REASONS:
            i = self._index.get("drop_" + reason)
            if i is not None and arr[i]:
                out[reason] = int(arr[i])
        return out

    def reset(self, names: Iterable[str]) -> None:
        for name in names:
            self.set(name, 0.0)

    def __getstate__(self):
        return (tuple(self._index), self._array)

    def __setstate__(self, state):
        fields, array = state
        self._index = {name: i for i, name in enumerate(fields)}
        self._array = array


NOTE_BYTES = 2048


class Note:
    """A short shared text (one writer), e.g. the symbols an exchange refused."""

    def __init__(self, array=None):
        self._array = array if array is not None else bytearray(NOTE_BYTES)

    @classmethod
    def shared(cls, ctx) -> "Note":
        return cls(ctx.RawArray("c", NOTE_BYTES))

    @property
    def array(self):
        return self._array

    def set(self, text: str) -> None:
        data = text.encode("utf-8", "replace")[: NOTE_BYTES - 1]
        self._array[: len(data) + 1] = data + b"\0"

    def get(self) -> str:
        raw = bytes(self._array[:])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
