"""Gaps in a symbol's trades: detection, holding, filling, and the one dedupe rule.

Runs inside the writer, which owns the files and so knows, per symbol, the
newest trade stored: the **mark**. Every trade row of one exchange passes
through :class:`GapEngine.trades`::

    slot pipes --rows--> GapEngine.trades(symbol, rows) --new rows, in order--> emit -> table buffers
                              |    ^
            gap: rows held    |    | filled(gap, rows): backfilled rows emitted first,
            (hold_secs max)   v    | then the held rows go through trades() again
                         request(gap) --> backfill thread (REST, mdlogger/history.py)

**One dedupe rule** (:meth:`Mark.is_duplicate`) for live, snapshot,
overlap and backfilled rows: where the exchange has trade ids, a row is new
only when its id is above the mark's; where it has none (Kraken v1), live rows
are never dropped (two trades may share a time), while replayed and
backfilled rows are new only after the mark's time, or at the mark's time
when no stored row had the same price, size and side. The worker applies the
same rule, through the same class, to the trades of a connection that
replaces another (:class:`mdlogger.rotation.OverlapSink`: the old
connection's trades are the mark, the new one's are replayed rows), so
overlap rows reach the writer already deduplicated.

**A gap** is

* ids that jump, where ids are consecutive per symbol (Binance, Coinbase,
  OKX): the first row whose id is above ``mark + 1``;
* any span with no live connection, on every exchange: the worker sends a
  *resume* marker per symbol after every plain (re)connect, and the writer's
  first sighting of a symbol after its own start counts as one too. The next
  new row ends the span. Where ids are consecutive, the id check decides
  whether anything is missing. Elsewhere, a replay sent on subscribe that
  reaches back over the mark (a duplicate row seen in it) proves nothing is
  missing; otherwise the span is fetched by time, and may turn out empty.

While a gap is open the symbol's later rows (and markers) are **held** in
arrival order, so backfilled trades land in their place and a TRADES table
stays in exchange order. When the gap is filled, or fails, or its hold
expires (``hold_secs``), the held items go through :meth:`GapEngine.trades`
again, which may open the next gap. A gap whose start is older than
``max_lookback_secs`` is recorded as unrecoverable at once and holds nothing.

Every gap is handed to ``record`` (the ledger) when detected and again with
its fate: filled, empty or unrecoverable. Gaps a killed writer left pending
(``load_orphans``) are settled by the next writer: the span they were in is
found again from the stored rows, and they take the fate of the gap that
covers them (or "filled" when the replay after the restart covered it).
"""

from __future__ import annotations

import collections
import itertools
import operator
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .ledger import Gap
from .records import SYMBOL_FIELD, TRADE_WIRE

F32 = struct.Struct("<f")
_RECORD = TRADE_WIRE.size
# (id, sec, nanos) of a wire record; the rest skipped
_MARK_FORMAT = "%dxQII%dx" % (SYMBOL_FIELD, _RECORD - SYMBOL_FIELD - 16)
_MARK_ONE = struct.Struct("<" + _MARK_FORMAT)
_MARK_MANY: dict[int, struct.Struct] = {}
_MARK_MANY_MAX = 128  # blocks of more records are unpacked record by record
_KEY_FIELDS = struct.Struct("<ffI")  # price, size, side: a row's key (_key)
_KEY_AT = SYMBOL_FIELD + 16


def f32(x: float) -> float:
    """The value a float32 column will hold (comparisons must use what is stored)."""
    return F32.unpack(F32.pack(x))[0]


def _key(row: tuple) -> tuple:
    """What identifies a trade without an id: price, size and side as stored."""
    return (f32(row[4]), f32(row[5]), row[6])


def _latest(secs: tuple, nanos: tuple, k: int):
    """Indexes of the rows at the latest time of a block of ``k`` > 1 rows, in order (usually the last
    row or rows: times seldom go back)."""
    top_sec = max(secs)
    c = secs.count(top_sec)
    if secs[k - c:].count(top_sec) == c:  # the rows of the latest second are the last ones
        tail = nanos[k - c:]
        top_nanos = max(tail)
        n = tail.count(top_nanos)
        if tail[c - n:].count(top_nanos) == n:  # and those of the latest time too
            return range(k - n, k)
        return tuple(k - c + i for i, x in enumerate(tail) if x == top_nanos)
    pairs = list(zip(secs, nanos))
    top = max(pairs)
    return tuple(i for i, p in enumerate(pairs) if p == top)


