"""``GET /``: a small status page for a person with a browser.

``status_page(view, now, report)`` renders a published ``ServiceView``
(view.py) and an analytics report (``Analytics.report``): self-contained HTML
(inline CSS and script, nothing fetched from elsewhere), built from the very
``/health`` document (``health.health_document``) and ``/analytics`` report,
so the page and the JSON endpoints always agree. It works without JavaScript
(a ``<noscript>`` meta refresh every 5 s); with it, a small script fetches the
page every 2 s and swaps the ``<main>`` element in place. ``web.py`` serves
it with ``HEADERS``; this module imports neither the web layer nor the
supervisor.
"""

from __future__ import annotations

import html
import math
import time

from .health import health_document
from .view import ServiceView

REFRESH_MS = 2000  # the inline script's period
NOSCRIPT_REFRESH_SECS = 5
MOST_ACTIVE = 10
DASH = "\u2014"

HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    # Inline style and script only; the page talks to nothing but its own origin.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
}

STATE_CLASSES = {"running": "good", "starting": "warn", "backoff": "warn", "discovering": "warn", "fatal": "bad"}

STYLE = """
:root { color-scheme: light; --good: #1a7f37; --warn: #9a6700; --bad: #cf222e; --muted: #57606a; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.2em 2em; color: #1f2328; }
header { display: flex; align-items: baseline; gap: 1.2em; flex-wrap: wrap; border-bottom: 1px solid #d0d7de;
         padding-bottom: .5em; }
h1 { font-size: 1.5em; margin: 0; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.muted, .note { color: var(--muted); }
.badge { font-weight: 600; padding: .1em .6em; border-radius: 1em; color: #fff; }
.badge.ok { background: var(--good); }
.badge.degraded { background: var(--bad); }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .25em .8em; border-bottom: 1px solid #eaeef2; white-space: nowrap; }
th { text-align: left; font-weight: 600; background: #f6f8fa; }
td.num, th.num { text-align: right; }
td.state { font-weight: 600; white-space: normal; max-width: 30em; }
td.good { color: var(--good); }
td.warn { color: var(--warn); }
td.bad { color: var(--bad); }
td.wrap { white-space: normal; max-width: 60em; }
#reasons { margin: .5em 0; padding-left: 1.2em; }
#reasons li.bad { color: var(--bad); }
#reasons li.warn { color: var(--warn); }
#stale { display: none; color: #fff; background: var(--bad); padding: .3em .8em; margin: .5em 0; }
body.stale #stale { display: block; }
"""

# Fetch the page again every REFRESH_MS and swap <main>; a failed fetch shows the "stale" banner.
SCRIPT = """
(function () {
  var period = %d;
  function tick() {
    var ctl = new AbortController();
    var timer = setTimeout(function () { ctl.abort(); }, period * 2);
    fetch(location.href, {cache: "no-store", signal: ctl.signal})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.querySelector("main");
        if (!fresh) throw new Error("no main element");
        document.querySelector("main").replaceWith(document.adoptNode(fresh));
        document.title = doc.title;
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); })
      .finally(function () { clearTimeout(timer); setTimeout(tick, period); });
  }
  setTimeout(tick, period);
})();
""" % REFRESH_MS


# -- formatting ------------------------------------------------------------------------


