"""The web layer: the Flask app, its routes and the server that serves it in the supervisor.

    /           the status page (statuspage.py)
    /health     JSON, 200 or 503 (health.py)
    /metrics    Prometheus text (metrics.py)
    /analytics  JSON, the analytics engine's report

It is given ``latest``, a callable returning the ``ServiceView`` (view.py)
the supervisor published last (one reference, swapped whole each pass of its
loop), and the analytics engine. Each request takes one view and the time and
hands them to a renderer, which is a plain function of them. It only reads:
it never forks, kills or changes state, and it never sees the supervisor.

The server is waitress, not Werkzeug's development server (one thread per
connection, no timeouts): one thread runs the sockets (poll, so any number of
descriptors), ``THREADS`` threads run requests, at most ``CONNECTION_LIMIT``
connections are open (more wait in the kernel's listen queue), a request must
arrive whole within ``REQUEST_SECS`` of its first byte and an idle connection
is closed after ``IDLE_SECS``, so slow or half-sent requests cost a socket for
seconds and never a thread. Responses carry no ``Server`` header. None of it
runs on the supervisor's loop, which goes on handling signals and children
whatever the listener is doing; waitress's own log lines are escaped and
throttled (one per kind per minute).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from flask import Flask, jsonify
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from .health import health_document
from .logs import Throttle, escape
from .metrics import CONTENT_TYPE, render_metrics
from .statuspage import HEADERS, status_page
from .view import ServiceView

log = logging.getLogger("mdlogger.health")  # the name its log lines always had

THREADS = 4  # requests served at once; each is a few milliseconds of rendering
CONNECTION_LIMIT = 1000  # open connections (fewer if the descriptor limit is low: see _connection_limit)
REQUEST_SECS = 10  # a whole request (line, headers, any body) must arrive within this of its first byte
IDLE_SECS = 10  # a connection with no request in progress is closed after this
MAX_HEADER_BYTES = 16 << 10  # request line and headers; every route is a GET
MAX_BODY_BYTES = 64 << 10


def build_app(latest: Callable[[], ServiceView], analytics) -> Flask:
    """The app serving ``latest()`` and ``analytics`` (an ``analytics.Analytics``)."""
    app = Flask("mdlogger")

    @app.get("/")
    def status():
        now = time.time()
        return status_page(latest(), now, analytics.report(now)), 200, HEADERS

    @app.get("/health")
    def health():
        code, doc = health_document(latest(), time.time())
        return jsonify(doc), code

    @app.get("/analytics")
    def analytics_report():
        return jsonify(analytics.report())

    @app.get("/metrics")
    def metrics():
        return render_metrics(latest(), time.time()), 200, {"Content-Type": CONTENT_TYPE}

    return app


class _Channel(HTTPChannel):
    """A connection that remembers when the request it is reading began."""

    request_began = 0.0

    def received(self, data):
        if data and self.request is None:
            self.request_began = time.time()
        return super().received(data)


class _Server(TcpWSGIServer):
    """waitress's server with a deadline for a whole request (it has only an idle timeout)."""

    channel_class = _Channel

    def maintenance(self, now: float) -> None:  # on the socket thread, about once a second
        super().maintenance(now)
        cutoff = now - REQUEST_SECS
        for channel in self.active_channels.values():
            if channel.request is not None and channel.request_began < cutoff:
                channel.will_close = True  # half-sent (or dripping) past the deadline: dropped


class _WaitressLog(logging.Filter):
    """waitress's log lines: control characters escaped (a request path is the client's text),
    and at most one line per kind per minute, with the count held back."""

    def __init__(self):
        super().__init__()
        self.throttle = Throttle(60.0)
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self.lock:
            admitted = self.throttle.admit(str(record.msg)[:80])
        if admitted is None:
            return False
        held = admitted[0]
        record.msg = escape(record.getMessage()) + (" (%d more like it since the last)" % held if held else "")
        record.args = None
        return True


_WAITRESS_LOG = _WaitressLog()
for _name in ("waitress", "waitress.queue"):
    logging.getLogger(_name).addFilter(_WAITRESS_LOG)


def _connection_limit() -> int:
    """CONNECTION_LIMIT, or a quarter of the open-files limit when that is lower (the rest is the service's)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return CONNECTION_LIMIT
    return max(16, min(CONNECTION_LIMIT, soft // 4))


class HealthServer:
    """The app behind waitress: the socket thread ("health") and THREADS request threads."""

    def __init__(self, server: _Server):
        self.server = server
        self.thread = threading.Thread(target=server.run, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def shutdown(self) -> None:
        """Close the listener and every connection (on the socket thread, which then ends) and the request threads."""
        from waitress import wasyncore

        if not self.thread.is_alive():
            return
        self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.server._map))
        self.thread.join(2.0)
        self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)


def start_health_server(latest: Callable[[], ServiceView], analytics, host: str, port: int) -> HealthServer:
    """Serve ``build_app(latest, analytics)`` on ``host:port`` (0: any free port) until ``shutdown()``."""
    app = build_app(latest, analytics)
    adj = Adjustments(host=host, port=port, threads=THREADS, connection_limit=_connection_limit(),
                      channel_timeout=IDLE_SECS, cleanup_interval=1, max_request_header_size=MAX_HEADER_BYTES,
                      max_request_body_size=MAX_BODY_BYTES, asyncore_use_poll=True, ident="",
                      log_socket_errors=False, expose_tracebacks=False)
    web = HealthServer(_Server(app, map={}, adj=adj))
    web.thread.start()
    log.info("health on http://%s:%d/health", host, web.port)
    log.info("status page on http://%s:%d/", host, web.port)
    return web
