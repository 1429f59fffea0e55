"""Headless Chromium driven over the DevTools protocol, for tests that look at a page.

    with Chromium() as browser:
        browser.navigate("http://127.0.0.1:8080/")
        text = browser.evaluate("document.body.innerText")
        png = browser.screenshot()

Chromium runs in its own process group with a throw-away profile; leaving the
``with`` block kills the group and removes the profile.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import websocket

from .waiting import wait_for

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
]


def find_chromium() -> str | None:
    """``$MDLOGGER_CHROMIUM``, else ``chromium`` on PATH."""
    return os.environ.get("MDLOGGER_CHROMIUM") or shutil.which("chromium")


class BrowserError(AssertionError):
    pass


class Chromium:
    def __init__(self, path: str | None = None, width: int = 1200, height: int = 900, timeout: float = 15.0):
        self.path = path or find_chromium()
        if not self.path:
            raise BrowserError("chromium not found (set MDLOGGER_CHROMIUM or run scripts/install-test-deps)")
        self.size = (width, height)
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.ws: websocket.WebSocket | None = None
        self.profile = ""
        self.stderr_path = ""
        self.port = 0
        self._next_id = 0
        self.events: list[dict] = []

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "Chromium":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="mdlogger-chromium-")
        self.stderr_path = os.path.join(self.profile, "stderr.log")
        # stderr goes to a file: chromium may write a lot there, and a pipe nobody drains would stall it.
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [self.path, *FLAGS, "--window-size=%d,%d" % self.size,
                 "--user-data-dir=" + os.path.join(self.profile, "profile"), "--remote-debugging-port=0",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )
        m = self._wait(lambda: re.search(r"DevTools listening on (ws://[^\s]+)", self.stderr_text()),
                       "the DevTools endpoint")
        self.port = int(re.match(r"ws://[^/]+:(\d+)/", m.group(1)).group(1))
        target = self._wait(self._page_target, "a page target")
        # No Origin header: chromium refuses DevTools connections from origins it was not told to allow.
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=self.timeout,
                                              suppress_origin=True)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except (OSError, websocket.WebSocketException):
                pass
            self.ws = None
        if self.proc is not None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(signal.SIGKILL)  # what did not stop, and helpers that outlived the leader
            self.proc.wait(5)
            deadline = time.monotonic() + 5
            while self._signal_group(0) and time.monotonic() < deadline:
                time.sleep(0.02)  # until the helpers are gone too
            self.proc = None
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = ""

    def _signal_group(self, sig: int) -> bool:
        """Signal chromium's process group; False when it has no process left."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    # -- helpers -------------------------------------------------------------------------
    def stderr_text(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def _wait(self, predicate, what: str, timeout: float | None = None):
        def check():
            if self.proc is not None and self.proc.poll() is not None:
                raise BrowserError("chromium exited with %s while waiting for %s; stderr:\n%s"
                                   % (self.proc.returncode, what, self.stderr_text()[-3000:]))
            return predicate()

        return wait_for(check, timeout or self.timeout, 0.05, what,
                        explain=lambda: "chromium stderr:\n%s" % self.stderr_text()[-3000:])

    def _http(self, path: str, method: str = "GET"):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path), method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def _page_target(self):
        pages = [t for t in self._http("/json/list") if t.get("type") == "page"]
        return pages[0] if pages else self._http("/json/new?about:blank", "PUT")

    # -- the protocol ----------------------------------------------------------------
    def call(self, method: str, timeout: float | None = None, **params) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        mid = self._next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("no answer to %s within %.0f s" % (method, timeout or self.timeout))
            self.ws.settimeout(left)
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError("%s failed: %s" % (method, msg["error"]))
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
                del self.events[:-1000]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited), as JSON data."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError("%s: %s" % (details.get("text"), details.get("exception", {}).get("description")))
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float | None = None, what: str = ""):
        """Poll a JavaScript expression until it is truthy; return its value."""
        return self._wait(lambda: self.evaluate(expression), what or expression, timeout)

    def navigate(self, url: str, timeout: float | None = None) -> None:
        """Open ``url`` and wait until it has loaded."""
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError("cannot open %s: %s" % (url, result["errorText"]))
        self.wait_until("location.href === %s && document.readyState === 'complete'" % json.dumps(url),
                        timeout, "%s to load" % url)

    def screenshot(self, full_page: bool = True) -> bytes:
        """A PNG of the page: the whole document when ``full_page``, else the window."""
        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": max(size["width"], 1), "height": max(size["height"], 1),
                                "scale": 1})
        return base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
