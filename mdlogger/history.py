"""REST GETs for the gap backfill, paced by the exchange's shared token bucket.

Every request first takes its cost from the exchange's :class:`SharedBucket`
(shared with the supervisor's discovery and every other backfill thread), so
all callers on this IP together stay inside the exchange's limit. Replies::

    200 + JSON ........................ returned (after the adapter's ``limited`` check)
    429 / 418, or ``limited`` says so . bucket.pause(Retry-After capped at 300 s, or the
                                        adapter's default pause), then retried: nobody
                                        on this exchange sends before the pause ends
    5xx, timeout, connection error .... capped, jittered backoff, then retried
    other status, body over 32 MiB,
    invalid JSON, or ``fatal`` says so  HistoryError (not retryable)
    deadline passed, stop set ......... HistoryDeadline

The adapter's ``after_reply(headers)`` sees every reply and may pause the
bucket too (Binance: used weight near the minute's limit).
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time

import orjson
import requests

from .backoff import Backoff
from .budget import SharedBucket

log = logging.getLogger("mdlogger.history")

MAX_BODY_BYTES = 32 << 20
MAX_RETRY_AFTER_SECS = 300.0
MIN_RATE_LIMIT_PAUSE_SECS = 0.25  # even "Retry-After: 0" does not make a tight loop
BACKOFF_BASE_SECS = 0.5
BACKOFF_CAP_SECS = 30.0
ERROR_BODY_CHARS = 200
CHUNK_BYTES = 64 << 10


class HistoryFailure(Exception):
    """Base of the two ways a history fetch ends without its rows."""


class HistoryError(HistoryFailure):
    """A reply that cannot be used (bad status, oversized or invalid body, no progress): not retryable."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


class HistoryDeadline(HistoryFailure):
    """The deadline passed (or ``stop`` was set) before the fetch was done.

    ``rows``: when raised out of ``Exchange.fetch_history``, the valid rows of
    the window fetched so far (a ``HistoryRows``, ascending), and ``direction``:
    ``"forward"`` (they start right after the ``after`` edge: binance,
    bitfinex, kraken) or ``"backward"`` (they end right before the ``before``
    edge: coinbase, okx). Empty when raised by :meth:`HistoryClient.get`.
    """

    def __init__(self, message: str, stopped: bool = False):
        super().__init__(message)
        self.stopped = stopped
        self.rows: list = []
        self.direction = ""


_RETRYABLE_EXC = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                  requests.exceptions.ContentDecodingError)


