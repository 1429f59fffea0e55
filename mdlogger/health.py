"""``GET /health`` (and ``/``, ``/metrics``, ``/analytics``): a Flask app on a thread of the supervisor.

It only reads: the view the main loop publishes (one reference, swapped
whole) and the lock-free counter blocks the children write. It never forks,
kills or changes state.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask, jsonify
from werkzeug.serving import make_server

from .clock import clock_note, combine
from .stats import gap_field

log = logging.getLogger("mdlogger.health")


def shard_health(entry: dict, now: float, stall: float) -> dict:
    stats = entry["stats"]
    s = stats.as_dict()
    last = s["last_message"]
    since_last = round(now - last, 3) if last else None
    connected = bool(s["connected"])
    receiving = connected and since_last is not None and since_last <= stall
    return {
        "exchange": entry["exchange"],
        "shard": entry["shard"],
        "symbols": entry["symbols"],
        "symbol_names": list(entry.get("symbol_names", ())),
        "pid": int(s["pid"]) or None,
        "state": entry["state"],
        "restarts": entry["restarts"],
        "last_exit": entry["reason"],
        "connected": connected,
        "receiving": receiving,
        "down_since": (None if connected or not s["down_since"] else _iso(s["down_since"])),
        "seconds_since_last_message": since_last,
        "messages_per_second": round(s["rate"], 2),
        "messages": int(s["messages"]),
        "records": int(s["records"]),
        "reconnects": int(s["reconnects"]),
        "parse_errors": int(s["parse_errors"]),
        "parse_errors_by_reason": stats.reasons(),
        "dropped_records": int(s["dropped_records"]),
        "refused_symbols": [x for x in entry["note"].get().split(",") if x],
        "clock": shard_clock(s),
    }


def shard_clock(s: dict) -> dict:
    """A shard's clock offset figures (receive time minus exchange event time, last minute)."""
    n = int(s.get("clock_samples", 0))
    return {
        "offset_p50_secs": round(s.get("clock_offset_p50", 0.0), 6) if n else None,
        "offset_p99_secs": round(s.get("clock_offset_p99", 0.0), 6) if n else None,
        "samples": n,
    }


def clock_figures(entries) -> tuple[float | None, float | None, int]:
    """``(p50, p99, samples)`` of an exchange over its slots' stats blocks (see clock.combine)."""
    figures = []
    for entry in entries:
        s = entry["stats"].as_dict()
        figures.append((s.get("clock_offset_p50", 0.0), s.get("clock_offset_p99", 0.0),
                        int(s.get("clock_samples", 0))))
    return combine(figures)


def exchange_clock(entries, bad_time: int) -> dict:
    """One exchange's clock figures, with a note when the local clock is to blame for refused rows."""
    p50, p99, n = clock_figures(entries)
    return {
        "offset_p50_secs": None if p50 is None else round(p50, 6),
        "offset_p99_secs": None if p99 is None else round(p99, 6),
        "samples": n,
        "note": clock_note(p50, bad_time),
    }


# /health names of the writer's per-exchange gap counters (see stats.GAP_FIELDS)
GAP_KEYS = {
    "gaps_detected": "detected",
    "gaps_filled": "filled",
    "gaps_empty": "empty",
    "gaps_unrecoverable": "unrecoverable",
    "gaps_pending": "pending",
    "trades_backfilled": "trades_backfilled",
    "rest_calls": "rest_calls",
}


def exchange_gaps(ws: dict, exchange: str, now: float) -> dict:
    """What became of an exchange's gaps, from the writer's block (zeros for an exchange it has no cells for)."""
    out = {key: int(ws.get(gap_field(field, exchange), 0)) for field, key in GAP_KEYS.items()}
    oldest = ws.get(gap_field("oldest_pending_gap", exchange), 0)
    out["oldest_pending_gap_seconds"] = round(max(0.0, now - oldest), 3) if oldest else None
    return out


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def health_document(supervisor) -> tuple[int, dict]:
    now = time.time()
    settings = supervisor.settings
    stall = settings.logger.stall_timeout_secs
    view = supervisor.view
    shards = [shard_health(entry, now, stall) for entry in view["slots"]]
    ws = supervisor.writer_stats.as_dict()
    writer = dict(view["writer"])
    writer.update(
        {
            "pid": int(ws["pid"]) or None,
            "rows_written": int(ws["rows"]),
            "rows_md": int(ws["rows_md"]),
            "rows_trades": int(ws["rows_trades"]),
            "seconds_since_last_flush": round(now - ws["last_flush"], 3) if ws["last_flush"] else None,
            "io_errors": int(ws["io_errors"]),
            "bytes_written": int(ws["bytes_written"]),
            "pending_rows": int(ws["pending_rows"]),
            "corrupt_bytes": int(ws["corrupt_bytes"]),
            "refused_records": int(ws["refused_records"]),
            "repaired_tables": int(ws["repaired_tables"]),
            "duplicate_trades_skipped": int(ws["duplicates"]),
            "held_rows": int(ws.get("held_rows", 0)),
            "sealed_days": int(ws.get("sealed_days", 0)),
            "late_rows": int(ws.get("late_rows", 0)),
        }
    )
    exchanges = {}
    healthy = writer["state"] in ("starting", "running")
    for name, status in view["exchanges"].items():
        mine = [s for s in shards if s["exchange"] == name]
        entries = [e for e in view["slots"] if e["exchange"] == name]
        ok = any(s["state"] == "running" and s["receiving"] for s in mine)
        reasons: dict[str, int] = {}
        for s in mine:
            for reason, n in s["parse_errors_by_reason"].items():
                reasons[reason] = reasons.get(reason, 0) + n
        refused = sorted({x for s in mine for x in s["refused_symbols"]})
        exchanges[name] = dict(status, healthy=ok, shards=len(mine),
                               shards_receiving=sum(1 for s in mine if s["receiving"]),
                               refused_by_reason=reasons, refused_by_exchange=refused,
                               gaps=exchange_gaps(ws, name, now),
                               clock=exchange_clock(entries, reasons.get("bad_time", 0)))
        healthy = healthy and ok
    doc = {
        "status": "ok" if healthy else "degraded",
        "uptime_seconds": round(now - supervisor.started, 1),
        "pid": supervisor_pid(),
        "exchanges": exchanges,
        "shards": shards,
        "writer": writer,
    }
    return (200 if healthy else 503), doc


def supervisor_pid() -> int:
    import os

    return os.getpid()


def build_app(supervisor) -> Flask:
    from .metrics import CONTENT_TYPE, metrics_registry, render

    app = Flask("mdlogger")
    registry = metrics_registry(supervisor)

    @app.get("/")
    def status():
        from .statuspage import HEADERS, status_page

        return status_page(supervisor), 200, HEADERS

    @app.get("/health")
    def health():
        code, doc = health_document(supervisor)
        return jsonify(doc), code

    @app.get("/analytics")
    def analytics():
        return jsonify(supervisor.analytics.report())

    @app.get("/metrics")
    def metrics():
        return render(registry), 200, {"Content-Type": CONTENT_TYPE}

    return app


class HealthServer:
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


def start_health_server(supervisor, host: str, port: int) -> HealthServer:
    app = build_app(supervisor)
    server = make_server(host, port, app, threaded=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    hs = HealthServer(server)
    hs.thread.start()
    log.info("health on http://%s:%d/health", host, hs.port)
    log.info("status page on http://%s:%d/", host, hs.port)
    return hs
