"""``python -m mdlogger.fakes EXCHANGE``: serve a fake exchange until SIGTERM/SIGINT, then exit 0.

Prints one line ``READY <port> <ws_path>`` once listening (``ws_path`` is what
follows host:port in the exchange's ws_endpoint, ``/`` for none; the
``FakeProcess`` helper in mdlogger.cli reads exactly these three words).
Options that only some fakes have are passed on only when given.
``--drop-after N`` ends every WebSocket connection (no close frame) once it
was sent N data messages; ``--refuse-upgrades S`` answers WebSocket upgrades
with 503 for the first S seconds (REST is served).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from . import FAKES, fake_class


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(prog="python -m mdlogger.fakes")
    ap.add_argument("exchange", choices=sorted(FAKES))
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--mode", default="steady", choices=["steady", "firehose", "idle", "script"])
    ap.add_argument("--rate", type=float, default=5.0, help="trades per second per symbol (steady)")
    ap.add_argument("--symbols", default=None, help="comma-separated BASE-QUOTE symbols")
    ap.add_argument("--seed", type=int, default=None, help="random-walk seed")
    ap.add_argument("--ping-interval", type=float, default=None, help="server ping interval (Binance)")
    ap.add_argument("--pong-timeout", type=float, default=None, help="seconds to wait for a pong (Binance)")
    ap.add_argument("--max-connection-age", type=float, default=None, help="close connections older (Binance)")
    ap.add_argument("--weight-limit", type=int, default=None, help="REST request weight per minute (Binance)")
    ap.add_argument("--history-size", type=int, default=None, help="trades kept per symbol for snapshots and REST")
    ap.add_argument("--quiet-when-unsubscribed", action="store_true",
                    help="steady mode: trade only symbols some connection is subscribed to")
    ap.add_argument("--drop-after", type=int, default=None, metavar="N",
                    help="end every WebSocket connection (no close frame) after N data messages")
    ap.add_argument("--refuse-upgrades", type=float, default=None, metavar="SECONDS",
                    help="answer WebSocket upgrades with HTTP 503 for the first SECONDS")
    return ap.parse_args(argv)


def fake_kwargs(args: argparse.Namespace) -> dict:
    """Constructor arguments for the fake, leaving out options not given."""
    kwargs = {"mode": args.mode, "rate": args.rate, "port": args.port}
    optional = {"seed": args.seed, "ping_interval": args.ping_interval, "pong_timeout": args.pong_timeout,
                "max_connection_age": args.max_connection_age, "weight_limit": args.weight_limit,
                "history_size": args.history_size}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if args.quiet_when_unsubscribed:
        kwargs["trade_when_unsubscribed"] = False
    if args.symbols:
        kwargs["symbols"] = [s.strip() for s in args.symbols.split(",") if s.strip()]
    return kwargs


def main(argv=None) -> int:
    args = parse_args(argv)
    server = fake_class(args.exchange)(**fake_kwargs(args))
    if args.drop_after is not None:
        server.drop_after(args.drop_after)
    if args.refuse_upgrades is not None:
        server.refuse_upgrades(args.refuse_upgrades)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    print("READY %d %s" % (server.port, server.ws_path or "/"), flush=True)
    try:
        while not done.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
