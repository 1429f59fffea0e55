"""The web layer: the Flask app, its routes and the server thread in the supervisor.

    /           the status page (statuspage.py)
    /health     JSON, 200 or 503 (health.py)
    /metrics    Prometheus text (metrics.py)
    /analytics  JSON, the analytics engine's report

It is given ``latest``, a callable returning the ``ServiceView`` (view.py)
the supervisor published last (one reference, swapped whole each pass of its
loop), and the analytics engine. Each request takes one view and the time and
hands them to a renderer, which is a plain function of them. It only reads:
it never forks, kills or changes state, and it never sees the supervisor.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from flask import Flask, jsonify
from werkzeug.serving import make_server

from .health import health_document
from .metrics import CONTENT_TYPE, render_metrics
from .statuspage import HEADERS, status_page
from .view import ServiceView

log = logging.getLogger("mdlogger.health")  # the name its log lines always had


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


class HealthServer:
    """The app behind werkzeug's threaded server, on a daemon thread of its own (on the health port)."""

    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_port

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2.0)


def start_health_server(latest: Callable[[], ServiceView], analytics, host: str, port: int) -> HealthServer:
    """Serve ``build_app(latest, analytics)`` on ``host:port`` (0: any free port) until ``shutdown()``."""
    app = build_app(latest, analytics)
    server = make_server(host, port, app, threaded=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    web = HealthServer(server)
    web.thread.start()
    log.info("health on http://%s:%d/health", host, web.port)
    log.info("status page on http://%s:%d/", host, web.port)
    return web
