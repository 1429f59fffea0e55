"""``python -m mdlogger.fakes EXCHANGE``: serve a fake exchange until SIGTERM/SIGINT.

Prints ``READY <port>`` on one line once listening.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from . import fake_class


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdlogger.fakes")
    ap.add_argument("exchange")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mode", default="steady", choices=["steady", "firehose", "idle", "script"])
    ap.add_argument("--rate", type=float, default=5.0, help="trades per second per symbol (steady)")
    ap.add_argument("--symbols", default=None, help="comma-separated BASE-QUOTE symbols")
    ap.add_argument("--ping-interval", type=float, default=None, help="server ping interval (Binance)")
    args = ap.parse_args(argv)
    kwargs = {"mode": args.mode, "rate": args.rate, "port": args.port}
    if args.ping_interval is not None:
        kwargs["ping_interval"] = args.ping_interval
    if args.symbols:
        kwargs["symbols"] = [s.strip() for s in args.symbols.split(",") if s.strip()]
    server = fake_class(args.exchange)(**kwargs)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    print("READY %d %s" % (server.port, server.ws_path or "/"), flush=True)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
