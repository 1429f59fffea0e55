"""A small HTTP + RFC 6455 WebSocket server for loopback fake exchanges.

Standard library only, nothing exchange-specific. Design:

* :class:`FakeServer` binds 127.0.0.1 (port 0 = ephemeral), accepts in one
  daemon thread and serves each connection in its own daemon thread. It reads
  one HTTP request head; a WebSocket upgrade gets ``101`` plus a
  :class:`WsConn` handed to the ``on_ws(conn)`` hook (the request path and
  query are ``conn.path`` / ``conn.query``), anything else goes to
  ``on_http(method, path, query, headers) -> (status, headers, body)`` and is
  answered with a ``Connection: close`` HTTP/1.1 response. Before a
  WebSocket upgrade is accepted, ``upgrade_answer(path, query, headers)`` may
  return an HTTP answer instead (a refused upgrade, e.g. 503).
* :class:`WsConn` is the server side of one WebSocket. Sends from any thread
  are serialized by a per-connection lock and written with one ``sendall``;
  :func:`encode_frame` lets a fake pre-encode thousands of frames into one
  blob for firehose rates. Server frames are never masked.
* Hostile servers exist (a broken exchange, a man in the middle): :func:`raw_frame` builds any
  frame header, valid or not (RSV bits, masks, a length that is not the payload's, fragments),
  and :meth:`WsConn.hijack` takes a connection away from the fake so a test can write raw bytes
  on it (:meth:`WsConn.send_raw`) or drip them (:meth:`WsConn.drip`) with nothing else interleaved.
* ``WsConn.recv`` unmasks client frames (unmasked client frames are a
  protocol error, 1002), joins fragmented messages, answers pings with pongs
  (unless the server is ``silent()``), answers a close with a close, and
  records every client frame, control frames included, with its monotonic
  arrival time in ``conn.received`` so fakes can enforce message-rate limits
  and check pong payloads.
"""

from __future__ import annotations

import base64
import hashlib
import http
import socket
import struct
import threading
import time
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from ..polling import readable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
MAX_MESSAGE = 16 << 20  # largest client message accepted (close 1009 beyond)
MAX_REQUEST_HEAD = 65536
_H2 = struct.Struct("!BB")
_H4 = struct.Struct("!BBH")
_H10 = struct.Struct("!BBQ")


def frame_header(opcode: int, length: int) -> bytes:
    """The header of one final, unmasked server frame of ``length`` payload bytes."""
    b1 = 0x80 | opcode
    if length < 126:
        return _H2.pack(b1, length)
    if length < 1 << 16:
        return _H4.pack(b1, 126, length)
    return _H10.pack(b1, 127, length)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked server frame (7-, 16- or 64-bit length)."""
    return frame_header(opcode, len(payload)) + payload


def raw_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, mask: bytes | None = None,
              length: int | None = None, length_bits: int | None = None) -> bytes:
    """Any frame, RFC 6455 or not: ``rsv`` (0-7) goes in the RSV bits, ``mask`` (4 bytes) masks the
    payload and sets the MASK bit, ``length`` announces a length other than the payload's (a header
    promising more than follows), ``length_bits`` (7, 16 or 64) forces the length encoding."""
    n = len(payload) if length is None else length
    if length_bits is None:
        length_bits = 7 if n < 126 else 16 if n < 1 << 16 else 64
    b1 = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F
    m = 0x80 if mask is not None else 0
    if length_bits == 7:
        head = _H2.pack(b1, m | n)
    elif length_bits == 16:
        head = _H4.pack(b1, m | 126, n)
    else:
        head = _H10.pack(b1, m | 127, n)
    if mask is not None:
        return head + mask + unmask(payload, mask)
    return head + payload


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client payload with its 4-byte mask (as one big integer: fast in CPython)."""
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def accept_key(sec_websocket_key: str) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(sec_websocket_key.encode() + GUID).digest())


class ConnectionClosed(Exception):
    """The WebSocket is closed (by either side) or its socket failed."""


class ProtocolError(ConnectionClosed):
    """The client broke RFC 6455; the connection was closed with ``code``."""

    def __init__(self, code: int, reason: str):
        super().__init__("%d %s" % (code, reason))
        self.code = code
        self.reason = reason


