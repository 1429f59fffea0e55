"""Run the real service (a separate process tree) against loopback fakes, for tests.

    with FakeBinance(symbols=["BTC-USDT"], mode="script") as fake, service_for(tmp_path, fake) as svc:
        svc.wait_all_connected(1)
        ...
        assert svc.stop() == 0

The configuration comes from the fakes themselves (``FakeExchange.config_section``: endpoints and
symbols) plus the short timers of :data:`FAST_LOGGER` and :data:`FAST_RECONNECT`, which are test policy
and so live here, not in the fakes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import yaml

from .waiting import wait_for

# Logger timers short enough for tests.
FAST_LOGGER = {
    "health_check_port": 0,
    "flush_interval_secs": 0.2,
    "heartbeat_timeout_secs": 5.0,
    "stall_timeout_secs": 10.0,
    "shutdown_timeout_secs": 10.0,
    "healthy_run_secs": 5.0,
    "restart_delay_secs": 0.2,
    "max_restart_delay_secs": 1.0,
    "fsync_interval_secs": 5.0,
}

# An exchange's reconnect and silence timers, short enough for tests.
FAST_RECONNECT = {"reconnect_delay_secs": 0.1, "max_reconnect_delay_secs": 0.5, "silence_timeout_secs": 10.0}


def fast_logger(data_path: str, **extra) -> dict:
    """The ``logger`` section: data in ``data_path``, an ephemeral health port, short timers, then ``extra``."""
    cfg = {"data_path": str(data_path), **FAST_LOGGER}
    cfg.update(extra)
    return cfg


def fast_section(fake, symbols=None, **overrides) -> dict:
    """The fake's own section (``fake.config_section``) with the short reconnect timers, then ``overrides``."""
    return fake.config_section(symbols, **{**FAST_RECONNECT, **overrides})


def service_config(data_path, fakes, logger=None, symbols=None, **section) -> dict:
    """A whole configuration: ``fast_logger(data_path, **logger)`` and one ``fast_section`` per fake
    (``symbols`` and ``section`` apply to each)."""
    return {"logger": fast_logger(data_path, **(logger or {})),
            "exchanges": {fake.name: fast_section(fake, symbols, **section) for fake in fakes}}


class Service:
    """``mdlogger-supervisor --config <file> run`` in its own process (a context manager: leaving it kills
    whatever is left of the service)."""

    def __init__(self, tmp_path, config: dict, args=(), env=None):
        self.config_path = os.path.join(str(tmp_path), "logger.yaml")
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(config, fh)
        self.log_path = os.path.join(str(tmp_path), "service.log")
        self.data_path = config["logger"]["data_path"]
        self._log = open(self.log_path, "w")
        full_env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET" and not k.startswith("LOGGER_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mdlogger", "--config", self.config_path, "run", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        self.port = None

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.ensure_dead()

    # -- observing ---------------------------------------------------------------
    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def health_port(self) -> int:
        if self.port is None:
            m = wait_for(lambda: re.search(r"health on http://[\d.]+:(\d+)/health", self.log_text()),
                         timeout=30, what="the health server")
            self.port = int(m.group(1))
        return self.port

    def health(self) -> tuple[int, dict]:
        url = "http://127.0.0.1:%d/health" % self.health_port()
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                code, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            code, body = exc.code, exc.read()
        try:
            return code, json.loads(body)
        except ValueError:
            raise AssertionError("/health answered %d with non-JSON %r; service log:\n%s"
                                 % (code, body[:500], self.log_text()[-3000:])) from None

    def wait_healthy(self, timeout: float = 30.0) -> dict:
        def ok():
            code, doc = self.health()
            return doc if code == 200 else None

        return wait_for(ok, timeout, 0.1, "HTTP 200 from /health")

    def wait_all_connected(self, shards: int, timeout: float = 30.0) -> list[dict]:
        """Healthy, with ``shards`` shards all running and connected."""
        self.wait_healthy(timeout)

        def ok():
            s = self.shards()
            return s if len(s) == shards and all(x["state"] == "running" and x["connected"] for x in s) else None

        return wait_for(ok, timeout, 0.1, "%d shards running and connected" % shards)

    def shards(self) -> list[dict]:
        return self.health()[1]["shards"]

    def writer(self) -> dict:
        """The writer's part of /health."""
        return self.health()[1]["writer"]

    def records(self, exchange: str | None = None) -> int:
        """Records the shards (of one exchange, or all) received, from /health."""
        return sum(s["records"] for s in self.shards() if exchange in (None, s["exchange"]))

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def pids(self) -> dict[str, int]:
        doc = self.health()[1]
        out = {"writer": doc["writer"]["pid"]}
        for s in doc["shards"]:
            out["%s#%d" % (s["exchange"], s["shard"])] = s["pid"]
        return out

    # -- stopping --------------------------------------------------------------------
    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill_tree(self) -> None:
        """SIGKILL every process of the service at once (a power cut, as far as files go)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()


@contextlib.contextmanager
def service(tmp_path, config: dict, args=(), env=None):
    """The service started on ``config`` (its files in ``tmp_path``); killed, if still running, on leaving."""
    svc = Service(tmp_path, config, args, env)
    try:
        yield svc
    finally:
        svc.ensure_dead()


def service_for(tmp_path, fake, symbols=None, logger=None, data=None, **section):
    """``service`` on one fake: ``service_config`` with data in ``<tmp_path>/data`` unless ``data``."""
    data = data or os.path.join(str(tmp_path), "data")
    return service(tmp_path, service_config(data, [fake], logger, symbols, **section))
