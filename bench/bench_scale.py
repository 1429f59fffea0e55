#!/usr/bin/env python3
"""The service at scale: all five exchanges at realistic rates, then every symbol of all five.

    python bench/bench_scale.py [--profile real|all|both] [--seconds 60] [--warmup 10]
                                [--real-symbols 50] [--all-symbols 800] [--ticker-every 5]

The five fake exchanges run in this process, on loopback, with generated
symbol lists (``generated_symbols``: BTC, ETH, SOL, XRP, DOGE, ADA, then
made-up three-letter bases) and the scheduled market clock (``rates``): each
symbol trades as a Poisson process at its own rate whether or not anyone
listens, and each subscribed symbol gets a ticker every ``ticker_interval``
seconds, the tickers spread over the interval. The service runs as in
production (``python -m mdlogger run``, its own process tree, default
settings; ``max_connections`` raised so every symbol is covered: the
service shards each exchange by its adapter's per-connection limit).

Profiles:

* **real**: 5 exchanges x ``--real-symbols`` (50) symbols listed in the
  configuration, every symbol of an exchange at the same rate (trades/s per
  symbol: binance 5, okx 4, coinbase 3.5, kraken 2.5, bitfinex 2) and a
  ticker per symbol per second: 17 x 50 = 850 trades/s plus 250 tickers/s,
  about 1,100 messages/s (OKX sometimes puts 2-3 trades in one message,
  Kraken and Bitfinex sweep 2-3 trades at one time, Bitfinex follows each
  ``te`` with a ``tu``: the workers' own message count is printed).
* **all**: every fake lists ``--all-symbols`` (800) symbols (4,000 in all,
  8,000 tables) and the configuration says ``symbols: []``, so discovery takes
  every active symbol. Rates fall with the symbol's rank as on a real
  exchange: the symbol of rank r (1 = most traded) trades top/r times a
  second, top = binance 20, okx 10, coinbase 10, kraken 5, bitfinex 4 (about
  145, 73, 73, 36 and 29 trades/s per exchange, 356 in all; the least traded
  symbols trade about once a minute), and every symbol gets a ticker every
  ``--ticker-every`` (5) seconds: 800 tickers/s. About the messages per
  second of the real profile, spread over 16 times the tables.

Each profile waits until every shard receives, lets ``--warmup`` seconds
pass, then measures ``--seconds``: CPU % of one core of the whole process
tree and of each process (psutil ``cpu_times``, user + system, reaped
children included; workers summed per exchange, with their count), PSS
(psutil ``memory_full_info().pss``, sampled every 5 s, median), the
writer's open files (``num_fds``), and the writer's counters from
``/metrics`` (``fsyncs``, ``evictions``, ``reopens`` per second, and any
other writer counter that exists). Then the markets stop, the service is
given time to store what is in flight, and every row is checked: for every
symbol, the trades on disk are the trades its fake made, from the first one
stored (and every one made after the service was up) to the last, each
exactly once.
"""

from __future__ import annotations

import argparse
import array
import collections
import os
import statistics
import struct
import time

import psutil
from benchlib import Service, by_role, delta, machine_line, metrics, role_order, trades_on_disk

from mdlogger import records as rec
from mdlogger.fakes import fake_class
from mdlogger.fakes.base import generated_symbols

EXCHANGES = ("binance", "coinbase", "okx", "bitfinex", "kraken")
QUOTE = {"binance": "USDT", "okx": "USDT", "coinbase": "USD", "bitfinex": "USD", "kraken": "USD"}
REAL_RATE = {"binance": 5.0, "okx": 4.0, "coinbase": 3.5, "kraken": 2.5, "bitfinex": 2.0}  # trades/s per symbol
ALL_TOP = {"binance": 20.0, "okx": 10.0, "coinbase": 10.0, "kraken": 5.0, "bitfinex": 4.0}  # rank-1 trades/s
MAX_CONNECTIONS = 200  # per exchange: enough shards for every symbol (Bitfinex: 12 symbols a connection)
WRITER_COUNTERS = ("fsync", "evict", "reopen", "open_tables")  # what /metrics may say about the table cache


def f32(x) -> float:
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def made_key(exchange: str, e) -> tuple:
    """(id, seconds, nanos, size as float32) of a trade a fake made, as the service stores it."""
    if exchange == "binance":
        return (e["t"], *rec.from_millis(e["T"]), f32(e["q"]))
    if exchange == "okx":
        return (int(e["tradeId"]), *rec.from_millis(int(e["ts"])), f32(e["sz"]))
    if exchange == "coinbase":
        return (e["trade_id"], *rec.from_iso8601(e["time"]), f32(e["size"]))
    if exchange == "bitfinex":
        return (e["trade"][0], *rec.from_millis(e["trade"][1]), f32(abs(e["trade"][2])))
    return (0, *rec.from_decimal_seconds(e["trade"][2]), f32(e["trade"][1]))  # kraken: no id on the wire


