"""What the tests share (tests/conftest.py puts tests/ on sys.path: ``from helpers import ...``).

Waiting: ``wait_for(condition, timeout, interval, what)``, the one place a test polls: it waits on a fact
(a row on disk, a line in a log, a figure on /health, a subscription the fake saw) and fails, naming it,
when the fact does not come.

The service: ``Service`` (the real process tree; a context manager), ``service(tmp_path, config)`` and
``service_for(tmp_path, fake, symbols, logger, data, **section)`` (context managers that kill what is
left on leaving), ``service_config(data_path, fakes, logger, symbols, **section)``,
``fast_logger(data_path, **extra)``, ``fast_section(fake, symbols, **overrides)`` (the fake's own
``config_section`` with the short timers of ``FAST_RECONNECT``).

Rows and fakes: ``SPECS`` and the independent converters (``binance_trade`` ... ``kraken_md``), ``f32``, ``ms``,
``symbol_of``, ``started_fakes``, ``all_subscribed``, ``check_rows``, ``assert_tables_whole``, ``today``.

Adapters: ``make_adapter``, ``fake_settings``, ``normalized_session``, ``ListSink``, ``FakeRest``,
``recv_close`` (a websocket-client connection's close frame).

Captures (``helpers.captures``: ``received_frames``, ``rest_body``) and headless Chromium
(``helpers.browser``) are imported from their modules.
"""

from .adapters import FakeRest, ListSink, fake_settings, make_adapter, normalized_session, recv_close
from .rows import (SPECS, all_subscribed, assert_tables_whole, binance_md, binance_trade, bitfinex_md, bitfinex_trade,
                   check_rows, coinbase_md, coinbase_trade, f32, kraken_md, kraken_trade, ms, okx_md, okx_trade,
                   started_fakes, symbol_of, today)
from .service import (FAST_LOGGER, FAST_RECONNECT, Service, fast_logger, fast_section, service, service_config,
                      service_for)
from .waiting import wait_for

__all__ = [
    "FAST_LOGGER", "FAST_RECONNECT", "FakeRest", "ListSink", "SPECS", "Service", "all_subscribed",
    "assert_tables_whole", "binance_md", "binance_trade", "bitfinex_md", "bitfinex_trade", "check_rows",
    "coinbase_md", "coinbase_trade", "f32", "fake_settings", "fast_logger", "fast_section", "kraken_md",
    "kraken_trade", "make_adapter", "ms", "normalized_session", "okx_md", "okx_trade", "recv_close", "service",
    "service_config", "service_for", "started_fakes", "symbol_of", "today", "wait_for",
]
