#!/usr/bin/env python3
"""Throughput, latency, memory and CPU of the service against the fake Binance.

    python bench/bench_service.py [--seconds 10] [--repeat 3]

Measured in one run, on the same machine, against the same fake firehose:

1. baseline: a bare websocket-client receive loop (``skip_utf8_validation=True``)
   counting frames: the library's ceiling;
2. the service with one Binance shard: trades per second landed on disk,
   counted from the files;
3. the service with two shards (the writer shares the two cores);
4. the service at a steady realistic rate, with default settings (the
   flush interval is the service's default, 0.02 s, unless ``--flush`` is
   given): receive-to-file latency p50/p99 (the time a row appears in its
   file minus the trade time the fake stamped), and the whole process tree's
   PSS memory and CPU.

Every run uses the service's default settings apart from the endpoints,
the symbols and the shard layout. Rows are counted from the TRADES column
files' sizes (bench/benchlib.py), not through the writer's code.

Prints medians over ``--repeat`` runs and ratios against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import psutil
import websocket
import yaml
from benchlib import ROOT, machine_line, trade_rows_by_table, trades_on_disk

from mdlogger.cli import start_fake

SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "BNB-USDT"]


def bare_loop(port: int, seconds: float) -> float:
    """Frames per second a bare websocket-client loop receives from the firehose."""
    ws = websocket.create_connection("ws://127.0.0.1:%d/stream" % port, skip_utf8_validation=True)
    streams = ["%s@trade" % s.replace("-", "").lower() for s in SYMBOLS]
    ws.send(json.dumps({"method": "SUBSCRIBE", "params": streams, "id": 1}))
    ws.recv()  # ack
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # warm up
        ws.recv()
    n = 0
    start = time.monotonic()
    end = start + seconds
    while True:
        ws.recv()
        n += 1
        if n & 1023 == 0 and time.monotonic() >= end:
            break
    elapsed = time.monotonic() - start
    ws.close()
    return n / elapsed


def tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p] + p.children(recursive=True)


def tree_pss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class ServiceRun:
    def __init__(self, port: int, shards: int, flush: float | None = None):
        self.dir = tempfile.mkdtemp(prefix="mdlogger-bench-")
        self.data = os.path.join(self.dir, "data")
        per = max(1, -(-len(SYMBOLS) // shards))
        logger = {"data_path": self.data, "health_check_port": 0}
        if flush is not None:  # else the service's default
            logger["flush_interval_secs"] = flush
        config = {
            "logger": logger,
            "exchanges": {"binance": {
                "enabled": True, "ws_endpoint": "ws://127.0.0.1:%d" % port,
                "rest_endpoint": "http://127.0.0.1:%d" % port, "symbols": SYMBOLS,
                "symbols_per_connection": per, "max_connections": shards,
            }},
        }
        path = os.path.join(self.dir, "logger.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(config, fh)
        self.log = open(os.path.join(self.dir, "service.log"), "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mdlogger", "--config", path, "run"],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def service_throughput(port: int, shards: int, seconds: float) -> float:
    run = ServiceRun(port, shards)
    try:
        deadline = time.monotonic() + 20
        while trades_on_disk(run.data) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # warm up
        start_rows, start = trades_on_disk(run.data), time.monotonic()
        time.sleep(seconds)
        end_rows, end = trades_on_disk(run.data), time.monotonic()
        return (end_rows - start_rows) / (end - start)
    finally:
        run.stop()


def steady_latency(port: int, seconds: float, flush: float | None) -> dict:
    """Receive-to-file latency (ms) of every trade, plus PSS and CPU of the tree."""
    run = ServiceRun(port, 1, flush=flush)
    try:
        seen: dict[str, int] = {}
        lat = []
        deadline = time.monotonic() + 20
        while trades_on_disk(run.data) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu0, t0 = tree_cpu(run.proc.pid), time.monotonic()
        end = t0 + seconds
        pss = []
        while time.monotonic() < end:
            now_ms = time.time() * 1000
            for (exchange, symbol, day), rows in trade_rows_by_table(run.data).items():
                base = os.path.join(run.data, exchange, symbol, "TRADES")
                path_t = os.path.join(base, "time.%s.bin" % day)
                path_n = os.path.join(base, "nanos.%s.bin" % day)
                key = (symbol, day)
                done = seen.get(key, 0)
                if rows > done:
                    with open(path_t, "rb") as ft, open(path_n, "rb") as fn:
                        ft.seek(done * 4)
                        fn.seek(done * 4)
                        secs = struct.unpack("<%dI" % (rows - done), ft.read((rows - done) * 4))
                        nans = struct.unpack("<%dI" % (rows - done), fn.read((rows - done) * 4))
                    if done:  # skip the first batch (start-up)
                        lat.extend(now_ms - (s * 1000 + n / 1e6) for s, n in zip(secs, nans))
                    seen[key] = rows
            pss.append(tree_pss(run.proc.pid))
            time.sleep(0.005)
        cpu = (tree_cpu(run.proc.pid) - cpu0) / (time.monotonic() - t0)
        lat.sort()
        return {
            "p50_ms": lat[len(lat) // 2] if lat else float("nan"),
            "p99_ms": lat[int(len(lat) * 0.99)] if lat else float("nan"),
            "samples": len(lat),
            "pss_mb": statistics.median(pss) / 1e6 if pss else float("nan"),
            "cpu_cores": cpu,
        }
    finally:
        run.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steady-rate", type=float, default=50.0, help="trades/s per symbol for the latency run")
    ap.add_argument("--flush", type=float, default=None,
                    help="flush_interval_secs for the latency run (default: the service's default)")
    args = ap.parse_args()
    results = {"bare": [], "one_shard": [], "two_shards": []}
    fake = start_fake("binance", mode="firehose", extra=["--symbols", ",".join(SYMBOLS)])
    try:
        for i in range(args.repeat):
            results["bare"].append(bare_loop(fake.port, args.seconds))
            results["one_shard"].append(service_throughput(fake.port, 1, args.seconds))
            results["two_shards"].append(service_throughput(fake.port, 2, args.seconds))
            print("run %d: %s" % (i + 1, {k: round(v[-1]) for k, v in results.items()}), flush=True)
    finally:
        fake.stop()
    steady = start_fake("binance", mode="steady", rate=args.steady_rate, extra=["--symbols", ",".join(SYMBOLS)])
    try:
        lat = steady_latency(steady.port, args.seconds, args.flush)
    finally:
        steady.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(machine_line())
    print("median of %d runs of %.0f s each:" % (args.repeat, args.seconds))
    print("  bare websocket-client loop : %9.0f frames/s" % med["bare"])
    print("  service, 1 shard           : %9.0f trades/s on disk  (%.2fx)" % (med["one_shard"], med["one_shard"] / med["bare"]))
    print("  service, 2 shards          : %9.0f trades/s on disk  (%.2fx)" % (med["two_shards"], med["two_shards"] / med["bare"]))
    print("steady %.0f trades/s/symbol x %d symbols, flush interval %s:" % (
        args.steady_rate, len(SYMBOLS), "%.3f s" % args.flush if args.flush is not None else "default"))
    print("  receive-to-file latency p50 %.1f ms, p99 %.1f ms (%d trades)" % (lat["p50_ms"], lat["p99_ms"], lat["samples"]))
    print("  process tree PSS %.1f MB, CPU %.2f cores" % (lat["pss_mb"], lat["cpu_cores"]))


if __name__ == "__main__":
    main()