def stored_keys(data: str, exchange: str, symbol: str, days) -> list[tuple]:
    """(id, seconds, nanos, size) of every stored trade of a symbol, file order, from the column files."""
    out = []
    for day in days:
        cols = {}
        for name, code in (("id", "Q"), ("time", "I"), ("nanos", "I"), ("size", "f")):
            a = array.array(code)
            try:
                with open(os.path.join(data, exchange, symbol, "TRADES", "%s.%s.bin" % (name, day)), "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                raw = b""
            a.frombytes(raw[:len(raw) - len(raw) % a.itemsize])
            cols[name] = a
        n = min(len(c) for c in cols.values())
        out.extend(zip(cols["id"][:n], cols["time"][:n], cols["nanos"][:n], cols["size"][:n]))
    return out


def check_rows(data: str, exchange: str, fake, symbols, covered_from: float, days) -> dict:
    """Per exchange: trades expected (made from the first stored one, or made after ``covered_from``),
    stored, missing, stored twice, stored but never made."""
    tally = collections.Counter()
    for sym in symbols:
        made = [made_key(exchange, e) for e in fake.made_trades(sym)]
        got = stored_keys(data, exchange, sym, days)
        counts = collections.Counter(got)
        tally["stored"] += len(got)
        tally["twice"] += sum(c - 1 for c in counts.values() if c > 1)
        made_set = set(made)
        tally["unknown"] += sum(1 for k in counts if k not in made_set)
        start = next((i for i, k in enumerate(made) if k[1] + k[2] / 1e9 >= covered_from), len(made))
        if got:
            start = min(start, next((i for i, k in enumerate(made) if k == got[0]), start))
        expected = made[start:]
        tally["expected"] += len(expected)
        tally["missing"] += sum(1 for k in expected if k not in counts)
        tally["symbols"] += 1
    return tally


def all_rates(symbols: list[str], top: float) -> dict[str, float]:
    return {s: top / (rank + 1) for rank, s in enumerate(symbols)}


def run_profile(profile: str, args) -> None:
    n = args.real_symbols if profile == "real" else args.all_symbols
    ticker_every = 1.0 if profile == "real" else args.ticker_every
    fakes, symbols = {}, {}
    for name in EXCHANGES:
        syms = generated_symbols(n, QUOTE[name])
        fake = fake_class(name)(symbols=syms, mode="steady")
        fake.rates = ({s: REAL_RATE[name] for s in syms} if profile == "real" else all_rates(syms, ALL_TOP[name]))
        fake.ticker_interval = ticker_every
        fakes[name], symbols[name] = fake.start(), syms
    trades_per_s = sum(sum(f.rates.values()) for f in fakes.values())
    config = {"exchanges": {name: f.config_section(symbols=[] if profile == "all" else symbols[name],
                                                   max_connections=MAX_CONNECTIONS)
                            for name, f in fakes.items()}}
    svc = Service(config, prefix="mdlogger-scale-")
    bench_cpu0 = time.process_time()
    try:
        t_start = time.monotonic()
        doc = svc.wait_healthy(args.start_timeout)
        covered_from = time.time() + 2.0  # every trade made from here on must be stored
        up = time.monotonic() - t_start
        roles = svc.learn_roles(doc)
        shards = collections.Counter(r.split("#")[0] for r in roles.values() if r.startswith("worker"))
        print("%s: service up, every shard receiving, after %.1f s (%s)" % (
            profile, up, ", ".join("%s %d" % (k.split()[1], v) for k, v in sorted(shards.items()))), flush=True)
        time.sleep(args.warmup)

        writer = svc.pid_of("writer")
        t0 = time.monotonic()
        cpu0, m0, h0, rows0 = svc.cpu(), metrics(svc.port, "mdlogger_"), svc.health(), trades_on_disk(svc.data)
        bench0 = time.process_time()
        pss, fds = [], []
        end = t0 + args.seconds
        while True:
            pss.append(by_role(svc.pss(), group_workers=True))
            try:
                fds.append(psutil.Process(writer).num_fds())
            except Exception:  # noqa: BLE001 - the writer restarted: no sample
                pass
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(args.pss_every, left))
        cpu1, m1, h1, rows1 = svc.cpu(), metrics(svc.port, "mdlogger_"), svc.health(), trades_on_disk(svc.data)
        t1 = time.monotonic()
        bench_busy = (time.process_time() - bench0) / (t1 - t0)
        secs = t1 - t0

        procs = collections.Counter(role.split("#")[0] for role, _ in cpu1.values())
        cpu = by_role(delta(cpu1, cpu0), group_workers=True)
        pss_med = {role: statistics.median(s.get(role, 0) for s in pss) for role in cpu}
        pss_tree = statistics.median(sum(s.values()) for s in pss)
        messages = sum(s["messages"] for s in h1["shards"]) - sum(s["messages"] for s in (h0 or {}).get("shards", []))

        # -- every row exact: stop the markets, let the service store what is in flight, compare
        for f in fakes.values():
            f.stop_market()
        days = sorted({rec.day_string(int(covered_from)), rec.day_string(int(time.time()))})
        settle_deadline = time.monotonic() + 120
        last, quiet = -1, 0
        while time.monotonic() < settle_deadline and quiet < 3:
            time.sleep(1.0)
            h = svc.health() or {}
            w = h.get("writer", {})
            busy = w.get("pending_rows", 1) or w.get("held_rows", 1) or sum(
                x["gaps"]["pending"] for x in h.get("exchanges", {}).values())
            now_rows = trades_on_disk(svc.data)
            quiet = quiet + 1 if (now_rows == last and not busy) else 0
            last = now_rows
        checks = {name: check_rows(svc.data, name, f, symbols[name], covered_from, days) for name, f in fakes.items()}
    finally:
        svc.stop(keep=args.keep)
        for f in fakes.values():
            f.stop()
        if args.keep:
            print("kept:", svc.dir)

    # -- the report -----------------------------------------------------------------------------------------
    print()
    print(machine_line())
    if profile == "real":
        what = "real rates: 5 exchanges x %d symbols listed, %s trades/s per symbol, a ticker per symbol per second" % (
            n, ", ".join("%s %g" % (k, REAL_RATE[k]) for k in EXCHANGES))
    else:
        what = ("all symbols: 5 fakes x %d symbols, `symbols: []`; trades/s of rank r = top/r, top %s; a ticker "
                "per symbol every %g s" % (n, ", ".join("%s %g" % (k, ALL_TOP[k]) for k in EXCHANGES), ticker_every))
    print(what)
    print("fakes: %.0f trades/s and %.0f tickers/s made; measured %.0f s after a %.0f s warm-up; the fakes (this "
          "process) used %.0f%% of a core" % (trades_per_s, 5 * n / ticker_every, secs, args.warmup, 100 * bench_busy))
    print("received %.0f messages/s (workers' count), landed %.0f trades/s on disk" % (
        messages / secs, (rows1 - rows0) / secs))
    print()
    print("| process | count | CPU % of one core | PSS MB (median) |")
    print("|---|---:|---:|---:|")
    for role in sorted(cpu, key=role_order):
        print("| %s | %d | %.1f | %.1f |" % (role, procs[role], 100 * cpu[role] / secs, pss_med[role] / 1e6))
    print("| **whole tree** | %d | **%.1f** | **%.1f** |" % (sum(procs.values()), 100 * sum(cpu.values()) / secs,
                                                               pss_tree / 1e6))
    print()
    if fds:
        print("writer open files (num_fds): median %d, max %d" % (statistics.median(fds), max(fds)))
    found = False
    for name in sorted(m1):
        if any(w in name for w in WRITER_COUNTERS):
            found = True
            if name.endswith("_total") or "_total{" in name:
                grew = m1[name] - m0.get(name, 0.0)
                print("%s: %+.0f (%.1f/s)" % (name, grew, grew / secs))
            else:
                print("%s: %g" % (name, m1[name]))
    if not found:
        print("no fsync/eviction/reopen counters on /metrics (writer counters there: %s)" % (
            ", ".join(sorted({k.split("{")[0] for k in m1 if k.startswith("mdlogger_writer_")})) or "none"))
    print()
    print("every row exact (from the first trade stored, or made after the service was up, to the last):")
    print()
    print("| exchange | symbols | trades expected | stored | missing | stored twice | never made |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total = collections.Counter()
    for name in EXCHANGES:
        t = checks[name]
        total.update(t)
        print("| %s | %d | %d | %d | %d | %d | %d |" % (name, t["symbols"], t["expected"], t["stored"], t["missing"],
                                                      t["twice"], t["unknown"]))
    print("| all | %d | %d | %d | %d | %d | %d |" % (total["symbols"], total["expected"], total["stored"],
                                                    total["missing"], total["twice"], total["unknown"]))
    exact = not (total["missing"] or total["twice"] or total["unknown"]) and total["expected"] == total["stored"]
    print()
    print("rows exact: %s" % ("yes" if exact else "NO"))
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["real", "all", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=60.0, help="measuring window")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds after every shard receives")
    ap.add_argument("--real-symbols", type=int, default=50, help="symbols per exchange, real profile")
    ap.add_argument("--all-symbols", type=int, default=800, help="symbols per exchange, all-symbols profile")
    ap.add_argument("--ticker-every", type=float, default=5.0, help="seconds between tickers, all-symbols profile")
    ap.add_argument("--pss-every", type=float, default=5.0, help="seconds between PSS samples")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds for every shard to receive")
    ap.add_argument("--keep", action="store_true", help="keep the data directory and the service log")
    args = ap.parse_args()
    for profile in (("real", "all") if args.profile == "both" else (args.profile,)):
        run_profile(profile, args)


if __name__ == "__main__":
    main()
