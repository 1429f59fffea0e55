#!/usr/bin/env python3
"""The floor under the real-rate profile: its wake-ups and system calls with no work in between.

    python bench/bench_floor.py [--seconds 60] [--warmup 5] [--repeat 3]

``bench_scale.py --profile real`` (5 exchanges x 50 symbols, about 1,280
messages/s over 9 connections, about 1,230 rows/s into 500 tables) measures
the service. This benchmark measures what the same traffic costs when every
process does nothing but the input and output the design requires, so the
service's figure can be read against it:

* **9 bare receivers** (the shards of the real profile: binance 1, coinbase
  1, okx 1, kraken 1, bitfinex 5), each a process blocked in ``recv_into`` on
  a loopback TCP connection. For each recv it writes one block of 48-byte
  records (one per whole message received) to its pipe: the least a worker
  does (wake up, recv, hand over). No frame parsing, no JSON, no packing.
* **1 bare writer**, a process that wakes every 20 ms (``flush_interval_secs``),
  reads every pipe once, and appends each row to its table's column files:
  one ``write`` per column of each table with rows, the columnar format's
  cost (8 columns a TRADES table, 7 an MD table; 250 of each, 3,750 files).
  Every 30 s (``fsync_interval_secs``) it fsyncs the columns of every table
  written since, spread over one second as the writer does.
* **The sender** (this process, not counted, like the fakes in
  ``bench_scale.py``) ticks every 10 ms as the fakes' clock does and sends
  each due message (Poisson arrivals at the profile's rates per connection,
  ``MESSAGE_BYTES`` each) with its own ``send``.

Printed: CPU % of one core (psutil, user + system) of the receivers and of
the writer over ``--seconds``, the recvs and rows per second, per repeat and
the median. Nothing of mdlogger runs: the figure is the floor of one process
per connection, one file per column, rows on disk within 20 ms and the
fsync interval, on this machine.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import shutil
import socket
import statistics
import tempfile
import time

import psutil
from benchlib import machine_line

# Messages per second of each connection in the real profile (the workers' counts: trades, plus
# Bitfinex's te/tu pairs, plus a ticker per symbol per second; 1,285 in all).
CONNECTIONS = [("binance", 300.0), ("coinbase", 225.0), ("okx", 200.0), ("kraken", 160.0)] + [
    ("bitfinex", 80.0)] * 5
SYMBOLS = {"binance": 50, "coinbase": 50, "okx": 50, "kraken": 50, "bitfinex": 10}
MESSAGE_BYTES = 220  # a typical trade frame
RECORD_BYTES = 48  # one wire record handed to the writer
MD_SHARE = 0.2  # of the rows: tickers (into the MD tables), the rest trades
COLUMNS = {"trades": (8, 4, 4, 4, 4, 4, 16, 16), "md": (4, 4, 4, 4, 4, 4, 4)}
FLUSH_SECS = 0.02
FSYNC_SECS = 30.0
FSYNC_SPREAD_SECS = 1.0
FSYNC_MIN_SHARE = 64
SENDER_TICK = 0.01


def receiver(sock: socket.socket, pipe_w: int) -> None:
    """Blocked in recv; one write of records per recv (one record per whole message)."""
    buf = bytearray(1 << 18)
    rest = 0
    record = b"\0" * RECORD_BYTES
    while True:
        n = sock.recv_into(buf)
        if not n:
            os._exit(0)
        whole, rest = divmod(rest + n, MESSAGE_BYTES)
        if whole:
            os.write(pipe_w, record * whole)


def open_tables(root: str, connections) -> list[list[list[int]]]:
    """Per connection, its tables (trades and md of each symbol), each a list of column descriptors."""
    out = []
    for c, (exchange, _) in enumerate(connections):
        tables = []
        for s in range(SYMBOLS[exchange]):
            for kind in ("trades", "md"):
                d = os.path.join(root, "%s%d" % (exchange, c), "S%d" % s, kind)
                os.makedirs(d)
                fds = [os.open(os.path.join(d, "c%d" % i), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                       for i in range(len(COLUMNS[kind]))]
                tables.append((kind, fds))
        out.append(tables)
    return out


def writer(pipes: list[int], root: str, connections, seed: int) -> None:
    """Every FLUSH_SECS: read every pipe once, append each row to its table's columns; fsync by the interval."""
    rng = random.Random(seed)
    tables = open_tables(root, connections)
    for fd in pipes:
        os.set_blocking(fd, False)
    blanks = {kind: [b"\0" * w for w in widths] for kind, widths in COLUMNS.items()}
    dirty: set = set()
    due: list = []
    last_fsync = time.monotonic()
    next_flush = time.monotonic() + FLUSH_SECS
    while True:
        time.sleep(max(0.0, next_flush - time.monotonic()))
        next_flush += FLUSH_SECS
        pending: dict = {}
        for c, fd in enumerate(pipes):
            try:
                data = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not data:
                os._exit(0)
            mine = tables[c]
            for _ in range(len(data) // RECORD_BYTES):
                pick = rng.randrange(len(mine) // 2) * 2 + (1 if rng.random() < MD_SHARE else 0)
                pending[(c, pick)] = pending.get((c, pick), 0) + 1
        for (c, pick), rows in pending.items():
            kind, fds = tables[c][pick]
            for fd, blank in zip(fds, blanks[kind]):
                os.write(fd, blank * rows)
            dirty.add((c, pick))
        now = time.monotonic()
        if now - last_fsync >= FSYNC_SECS:
            last_fsync = now
            due, dirty = list(dirty), set()
        if due:
            share = max(FSYNC_MIN_SHARE, int(len(due) * FLUSH_SECS / FSYNC_SPREAD_SECS) + 1)
            for c, pick in due[:share]:
                for fd in tables[c][pick][1]:
                    os.fsync(fd)
            del due[:share]


def connected_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def run_once(seconds: float, warmup: float, seed: int) -> dict:
    listener = socket.create_server(("127.0.0.1", 0))
    pairs = [connected_pair(listener) for _ in CONNECTIONS]
    pipes = [os.pipe() for _ in CONNECTIONS]
    root = tempfile.mkdtemp(prefix="mdlogger-floor-")
    children = []
    for (send_end, recv_end), (_, pipe_w) in zip(pairs, pipes):
        pid = os.fork()
        if pid == 0:
            receiver(recv_end, pipe_w)
        children.append(pid)
        recv_end.close()
        os.close(pipe_w)
    pid = os.fork()
    if pid == 0:
        writer([r for r, _ in pipes], root, CONNECTIONS, seed)
    writer_pid = pid
    for r, _ in pipes:
        os.close(r)
    procs = {p: psutil.Process(p) for p in children + [writer_pid]}
    rng = random.Random(seed)
    heap = [(time.monotonic() + rng.expovariate(rate), c) for c, (_, rate) in enumerate(CONNECTIONS)]
    heapq.heapify(heap)
    message = b"x" * MESSAGE_BYTES
    sent = 0
    start = time.monotonic()
    mark = None
    end = start + warmup + seconds
    while True:
        now = time.monotonic()
        if mark is None and now >= start + warmup:
            mark = (now, {p: sum(pr.cpu_times()[:2]) for p, pr in procs.items()}, sent)
        if now >= end:
            break
        while heap and heap[0][0] <= now:
            at, c = heapq.heappop(heap)
            pairs[c][0].sendall(message)
            sent += 1
            heapq.heappush(heap, (at + rng.expovariate(CONNECTIONS[c][1]), c))
        time.sleep(SENDER_TICK)
    now = time.monotonic()
    cpu = {p: sum(pr.cpu_times()[:2]) for p, pr in procs.items()}
    t0, cpu0, sent0 = mark
    span = now - t0
    receivers = sum(cpu[p] - cpu0[p] for p in children) / span * 100
    writer_cpu = (cpu[writer_pid] - cpu0[writer_pid]) / span * 100
    for a, _ in pairs:
        a.close()
    listener.close()
    for p in children + [writer_pid]:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass
        os.waitpid(p, 0)
    shutil.rmtree(root)
    return {"receivers": receivers, "writer": writer_cpu, "messages": (sent - sent0) / span}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="measuring window of each repeat")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(machine_line())
    runs = []
    for i in range(args.repeat):
        r = run_once(args.seconds, args.warmup, seed=i + 1)
        runs.append(r)
        print("run %d: %.0f messages/s; receivers (9) %.2f%%, writer %.2f%%, together %.2f%% of one core" % (
            i + 1, r["messages"], r["receivers"], r["writer"], r["receivers"] + r["writer"]), flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("receivers", "writer")}
    print("median: receivers %.2f%%, writer %.2f%%, together %.2f%% of one core" % (
        med["receivers"], med["writer"], statistics.median(r["receivers"] + r["writer"] for r in runs)))


if __name__ == "__main__":
    main()
