"""Adapters and sessions outside the service: settings, a sink that keeps what a session hands over,
a REST stand-in for discovery, and a websocket-client close reader."""

from __future__ import annotations

import struct

import orjson
from websocket import ABNF

from mdlogger.exchanges import adapter_for
from mdlogger.exchanges.base import Sink, SymbolInfo
from mdlogger.settings import load_settings


def make_adapter(name: str):
    """An exchange's adapter with its default settings."""
    settings = load_settings(None, {}, {"exchanges.%s.enabled" % name: True}, check_resources=False)
    return adapter_for(settings.exchange(name))


def fake_settings(fake, symbols=None, **logger):
    """Settings with the fake's exchange enabled and pointed at the fake (``fake.config_section``), the other
    exchanges at their defaults; ``logger`` sets ``logger.<key>`` values."""
    overrides = {"exchanges.%s.%s" % (fake.name, k): v for k, v in fake.config_section(symbols).items()}
    overrides.update({"logger.%s" % k: v for k, v in logger.items()})
    return load_settings(None, {}, overrides, check_resources=False)


def normalized_session(adapter, names, sink):
    """A session for symbols given in the exchange's spelling (normalized by the adapter)."""
    syms = [SymbolInfo(adapter.normalize(n), n, *adapter.normalize(n).split("-")) for n in names]
    return adapter.new_session(syms, sink)


class ListSink(Sink):
    """Keeps what a session hands over.

    ``trades``: each trade's tuple, plus ``True`` at the end when it came in a snapshot (with
    ``flag_every_trade``: plus the snapshot flag, True or False, on every trade). ``tickers``: each ticker's
    tuple. ``errors``: the exchange's error texts (with ``error_symbols``: ``(text, symbol)`` pairs).
    Refusals are the session's to raise, never the sink's to receive.
    """

    def __init__(self, flag_every_trade: bool = False, error_symbols: bool = False):
        self.trades, self.tickers, self.errors = [], [], []
        self.flag_every_trade = flag_every_trade
        self.error_symbols = error_symbols

    def trade(self, *args, snapshot=False, **kw):
        self.trades.append(args + (snapshot,) if self.flag_every_trade or snapshot else args)

    def ticker(self, *args):
        self.tickers.append(args)

    def refuse(self, reason, sample):
        raise AssertionError("sessions raise Refused; the worker counts")

    def exchange_error(self, text, symbol=None):
        self.errors.append((text, symbol) if self.error_symbols else text)


class FakeRest:
    """Answers an adapter's REST calls with one body (text or bytes are parsed as JSON, anything else is
    returned as it is); keeps the calls in ``calls``; with ``path``, every URL must end with it."""

    def __init__(self, body, path: str | None = None):
        self.body = body
        self.path = path
        self.calls = []

    def get_json(self, url, params=None):
        self.calls.append((url, params))
        if self.path is not None:
            assert url.endswith(self.path), url
        return orjson.loads(self.body) if isinstance(self.body, (str, bytes)) else self.body


def recv_close(ws) -> tuple[int, str]:
    """Read raw frames (no automatic pongs) until the server's close frame: its ``(status code, reason)``."""
    while True:
        frame = ws.recv_frame()
        if frame.opcode == ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", frame.data[:2])[0], frame.data[2:].decode("utf-8", "replace")
