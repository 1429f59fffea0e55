"""The ``/health`` document: a pure function of a published ``ServiceView`` and the time.

``health_document(view, now)`` returns ``(HTTP code, document)``: 200 when the
writer is starting or running and every enabled exchange has a shard running
and receiving, 503 otherwise. It reads the view (see view.py) and the lock-free
counter blocks it refers to, and nothing else; ``web.py`` serves it, and the
status page (statuspage.py) and ``/metrics`` (metrics.py) reuse its pieces.
It imports neither the web layer nor the supervisor.
"""

from __future__ import annotations

import time

from .clock import clock_note, combine
from .stats import gap_field
from .view import ServiceView, SlotView


def shard_health(entry: SlotView, now: float, stall: float) -> dict:
    stats = entry.stats
    s = stats.as_dict()
    last = s["last_message"]
    since_last = round(now - last, 3) if last else None
    connected = bool(s["connected"])
    receiving = connected and since_last is not None and since_last <= stall
    return {
        "exchange": entry.exchange,
        "shard": entry.shard,
        "symbols": entry.symbols,
        "symbol_names": list(entry.symbol_names),
        "pid": int(s["pid"]) or None,
        "state": entry.state,
        "restarts": entry.restarts,
        "last_exit": entry.reason,
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
        "refused_symbols": [x for x in entry.note.get().split(",") if x],
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
        s = entry.stats.as_dict()
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


def writer_health(view: ServiceView, now: float) -> dict:
    """The writer's part of the document: its state machine and its counters."""
    w = view.writer
    ws = w.stats.as_dict()
    return {
        "state": w.state,
        "restarts": w.restarts,
        "reason": w.reason,
        "backlog_bytes": w.backlog_bytes,
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


def health_document(view: ServiceView, now: float) -> tuple[int, dict]:
    """``(200 or 503, the /health document)`` for ``view`` at wall-clock time ``now``."""
    shards = [shard_health(entry, now, view.stall_timeout_secs) for entry in view.slots]
    ws = view.writer.stats.as_dict()
    writer = writer_health(view, now)
    exchanges = {}
    healthy = writer["state"] in ("starting", "running")
    for x in view.exchanges:
        name = x.name
        mine = [s for s in shards if s["exchange"] == name]
        ok = any(s["state"] == "running" and s["receiving"] for s in mine)
        reasons: dict[str, int] = {}
        for s in mine:
            for reason, n in s["parse_errors_by_reason"].items():
                reasons[reason] = reasons.get(reason, 0) + n
        refused = sorted({r for s in mine for r in s["refused_symbols"]})
        exchanges[name] = {
            "state": x.state,
            "error": x.error,
            "symbols": x.symbols,
            "uncovered_symbols": x.uncovered_symbols,
            "refused_symbols": list(x.refused_symbols),
            "healthy": ok,
            "shards": len(mine),
            "shards_receiving": sum(1 for s in mine if s["receiving"]),
            "refused_by_reason": reasons,
            "refused_by_exchange": refused,
            "gaps": exchange_gaps(ws, name, now),
            "clock": exchange_clock(view.slots_of(name), reasons.get("bad_time", 0)),
        }
        healthy = healthy and ok
    doc = {
        "status": "ok" if healthy else "degraded",
        "uptime_seconds": round(now - view.started, 1),
        "pid": view.pid,
        "exchanges": exchanges,
        "shards": shards,
        "writer": writer,
    }
    return (200 if healthy else 503), doc