class WsConn:
    """The server side of one WebSocket connection.

    ``state`` is free for the fake's own per-connection data; ``received`` holds
    ``(monotonic, opcode, payload)`` for every client frame; ``quiet`` is a
    callable telling whether automatic pongs are suppressed right now.
    """

    def __init__(self, sock: socket.socket, path: str, query: dict, quiet: Callable[[], bool] | None = None):
        self.sock = sock
        self.path = path
        self.query = query
        self.quiet = quiet or (lambda: False)
        self.opened = time.monotonic()
        self.lock = threading.Lock()
        self.closed = False
        self.hijacked = False  # see hijack()
        self.close_code: int | None = None  # the code of the close frame we sent, if any
        self.received: list[tuple[float, int, bytes]] = []
        self.state: dict = {}
        self._buf = b""
        self._partial: tuple[int, list[bytes]] | None = None  # (opcode, fragments) of a message in progress

    # -- sending --------------------------------------------------------------
    def send_frames(self, data: bytes) -> None:
        """Write pre-encoded frames with one ``sendall``; ConnectionClosed if the socket is gone."""
        with self.lock:
            if self.closed:
                raise ConnectionClosed()
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed() from exc

    def send_text(self, text) -> None:
        """One text frame (``str`` is UTF-8 encoded, ``bytes`` sent as they are)."""
        if isinstance(text, str):
            text = text.encode()
        self.send_frames(encode_frame(OP_TEXT, text))

    def send_ping(self, payload: bytes) -> None:
        """One ping frame (payload at most 125 bytes)."""
        self.send_frames(encode_frame(OP_PING, payload))

    def send_pong(self, payload: bytes) -> None:
        """One pong frame."""
        self.send_frames(encode_frame(OP_PONG, payload))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (if still possible), then drop the TCP connection."""
        if self.close_code is None:
            self.close_code = code
        frame = encode_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:123])
        with self.lock:
            was_closed, self.closed = self.closed, True  # closed before the frame leaves: whoever reads it
            if not was_closed:                           # finds the connection gone from open_connections()
                try:
                    self.sock.sendall(frame)
                except OSError:
                    pass
        self.abort()

    def hijack(self) -> "WsConn":
        """Take this connection away from the fake: from now on it counts as closed for the fake's
        own sends (trades, pongs, keepalives), and only :meth:`send_raw` / :meth:`drip` write on it.
        Client frames are still read (a close from the client ends it). Returns self."""
        with self.lock:
            self.closed = True
            self.hijacked = True
        return self

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are on a hijacked connection; ConnectionClosed once the socket is gone."""
        with self.lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise ConnectionClosed() from exc

    def drip(self, data: bytes, interval: float, stop: threading.Event | None = None) -> int:
        """Write ``data`` one byte every ``interval`` seconds on a hijacked connection, until all is
        sent, the socket is gone or ``stop`` is set; returns the bytes sent. Blocks: run it in a thread."""
        stop = stop or threading.Event()
        for i in range(len(data)):
            if stop.is_set():
                return i
            try:
                self.send_raw(data[i:i + 1])
            except ConnectionClosed:
                return i
            stop.wait(interval)
        return len(data)

    def half_close(self) -> None:
        """End the connection without a close frame: no more sends; everything already
        sent reaches the client, then EOF (TCP FIN). The reader thread ends when the
        client closes its side."""
        with self.lock:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        with self.lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    # -- receiving ----------------------------------------------------------------
    def _read(self, n: int, timeout: float | None) -> bytes:
        while len(self._buf) < n:
            if timeout is not None:
                if self.sock.fileno() < 0:  # closed socket
                    raise ConnectionClosed()
                ready = readable([self.sock], timeout)
                if not ready:
                    raise TimeoutError()
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                raise ConnectionClosed() from exc
            if not chunk:
                raise ConnectionClosed()
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _fail(self, code: int, reason: str) -> ProtocolError:
        self.close(code, reason)
        return ProtocolError(code, reason)

    def _read_frame(self, timeout: float | None) -> tuple[bool, int, bytes]:
        """One client frame: (fin, opcode, unmasked payload), recorded in ``received``."""
        b1, b2 = self._read(2, timeout)
        fin, opcode, n = bool(b1 & 0x80), b1 & 0x0F, b2 & 0x7F
        if not b2 & 0x80:
            raise self._fail(1002, "client frames must be masked")
        if b1 & 0x70:
            raise self._fail(1002, "reserved bits set")
        if opcode in CONTROL_OPCODES and (n > 125 or not fin):
            raise self._fail(1002, "bad control frame")
        if n == 126:
            n = struct.unpack("!H", self._read(2, None))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8, None))[0]
        if n > MAX_MESSAGE:
            raise self._fail(1009, "message too big")
        mask = self._read(4, None)
        payload = unmask(self._read(n, None), mask) if n else b""
        self.received.append((time.monotonic(), opcode, payload))
        return fin, opcode, payload

    def read_frame(self, timeout: float | None = None) -> tuple[bool, int, bytes]:
        """The next client frame as it came, ``(fin, opcode, unmasked payload)``: nothing answered or
        joined (for tests that check every frame a client sent, pongs and closes included)."""
        return self._read_frame(timeout)

    def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next client message or control frame ``(opcode, payload)``.

        Fragments are joined (the first frame's opcode is returned). Pings are
        answered automatically and returned too. A close frame is answered and
        raises ConnectionClosed. TimeoutError if nothing starts arriving within
        ``timeout`` seconds (None waits forever).
        """
        while True:
            fin, opcode, payload = self._read_frame(timeout if self._partial is None else None)
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1000
                self.close(code)
                raise ConnectionClosed()
            if opcode in CONTROL_OPCODES:
                if opcode == OP_PING and not self.quiet():
                    self.send_pong(payload)
                return opcode, payload
            message = self._assemble(fin, opcode, payload)
            if message is not None:
                return message

    def _assemble(self, fin: bool, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        """Join data frames into a message; None while fragments are still due."""
        if (opcode == OP_CONT) != (self._partial is not None):
            raise self._fail(1002, "unexpected continuation frame" if opcode == OP_CONT else "expected continuation")
        if self._partial is None:
            if fin:
                return opcode, payload
            self._partial = (opcode, [payload])
            return None
        first_opcode, parts = self._partial
        parts.append(payload)
        if sum(map(len, parts)) > MAX_MESSAGE:
            raise self._fail(1009, "message too big")
        if not fin:
            return None
        self._partial = None
        return first_opcode, b"".join(parts)


class FakeServer:
    """Listener, accept loop and per-connection threads. Subclasses implement ``on_http`` and ``on_ws``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        self.host = host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.conns: list[WsConn] = []  # every WebSocket ever accepted, open or not
        self.conns_lock = threading.Lock()
        self.accepted = 0  # TCP connections accepted (HTTP and WebSocket)
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def url_ws(self) -> str:
        """``ws://127.0.0.1:<port>`` (no path)."""
        return "ws://%s:%d" % (self.host, self.port)

    @property
    def url_http(self) -> str:
        """``http://127.0.0.1:<port>`` (no path)."""
        return "http://%s:%d" % (self.host, self.port)

    def start(self) -> "FakeServer":
        """Start accepting; returns self."""
        self._spawn(self._accept_loop, "fake-accept")
        return self

    def _spawn(self, target, name: str, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        with self._threads_lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        return t

    def stop(self) -> None:
        """Close the listener and every connection, join the threads. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:  # half-closed ones too: their reader threads must end
            conn.abort()
        with self._threads_lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(2.0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def open_connections(self) -> list[WsConn]:
        """The WebSocket connections not closed yet."""
        with self.conns_lock:
            return [c for c in self.conns if not c.closed]

    def silent(self) -> bool:
        """Whether the server sends nothing at all right now (automatic pongs included)."""
        return False

    # -- plumbing --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.accepted += 1
            self._spawn(self._serve, "fake-conn", sock)

    def _serve(self, sock: socket.socket) -> None:
        try:
            request = self._read_request(sock)
        except (OSError, ValueError, UnicodeDecodeError):
            request = None
        if request is None:
            sock.close()
            return
        method, target, headers = request
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if headers.get("upgrade", "").lower() == "websocket" and "sec-websocket-key" in headers:
            refusal = self.upgrade_answer(parts.path, query, headers)
            if refusal is not None:
                self._send_http(sock, method, *refusal)
                return
            self._serve_ws(sock, parts.path, query, headers["sec-websocket-key"])
        else:
            self._serve_http(sock, method, parts.path, query, headers)

    def _serve_ws(self, sock: socket.socket, path: str, query: dict, key: str) -> None:
        try:
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
            )
        except OSError:
            sock.close()
            return
        conn = WsConn(sock, path, query, quiet=self.silent)
        with self.conns_lock:
            self.conns.append(conn)
        try:
            self.on_ws(conn)
        except ConnectionClosed:
            pass
        finally:
            conn.abort()

    def _serve_http(self, sock: socket.socket, method: str, path: str, query: dict, headers: dict) -> None:
        self._send_http(sock, method, *self.on_http(method, path, query, headers))

    @staticmethod
    def _send_http(sock: socket.socket, method: str, status: int, extra: dict, body: bytes) -> None:
        head = "HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n" % (status, _reason(status), len(body))
        head += "".join("%s: %s\r\n" % kv for kv in extra.items())
        try:
            sock.sendall(head.encode("latin-1") + b"\r\n" + (body if method != "HEAD" else b""))
        except OSError:
            pass
        sock.close()

    @staticmethod
    def _read_request(sock: socket.socket):
        """``(method, target, headers)`` from a request head (lower-case header names), None on EOF."""
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
            if len(data) > MAX_REQUEST_HEAD:
                raise ValueError("request head too large")
        sock.settimeout(None)
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return method, target, headers

    # -- hooks --------------------------------------------------------------------------
    def upgrade_answer(self, path: str, query: dict, headers: dict) -> tuple[int, dict, bytes] | None:
        """None to accept a WebSocket upgrade, or the HTTP answer ``(status, headers, body)`` refusing it."""
        return None

    def on_http(self, method: str, path: str, query: dict, headers: dict) -> tuple[int, dict, bytes]:
        """Answer a plain HTTP request: ``(status, headers, body)``."""
        return 404, {"Content-Type": "text/plain"}, b"not found"

    def on_ws(self, conn: WsConn) -> None:
        """Serve one WebSocket until it ends (raising ConnectionClosed is fine)."""
        while True:
            conn.recv()


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
