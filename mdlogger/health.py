"""The ``/health`` document: a pure function of a published ``ServiceView`` and the time.

``health_document(view, now)`` returns ``(HTTP code, document)``. The
document's ``status`` is ``ok``, or ``degraded`` with the ``reasons`` listed
(:func:`health_reasons`); the code is 503 when one of the reasons means trades
are being lost or not stored (``critical``), 200 otherwise:

==========================  ========  ================================================
reason                      HTTP      when
==========================  ========  ================================================
``writer_not_running``      503       the writer process is not starting or running
``writer_not_writing``      503       rows wait and none was written for
                                      ``stall_limit_secs`` (60 s, or 3 flush intervals)
``exchange_not_receiving``  503       an enabled exchange has no shard running and
                                      receiving (discovering, fatal, disconnected, silent)
``writer_io_errors``        200       the writer's I/O errors grew in the last 5 minutes
                                      (disk full: it keeps the rows in memory and retries)
``symbols_refused``         200       a configured symbol is unknown or inactive on the
                                      exchange, or the exchange refused a subscription
==========================  ========  ================================================

It reads the view (see view.py) and the lock-free counter blocks it refers
to, and nothing else; ``web.py`` serves it, and the status page
(statuspage.py) and ``/metrics`` (metrics.py) reuse its pieces. Lists that
an exchange can make long (symbols it refused) show their first
``LIST_SHOWN`` entries and a count. It imports neither the web layer nor the
supervisor.
"""

from __future__ import annotations

import time

from .clock import clock_note, combine
from .stats import gap_field
from .view import ServiceView, SlotView

LIST_SHOWN = 20  # entries of a list an exchange can make long shown on /health (with the whole count)
IO_ERROR_RECENT_SECS = 300.0  # I/O errors this recent make the service "degraded"
# Every reason /health can give, and whether it is critical (HTTP 503); /metrics has a gauge for each.
REASONS = {
    "writer_not_running": True,
    "writer_not_writing": True,
    "exchange_not_receiving": True,
    "writer_io_errors": False,
    "symbols_refused": False,
}


def first(items, n: int = LIST_SHOWN) -> list:
    """The first ``n`` of ``items`` (a list on /health that an exchange could make long)."""
    return list(items[:n])


def shard_health(entry: SlotView, now: float, stall: float) -> dict:
    stats = entry.stats
    s = stats.as_dict()
    refused = [x for x in entry.note.get().split(",") if x]
    refused_count = max(len(refused), int(s.get("refused_symbols", 0)))  # (the note holds 2 KiB at most)
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
        # connections closed for a bad frame, by kind (mdlogger/wsframes.py)
        "frame_closes": {"oversized": int(s["oversized_closes"]), "protocol_error": int(s["protocol_errors"]),
                         "stalled": int(s["stalled_frames"])},
        "refused_symbols": first(refused),
        "refused_symbols_count": refused_count,
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
        # open tables (mdlogger/writer.py, "Open files")
        "open_tables": int(ws.get("open_tables", 0)),
        "table_cache": int(ws.get("table_cache", 0)),
        "table_opens": int(ws.get("table_opens", 0)),
        "evictions": int(ws.get("evictions", 0)),
        "reopened_tables": int(ws.get("reopened_tables", 0)),
        "fsyncs": int(ws.get("fsyncs", 0)),
    }


def health_document(view: ServiceView, now: float) -> tuple[int, dict]:
    """``(200 or 503, the /health document)`` for ``view`` at wall-clock time ``now``."""
    shards = [shard_health(entry, now, view.stall_timeout_secs) for entry in view.slots]
    ws = view.writer.stats.as_dict()
    writer = writer_health(view, now)
    exchanges = {}
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
            "down_since": _iso(x.down_since) if x.down_since else None,
            "discovery_errors": x.discovery_errors,
            "listing_skipped": dict(x.listing_skipped),
            "symbols": x.symbols,
            "uncovered_symbols": x.uncovered_symbols,
            "refused_symbols": first(x.refused_symbols),
            "refused_symbols_count": len(x.refused_symbols),
            "healthy": ok,
            "shards": len(mine),
            "shards_receiving": sum(1 for s in mine if s["receiving"]),
            "refused_by_reason": reasons,
            "refused_by_exchange": first(refused),
            "refused_by_exchange_count": sum(s["refused_symbols_count"] for s in mine),
            "gaps": exchange_gaps(ws, name, now),
            "clock": exchange_clock(view.slots_of(name), reasons.get("bad_time", 0)),
        }
    degraded = health_reasons(view, now, exchanges, writer)
    critical = any(r["critical"] for r in degraded)
    restarts = {t.name: t.restarts for t in view.threads}
    doc = {
        "status": "degraded" if degraded else "ok",
        "reasons": degraded,
        "uptime_seconds": round(now - view.started, 1),
        "pid": view.pid,
        "exchanges": exchanges,
        "shards": shards,
        "writer": writer,
        "threads": {t.name: {"alive": t.alive, "restarts": t.restarts, "errors": t.errors} for t in view.threads},
        "thread_restarts": sum(restarts.values()),
    }
    return (503 if critical else 200), doc


def health_reasons(view: ServiceView, now: float, exchanges: dict, writer: dict) -> list[dict]:
    """Why the service is degraded: ``[{"reason", "critical", "exchange"?, "detail"}]`` (see REASONS)."""
    out = []

    def add(reason: str, detail: str, exchange: str | None = None) -> None:
        entry = {"reason": reason, "critical": REASONS[reason]}
        if exchange is not None:
            entry["exchange"] = exchange
        entry["detail"] = detail
        out.append(entry)

    w = view.writer
    if writer["state"] not in ("starting", "running"):
        add("writer_not_running", "the writer is %s%s" % (writer["state"], ": " + w.reason if w.reason else ""))
    elif w.stalled_since and now - w.stalled_since >= w.stall_limit_secs:
        add("writer_not_writing", "%d rows waiting, none written for %.0f s" % (writer["pending_rows"],
                                                                                 now - w.stalled_since))
    if w.last_io_error and now - w.last_io_error < IO_ERROR_RECENT_SECS:
        add("writer_io_errors", "%d I/O errors, the last %.0f s ago; %d rows held in memory" % (
            writer["io_errors"], max(0.0, now - w.last_io_error), writer["pending_rows"]))
    for name, x in exchanges.items():
        if not x["healthy"]:
            if x["state"] != "running":
                why = x["state"] + (" since %s" % x["down_since"] if x["down_since"] else "")
                why += (": " + x["error"]) if x["error"] else ""
            else:
                why = "%d of %d shards receiving" % (x["shards_receiving"], x["shards"])
            add("exchange_not_receiving", why, name)
        refused = x["refused_symbols_count"] + x["refused_by_exchange_count"]
        if refused:
            names = (x["refused_symbols"] + x["refused_by_exchange"])[:LIST_SHOWN]
            add("symbols_refused", "%d configured symbols refused: %s%s" % (
                refused, ", ".join(names), " ..." if refused > len(names) else ""), name)
    return out