def retry_after(headers, now_wall: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), capped at 300; None if absent or unusable."""
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        secs = when.timestamp() - (time.time() if now_wall is None else now_wall)
    if not math.isfinite(secs):
        return None
    return min(MAX_RETRY_AFTER_SECS, max(0.0, secs))


def escaped(body: bytes, limit: int = ERROR_BODY_CHARS) -> str:
    """A short, printable form of a reply body for messages and logs."""
    text = body[: limit * 4].decode("utf-8", "backslashreplace")
    text = text.encode("unicode_escape").decode("ascii")
    return text[:limit] + ("..." if len(text) > limit else "")


class HistoryClient:
    """GETs against one exchange's REST API for ``Exchange.fetch_history``.

    ``adapter``: the exchange's adapter (class or instance), which gives the
    hooks and the default pause (passed in, so this module never imports the
    adapters, which import it). ``session``: a ``requests.Session`` to use
    (default: a new one, closed by :meth:`close`). ``stop``: an Event that ends
    waits early with HistoryDeadline(stopped=True). ``calls`` counts every HTTP
    request made; ``pauses`` every pause this client set on the bucket (rate-limit
    answers and ``after_reply``).
    One client may be used by several threads (requests' Session is, for GETs).
    """

    def __init__(self, adapter, bucket: SharedBucket, timeout: float = 10.0, session=None,
                 stop: threading.Event | None = None, rng=None):
        self.adapter = adapter  # an Exchange (class or instance): limited(), after_reply(), history
        self.exchange = adapter.name
        self.bucket = bucket
        self.timeout = timeout
        self.stop = stop
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = "mdlogger"
        self.session = session
        self.rng = rng
        self.calls = 0
        self.pauses = 0
        self._count_lock = threading.Lock()

    # -- one GET, with the budget, pauses and retries ---------------------------------------------
    def get(self, url: str, params: dict | None = None, cost: float = 1.0, deadline: float | None = None):
        """``(doc, headers)`` of a 200 reply whose body is JSON and not a rate-limit answer.

        ``deadline``: a ``time.monotonic()`` stamp (None: wait as long as it takes).
        """
        backoff = Backoff(BACKOFF_BASE_SECS, BACKOFF_CAP_SECS, self.rng)
        clock = self.bucket.clock
        while True:
            self._check_deadline(deadline, url)
            if not self.bucket.acquire(cost, deadline=deadline, stop=self.stop):
                self._check_deadline(deadline, url)
                raise HistoryDeadline("GET %s: no budget before the deadline" % (url,))
            with self._count_lock:
                self.calls += 1
            timeout = self.timeout if deadline is None else max(0.1, min(self.timeout, deadline - clock()))
            try:
                status, headers, body = self._fetch(url, params, timeout)
            except _RETRYABLE_EXC as exc:
                self._back_off(backoff, "%s" % (exc.__class__.__name__,), url, deadline)
                continue
            pause = self.adapter.after_reply(headers)
            if pause:
                self._pause(pause, "after_reply", url, status)
            doc = _json_or_none(body)
            limit_pause = self.adapter.limited(status, doc, headers) if doc is not _NOT_JSON else None
            if status in (429, 418) or limit_pause is not None:
                wait = retry_after(headers)
                if wait is None:
                    wait = limit_pause if limit_pause is not None else self.adapter.history.default_pause
                wait = max(wait, MIN_RATE_LIMIT_PAUSE_SECS)
                if status == 418:
                    log.error("%s GET %s: HTTP 418, this IP is banned; pausing every caller %.1f s",
                              self.exchange, url, wait)
                self._pause(wait, "HTTP %d rate limit" % status, url, status, body)
                if deadline is not None and clock() + wait > deadline:
                    raise HistoryDeadline("GET %s: rate limited for %.1f s, past the deadline" % (url, wait))
                continue
            reason = self.adapter.fatal(status, doc) if doc is not _NOT_JSON else None
            if reason is not None:
                raise HistoryError("GET %s: HTTP %d: %s" % (url, status, escaped(reason.encode())), status,
                                   escaped(body))
            if status >= 500:
                self._back_off(backoff, "HTTP %d" % status, url, deadline)
                continue
            if status != 200:
                raise HistoryError("GET %s: HTTP %d: %s" % (url, status, escaped(body)), status, escaped(body))
            if doc is _NOT_JSON:
                raise HistoryError("GET %s: invalid JSON: %s" % (url, escaped(body)), status, escaped(body))
            return doc, headers

    def _fetch(self, url, params, timeout):
        resp = self.session.get(url, params=params, timeout=timeout, stream=True)
        try:
            chunks, total = [], 0
            for chunk in resp.iter_content(CHUNK_BYTES):
                total += len(chunk)
                if total > MAX_BODY_BYTES:
                    raise HistoryError("GET %s: body over %d bytes" % (url, MAX_BODY_BYTES), resp.status_code)
                chunks.append(chunk)
            return resp.status_code, resp.headers, b"".join(chunks)
        finally:
            resp.close()

    def _pause(self, seconds: float, why: str, url: str, status: int, body: bytes = b"") -> None:
        with self._count_lock:
            self.pauses += 1
        log.warning("%s GET %s: %s (HTTP %d %s); every caller pauses %.1f s", self.exchange, url, why, status,
                    escaped(body, 80), seconds)
        self.bucket.pause(seconds)

    def _back_off(self, backoff: Backoff, problem: str, url: str, deadline: float | None) -> None:
        delay = backoff.next_delay()
        log.warning("%s GET %s: %s; retrying in %.1f s", self.exchange, url, problem, delay)
        if deadline is not None and self.bucket.clock() + delay > deadline:
            raise HistoryDeadline("GET %s: %s, and no time left to retry" % (url, problem))
        if self.stop is not None:
            if self.stop.wait(delay):
                raise HistoryDeadline("GET %s: stopped" % (url,), stopped=True)
        else:
            time.sleep(delay)

    def _check_deadline(self, deadline: float | None, url: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise HistoryDeadline("GET %s: stopped" % (url,), stopped=True)
        if deadline is not None and self.bucket.clock() >= deadline:
            raise HistoryDeadline("GET %s: deadline passed" % (url,))

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_NOT_JSON = object()


def _json_or_none(body: bytes):
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _NOT_JSON
