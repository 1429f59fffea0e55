"""Reconnects that never fall behind: a connection that delivered data retries at once, and one
shared connection budget per exchange paces every shard's attempts together."""

from __future__ import annotations

import os
import re

import pytest

from mdlogger.exchanges.binance import Binance
from mdlogger.fakes.binance import FakeBinance
from mdlogger.worker import CONNECT_BURST, RECONNECT_JITTER_SECS

from helpers import fast_logger, service, wait_for

pytestmark = pytest.mark.slow


def test_busy_connections_dropped_again_and_again_do_not_escalate_the_backoff(tmp_path):
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT", "SOL-USDT", "DOGE-USDT"], mode="steady", rate=20) as fake:
        fake.drop_after(15)  # each connection: its ack and a few trades, then the exchange drops it
        data = os.path.join(str(tmp_path), "data")
        cfg = fake.config_section(symbols_per_connection=2, reconnect_delay_secs=1.0, max_reconnect_delay_secs=30.0)
        with service(tmp_path, {"logger": fast_logger(data), "exchanges": {"binance": cfg}}) as svc:
            wait_for(lambda: len(svc.shards()) == 2 and sum(s["reconnects"] for s in svc.shards()) >= 10,
                     timeout=60, what="ten drops")
            fake.drop_after(None)
            svc.stop()
            delays = [float(x) for x in re.findall(r"binance#\d: reconnecting in ([\d.]+) s", svc.log_text())]
            assert len(delays) >= 10
            # Every drop came after data: no attempt waited on an escalated backoff (1, 2, 4 ... s).
            assert max(delays) <= RECONNECT_JITTER_SECS + 0.05, delays
            # Two shards, one budget: attempts never outran the exchange's bucket.
            times = sorted(t for t, _, status in fake.upgrade_log if status == 101)
            for i, t in enumerate(times):
                in_window = [u for u in times[: i + 1] if u >= t - 10.0]
                span = t - in_window[0]
                assert len(in_window) <= CONNECT_BURST + Binance.connect_rate * span + 1, (len(in_window), span)


def test_attempts_that_fail_before_any_data_do_escalate(tmp_path):
    with FakeBinance(symbols=["BTC-USDT"], mode="steady", rate=5) as fake:
        data = os.path.join(str(tmp_path), "data")
        cfg = fake.config_section(reconnect_delay_secs=0.2, max_reconnect_delay_secs=1.6)
        with service(tmp_path, {"logger": fast_logger(data), "exchanges": {"binance": cfg}}) as svc:
            svc.wait_all_connected(1)
            fake.refuse_upgrades(30.0)
            fake.drop_all()
            wait_for(lambda: len(re.findall(r"Handshake status 503", svc.log_text())) >= 5, timeout=60,
                     what="five refused attempts")
            fake.refuse_upgrades(0)
            svc.wait_all_connected(1)
            svc.stop()
            log = svc.log_text()
            after = log[log.index("Handshake status 503"):]
            delays = [float(x) for x in re.findall(r"reconnecting in ([\d.]+) s", after)]
            assert max(delays[:5]) >= 0.8, delays  # 0.2, 0.4, 0.8, 1.6 (jittered down to half at most)
