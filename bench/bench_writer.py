#!/usr/bin/env python3
"""The writer alone, in this process, on a recorded stream of frames.

    python bench/bench_writer.py [--rows 1000000] [--symbols 1,10,250] [--scale 250,4000]
                                 [--scale-secs 60] [--repeat 3] [--dir DIR] [--quick]

Two parts:

* **throughput**: ``--rows`` trades over 1, 10 and 250 symbols (Binance:
  consecutive ids), plus one ticker for every 20 trades, packed with the real
  wire layout (``records.TRADE_WIRE`` / ``MD_WIRE``) into full frames (48
  trades, 78 tickers) the way a worker batches them at a firehose: the
  symbol of each message sticks with even odds, else it is drawn by
  popularity (Zipf), and a message carries 1 trade, sometimes up to 5. The
  frames are made first; then ``Writer.take_frame`` takes them and
  ``flush_all`` runs every 7,500 rows (50 ms at 150,000 rows/s), then one
  ``fsync_all``. Reported: CPU seconds of this process (user + system),
  microseconds of CPU per row and CPU seconds per 1M rows, the best of
  ``--repeat`` runs (a fresh writer and directory each).
* **scale**: every symbol of the ``--scale`` counts (a trades and a tickers
  table each: 4,000 symbols are 8,000 tables) at real rates, on a simulated
  clock: one ticker per symbol per second, and 2,000 trades a second spread
  by popularity; a flush every 50 ms of simulated time and an fsync every
  30 s (``fsync_interval_secs``), ``--scale-secs`` simulated seconds after
  2 to warm up. Reported per simulated second: column files opened (``os.open``), fsyncs
  (``os.fsync``), the writer's evictions where it counts them, and the CPU
  that second cost (percent of one core). The calls are counted by wrapping
  ``os.open`` and ``os.fsync`` in this process, so any writer can be
  measured the same way. The table cache is what the writer sizes from
  ``RLIMIT_NOFILE`` once raised to the hard limit (``--table-cache`` sets
  it, for a writer that takes it).

Only ``Writer(settings, stats_block, clock=...)``, ``take_frame``,
``flush_all`` and ``fsync_all`` are used, so an older tree can be measured with
the same script: ``git worktree add /tmp/base <ref>`` then
``PYTHONPATH=/tmp/base python bench/bench_writer.py``; the first line names the
``mdlogger`` measured. The data directory is under /dev/shm when there is one
(the writer's CPU, not the disk, is measured; ``--dir`` puts it elsewhere).
No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import itertools
import os
import random
import shutil
import sys
import tempfile
import time

import mdlogger
from mdlogger import records as rec
from mdlogger.settings import load_settings
from mdlogger.stats import Block, writer_fields
from mdlogger.writer import Writer

DAY = 1795478400  # 2026-11-24T00:00:00Z
EXCHANGE = "binance"
TRADES_PER_FRAME = 48
TICKERS_PER_FRAME = 78
FLUSH_ROWS = 7500
FLUSH_SECS = 0.05
FSYNC_SECS = 30.0
SCALE_TRADES_PER_SEC = 2000
WARM_SECS = 2


def symbols(n: int) -> list[bytes]:
    return [("S%04d-USDT" % i).encode() for i in range(n)]


def zipf(n: int, rnd: random.Random, s: float = 1.0):
    """A draw of an index 0..n-1, index i with weight 1/(i+1)^s."""
    cum = list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(n)))
    total = cum[-1]
    return lambda: min(n - 1, bisect.bisect_left(cum, rnd.random() * total))


def throughput_frames(nsym: int, rows: int, seed: int = 1) -> tuple[list, int, int]:
    """``(frames, trades, tickers)``: full frames of a firehose over ``nsym`` symbols."""
    rnd = random.Random(seed)
    names = symbols(nsym)
    draw = zipf(nsym, rnd)
    ids = [1_000_000] * nsym
    pack_trade, pack_md = rec.TRADE_WIRE.pack, rec.MD_WIRE.pack
    frames, trades, tickers = [], [], []
    sec, nanos = DAY + 3600, 0
    s = 0
    made = md = 0
    while made < rows:
        if rnd.random() >= 0.5:
            s = draw()
        nanos += 137_000
        if nanos >= 1_000_000_000:
            nanos -= 1_000_000_000
            sec += 1
        for _ in range(1 if rnd.random() < 0.8 else rnd.randint(2, 5)):
            ids[s] += 1
            trades.append(pack_trade(names[s], ids[s], sec, nanos, 100.0 + rnd.random(), rnd.random(),
                                     1 + (ids[s] & 1), rec.ZERO_ID, rec.ZERO_ID))
            made += 1
            if len(trades) == TRADES_PER_FRAME:
                frames.append((rec.KIND_TRADES, b"".join(trades)))
                trades = []
            if made % 20 == 0:
                tickers.append(pack_md(names[draw()], sec, nanos, 100.0, 1.0, 0, 99.5, 100.5))
                md += 1
                if len(tickers) == TICKERS_PER_FRAME:
                    frames.append((rec.KIND_MD, b"".join(tickers)))
                    tickers = []
    for kind, rest in ((rec.KIND_TRADES, trades), (rec.KIND_MD, tickers)):
        if rest:
            frames.append((kind, b"".join(rest)))
    return frames, made, md


def make_writer(data_path: str, clock, table_cache: int | None = None):
    settings = load_settings(None, {}, {"logger.data_path": data_path, "exchanges.binance.enabled": True},
                             check_resources=False)
    if table_cache:
        try:
            return Writer(settings, Block(writer_fields()), clock=clock, max_open_tables=table_cache)
        except TypeError:  # a writer whose table cache is fixed
            pass
    return Writer(settings, Block(writer_fields()), clock=clock)


def raise_limit() -> int:
    """What the writer process does at its start, where the writer has it: raise RLIMIT_NOFILE."""
    try:
        from mdlogger.tables import raise_nofile_limit
    except ImportError:
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return raise_nofile_limit()


class Calls:
    """Counts of ``os.open`` and ``os.fsync`` made in this process while installed."""

    def __init__(self):
        self.opens = self.fsyncs = 0
        self._open, self._fsync = os.open, os.fsync

    def __enter__(self):
        def counted_open(*a, **kw):
            self.opens += 1
            return self._open(*a, **kw)

        def counted_fsync(fd):
            self.fsyncs += 1
            return self._fsync(fd)

        os.open, os.fsync = counted_open, counted_fsync
        return self

    def __exit__(self, *exc):
        os.open, os.fsync = self._open, self._fsync


def run_throughput(base: str, frames: list, rows: int) -> float:
    """CPU seconds for the writer to take and write ``frames``."""
    path = tempfile.mkdtemp(prefix="bench-writer-", dir=base)
    try:
        w = make_writer(path, lambda: DAY + 3600)
        gc.collect()
        since = 0
        c0 = time.process_time()
        for kind, records in frames:
            w.take_frame(kind, EXCHANGE, records)
            since += len(records) // rec.WIRE[kind].size
            if since >= FLUSH_ROWS:
                w.flush_all()
                since = 0
        w.flush_all()
        w.fsync_all()
        cpu = time.process_time() - c0
        written = int(w.stats.get("rows"))
        assert written == rows, "%d rows written of %d" % (written, rows)
        w.drain_and_close()
        return cpu
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scale_ticks(nsym: int, secs: int, seed: int = 2):
    """Per 50 ms of simulated time: ``(now, frames)``. Each symbol's ticker once a second (spread over
    the second), ``SCALE_TRADES_PER_SEC`` trades by popularity; frames of at most 48 / 78 records."""
    rnd = random.Random(seed)
    names = symbols(nsym)
    draw = zipf(nsym, rnd)
    ids = [1_000_000] * nsym
    ticks_per_sec = int(round(1 / FLUSH_SECS))
    slot_of = [rnd.randrange(ticks_per_sec) for _ in range(nsym)]  # when in the second each ticker comes
    by_slot = [[i for i in range(nsym) if slot_of[i] == t] for t in range(ticks_per_sec)]
    per_tick = SCALE_TRADES_PER_SEC // ticks_per_sec
    for n in range(secs * ticks_per_sec):
        sec, sub = DAY + 3600 + n // ticks_per_sec, n % ticks_per_sec
        nanos = sub * int(FLUSH_SECS * 1e9)
        trades = []
        for _ in range(per_tick):
            s = draw()
            ids[s] += 1
            trades.append(rec.TRADE_WIRE.pack(names[s], ids[s], sec, nanos, 100.0, 1.0, 1, rec.ZERO_ID, rec.ZERO_ID))
        md = [rec.MD_WIRE.pack(names[i], sec, nanos, 100.0, 1.0, 0, 99.5, 100.5) for i in by_slot[sub]]
        frames = [(rec.KIND_TRADES, b"".join(trades[i:i + TRADES_PER_FRAME]))
                  for i in range(0, len(trades), TRADES_PER_FRAME)]
        frames += [(rec.KIND_MD, b"".join(md[i:i + TICKERS_PER_FRAME])) for i in range(0, len(md), TICKERS_PER_FRAME)]
        yield sec + nanos / 1e9, frames


def run_scale(base: str, nsym: int, secs: int, table_cache: int | None) -> dict:
    """Figures per simulated second, counted after the first ``WARM_SECS`` (every ticker table has been
    opened once by then; trade tables of rare symbols keep opening for the first time now and then)."""
    ticks = list(scale_ticks(nsym, secs + WARM_SECS))
    warm = int(round(WARM_SECS / FLUSH_SECS))
    every_fsync = int(round(FSYNC_SECS / FLUSH_SECS))
    path = tempfile.mkdtemp(prefix="bench-writer-", dir=base)
    now = [DAY + 3600.0]
    try:
        w = make_writer(path, lambda: now[0], table_cache)
        rows = 0
        gc.collect()
        with Calls() as calls:
            for n, (t, frames) in enumerate(ticks):
                if n == warm:
                    c0, rows, opens, fsyncs = time.process_time(), 0, calls.opens, calls.fsyncs
                    evictions = w.stats.as_dict().get("evictions", 0)
                now[0] = t
                for kind, records in frames:
                    w.take_frame(kind, EXCHANGE, records)
                    rows += len(records) // rec.WIRE[kind].size
                w.flush_all()
                if n >= warm and (n - warm + 1) % every_fsync == 0:
                    w.fsync_all()
            cpu = time.process_time() - c0
        stats = w.stats.as_dict()
        w.drain_and_close()
        return {"symbols": nsym, "tables": 2 * nsym, "rows_per_sec": rows / secs, "cpu_pct": 100.0 * cpu / secs,
                "opens": (calls.opens - opens) / secs, "fsyncs": (calls.fsyncs - fsyncs) / secs,
                "evictions": (stats["evictions"] - evictions) / secs if "evictions" in stats else None,
                "cache": int(stats["table_cache"]) if "table_cache" in stats else None}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--symbols", default="1,10,250")
    ap.add_argument("--scale", default="250,4000")
    ap.add_argument("--scale-secs", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--table-cache", type=int, default=None,
                    help="tables the writer keeps open in the scale part (default: what it sizes from the "
                         "descriptor limit, raised to the hard limit as the writer process does)")
    ap.add_argument("--quick", action="store_true", help="100,000 rows, 10 simulated seconds, one run")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.scale_secs, args.repeat = 100_000, 10, 1
    print("mdlogger measured: %s" % os.path.dirname(mdlogger.__file__))
    limit = raise_limit()
    print("Python %s, %d cores, data in %s, RLIMIT_NOFILE %d" % (sys.version.split()[0], os.cpu_count() or 0,
                                                                  args.dir or tempfile.gettempdir(), limit))
    print()
    print("throughput: %s trades (+1 ticker per 20), full frames, a flush every %s rows; best of %d"
          % (format(args.rows, ","), format(FLUSH_ROWS, ","), args.repeat))
    print("| symbols | rows | CPU s | µs of CPU per row = CPU s per 1M rows |")
    print("|---:|---:|---:|---:|")
    for nsym in [int(x) for x in args.symbols.split(",") if x]:
        frames, trades, tickers = throughput_frames(nsym, args.rows)
        rows = trades + tickers
        cpu = min(run_throughput(args.dir, frames, rows) for _ in range(args.repeat))
        print("| %d | %s | %.2f | %.2f |" % (nsym, format(rows, ","), cpu, cpu / rows * 1e6))
        sys.stdout.flush()
    print()
    print("scale: 1 ticker per symbol per second + %s trades/s, a flush every %d ms, fsync every %.0f s; "
          "%d simulated seconds after %d to warm up" % (format(SCALE_TRADES_PER_SEC, ","), FLUSH_SECS * 1000,
                                                         FSYNC_SECS, args.scale_secs, WARM_SECS))
    print("| symbols | tables | table cache | rows/s | CPU % of a core | opens/s | fsyncs/s | evictions/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nsym in [int(x) for x in args.scale.split(",") if x]:
        r = run_scale(args.dir, nsym, args.scale_secs, args.table_cache)
        print("| %d | %d | %s | %s | %.1f | %.0f | %.1f | %s |" % (
            r["symbols"], r["tables"], r["cache"] if r["cache"] is not None else "256 (fixed)",
            format(int(r["rows_per_sec"]), ","), r["cpu_pct"], r["opens"], r["fsyncs"],
            "%.0f" % r["evictions"] if r["evictions"] is not None else "not counted"))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
