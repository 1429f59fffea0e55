"""The gap engine alone: detection, holding, filling, expiry and the one dedupe rule (no processes)."""

from __future__ import annotations

import random
import time

import pytest

from mdlogger import records as rec
from mdlogger.gaps import GapEngine
from mdlogger.records import ZERO_ID

SYM = b"BTC-USDT"
NOW = int(time.time())


def row(tid, sec=None, nanos=0, price=100.0, size=1.0, side=1):
    return (SYM, tid, NOW if sec is None else sec, nanos, price, size, side, ZERO_ID, ZERO_ID)


class Harness:
    def __init__(self, consecutive=True, stored=(), hold=10.0, lookback=3600.0):
        self.out, self.requests, self.records = [], [], []
        self.mono = [0.0]
        self.engine = GapEngine(
            "binance", consecutive, emit=lambda s, rows: self.out.extend(rows),
            request=self.requests.append, record=lambda g: self.records.append((g.gap, g.fate, g.why)),
            load_mark=lambda s: list(stored), hold_secs=hold, max_lookback_secs=lookback,
            monotonic=lambda: self.mono[0])

    def ids(self):
        return [r[1] for r in self.out]


def test_consecutive_ids_pass_and_duplicates_are_dropped():
    h = Harness()
    h.engine.trades(SYM, [row(1), row(2), row(3)])
    h.engine.trades(SYM, [row(2), row(3), row(4)], replayed=True)
    h.engine.trades(SYM, [row(4), row(5)])  # live rows follow the same rule
    assert h.ids() == [1, 2, 3, 4, 5]
    assert h.engine.counts["duplicates"] == 3 and not h.requests


def test_id_jump_holds_later_rows_until_filled_then_all_in_order():
    h = Harness()
    h.engine.trades(SYM, [row(1), row(2)])
    h.engine.trades(SYM, [row(6), row(7)])
    h.engine.trades(SYM, [row(8)])
    assert h.ids() == [1, 2] and len(h.requests) == 1
    og = h.requests[0]
    assert og.after[0] == 2 and og.before[0] == 6 and og.gap.why == "id_jump" and og.gap.missing == 3
    stored = h.engine.filled(og.gap.gap, [row(2), row(3), row(4), row(5), row(6)])  # edges overlap: dropped
    assert stored == 3
    assert h.ids() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r[1:] for r in h.records] == [("pending", "id_jump"), ("filled", "id_jump")]
    assert h.engine.counts["backfilled"] == 3 and h.engine.pending() == 0


def test_short_answer_is_recorded_with_what_is_still_missing():
    h = Harness()
    h.engine.trades(SYM, [row(1), row(5)])
    og = h.requests[0]
    h.engine.filled(og.gap.gap, [row(2), row(4)])
    assert h.ids() == [1, 2, 4, 5]
    assert og.gap.fate == "filled" and og.gap.missing == 1 and "2 of 3" in og.gap.detail


def test_hold_expiry_releases_rows_and_marks_unrecoverable():
    h = Harness(hold=5.0)
    h.engine.trades(SYM, [row(1)])
    h.engine.trades(SYM, [row(4), row(5)])
    h.mono[0] = 4.9
    h.engine.expire()
    assert h.ids() == [1]
    h.mono[0] = 5.0
    h.engine.expire()
    assert h.ids() == [1, 4, 5]
    assert h.records[-1][1] == "unrecoverable"
    assert h.engine.filled(h.requests[0].gap.gap, [row(2), row(3)]) == 0  # too late: never out of order
    assert h.ids() == [1, 4, 5]


def test_a_second_gap_among_held_rows_opens_after_the_first_is_filled():
    h = Harness()
    h.engine.trades(SYM, [row(1), row(3)])  # gap 2
    h.engine.trades(SYM, [row(4), row(7)])  # held; another gap 5..6 inside
    first = h.requests[0]
    h.engine.filled(first.gap.gap, [row(2)])
    assert h.ids() == [1, 2, 3, 4] and len(h.requests) == 2
    second = h.requests[1]
    assert second.after[0] == 4 and second.before[0] == 7
    h.engine.filled(second.gap.gap, [row(5), row(6)])
    assert h.ids() == list(range(1, 8))


def test_resume_after_reconnect_without_loss_opens_no_gap():
    h = Harness()
    h.engine.trades(SYM, [row(1), row(2)])
    h.engine.resume(SYM, "reconnect")
    h.engine.trades(SYM, [row(3)])
    assert h.ids() == [1, 2, 3] and not h.requests


def test_resume_reason_names_the_gap():
    h = Harness()
    h.engine.trades(SYM, [row(1)])
    h.engine.resume(SYM, "reconnect")
    h.engine.trades(SYM, [row(9)])
    assert h.requests[0].gap.why == "reconnect"


