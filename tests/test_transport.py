"""Frames over a real pipe: batching, bounded buffering, resync after damage."""

import os

from mdlogger import records as rec
from mdlogger.transport import FRAME_MAX, HEADER, MAGIC, MAX_RECORDS, FrameReader, FrameSender, encode_frame


def trade(i, sym=b"BTC-USDT"):
    return rec.TRADE_WIRE.pack(sym, i, 1700000000, i, 100.0 + i, 1.0, 1, rec.ZERO_ID, rec.ZERO_ID)


def read_all(reader):
    reader.fill()
    out = []
    for kind, records in reader.frames_ready():
        out.extend((kind, row) for row in rec.WIRE[kind].iter_unpack(records))
    return out


def test_frames_never_exceed_pipe_buf_and_arrive_whole():
    r, w = os.pipe()
    sender = FrameSender(w, 1 << 20)
    reader = FrameReader(r)
    n = MAX_RECORDS[rec.KIND_TRADES] * 3 + 5
    for i in range(n):
        sender.add(rec.KIND_TRADES, trade(i))
    assert sender.frames_sent == 3  # full batches go at once; the partial waits
    sender.seal()
    assert sender.frames_sent == 4
    rows = read_all(reader)
    assert [row[1][1] for row in rows] == list(range(n))
    assert all(kind == rec.KIND_TRADES for kind, _ in rows)
    assert MAX_RECORDS[rec.KIND_TRADES] * rec.TRADE_WIRE.size + 12 <= FRAME_MAX


def test_full_pipe_buffers_then_drops_and_counts():
    r, w = os.pipe()
    sender = FrameSender(w, max_buffer_bytes=64 * 1024)
    total = 0
    for i in range(60000):  # ~5 MB of records: far more than pipe + buffer
        sender.add(rec.KIND_TRADES, trade(i))
        total += 1
    sender.seal()
    assert sender.dropped_records > 0
    assert sender.buffered_bytes <= 64 * 1024
    reader = FrameReader(r)
    got = 0
    while True:
        n = len(read_all(reader))
        got += n
        done = sender.pump()
        if n == 0 and done:
            break
    assert got + sender.dropped_records == total


def test_reader_resyncs_after_garbage_and_bad_crc():
    r, w = os.pipe()
    good1 = encode_frame(rec.KIND_TRADES, trade(1) + trade(2))
    good2 = encode_frame(rec.KIND_TRADES, trade(3))
    damaged = bytearray(encode_frame(rec.KIND_TRADES, trade(99)))
    damaged[-1] ^= 0xFF
    os.write(w, b"junk" + good1[5:] + good1 + bytes(damaged) + good2)
    reader = FrameReader(r)
    rows = read_all(reader)
    assert [row[1][1] for row in rows] == [1, 2, 3]
    assert reader.corrupt_bytes > 0


def test_split_frame_waits_for_the_rest():
    r, w = os.pipe()
    frame = encode_frame(rec.KIND_MD, rec.MD_WIRE.pack(b"ETH-USDT", 1, 2, 3.0, 4.0, 0, 5.0, 6.0))
    reader = FrameReader(r)
    os.write(w, frame[:10])
    assert read_all(reader) == []
    os.write(w, frame[10:])
    rows = read_all(reader)
    assert len(rows) == 1 and rows[0][1][0].rstrip(b"\0") == b"ETH-USDT"
    assert reader.corrupt_bytes == 0


def test_snapshot_and_live_trades_keep_their_order():
    """A live batch never overtakes snapshot trades added before it (and vice versa)."""
    r, w = os.pipe()
    sender = FrameSender(w, 1 << 20)
    sender.add_snapshot(trade(1))
    sender.add_snapshot(trade(2))
    sender.add_trade(trade(3))  # seals the snapshot batch first
    sender.add_snapshot(trade(4))  # seals the live batch first
    sender.seal()
    rows = read_all(FrameReader(r))
    assert [(kind, row[1]) for kind, row in rows] == [
        (rec.KIND_SNAPSHOT, 1), (rec.KIND_SNAPSHOT, 2), (rec.KIND_TRADES, 3), (rec.KIND_SNAPSHOT, 4)]


def test_the_header_names_no_exchange():
    """A pipe carries one slot, whose exchange the writer knows: the header's old exchange byte is written 0
    and ignored, so the header keeps its 12 bytes."""
    frame = encode_frame(rec.KIND_TRADES, trade(5))
    assert HEADER.size == 12
    assert HEADER.unpack_from(frame)[:4] == (MAGIC, rec.KIND_TRADES, 0, 1)
    other = bytearray(frame)
    other[5] = 7  # whatever an older writer put there
    r, w = os.pipe()
    os.write(w, bytes(other))
    assert [row[1][1] for row in read_all(FrameReader(r))] == [5]
