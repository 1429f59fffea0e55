"""REST calls to exchanges: timeouts, retries, and respect for rate limits.

Used by the supervisor (symbol discovery) and the command-line tools;
never from a signal handler or a worker's hot path. Backfill has its own
client (mdlogger/history.py); both spend the exchange's one shared budget.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time

import requests

from .logs import escape

log = logging.getLogger("mdlogger.rest")

RETRY_STATUSES = {429, 418, 500, 502, 503, 504}


class RestError(Exception):
    """A REST call failed after its retries; ``cause`` is what went wrong last, in the words of
    the library that saw it (``Failed to resolve 'api.binance.com' ...``), or ""."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__("%s: %s" % (message, cause) if cause else message)
        self.cause = cause


# requests words a failure as "HTTPSConnectionPool(host=..., port=443): Max retries exceeded with url: ...
# (Caused by NameResolutionError("HTTPSConnection(host=..., port=443): Failed to resolve 'api.binance.com'
# (...)"))": the cause is the innermost part, after the name of the connection it happened on.
_CONNECTION_PREFIX = re.compile(r"^(?:<[^<>]*>|[A-Za-z]+\([^()]*\)): ")


def cause_of(exc: BaseException) -> str:
    """The underlying reason of a requests exception, one escaped line (the urllib3 reason
    when there is one: a name that does not resolve, a refused connection, a read timeout)."""
    reason = exc
    for _ in range(4):  # requests.ConnectionError(MaxRetryError(reason=NameResolutionError(...)))
        inner = getattr(reason, "reason", None)
        if not isinstance(inner, BaseException):
            inner = reason.args[0] if reason.args and isinstance(reason.args[0], BaseException) else None
        if inner is None:
            break
        reason = inner
    try:
        text = str(reason)
    except Exception:  # noqa: BLE001 - a message must never be what fails
        text = ""
    text = _CONNECTION_PREFIX.sub("", text) or type(reason).__name__
    return escape(text, 200)


class RestClient:
    def __init__(self, timeout: float = 10.0, retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 30.0, sleep=time.sleep, bucket=None, cost: float = 1.0):
        self.bucket = bucket  # the exchange's shared REST budget (mdlogger/budget.py), when given
        self.cost = cost
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "mdlogger"

    def get_json(self, url: str, params: dict | None = None):
        attempt = 0
        while True:
            if self.bucket is not None:
                self.bucket.acquire(self.cost)
            try:
                resp = self.session.get(url, params=params, timeout=self.timeout, stream=True)
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem, wait, cause = "%s" % (exc.__class__.__name__,), None, cause_of(exc)
            else:
                if resp.status_code == 200:
                    return _json_body(resp, url)
                if resp.status_code not in RETRY_STATUSES:
                    text = resp.raw.read(200, decode_content=True).decode("utf-8", "replace")
                    raise RestError("GET %s: HTTP %d: %s" % (url, resp.status_code, escape(text)))
                problem, wait, cause = "HTTP %d" % resp.status_code, _retry_after(resp), ""
                if wait is not None and self.bucket is not None and resp.status_code in (418, 429):
                    self.bucket.pause(wait)  # every process of this exchange waits, not only this one
                if resp.status_code == 418:
                    log.error("GET %s: HTTP 418, this IP is banned for now; waiting %s s", url, wait)
            if attempt >= self.retries:
                # the cause is said once, here: the retries' warnings only name the problem
                raise RestError("GET %s: %s after %d attempts" % (url, problem, attempt + 1), cause)
            if wait is None:
                wait = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            log.warning("GET %s: %s; retrying in %.1f s", url, problem, wait)
            self.sleep(wait)
            attempt += 1

    def close(self) -> None:
        self.session.close()


MAX_RETRY_AFTER = 300.0  # an exchange asking for longer (or "inf") is waited this long, then asked again
MAX_BODY_BYTES = 32 << 20  # a listing bigger than this is not a listing


def _retry_after(resp) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        wait = float(value)
    except ValueError:
        return None
    if wait != wait:  # NaN
        return None
    return min(MAX_RETRY_AFTER, max(0.0, wait))


def _json_body(resp, url: str):
    """The reply's JSON, read at most MAX_BODY_BYTES."""
    chunks, size = [], 0
    for chunk in resp.iter_content(1 << 16):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            resp.close()
            raise RestError("GET %s: reply larger than %d bytes" % (url, MAX_BODY_BYTES))
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise RestError("GET %s: invalid JSON: %s" % (url, exc)) from None