def esc(value) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def fmt_duration(seconds) -> str:
    """``3d 04h``, ``2h 05m``, ``4m 07s``, ``12s``."""
    if seconds is None:
        return DASH
    s = int(max(0, seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return "%dd %02dh" % (days, hours)
    if hours:
        return "%dh %02dm" % (hours, minutes)
    if minutes:
        return "%dm %02ds" % (minutes, s)
    return "%ds" % s


def fmt_age(seconds) -> str:
    """Seconds since something, or a dash when it never happened."""
    if seconds is None:
        return DASH
    return "%.1f s" % seconds if seconds < 100 else fmt_duration(seconds)


def fmt_count(n) -> str:
    return DASH if n is None else "{:,}".format(int(n))


def fmt_rate(x) -> str:
    return DASH if x is None else "%.1f" % x


def fmt_bytes(n) -> str:
    if n is None:
        return DASH
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024
    return DASH  # not reached


def fmt_price(p) -> str:
    """A price with as many decimals as its size needs: 87,012.35, 3,101.2870, 0.16042."""
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return DASH
    p = float(p)
    a = abs(p)
    if a >= 1000:
        return "{:,.2f}".format(p)
    if a >= 1:
        return "{:,.4f}".format(p)
    return "%.6g" % p


def fmt_interval(seconds: int) -> str:
    """``2 s``, ``1 min``, ``90 s``, ``1 h``."""
    if seconds % 3600 == 0:
        return "%d h" % (seconds // 3600)
    if seconds % 60 == 0:
        return "%d min" % (seconds // 60)
    return "%d s" % seconds


def fmt_clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


# -- pieces ----------------------------------------------------------------------------


def cell(value, cls: str = "num") -> str:
    return '<td class="%s">%s</td>' % (cls, esc(value))


def state_cell(state: str, note: str = "", cls: str = "") -> str:
    cls = cls or STATE_CLASSES.get(state, "warn")
    text = state + (" (%s)" % note if note else "")
    return '<td class="state %s">%s</td>' % (cls, esc(text))


def head_row(*names) -> str:
    """Column titles; a name starting with ``#`` is a number column (right-aligned)."""
    out = []
    for name in names:
        cls = ' class="num"' if name.startswith("#") else ""
        out.append("<th%s>%s</th>" % (cls, esc(name.lstrip("#"))))
    return "<tr>%s</tr>" % "".join(out)


def header_html(doc: dict, now: float) -> str:
    status = doc["status"]
    return (
        "<header><h1>mdlogger</h1>"
        '<span class="badge %s" id="status">%s</span>' % (esc(status), esc(status))
        + '<span id="uptime">up %s</span>' % esc(fmt_duration(doc["uptime_seconds"]))
        + '<span class="muted">pid %s</span>' % esc(doc["pid"])
        + '<span class="muted" id="updated">updated %s UTC</span>' % esc(fmt_clock(now))
        + "</header>"
        + reasons_html(doc.get("reasons") or [])
    )


def reasons_html(reasons: list) -> str:
    """Why the service is degraded, one line each (red: /health answers 503)."""
    if not reasons:
        return ""
    items = []
    for r in reasons:
        where = " (%s)" % r["exchange"] if r.get("exchange") else ""
        items.append('<li class="%s">%s%s: %s</li>' % ("bad" if r.get("critical") else "warn", esc(r["reason"]),
                                                         esc(where), esc(r.get("detail", ""))))
    return '<ul id="reasons">' + "".join(items) + "</ul>"


def shard_state_note(s: dict) -> tuple[str, str]:
    """A note and colour class for a shard's state: a running shard without a connection is not fine."""
    if s["state"] == "running" and not s["connected"]:
        return "disconnected", "warn"
    return "", ""


def symbols_text(s: dict) -> str:
    text = str(s["symbols"])
    if s.get("refused_symbols"):
        more = s.get("refused_symbols_count", 0) - len(s["refused_symbols"])
        text += " (refused: %s%s)" % (", ".join(s["refused_symbols"]), " +%d more" % more if more > 0 else "")
    return text


def names_text(s: dict, shown: int = 6) -> str:
    """The shard's symbols, the first few of them when there are many."""
    names = s.get("symbol_names") or []
    more = len(names) - shown
    return ", ".join(names[:shown]) + (" +%d more" % more if more > 0 else "")


def shard_row(s: dict) -> str:
    return (
        '<tr class="shard" data-exchange="%s" data-shard="%s">' % (esc(s["exchange"]), esc(s["shard"]))
        + cell(s["exchange"], "name")
        + cell(s["shard"])
        + cell(symbols_text(s))
        + state_cell(s["state"], *shard_state_note(s))
        + cell(fmt_rate(s["messages_per_second"]))
        + cell(fmt_age(s["seconds_since_last_message"]))
        + cell(fmt_count(s["reconnects"]))
        + cell(fmt_count(s["restarts"]))
        + cell(names_text(s), "name")
        + "</tr>"
    )


def exchange_row(name: str, x: dict) -> str:
    """An exchange without shards yet (discovering, or failed): one row saying why (and since when)."""
    note = x.get("error") or ""
    if x.get("state") == "discovering" and x.get("down_since"):
        note = "down since %s" % x["down_since"] + ("; " + note if note else "")
    return (
        '<tr class="exchange" data-exchange="%s">' % esc(name)
        + cell(name, "name")
        + cell(DASH)
        + cell(fmt_count(x.get("symbols") or 0))
        + state_cell(x.get("state", "?"), note)
        + cell(DASH) * 4
        + cell("", "name")
        + "</tr>"
    )


def shards_html(doc: dict) -> str:
    rows = [shard_row(s) for s in sorted(doc["shards"], key=lambda s: (s["exchange"], s["shard"]))]
    with_shards = {s["exchange"] for s in doc["shards"]}
    rows += [exchange_row(name, x) for name, x in sorted(doc["exchanges"].items()) if name not in with_shards]
    if not rows:
        rows = ['<tr><td colspan="9" class="note">no exchange enabled</td></tr>']
    return (
        "<h2>Shards</h2><table id=\"shards\">"
        + head_row("exchange", "#shard", "#symbols", "state", "#msgs/s", "#since last msg", "#reconnects", "#restarts",
                   "symbol names")
        + "".join(rows)
        + "</table>"
    )


def writer_html(w: dict) -> str:
    state = w.get("state", "?")
    row = (
        '<tr class="writer" id="writer">'
        + state_cell(state)
        + cell(w.get("pid") or DASH)
        + cell(fmt_count(w.get("rows_written")))
        + cell(fmt_bytes(w.get("bytes_written")))
        + cell(fmt_age(w.get("seconds_since_last_flush")))
        + cell(fmt_bytes(w.get("backlog_bytes")))
        + cell(fmt_count(w.get("restarts")))
        + cell(fmt_count(w.get("io_errors")))
        + "</tr>"
    )
    return (
        "<h2>Writer</h2><table>"
        + head_row("state", "#pid", "#rows written", "#bytes written", "#since last flush", "#backlog",
                   "#restarts", "#io errors")
        + row
        + "</table>"
    )


def fmt_offset(seconds) -> str:
    """A signed clock offset: ``+0.042 s``, ``-12.5 s``, ``+90,000 s``; a dash without samples."""
    if seconds is None:
        return DASH
    a = abs(seconds)
    if a < 10:
        return "%+.3f s" % seconds
    if a < 1000:
        return "%+.1f s" % seconds
    return "{:+,.0f} s".format(seconds)


def pending_text(g: dict) -> str:
    n = g.get("pending", 0)
    age = g.get("oldest_pending_gap_seconds")
    return fmt_count(n) + (" (oldest %s)" % fmt_age(age) if n and age is not None else "")


def gap_row(name: str, x: dict) -> str:
    """One exchange's gaps (detected / filled / unrecoverable / pending), trades backfilled and clock offset."""
    g = x.get("gaps") or {}
    clock = x.get("clock") or {}
    unrecoverable = g.get("unrecoverable", 0)
    row = (
        '<tr class="gaps" data-exchange="%s">' % esc(name)
        + cell(name, "name")
        + cell(fmt_count(g.get("detected", 0)))
        + cell(fmt_count(g.get("filled", 0)))
        + cell(fmt_count(g.get("empty", 0)))
        + cell(fmt_count(unrecoverable), "num bad" if unrecoverable else "num")
        + cell(pending_text(g), "num warn" if g.get("pending") else "num")
        + cell(fmt_count(g.get("trades_backfilled", 0)))
        + cell(fmt_offset(clock.get("offset_p50_secs")), "num bad" if clock.get("note") else "num")
        + "</tr>"
    )
    if clock.get("note"):
        row += ('<tr class="clock-note" data-exchange="%s"><td colspan="8" class="wrap bad">%s: %s</td></tr>'
                % (esc(name), esc(name), esc(clock["note"])))
    return row


def gaps_html(doc: dict) -> str:
    if not doc["exchanges"]:
        return ""
    return (
        "<h2>Gaps and clock</h2><table id=\"gaps\">"
        + head_row("exchange", "#gaps detected", "#filled", "#empty", "#unrecoverable", "#pending",
                   "#trades backfilled", "#clock offset p50")
        + "".join(gap_row(name, x) for name, x in sorted(doc["exchanges"].items()))
        + "</table>"
    )


def most_active(report: dict, n: int = MOST_ACTIVE) -> list[tuple[str, str, dict]]:
    """The ``n`` symbols of ``report`` with most trades in its last complete interval (none without trades)."""
    rows = [(x, s, f["interval"]) for x, syms in report["exchanges"].items() for s, f in syms.items()]
    rows.sort(key=lambda r: -r[2]["trades"])
    return [r for r in rows[:n] if r[2]["trades"]]


def active_rows(report: dict) -> list[dict]:
    """The most active symbols over the report's last complete interval, with last price and today's trades."""
    rows = []
    for exchange, symbol, f in most_active(report):
        figures = report["exchanges"].get(exchange, {}).get(symbol, {})
        rows.append({
            "exchange": exchange,
            "symbol": symbol,
            "last_price": figures.get("last_price"),
            "vwap": f.get("vwap"),
            "trades": f["trades"],
            "today_trades": figures.get("today", {}).get("trades", 0),
        })
    return rows


def active_row(r: dict) -> str:
    return (
        '<tr class="symbol" data-exchange="%s" data-symbol="%s">' % (esc(r["exchange"]), esc(r["symbol"]))
        + cell(r["exchange"], "name")
        + cell(r["symbol"], "name")
        + cell(fmt_price(r["last_price"]))
        + cell(fmt_price(r["vwap"]))
        + cell(fmt_count(r["trades"]))
        + cell(fmt_count(r["today_trades"]))
        + "</tr>"
    )


def active_html(interval_secs: int, rows: list[dict]) -> str:
    title = "<h2>Most active symbols <span class=\"muted\">(last complete %s interval)</span></h2>" % esc(
        fmt_interval(interval_secs))
    if not rows:
        return title + '<p class="note" id="no-trades">no trades in the last complete interval yet</p>'
    return (
        title + '<table id="active">'
        + head_row("exchange", "symbol", "#last price", "#VWAP", "#trades", "#trades today")
        + "".join(active_row(r) for r in rows)
        + "</table>"
    )


def main_html(doc: dict, interval_secs: int, active: list[dict], now: float) -> str:
    return (
        "<main>" + header_html(doc, now) + shards_html(doc) + writer_html(doc["writer"]) + gaps_html(doc)
        + active_html(interval_secs, active) + "</main>"
    )


def render_page(doc: dict, interval_secs: int, active: list[dict], now: float) -> str:
    """The whole page from a ``/health`` document and the most active symbols."""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>mdlogger %s</title>" % esc(doc["status"])
        + "<noscript><meta http-equiv=\"refresh\" content=\"%d\"></noscript>" % NOSCRIPT_REFRESH_SECS
        + "<style>" + STYLE + "</style></head>\n<body>"
        + '<div id="stale">cannot reach the service: the figures below are not current</div>'
        + main_html(doc, interval_secs, active, now)
        + "<script>" + SCRIPT + "</script></body></html>\n"
    )


def status_page(view: ServiceView, now: float, report: dict) -> str:
    """The page for ``view`` at wall-clock time ``now``, with the most active symbols of ``report``."""
    _code, doc = health_document(view, now)
    return render_page(doc, report["interval_secs"], active_rows(report), now)