def test_mark_recovered_from_disk_makes_a_writer_restart_gap():
    h = Harness(stored=[(10, NOW, 0, 1.0, 1.0, 1)])
    h.engine.trades(SYM, [row(10), row(13)])
    assert h.ids() == [] and h.requests[0].gap.why == "writer_restart"
    assert h.requests[0].after[0] == 10


def test_gap_older_than_lookback_is_unrecoverable_at_once_and_holds_nothing():
    h = Harness(stored=[(10, NOW - 7200, 0, 1.0, 1.0, 1)], lookback=3600)
    h.engine.trades(SYM, [row(20), row(21)])
    assert h.ids() == [20, 21] and not h.requests
    assert h.records[0][1] == "unrecoverable"


def test_time_only_exchange_gap_on_resume_and_edge_dedupe():
    """Kraken-like: no ids. Replayed rows at the mark's time that were stored are dropped; others kept."""
    h = Harness(consecutive=False)
    h.engine.trades(SYM, [row(0, NOW, 5, 10.0, 1.0, 1), row(0, NOW, 5, 11.0, 1.0, 1)])
    h.engine.resume(SYM, "reconnect")
    # the replay does not reach back to the mark: a gap by time
    h.engine.trades(SYM, [row(0, NOW + 3, 0, 12.0, 1.0, 2)], replayed=True)
    h.engine.trades(SYM, [row(0, NOW + 3, 0, 12.0, 1.0, 2)])  # live, same key as the replayed one: kept
    assert len(h.requests) == 1 and h.requests[0].gap.why == "reconnect"
    og = h.requests[0]
    rest = [row(0, NOW, 5, 10.0, 1.0, 1), row(0, NOW, 5, 11.0, 1.0, 1), row(0, NOW, 5, 13.0, 1.0, 1),
            row(0, NOW + 1, 0, 14.0, 1.0, 1), row(0, NOW + 3, 0, 12.0, 1.0, 2), row(0, NOW + 3, 0, 12.0, 1.0, 2),
            row(0, NOW + 4, 0, 15.0, 1.0, 1)]
    assert h.engine.filled(og.gap.gap, rest) == 2  # 13.0 (same time as the mark, not stored) and 14.0
    assert [r[4] for r in h.out] == [10.0, 11.0, 13.0, 14.0, 12.0, 12.0]


def test_time_only_replay_reaching_over_the_mark_proves_no_gap():
    h = Harness(consecutive=False)
    h.engine.trades(SYM, [row(0, NOW, 1, 10.0), row(0, NOW, 2, 11.0)])
    h.engine.resume(SYM, "reconnect")
    h.engine.trades(SYM, [row(0, NOW, 1, 10.0), row(0, NOW, 2, 11.0), row(0, NOW, 3, 12.0)], replayed=True)
    assert not h.requests and [r[4] for r in h.out] == [10.0, 11.0, 12.0]


def test_live_rows_without_ids_are_never_dropped():
    h = Harness(consecutive=False)
    h.engine.trades(SYM, [row(0, NOW, 1, 10.0)])
    h.engine.trades(SYM, [row(0, NOW, 1, 10.0), row(0, NOW - 1, 0, 9.0)])  # same key, even older: live is truth
    assert len(h.out) == 3


def test_resume_while_a_gap_is_open_is_replayed_in_order():
    h = Harness(consecutive=False)
    h.engine.trades(SYM, [row(0, NOW, 1, 10.0)])
    h.engine.resume(SYM, "reconnect")
    h.engine.trades(SYM, [row(0, NOW + 1, 0, 11.0)])
    h.engine.resume(SYM, "reconnect")  # the connection dropped again while the first gap is open
    h.engine.trades(SYM, [row(0, NOW + 5, 0, 12.0)])
    first = h.requests[0]
    h.engine.filled(first.gap.gap, [])
    assert first.gap.fate == "empty"
    assert len(h.requests) == 2 and h.requests[1].after[1:] == (NOW + 1, 0)
    h.engine.failed(h.requests[1].gap.gap, "REST: down")
    assert [r[4] for r in h.out] == [10.0, 11.0, 12.0] and h.records[-1][1] == "unrecoverable"


def test_gaps_a_killed_writer_left_pending_take_the_fate_of_the_gap_found_again():
    from mdlogger.ledger import Gap

    orphan = Gap(gap="old", exchange="binance", symbol="BTC-USDT", from_id=10, from_sec=NOW, from_nanos=0,
                 to_id=14, to_sec=NOW, to_nanos=0, why="reconnect", detected_at=NOW)
    h = Harness(stored=[(10, NOW, 0, 1.0, 1.0, 1)])
    h.engine.load_orphans = lambda s: [orphan]
    h.engine.trades(SYM, [row(15)])
    h.engine.filled(h.requests[0].gap.gap, [row(11), row(12), row(13), row(14)])
    assert h.ids() == [11, 12, 13, 14, 15]
    assert ("old", "filled", "reconnect") in h.records and orphan.detail.startswith("inside gap")


