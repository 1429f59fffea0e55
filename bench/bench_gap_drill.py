#!/usr/bin/env python3
"""Gap drill: every connection of all five fake exchanges dropped every few seconds, for a minute.

    python bench/bench_gap_drill.py [--seconds 60] [--every 5] [--rate 3] [--symbols 5]

The fakes (in this process, on loopback) keep trading at ``--rate`` trades/s
per symbol whether or not anyone is connected, as real exchanges do, and serve
their REST trade history with the real paging and rate limits. Every
``--every`` seconds each fake cuts every WebSocket connection. The service runs
as it does in production (its own process tree, default timers except the
test-friendly reconnect delays). At the end, per exchange:

* trades made (from the first trade stored to the end of the drill),
* trades stored (must equal made: nothing lost, nothing twice),
* trades backfilled and REST calls (from the gap ledger and /health),
* the longest time a trade waited before reaching its file (the moment a row
  was first seen in its file minus the trade's own time; rows held behind a
  gap wait longest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mdlogger import records as rec  # noqa: E402
from mdlogger.fakes import fake_class  # noqa: E402
from mdlogger.ledger import read_gaps  # noqa: E402
from mdlogger.storage import TableKey, column_path  # noqa: E402

SYMBOLS = {
    "binance": ["BTC-USDT", "ETH-USDT", "SOL-USDT", "DOGE-USDT", "BNB-BTC"],
    "coinbase": ["BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD", "ADA-USD"],
    "okx": ["BTC-USDT", "ETH-USDT", "SOL-USDT", "DOGE-USDT", "XRP-USDT"],
    "bitfinex": ["BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD"],
    "kraken": ["BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD", "ADA-USD"],
}


class FileWatcher(threading.Thread):
    """Polls every TRADES table's time columns; records how long each new row took to appear."""

    def __init__(self, data_path: str, tables):
        super().__init__(daemon=True)
        self.data_path = data_path
        self.tables = tables  # [(exchange, symbol)]
        self.seen = {t: 0 for t in tables}
        self.max_wait = {t: 0.0 for t in tables}
        self.stop_event = threading.Event()

    def run(self) -> None:
        day = rec.day_string(int(time.time()))
        cols = {c.name: c for c in rec.TRADE_COLUMNS}
        for t in self.tables:  # rows stored before the drill began are not timed
            try:
                size = os.path.getsize(column_path(self.data_path, TableKey(t[0], t[1], rec.KIND_TRADES, day),
                                                   cols["time"]))
            except FileNotFoundError:
                size = 0
            self.seen[t] = size // 4
        while not self.stop_event.wait(0.02):
            now = time.time()
            for t in self.tables:
                key = TableKey(t[0], t[1], rec.KIND_TRADES, day)
                try:
                    with open(column_path(self.data_path, key, cols["time"]), "rb") as fh:
                        secs = fh.read()
                    with open(column_path(self.data_path, key, cols["nanos"]), "rb") as fh:
                        nanos = fh.read()
                except FileNotFoundError:
                    continue
                n = min(len(secs) // 4, len(nanos) // 4)
                if n <= self.seen[t]:
                    continue
                s = struct.unpack_from("<%dI" % (n - self.seen[t]), secs, self.seen[t] * 4)
                ns = struct.unpack_from("<%dI" % (n - self.seen[t]), nanos, self.seen[t] * 4)
                worst = max(now - (a + b / 1e9) for a, b in zip(s, ns))
                self.max_wait[t] = max(self.max_wait[t], worst)
                self.seen[t] = n


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between drops of every connection")
    ap.add_argument("--rate", type=float, default=3.0, help="trades/s per symbol")
    ap.add_argument("--symbols", type=int, default=5, help="symbols per exchange (at most 5)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="mdlogger-drill-")
    data = os.path.join(tmp, "data")
    fakes = {}
    for name, syms in SYMBOLS.items():
        fakes[name] = fake_class(name)(symbols=syms[: args.symbols], mode="steady", rate=args.rate).start()
    port = 18000 + os.getpid() % 1000
    config = {
        "logger": {"data_path": data, "health_check_port": port},
        "exchanges": {
            name: {"enabled": True, "ws_endpoint": f.ws_endpoint, "rest_endpoint": f.url_http,
                   "symbols": SYMBOLS[name][: args.symbols], "reconnect_delay_secs": 0.2,
                   "max_reconnect_delay_secs": 2.0}
            for name, f in fakes.items()
        },
    }
    cfg_path = os.path.join(tmp, "logger.yaml")
    with open(cfg_path, "w") as fh:
        yaml.safe_dump(config, fh)
    log = open(os.path.join(tmp, "service.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "mdlogger", "--config", cfg_path, "run"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    tables = [(n, s) for n, syms in SYMBOLS.items() for s in syms[: args.symbols]]
    watcher = FileWatcher(data, tables)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if health(port).get("status") == "ok":
                    break
            except OSError:
                pass
            time.sleep(0.2)
        watcher.start()
        start = time.time()
        end_at = time.monotonic() + args.seconds
        while time.monotonic() < end_at:
            time.sleep(min(args.every, max(0.0, end_at - time.monotonic())))
            for f in fakes.values():
                f.drop_all(abort=True)
        end = time.time()
        settle = time.monotonic() + 180
        quiet = 0  # every open gap filled or given up, and none opened for 3 s (a gap shows with the next trade)
        while time.monotonic() < settle and quiet < 6:
            doc = health(port)
            quiet = 0 if sum(x["gaps"]["pending"] for x in doc["exchanges"].values()) else quiet + 1
            time.sleep(0.5)
        doc = health(port)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        watcher.stop_event.set()
        watcher.join()
        print("gap drill: %d s, drops every %.0f s, %.1f trades/s per symbol, %d symbols per exchange"
              % (args.seconds, args.every, args.rate, args.symbols))
        print("%-9s %8s %8s %8s %10s %6s %6s %14s" % ("exchange", "made", "stored", "missing", "backfilled",
                                                       "gaps", "REST", "longest wait s"))
        totals = [0, 0, 0, 0, 0]
        for name, fake in fakes.items():
            made = stored = missing = 0
            for sym in SYMBOLS[name][: args.symbols]:
                stored_n, made_n = _compare(data, name, fake, sym, end)
                stored += stored_n
                made += made_n
            missing = made - stored
            gaps = read_gaps(data, name, rec.day_string(int(start)))
            backfilled = sum(g["trades"] for g in gaps)
            rest = doc["exchanges"][name]["gaps"]["rest_calls"]
            wait = max(watcher.max_wait[(name, s)] for s in SYMBOLS[name][: args.symbols])
            print("%-9s %8d %8d %8d %10d %6d %6d %14.2f" % (name, made, stored, missing, backfilled, len(gaps), rest,
                                                            wait))
            for i, v in enumerate((made, stored, missing, backfilled, rest)):
                totals[i] += v
        print("%-9s %8d %8d %8d %10d %6s %6d" % ("all", totals[0], totals[1], totals[2], totals[3], "", totals[4]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for f in fakes.values():
            f.stop()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _compare(data: str, name: str, fake, sym: str, end: float) -> tuple[int, int]:
    """(trades stored, trades made from the first stored one up to ``end``)."""
    from mdlogger.reader import read_rows

    rows = read_rows(data, name, sym, "TRADES", time.strftime("%Y-%m-%d", time.gmtime()))
    if not rows:
        return 0, 0
    made = [e for e in fake.made_trades(sym)]
    first = (rows[0][1], rows[0][2])
    times = [_event_time(name, e) for e in made]
    if rows[0][0]:  # by id where there are ids: trades of one millisecond must not count before the first stored
        start = next((i for i, e in enumerate(made) if fake.trade_key(e) == rows[0][0]), len(made))
    else:
        start = next((i for i, t in enumerate(times) if t >= first), len(times))
    upto = sum(1 for t in times[start:] if t[0] + t[1] / 1e9 <= end)
    stored = sum(1 for r in rows if r[1] + r[2] / 1e9 <= end)
    return stored, upto


def _event_time(name: str, e) -> tuple[int, int]:
    if name == "binance":
        return rec.from_millis(e["T"])
    if name == "okx":
        return rec.from_millis(int(e["ts"]))
    if name == "coinbase":
        return rec.from_iso8601(e["time"])
    if name == "bitfinex":
        return rec.from_millis(e["trade"][1])
    return rec.from_decimal_seconds(e["trade"][2])


if __name__ == "__main__":
    main()
