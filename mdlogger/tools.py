"""Operator tools over the exchange adapters: list symbols, check configured ones, test a feed."""

from __future__ import annotations

import time
from typing import IO

import websocket

from . import records as rec
from .exchanges import adapter_for
from .exchanges.base import Sink, SymbolInfo
from .frames import OPCODE_BINARY, OPCODE_TEXT, deliver
from .rest import RestClient
from .settings import ExchangeSettings


def discover(xs: ExchangeSettings) -> list[SymbolInfo]:
    rest = RestClient(timeout=xs.rest_timeout_secs, retries=xs.rest_retries)
    try:
        return adapter_for(xs).discover(rest)
    finally:
        rest.close()


def check_symbols(xs: ExchangeSettings, listed: list[SymbolInfo], out: IO[str]) -> int:
    """Print each configured symbol's status against the listing; 0 when all are ok."""
    by_norm = {s.symbol: s for s in listed}
    by_name = {s.exchange_name: s for s in listed}
    if not xs.symbols:
        active = sum(1 for s in listed if s.active)
        out.write("%s: no symbols configured: every active symbol (%d of %d listed)\n" % (xs.name, active, len(listed)))
        return 0
    bad = 0
    out.write("%-20s %-10s %s\n" % ("configured", "status", "exchange name"))
    for name in xs.symbols:
        info = by_norm.get(name) or by_name.get(name) or by_norm.get(name.upper())
        if info is None:
            status, exch = "unknown", "-"
        elif not info.active:
            status, exch = "inactive", info.exchange_name
        else:
            status, exch = "ok", info.exchange_name
        bad += status != "ok"
        out.write("%-20s %-10s %s\n" % (name, status, exch))
    return 0 if bad == 0 else 1


def print_symbols(listed: list[SymbolInfo], out: IO[str]) -> None:
    out.write("%-20s %-16s %-8s %-8s %-7s %-14s %s\n" % ("symbol", "exchange name", "base", "quote", "active", "tick size", "min size"))
    for s in sorted(listed, key=lambda s: s.symbol):
        out.write("%-20s %-16s %-8s %-8s %-7s %-14s %s\n" % (
            s.symbol, s.exchange_name, s.base, s.quote, "yes" if s.active else "no", s.tick_size or "-", s.min_size or "-"))


class PrintSink(Sink):
    def __init__(self):
        self.rows: list[tuple[str, tuple]] = []
        self.errors: list[str] = []
        self.refused: list[str] = []

    def trade(self, symbol, trade_id, sec, nanos, price, size, side, maker=rec.ZERO_ID, taker=rec.ZERO_ID,
              snapshot=False):
        row = (symbol.decode(), trade_id, sec, nanos, price, size, side) + (("snapshot",) if snapshot else ())
        self.rows.append(("TRADES", row))

    def ticker(self, symbol, sec, nanos, price, volume, side, bid, ask):
        self.rows.append(("MD", (symbol.decode(), sec, nanos, price, volume, side, bid, ask)))

    def refuse(self, reason, sample):
        self.refused.append(reason)

    def exchange_error(self, text, symbol=None):
        self.errors.append(text)


def test_feed(xs: ExchangeSettings, symbols: list[SymbolInfo], want: int, timeout: float, out: IO[str]) -> int:
    """Connect, subscribe, print the first parsed records; 0 on success."""
    adapter = adapter_for(xs)
    sink = PrintSink()
    session = adapter.new_session(symbols, sink)
    try:
        ws = websocket.create_connection(adapter.ws_url(symbols), timeout=xs.connect_timeout_secs,
                                         skip_utf8_validation=True, suppress_origin=True)
    except (websocket.WebSocketException, OSError) as exc:
        out.write("FAILED: cannot connect to %s: %s\n" % (adapter.ws_url(symbols), exc))
        return 1
    try:
        for message in adapter.subscribe_messages(symbols):
            ws.send(message)
            time.sleep(1.0 / adapter.send_rate)
        deadline = time.monotonic() + timeout
        ws.settimeout(0.5)
        while len(sink.rows) < want and time.monotonic() < deadline and not sink.errors:
            try:
                opcode, data = ws.recv_data()  # whole messages; pings answered by websocket-client
            except websocket.WebSocketTimeoutException:
                continue
            if opcode == OPCODE_TEXT:
                deliver(session, sink, data, adapter.max_frame_bytes, time.time_ns())  # as the worker does
            elif opcode == OPCODE_BINARY:
                sink.refuse("binary", data[:64])
    except (websocket.WebSocketException, OSError) as exc:
        out.write("FAILED: connection lost: %s\n" % exc)
        return 1
    finally:
        ws.close()
    for table, row in sink.rows[:want]:
        out.write("%-6s %s\n" % (table, "  ".join(str(v) for v in row)))
    if sink.errors:
        out.write("FAILED: the exchange refused: %s\n" % "; ".join(sink.errors))
        return 1
    if not sink.rows:
        out.write("FAILED: nothing parsed within %.0f s (%d messages refused)\n" % (timeout, len(sink.refused)))
        return 1
    out.write("OK: %d records from %s\n" % (len(sink.rows), ", ".join(s.symbol for s in symbols)))
    return 0