def test_an_orphan_with_nothing_missing_is_settled_as_filled():
    from mdlogger.ledger import Gap

    orphan = Gap(gap="old", exchange="binance", symbol="BTC-USDT", from_id=10, from_sec=NOW, from_nanos=0,
                 to_id=11, to_sec=NOW, to_nanos=0, why="reconnect", detected_at=NOW)
    h = Harness(stored=[(10, NOW, 0, 1.0, 1.0, 1)])
    h.engine.load_orphans = lambda s: [orphan]
    h.engine.trades(SYM, [row(11)])
    assert h.ids() == [11] and ("old", "filled", "reconnect") in h.records


# -- blocks of wire records (GapEngine.trades_block) ------------------------------------------------


def wire(rows) -> bytes:
    return b"".join(rec.TRADE_WIRE.pack(*r) for r in rows)


class Twins:
    """One engine fed blocks of wire records, one fed the same rows per row: they must agree."""

    def __init__(self, consecutive, stored=()):
        self.block, self.rows = Harness(consecutive, stored), Harness(consecutive, stored)
        self.block.engine.emit_block = lambda s, blob: self.block.out.extend(rec.TRADE_WIRE.iter_unpack(blob))

    def send(self, rows, replayed=False):
        self.block.engine.trades_block(SYM, wire(rows), replayed)
        self.rows.engine.trades(SYM, list(rec.TRADE_WIRE.iter_unpack(wire(rows))), replayed)

    def resume(self, why="reconnect"):
        self.block.engine.resume(SYM, why)
        self.rows.engine.resume(SYM, why)

    def check(self):
        a, b = self.block.engine.tracks[SYM], self.rows.engine.tracks[SYM]
        assert self.block.out == self.rows.out
        assert (a.mark_id, a.mark_sec, a.mark_nanos, a.known, dict(a.edge)) == \
               (b.mark_id, b.mark_sec, b.mark_nanos, b.known, dict(b.edge))
        assert [r[1:] for r in self.block.records] == [r[1:] for r in self.rows.records]
        assert self.block.engine.counts == self.rows.engine.counts


def test_steady_blocks_take_the_fast_path_and_end_where_row_by_row_ends():
    t = Twins(consecutive=True)
    t.send([row(1, NOW, 0), row(2, NOW, 5, 101.0), row(3, NOW, 5, 102.0)])  # two rows at the latest time
    t.send([row(4, NOW + 1, 0)])
    t.send([row(5, NOW, 9), row(6, NOW + 1, 0, 103.0)])  # times go back: the edge still matches
    t.check()
    assert t.block.engine.fast_blocks == 3


def test_blocks_that_are_not_steady_go_row_by_row():
    t = Twins(consecutive=True, stored=[(10, NOW, 0, 1.0, 1.0, 1)])
    t.send([row(11), row(12)])  # first sight after a restart: a resume is pending
    t.send([row(12), row(13)])  # a duplicate
    t.send([row(14), row(16), row(15), row(17)])  # out of order, first and last where they belong
    t.check()
    assert t.block.engine.fast_blocks == 0
    t.block.engine.failed(t.block.requests[0].gap.gap, "x")
    t.rows.engine.failed(t.rows.requests[0].gap.gap, "x")
    t.send([row(18), row(19)], replayed=True)  # a replay: row by row whatever it holds
    t.send([row(20)])
    t.check()


@pytest.mark.parametrize("consecutive,with_ids", [(True, True), (False, True), (False, False)])
def test_random_blocks_agree_with_row_by_row(consecutive, with_ids):
    """Binance-like, Bitfinex-like and Kraken-like rows, in blocks of every size, with jumps, duplicates,
    resumes, replays, times that stand still or go back."""
    rnd = random.Random(7)
    t = Twins(consecutive)
    tid, sec, nanos = 100, NOW - 600, 0
    for _ in range(400):
        rows = []
        for _ in range(rnd.choice((1, 1, 2, 3, 7, 20))):
            tid += 1 if consecutive else rnd.choice((1, 1, 5))
            if rnd.random() < 0.05:
                tid += 3  # a jump
            step = rnd.choice((0, 0, 1, 1000, -1))
            nanos = max(0, nanos + step)
            rows.append(row(tid if with_ids else 0, sec, nanos, rnd.choice((1.0, 2.0, float("inf"))), 1.0,
                            rnd.choice((1, 2))))
        if rnd.random() < 0.05 and rows:
            rows.insert(rnd.randrange(len(rows)), rows[0])  # a duplicate inside
        if rnd.random() < 0.05:
            t.resume()
        t.send(rows, replayed=rnd.random() < 0.05)
        for h in (t.block, t.rows):
            for og in list(h.requests):
                if og.gap.gap in h.engine.open:
                    h.engine.failed(og.gap.gap, "down")
        t.check()
    assert t.block.engine.fast_blocks > 100