def _mark_fields(blob, k: int) -> tuple:
    """``(id, sec, nanos)`` of each of the ``k`` wire records of ``blob``, flat: one unpack in C."""
    if k > _MARK_MANY_MAX:
        return tuple(itertools.chain.from_iterable(_MARK_ONE.iter_unpack(blob)))
    unpack = _MARK_MANY.get(k)
    if unpack is None:
        unpack = _MARK_MANY[k] = struct.Struct("<" + _MARK_FORMAT * k)
    return unpack.unpack(blob)


@dataclass
class OpenGap:
    gap: Gap
    after: tuple  # (id, sec, nanos) of the last stored trade
    before: tuple  # (id, sec, nanos) of the first trade after the gap
    deadline: float  # monotonic: the held rows go out by then, filled or not
    held: list = field(default_factory=list)  # ("rows", rows, snapshot) | ("resume", why)
    held_rows: int = 0
    covers: list = field(default_factory=list)  # orphaned gaps (a killed writer's) inside this one


class Mark:
    """The newest trade kept of one symbol, and the one dedupe rule against it.

    Used by the writer (the newest stored trade, through :class:`SymbolTrack`)
    and by the worker during an overlap (the newest trade the old connection
    delivered). Rows are ``TRADE_WIRE``-ordered tuples.
    """

    __slots__ = ("mark_id", "mark_sec", "mark_nanos", "edge", "known")

    def __init__(self):
        self.mark_id = 0
        self.mark_sec = 0
        self.mark_nanos = 0
        self.edge: collections.Counter = collections.Counter()  # keys of kept rows at the mark's time
        self.known = False  # a mark was kept (now or, in the writer, by an earlier run)

    def edge_tuple(self) -> tuple:
        return (self.mark_id, self.mark_sec, self.mark_nanos)

    def load(self, rows) -> None:
        """Set the mark from stored rows ``(id, sec, nanos, price, size, side)``, oldest first."""
        for tid, sec, nanos, px, qty, side in rows:
            self.advance((b"", tid, sec, nanos, px, qty, side))

    def advance(self, row: tuple) -> None:
        self.known = True
        if row[1] > self.mark_id:
            self.mark_id = row[1]
        t = (row[2], row[3])
        mt = (self.mark_sec, self.mark_nanos)
        if t > mt:
            self.mark_sec, self.mark_nanos = t
            self.edge.clear()
            self.edge[_key(row)] += 1
        elif t == mt:
            self.edge[_key(row)] += 1

    def is_duplicate(self, row: tuple, replayed: bool) -> bool:
        """The one dedupe rule (see the module docstring)."""
        if not self.known:
            return False
        if row[1] and self.mark_id:
            return row[1] <= self.mark_id
        if not replayed:
            return False
        t = (row[2], row[3])
        mt = (self.mark_sec, self.mark_nanos)
        if t != mt:
            return t < mt
        return self.edge.get(_key(row), 0) > 0


class SymbolTrack(Mark):
    """One symbol's mark (the newest stored trade), pending resume, and open gap."""

    __slots__ = ("resume", "overlap", "gap", "settled", "orphans")

    def __init__(self):
        super().__init__()
        self.resume: Optional[str] = None  # why a span without a connection ended (None: none pending)
        self.overlap = False  # since the resume, a replayed row was already stored
        self.gap: Optional[OpenGap] = None
        self.settled: Optional[tuple] = None  # the end of a gap just closed: its row opens no gap again
        self.orphans: list = []  # gaps a killed writer left pending: settled by what this one finds


