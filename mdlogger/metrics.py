"""``GET /metrics``: the service's counters in the Prometheus text format.

``render_metrics(view, now)`` renders a published ``ServiceView`` (view.py):
at scrape time it reads the lock-free counter blocks the workers and the
writer keep in shared memory, so the figures are aggregated across every
process without any process pushing anything. Names follow Prometheus
conventions (``mdlogger_..._total`` for counters, base units). Besides the
view, only the resident memory of each process is looked up (psutil).
``web.py`` serves it; this module imports neither the web layer nor the
supervisor.
"""

from __future__ import annotations

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .health import REASONS, clock_figures, exchange_gaps, health_document
from .view import ServiceView
from .wsframes import FAULT_COUNTERS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceCollector:
    """A one-shot collector: the metrics of one view at one time."""

    def __init__(self, view: ServiceView, now: float):
        self.view = view
        self.now = now

    def collect(self):
        view, now = self.view, self.now
        labels = ["exchange", "shard"]
        c = {
            "messages": CounterMetricFamily("mdlogger_messages", "Data frames received", labels=labels),
            "records": CounterMetricFamily("mdlogger_records", "Records parsed", labels=labels + ["kind"]),
            "refused": CounterMetricFamily("mdlogger_refused_messages", "Messages refused, by reason",
                                           labels=labels + ["reason"]),
            "dropped": CounterMetricFamily("mdlogger_dropped_records", "Records dropped because the writer was behind",
                                           labels=labels),
            "reconnects": CounterMetricFamily("mdlogger_reconnects", "WebSocket reconnects", labels=labels),
            "frame_closes": CounterMetricFamily("mdlogger_frame_closes",
                                                "Connections the worker closed for a bad frame, by kind "
                                                "(oversized, protocol_error, stalled)", labels=labels + ["kind"]),
            "restarts": CounterMetricFamily("mdlogger_restarts", "Worker process restarts", labels=labels),
        }
        connected = GaugeMetricFamily("mdlogger_connected", "1 while the shard's connection is open", labels=labels)
        silence = GaugeMetricFamily("mdlogger_seconds_since_last_message", "Seconds since the shard's last frame",
                                    labels=labels)
        for entry in view.slots:
            s = entry.stats.as_dict()
            lv = [entry.exchange, str(entry.shard)]
            c["messages"].add_metric(lv, s["messages"])
            c["records"].add_metric(lv + ["md"], s["records_md"])
            c["records"].add_metric(lv + ["trades"], s["records_trades"])
            for reason, n in entry.stats.reasons().items():
                c["refused"].add_metric(lv + [reason], n)
            c["dropped"].add_metric(lv, s["dropped_records"])
            c["reconnects"].add_metric(lv, s["reconnects"])
            for kind, field in FAULT_COUNTERS.items():
                c["frame_closes"].add_metric(lv + [kind], s[field])
            c["restarts"].add_metric(lv, entry.restarts)
            connected.add_metric(lv, s["connected"])
            if s["last_message"]:
                silence.add_metric(lv, max(0.0, now - s["last_message"]))
        yield from c.values()
        yield connected
        yield silence
        yield from self._writer(view)
        yield from self._gaps(view, now)
        yield self._clock(view)
        yield self._memory(view)
        yield from self._health(view, now)

    def _health(self, view: ServiceView, now: float):
        """The /health verdict: a gauge per degraded reason, the threads, discovery and refused symbols."""
        _code, doc = health_document(view, now)
        active: dict[str, int] = {}
        for r in doc["reasons"]:
            active[r["reason"]] = active.get(r["reason"], 0) + 1
        degraded = GaugeMetricFamily("mdlogger_health_degraded",
                                     "Conditions making /health degraded, by reason (critical ones answer 503)",
                                     labels=["reason", "critical"])
        for reason, critical in REASONS.items():
            degraded.add_metric([reason, "true" if critical else "false"], active.get(reason, 0))
        yield degraded
        restarts = CounterMetricFamily("mdlogger_thread_restarts", "Supervisor threads found dead and started again",
                                       labels=["thread"])
        errors = CounterMetricFamily("mdlogger_thread_errors", "Failures a supervisor thread caught and retried",
                                     labels=["thread"])
        for t in view.threads:
            restarts.add_metric([t.name], t.restarts)
            errors.add_metric([t.name], t.errors)
        yield restarts
        yield errors
        refused = GaugeMetricFamily("mdlogger_refused_symbols",
                                    "Symbols not captured: refused at discovery (unknown or inactive configured "
                                    "symbols) or by the exchange", labels=["exchange", "by"])
        down = GaugeMetricFamily("mdlogger_exchange_down_seconds",
                                 "Seconds an exchange has been discovering or fatal (0: it has shards)",
                                 labels=["exchange"])
        failures = CounterMetricFamily("mdlogger_discovery_errors", "Failed symbol discovery rounds",
                                       labels=["exchange"])
        skipped = GaugeMetricFamily("mdlogger_listing_skipped",
                                    "Entries of the last symbol listing left out, by reason",
                                    labels=["exchange", "reason"])
        for x in view.exchanges:
            e = doc["exchanges"][x.name]
            refused.add_metric([x.name, "discovery"], e["refused_symbols_count"])
            refused.add_metric([x.name, "exchange"], e["refused_by_exchange_count"])
            down.add_metric([x.name], max(0.0, now - x.down_since) if x.down_since else 0.0)
            failures.add_metric([x.name], x.discovery_errors)
            for reason, n in x.listing_skipped:
                skipped.add_metric([x.name, reason], n)
        yield from (refused, down, failures, skipped)

    def _writer(self, view: ServiceView):
        w = view.writer.stats.as_dict()
        rows = CounterMetricFamily("mdlogger_writer_rows", "Rows written", labels=["table"])
        rows.add_metric(["MD"], w["rows_md"])
        rows.add_metric(["TRADES"], w["rows_trades"])
        yield rows
        yield CounterMetricFamily("mdlogger_writer_written_bytes", "Bytes written to data files", value=w["bytes_written"])
        yield CounterMetricFamily("mdlogger_writer_io_errors", "Failed writes (retried)", value=w["io_errors"])
        last = view.writer.last_io_error
        yield GaugeMetricFamily("mdlogger_writer_seconds_since_io_error",
                                "Seconds since the writer's I/O errors last grew (-1: not since the start)",
                                value=max(0.0, self.now - last) if last else -1)
        yield CounterMetricFamily("mdlogger_writer_duplicate_trades", "Snapshot trades already stored",
                                  value=w["duplicates"])
        yield GaugeMetricFamily("mdlogger_writer_flush_duration_seconds", "Duration of the last flush",
                                value=w["flush_seconds"])
        yield GaugeMetricFamily("mdlogger_writer_queue_backlog_bytes", "Bytes waiting in the worker pipes",
                                value=view.writer.backlog_bytes)
        yield GaugeMetricFamily("mdlogger_writer_pending_rows", "Rows buffered, not yet written", value=w["pending_rows"])
        yield GaugeMetricFamily("mdlogger_writer_held_rows", "Rows held back until a gap before them is filled",
                                value=w.get("held_rows", 0))
        yield CounterMetricFamily("mdlogger_sealed_days", "Day manifests written", value=w.get("sealed_days", 0))
        yield CounterMetricFamily("mdlogger_late_rows", "Rows for a day already sealed (refused)",
                                  value=w.get("late_rows", 0))
        # the writer's open tables (mdlogger/writer.py, "Open files")
        yield GaugeMetricFamily("mdlogger_writer_open_tables", "Tables the writer has open", value=w["open_tables"])
        yield GaugeMetricFamily("mdlogger_writer_table_cache", "Tables the writer keeps open at most (from its "
                                "RLIMIT_NOFILE)", value=w.get("table_cache", 0))
        yield CounterMetricFamily("mdlogger_writer_table_opens", "Tables opened (every column file of each)",
                                  value=w.get("table_opens", 0))
        yield CounterMetricFamily("mdlogger_writer_evictions", "Tables closed to make room for another",
                                  value=w.get("evictions", 0))
        yield CounterMetricFamily("mdlogger_writer_reopened_tables", "Tables opened again after an eviction",
                                  value=w.get("reopened_tables", 0))
        yield CounterMetricFamily("mdlogger_writer_fsyncs", "fsync calls on column files", value=w.get("fsyncs", 0))

    def _gaps(self, view: ServiceView, now: float):
        """Per enabled exchange, what became of the gaps in its trades (the writer's counters)."""
        w = view.writer.stats.as_dict()
        gaps = CounterMetricFamily("mdlogger_gaps", "Gaps in an exchange's trades, by what became of them",
                                   labels=["exchange", "fate"])
        pending = GaugeMetricFamily("mdlogger_gaps_pending", "Gaps being filled", labels=["exchange"])
        backfilled = CounterMetricFamily("mdlogger_trades_backfilled", "Trades fetched over REST and stored",
                                         labels=["exchange"])
        calls = CounterMetricFamily("mdlogger_backfill_rest_calls", "REST requests made to fill gaps",
                                    labels=["exchange"])
        oldest = GaugeMetricFamily("mdlogger_oldest_pending_gap_seconds",
                                   "Seconds since the oldest gap still being filled was detected (0: none)",
                                   labels=["exchange"])
        for name in sorted(x.name for x in view.exchanges):
            g = exchange_gaps(w, name, now)
            for fate in ("detected", "filled", "empty", "unrecoverable"):
                gaps.add_metric([name, fate], g[fate])
            pending.add_metric([name], g["pending"])
            backfilled.add_metric([name], g["trades_backfilled"])
            calls.add_metric([name], g["rest_calls"])
            oldest.add_metric([name], g["oldest_pending_gap_seconds"] or 0.0)
        yield from (gaps, pending, backfilled, calls, oldest)

    def _clock(self, view: ServiceView):
        """Per exchange with samples: local receive time minus the exchange's event time over the last minute."""
        offset = GaugeMetricFamily("mdlogger_clock_offset_seconds",
                                   "Local receive time minus exchange event time (median over shards of each "
                                   "shard's last-minute median; 0.99: the largest shard 99th percentile)",
                                   labels=["exchange", "quantile"])
        by_exchange: dict[str, list] = {}
        for entry in view.slots:
            by_exchange.setdefault(entry.exchange, []).append(entry)
        for name in sorted(by_exchange):
            p50, p99, n = clock_figures(by_exchange[name])
            if n:
                offset.add_metric([name, "0.5"], p50)
                offset.add_metric([name, "0.99"], p99)
        return offset

    def _memory(self, view: ServiceView):
        rss = GaugeMetricFamily("mdlogger_process_resident_memory_bytes", "RSS of each process", labels=["process"])
        procs = [("supervisor", view.pid), ("writer", int(view.writer.stats.get("pid")))]
        procs += [("%s#%d" % (e.exchange, e.shard), int(e.stats.get("pid"))) for e in view.slots]
        for name, pid in procs:
            if not pid:
                continue
            try:
                rss.add_metric([name], psutil.Process(pid).memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return rss


def render_metrics(view: ServiceView, now: float) -> bytes:
    """The Prometheus text exposition of ``view`` at wall-clock time ``now``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(view, now))
    return generate_latest(registry)
