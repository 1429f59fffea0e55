#!/usr/bin/env python3
"""Firehose ingest, side by side: the same N Binance trades, as fast as each client reads them.

    python bench/bench_firehose.py [--trades 500000] [--repeat 3] [--symbols 4]
                                   [--cryptofeed-python PATH] [--no-cryptofeed]

Each measurement gets a fresh loopback fake Binance in its own process
(``FakeBinance`` in firehose mode with ``firehose_trades = N``): it sends
exactly N trade frames on the client's connection, pre-encoded rounds with
consecutive ids and current times, as fast as the socket takes them, then
stops (the connection stays open). Each client runs in its own process, so
its CPU is its own:

1. **bare**: a websocket-client receive loop (``skip_utf8_validation=True``,
   ``ws.recv()``) counting frames: the library's ceiling;
2. **cryptofeed** (when ``import cryptofeed`` works in the interpreter given
   by ``--cryptofeed-python``, default this one; skipped with a note
   otherwise): cryptofeed's own ``Binance`` feed, subclassed only to point
   its WebSocket and REST endpoints at the fake (the symbol listing is the
   fake's ``/api/v3/exchangeInfo``), ``TRADES`` with a callback that only
   counts; cryptofeed subscribes ``<symbol>@aggTrade`` streams, which the
   fake serves as aggTrade events (the same trades, about 30 bytes more per
   frame: ``a``, ``f``, ``l`` instead of ``t``);
3. **cryptofeed, packing**: the same with a callback that packs each trade
   into a binary record (id, time, price, size, side), the least a logger
   does;
4. **mdlogger**: the service (``python -m mdlogger run``) with one Binance
   worker holding every symbol, default settings; trades per second LANDED
   on disk, counted from the TRADES column files' sizes polled every 10 ms,
   and the CPU of every process of the tree (psutil ``cpu_times``, reaped
   children included) sampled before it is stopped.

Rates: the clients time the first to the N-th frame; for mdlogger,
(N - rows seen at the first poll that found rows) / (time until all N rows
were on disk). CPU seconds per 1M trades are given twice: the whole run
(process start, imports, connecting, start-up of every process of the tree)
and the transfer window alone (first frame to last). Medians over
``--repeat`` runs; the ratios are against the bare loop of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "BNB-USDT", "DOGE-USDT", "XRP-USDT", "ADA-USDT", "ETH-BTC"]


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def report(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


# -- the clients (each runs in its own process; standard library plus what it measures) -------------------


def client_bare(port: int, n: int, symbols: list[str]) -> None:
    import websocket

    streams = "/".join("%s@trade" % s.replace("-", "").lower() for s in symbols)
    ws = websocket.create_connection("ws://127.0.0.1:%d/stream?streams=%s" % (port, streams),
                                     skip_utf8_validation=True, timeout=60)
    ws.recv()
    t0, cpu0 = time.monotonic(), own_cpu()
    for _ in range(n - 1):
        ws.recv()
    t1, cpu1 = time.monotonic(), own_cpu()
    report(frames=n, seconds=t1 - t0, cpu_window=cpu1 - cpu0, cpu_run=cpu1,
           version="websocket-client " + websocket.__version__)
    ws.close()


def client_cryptofeed(port: int, n: int, symbols: list[str], pack: bool) -> None:
    import asyncio
    import struct
    from importlib.metadata import version

    from cryptofeed import FeedHandler, connection
    from cryptofeed.connection import RestEndpoint, WebsocketEndpoint
    from cryptofeed.defines import BUY, TRADES
    from cryptofeed.exchanges import Binance

    # cryptofeed accepts only wss:// addresses; the fake speaks plain ws:// on loopback (as it does to the other
    # clients), so the address handed to the websockets library's connect is rewritten, nothing else.
    tls_connect = connection.connect
    connection.connect = lambda address, **kw: tls_connect(address.replace("wss://", "ws://", 1), **kw)

    class LoopbackBinance(Binance):
        """cryptofeed's Binance feed, its addresses pointed at the fake (the rest is cryptofeed's own)."""

        websocket_endpoints = [WebsocketEndpoint("wss://127.0.0.1:%d" % port)]
        rest_endpoints = [RestEndpoint("http://127.0.0.1:%d" % port, routes=Binance.rest_endpoints[0].routes)]

    state = {"n": 0, "t0": 0.0, "cpu0": 0.0}
    record = struct.Struct("<QIIffI")
    packed = []

    def done() -> None:
        t1, cpu1 = time.monotonic(), own_cpu()
        report(frames=n, seconds=t1 - state["t0"], cpu_window=cpu1 - state["cpu0"], cpu_run=cpu1,
               version="cryptofeed " + version("cryptofeed"))
        asyncio.get_event_loop().stop()

    async def noop(trade, receipt_timestamp):
        state["n"] += 1
        if state["n"] == 1:
            state["t0"], state["cpu0"] = time.monotonic(), own_cpu()
        elif state["n"] == n:
            done()

    async def packing(trade, receipt_timestamp):
        ts = trade.timestamp
        secs = int(ts)
        packed.append(record.pack(int(trade.id), secs, int((ts - secs) * 1e9), float(trade.price),
                                  float(trade.amount), 1 if trade.side == BUY else 2))
        if len(packed) >= 4096:
            packed.clear()
        await noop(trade, receipt_timestamp)

    fh = FeedHandler(config={"log": {"disabled": True}, "uvloop": True})  # installs uvloop's policy
    asyncio.set_event_loop(asyncio.new_event_loop())  # FeedHandler.run asks for the current loop; none yet
    fh.add_feed(LoopbackBinance(symbols=symbols, channels=[TRADES], callbacks={TRADES: packing if pack else noop}))
    fh.run()


# -- the fake (its own process) ----------------------------------------------------------------------------


def serve_fake(n: int, symbols: list[str]) -> None:
    import signal
    import threading

    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from mdlogger.fakes.binance import FakeBinance

    fake = FakeBinance(symbols=symbols, mode="firehose")
    fake.firehose_trades = n
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    fake.start()
    print("READY %d" % fake.port, flush=True)
    while not done.wait(0.5):
        pass
    fake.stop()


class FakeProcess:
    def __init__(self, n: int, symbols: list[str]):
        self.proc = subprocess.Popen([sys.executable, HERE, "--serve-fake", "--trades", str(n),
                                      "--symbols", ",".join(symbols)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            self.stop()
            raise RuntimeError("the fake did not start (said %r)" % (line,))
        self.port = int(line[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the driver -----------------------------------------------------------------------------------------------


def run_client(kind: str, python: str, n: int, symbols: list[str]) -> dict:
    """One client against a fresh fake: ``{"rate", "cpu_run", "cpu_window", "version"}``."""
    fake = FakeProcess(n, symbols)
    try:
        cmd = [python, HERE, "--client", kind, "--port", str(fake.port), "--trades", str(n),
               "--symbols", ",".join(symbols)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(HERE))
        result = None
        deadline = time.monotonic() + 120 + n / 10_000
        for line in proc.stdout:  # the client prints RESULT once it has the N-th trade
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
                break
        try:
            proc.wait(max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if result is None:
            raise RuntimeError("client %s gave no result (exit %s): %s" % (kind, proc.returncode,
                                                                          proc.stderr.read()[-2000:]))
        proc.stderr.close()
        return {"rate": (n - 1) / result["seconds"], "cpu_run": result["cpu_run"],
                "cpu_window": result["cpu_window"], "version": result["version"]}
    finally:
        fake.stop()


def run_mdlogger(n: int, symbols: list[str]) -> dict:
    """The service with one Binance worker holding every symbol; rows landed on disk; CPU per process."""
    from benchlib import Service, delta, trades_on_disk

    fake = FakeProcess(n, symbols)
    svc = None
    try:
        svc = Service({"exchanges": {"binance": {
            "enabled": True, "ws_endpoint": "ws://127.0.0.1:%d" % fake.port,
            "rest_endpoint": "http://127.0.0.1:%d" % fake.port, "symbols": symbols,
            "symbols_per_connection": len(symbols), "max_connections": 1}}}, prefix="mdlogger-firehose-")
        deadline = time.monotonic() + 60
        rows = 0
        while rows == 0:
            if time.monotonic() > deadline or svc.proc.poll() is not None:
                raise RuntimeError("no rows on disk; the service log: %s" % svc.log_path)
            time.sleep(0.01)
            rows = trades_on_disk(svc.data)
        t0, rows0 = time.monotonic(), rows
        svc.learn_roles()  # /health: which pid is the writer, which the worker
        cpu0 = svc.cpu()
        deadline = t0 + 120 + n / 10_000
        while rows < n:
            if time.monotonic() > deadline:
                raise RuntimeError("%d of %d rows landed; the service log: %s" % (rows, n, svc.log_path))
            time.sleep(0.01)
            rows = trades_on_disk(svc.data)
        t1 = time.monotonic()
        cpu1 = svc.cpu()  # before the service is told to stop
        if rows != n:
            print("  note: %d rows on disk, %d sent" % (rows, n), flush=True)
        return {"rate": (n - rows0) / (t1 - t0), "cpu_run": sum(v for _, v in cpu1.values()),
                "cpu_window": sum(v for _, v in delta(cpu1, cpu0).values()),
                "per_process_run": {role: v for role, v in cpu1.values()},
                "per_process_window": {role: v for role, v in delta(cpu1, cpu0).values()}, "version": "mdlogger"}
    finally:
        if svc is not None:
            svc.stop()
        fake.stop()


def cryptofeed_available(python: str) -> str | None:
    """None when ``import cryptofeed`` works in ``python``, else why not."""
    try:
        done = subprocess.run([python, "-c", "import cryptofeed"], capture_output=True, text=True, timeout=120,
                              cwd=os.path.dirname(HERE))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]
    return None


LABELS = {
    "bare": "websocket-client bare receive loop (skip_utf8_validation)",
    "cryptofeed": "cryptofeed, no-op callback",
    "cryptofeed-pack": "cryptofeed, callback packs records",
    "mdlogger": "mdlogger, one Binance worker, rows landed on disk",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trades", type=int, default=500_000, help="trades per measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--symbols", default="4", help="how many symbols (at most %d), or a comma-separated list"
                    % len(SYMBOLS))
    ap.add_argument("--cryptofeed-python", default=sys.executable,
                    help="the interpreter that has cryptofeed (default: this one)")
    ap.add_argument("--no-cryptofeed", action="store_true", help="leave cryptofeed out")
    ap.add_argument("--client", choices=["bare", "cryptofeed", "cryptofeed-pack"], help=argparse.SUPPRESS)
    ap.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    symbols = SYMBOLS[:int(args.symbols)] if args.symbols.isdigit() else args.symbols.split(",")
    n = args.trades
    if args.serve_fake:
        return serve_fake(n, symbols)
    if args.client == "bare":
        return client_bare(args.port, n, symbols)
    if args.client in ("cryptofeed", "cryptofeed-pack"):
        return client_cryptofeed(args.port, n, symbols, pack=args.client == "cryptofeed-pack")

    from benchlib import machine_line, role_order

    kinds = ["bare"]
    if args.no_cryptofeed:
        print("cryptofeed left out (--no-cryptofeed)")
    else:
        why = cryptofeed_available(args.cryptofeed_python)
        if why is None:
            kinds += ["cryptofeed", "cryptofeed-pack"]
        else:
            print("cryptofeed skipped: `import cryptofeed` fails in %s (%s)" % (args.cryptofeed_python, why))
    kinds.append("mdlogger")
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(args.repeat):
        for kind in kinds:
            if kind == "mdlogger":
                r = run_mdlogger(n, symbols)
            else:
                r = run_client(kind, args.cryptofeed_python if kind.startswith("cryptofeed") else sys.executable,
                               n, symbols)
            results[kind].append(r)
        print("run %d: %s" % (i + 1, ", ".join("%s %.0f/s" % (k, v[-1]["rate"]) for k, v in results.items())),
              flush=True)

    def med(kind, field):
        return statistics.median(r[field] for r in results[kind])

    bare = med("bare", "rate")
    versions = sorted({r["version"] for v in results.values() for r in v} - {"mdlogger"})
    print()
    print(machine_line())
    print("firehose: %d trades on %d symbols (%s), one connection, loopback fake Binance in its own process; "
          "median of %d runs; %s" % (n, len(symbols), ",".join(symbols), args.repeat, ", ".join(versions)))
    print()
    cf = med("cryptofeed", "rate") if "cryptofeed" in kinds else None
    print("| client | trades/s | ratio to the bare loop |%s CPU s per 1M trades, whole run "
          "| CPU s per 1M, transfer only |" % (" ratio to cryptofeed no-op |" if cf else ""))
    print("|---|---:|---:|%s---:|---:|" % ("---:|" if cf else ""))
    for kind in kinds:
        rate = med(kind, "rate")
        print("| %s | %s | %.2f |%s %.1f | %.1f |" % (
            LABELS[kind], format(round(rate), ","), rate / bare, " %.2f |" % (rate / cf) if cf else "",
            med(kind, "cpu_run") * 1e6 / n, med(kind, "cpu_window") * 1e6 / n))
    runs = results["mdlogger"]
    roles = sorted({role for r in runs for role in r["per_process_run"]}, key=role_order)
    print()
    print("mdlogger, CPU s per 1M trades by process (median of %d runs):" % args.repeat)
    print()
    print("| process | whole run | transfer only |")
    print("|---|---:|---:|")
    for role in roles:
        run_cpu = statistics.median(r["per_process_run"].get(role, 0.0) for r in runs)
        window_cpu = statistics.median(r["per_process_window"].get(role, 0.0) for r in runs)
        print("| %s | %.2f | %.2f |" % (role, run_cpu * 1e6 / n, window_cpu * 1e6 / n))
    print()
    print("per run, trades/s:")
    for kind in kinds:
        print("  %-16s %s" % (kind, "  ".join("%9.0f" % r["rate"] for r in results[kind])))


if __name__ == "__main__":
    main()