class GapEngine:
    """Gap detection and ordering for the trades of one exchange (see the module docstring).

    ``emit(symbol, rows)`` takes rows to store, in order; ``request(open_gap)``
    asks for a backfill (the answer comes back through :meth:`filled` or
    :meth:`failed`); ``record(gap)`` writes a gap to the ledger; ``load_mark(symbol)``
    returns the stored rows the mark is recovered from.
    """

    def __init__(self, exchange: str, consecutive_ids: bool, emit: Callable, request: Callable,
                 record: Callable, load_mark: Callable, hold_secs: float = 120.0,
                 max_lookback_secs: float = 6 * 3600.0, monotonic=time.monotonic, wall=time.time,
                 load_orphans: Callable = lambda symbol: [], emit_block: Optional[Callable] = None):
        self.exchange = exchange
        self.consecutive = consecutive_ids
        self.emit = emit
        self.emit_block = emit_block
        self.fast_blocks = 0  # blocks that took the steady-state path of trades_block
        self.request = request
        self.record = record
        self.load_mark = load_mark
        self.load_orphans = load_orphans
        self.hold_secs = hold_secs
        self.max_lookback = max_lookback_secs
        self.monotonic = monotonic
        self.wall = wall
        self.tracks: dict[bytes, SymbolTrack] = {}
        self.open: dict[str, tuple[bytes, OpenGap]] = {}
        self.counts = collections.Counter()  # detected, filled, empty, unrecoverable, backfilled, duplicates
        self._ids = itertools.count(1)

    # -- state ---------------------------------------------------------------
    def track(self, symbol: bytes) -> SymbolTrack:
        t = self.tracks.get(symbol)
        if t is None:
            t = self.tracks[symbol] = SymbolTrack()
            t.load(self.load_mark(symbol.decode("ascii")))
            t.orphans = list(self.load_orphans(symbol.decode("ascii")))
            if t.known:
                t.resume = "writer_restart"  # whatever happened while no writer ran is a span to check
        return t

    def held_rows(self) -> int:
        return sum(g.held_rows for _, g in self.open.values())

    def pending(self) -> int:
        return len(self.open)

    def oldest_pending(self) -> float:
        """Wall-clock detection time of the oldest open gap (0: none)."""
        return min((g.gap.detected_at for _, g in self.open.values()), default=0.0)

    def pending_since(self, day_end: float) -> bool:
        """Whether an open gap starts before ``day_end`` (its day cannot be sealed yet)."""
        return any(g.gap.from_sec < day_end for _, g in self.open.values())

    # -- input ---------------------------------------------------------------
    def resume(self, symbol: bytes, why: str) -> None:
        """A connection for ``symbol`` (re)started: what follows may come after a span without one."""
        t = self.track(symbol)
        if t.gap is not None:
            t.gap.held.append(("resume", why))
            return
        if t.known:
            t.resume = why
            t.overlap = False

    def trades(self, symbol: bytes, rows: list, replayed: bool = False) -> None:
        """Take rows of one symbol in arrival order; ``replayed``: a replay sent on subscribe."""
        t = self.track(symbol)
        if t.gap is not None:
            self._hold(t.gap, rows, replayed)
            return
        out = []
        for i, row in enumerate(rows):
            if t.is_duplicate(row, replayed):
                self.counts["duplicates"] += 1
                if t.resume is not None and replayed:
                    t.overlap = True
                continue
            why = self._gap_before(t, row)
            if why is not None:
                if out:
                    self.emit(symbol, out)
                    out = []
                opened = self._open(symbol, t, row, why)
                if opened is not None:
                    self._hold(opened, rows[i:], replayed)
                    return
            elif t.orphans:
                self._settle_orphans(t, "filled", "nothing was missing after the writer's restart")
            out.append(row)
            t.advance(row)
        if out:
            self.emit(symbol, out)

    def trades_block(self, symbol: bytes, blob, replayed: bool = False) -> None:
        """:meth:`trades` for concatenated wire records (``TRADE_WIRE``) of one symbol, in arrival order.

        The steady state takes a path without a Python object per row: no
        gap open, no resume pending, no gap just settled, no orphans, live
        rows, and every row new with no gap before it, which a look at the
        whole block decides (:meth:`_advance_block`). Then the mark advances
        from the block's last rows and the block goes out as it came, to
        ``emit_block(symbol, blob)`` (``emit`` with unpacked rows if there is
        none). Anything else is unpacked and goes through :meth:`trades`, the
        reference, which the steady-state path must match exactly (same rows
        out, same mark after: tests/test_gaps.py, tests/test_writer.py).
        """
        if not blob:
            return
        t = self.tracks.get(symbol)
        if t is None:
            t = self.track(symbol)
        if (replayed or t.gap is not None or t.resume is not None or t.settled is not None or t.orphans
                or not self._advance_block(t, blob)):
            self.trades(symbol, list(TRADE_WIRE.iter_unpack(blob)), replayed)
            return
        self.fast_blocks += 1
        if self.emit_block is not None:
            self.emit_block(symbol, blob)
        else:
            self.emit(symbol, list(TRADE_WIRE.iter_unpack(blob)))

    def _advance_block(self, t: SymbolTrack, blob) -> bool:
        """Advance the mark over a block of live rows if :meth:`trades` would let every row through
        without a gap; False (nothing changed) otherwise.

        Rows: by the dedupe rule a live row is new unless it has an id and
        the mark has one at least as high; where ids are consecutive a row
        opens a gap unless its id is the mark's + 1. So where ids are
        consecutive the block must hold exactly ids mark+1 .. mark+k (the
        first row's id - 1 stands for the mark of a symbol never stored);
        elsewhere either no row has an id (Kraken) or every row has one,
        each above the one before and the first above the mark (Bitfinex).

        The mark then: the highest id; the latest time M of the mark and the
        rows; and the edge, the keys of the rows at M (added to the old edge
        when M is the mark's own time). That is what :meth:`Mark.advance`
        row by row ends with, whatever the order of the times: a row at M
        counts once M is reached, a row before M is cleared by it. Usually
        the rows at M are the last rows (times do not go back), so only
        those are unpacked.
        """
        k = len(blob) // _RECORD
        mark = t.mark_id
        if k == 1:  # (the usual block at real rates: one row, no slicing)
            rid, sec, nanos = _MARK_ONE.unpack_from(blob)
            if self.consecutive:
                if (rid != mark + 1 or not mark) if t.known else not rid:
                    return False
                new_id = rid
            elif rid and mark and rid <= mark:
                return False
            else:
                new_id = rid or mark
            at = (0,)
            top = (sec, nanos)
        else:
            unpack = _MARK_MANY.get(k)
            f = unpack.unpack(blob) if unpack is not None else _mark_fields(blob, k)
            ids = f[0::3]
            first, last = ids[0], ids[-1]
            if self.consecutive:
                if t.known:
                    if not mark:
                        return False
                elif first:
                    mark = first - 1
                else:
                    return False
                if first != mark + 1 or last != mark + k:
                    return False
                if k > 2 and ids != tuple(range(first, last + 1)):
                    return False
                new_id = last
            elif not first and not last and not any(ids):
                new_id = mark
            else:
                if first <= mark or 0 in ids or not all(map(operator.lt, ids, ids[1:])):
                    return False
                new_id = last
            secs, nanos = f[1::3], f[2::3]
            at = _latest(secs, nanos, k)
            top = (secs[at[0]], nanos[at[0]])
        mark_time = (t.mark_sec, t.mark_nanos)
        if top >= mark_time:
            edge = t.edge
            if top > mark_time:
                t.mark_sec, t.mark_nanos = top
                edge.clear()
            # price, size and side as the reference's _key has them: unpacked from float32, they are
            # what f32() would give (a NaN is a new object either way, equal to no other key)
            get, unpack_from = edge.get, _KEY_FIELDS.unpack_from
            for i in at:
                key = unpack_from(blob, i * _RECORD + _KEY_AT)
                edge[key] = get(key, 0) + 1
        t.mark_id = new_id
        t.known = True
        return True

    def _gap_before(self, t: SymbolTrack, row: tuple) -> Optional[str]:
        """Why there is a gap between the mark and ``row`` (a new row), or None."""
        if t.settled is not None:
            settled, t.settled = t.settled, None
            if (row[1], row[2], row[3]) == settled:
                return None  # what could be had of this gap is stored; the rest is in the ledger
        if t.resume is not None:
            why, t.resume = t.resume, None
            overlap, t.overlap = t.overlap, False
            if not t.known:
                return None
            if self.consecutive and row[1] and t.mark_id:
                return why if row[1] > t.mark_id + 1 else None
            return None if overlap else why
        if self.consecutive and t.known and t.mark_id and row[1] > t.mark_id + 1:
            return "id_jump"
        return None

    def _hold(self, og: OpenGap, rows: list, replayed: bool) -> None:
        og.held.append(("rows", rows, replayed))
        og.held_rows += len(rows)

    def _open(self, symbol: bytes, t: SymbolTrack, row: tuple, why: str) -> Optional[OpenGap]:
        now = self.wall()
        gap = Gap(
            gap="%s-%d-%d" % (symbol.decode("ascii"), int(now * 1000), next(self._ids)),
            exchange=self.exchange, symbol=symbol.decode("ascii"),
            from_id=t.mark_id, from_sec=t.mark_sec, from_nanos=t.mark_nanos,
            to_id=row[1], to_sec=row[2], to_nanos=row[3],
            why=why, detected_at=now, fate="pending", trades=0,
            missing=(row[1] - t.mark_id - 1) if self.consecutive and row[1] and t.mark_id else None,
            detail="", updated_at=now,
        )
        self.counts["detected"] += 1
        if now - t.mark_sec > self.max_lookback:
            gap.fate = "unrecoverable"
            gap.detail = "starts %.0f s ago, beyond backfill_max_secs (%.0f s)" % (now - t.mark_sec, self.max_lookback)
            self.counts["unrecoverable"] += 1
            self.record(gap)
            self._settle_orphans(t, "unrecoverable", "inside gap %s: %s" % (gap.gap, gap.detail))
            return None
        og = OpenGap(gap, t.edge_tuple(), (row[1], row[2], row[3]), self.monotonic() + self.hold_secs)
        og.covers, t.orphans = t.orphans, []
        t.gap = og
        self.open[gap.gap] = (symbol, og)
        self.record(gap)
        self.request(og)
        return og

    # -- outcomes ------------------------------------------------------------
    def filled(self, gap_id: str, rows: list, partial: str = "") -> int:
        """Backfilled rows for an open gap (ascending); returns how many were stored.

        ``partial``: why the fetch stopped before the whole gap was covered (the
        rows are stored in their place; the gap is recorded with what is missing).
        """
        entry = self.open.pop(gap_id, None)
        if entry is None:
            return 0  # the gap's hold expired first: its held rows are already out
        symbol, og = entry
        t = self.tracks[symbol]
        out = self._fitting(t, og, rows)
        for row in out:
            t.advance(row)
        if out:
            self.emit(symbol, out)
        gap = og.gap
        gap.trades = len(out)
        self.counts["backfilled"] += len(out)
        if gap.missing is not None:
            gap.missing = max(0, gap.missing - len(out))
        if gap.missing:
            gap.fate = "unrecoverable" if not out else "filled"
            gap.detail = "the exchange returned %d of %d trades" % (len(out), len(out) + gap.missing)
            if partial:
                gap.detail += " (%s)" % partial
        elif partial:
            gap.fate = "unrecoverable"  # how much is missing is unknown
            gap.detail = "partly filled (%d trades): %s" % (len(out), partial)
        else:
            gap.fate = "filled" if out else "empty"
        self.counts[gap.fate] += 1
        self._close(symbol, t, og)
        return len(out)

    def failed(self, gap_id: str, reason: str) -> None:
        entry = self.open.pop(gap_id, None)
        if entry is None:
            return
        symbol, og = entry
        og.gap.fate = "unrecoverable"
        og.gap.detail = reason
        self.counts["unrecoverable"] += 1
        self._close(symbol, self.tracks[symbol], og)

    def expire(self) -> None:
        """Release every gap whose hold has run out (called from the writer's tick)."""
        now = self.monotonic()
        for gap_id, (_, og) in list(self.open.items()):
            if now >= og.deadline:
                self.failed(gap_id, "not filled within backfill_hold_secs (%.0f s)" % self.hold_secs)

    def _fitting(self, t: SymbolTrack, og: OpenGap, rows: list) -> list:
        """Backfilled rows that belong in the gap: new by the dedupe rule, and before its end."""
        before = og.before
        at_end = collections.Counter()  # rows held at the end's exact time (no-id exchanges)
        if not before[0]:
            for kind, *item in og.held:
                if kind == "rows":
                    for row in item[0]:
                        if (row[2], row[3]) == before[1:]:
                            at_end[_key(row)] += 1
        out = []
        probe = Mark()
        probe.mark_id, probe.mark_sec, probe.mark_nanos = t.mark_id, t.mark_sec, t.mark_nanos
        probe.edge, probe.known = collections.Counter(t.edge), t.known
        for row in rows:
            if probe.is_duplicate(row, True):
                continue
            if row[1] and before[0]:
                if row[1] >= before[0]:
                    continue
            else:
                when = (row[2], row[3])
                if when > before[1:]:
                    continue
                if when == before[1:]:
                    k = _key(row)
                    if at_end[k] > 0:
                        at_end[k] -= 1
                        continue
            probe.advance(row)
            out.append(row)
        return out

    def _settle_orphans(self, t: SymbolTrack, fate: str, detail: str) -> None:
        for orphan in t.orphans:
            orphan.fate, orphan.detail, orphan.updated_at = fate, detail, self.wall()
            self.record(orphan)
        t.orphans = []

    def _close(self, symbol: bytes, t: SymbolTrack, og: OpenGap) -> None:
        og.gap.updated_at = self.wall()
        self.record(og.gap)
        if og.covers:
            t.orphans = og.covers
            self._settle_orphans(t, og.gap.fate, "inside gap %s, found again after the writer's restart" % og.gap.gap)
        t.gap = None
        t.settled = og.before
        for kind, *item in og.held:
            if kind == "rows":
                self.trades(symbol, item[0], item[1])
            else:
                self.resume(symbol, item[0])
