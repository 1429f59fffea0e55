"""A small HTTP + RFC 6455 WebSocket server for loopback fake exchanges.

Standard library only. One thread accepts, one thread per connection reads;
sends from any thread are serialized per connection. A fake exchange
subclasses :class:`FakeServer` and implements ``on_http`` and ``on_ws``.
Server frames are not masked; client frames are, and are unmasked here.
Every client frame is recorded with its arrival time so fakes can enforce
the exchange's message-rate limits and check pong payloads.
"""

from __future__ import annotations

import base64
import hashlib
import select
import socket
import struct
import threading
import time
from urllib.parse import parse_qs, urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_H2 = struct.Struct("!BB")
_H4 = struct.Struct("!BBH")
_H10 = struct.Struct("!BBQ")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked server frame."""
    n = len(payload)
    b1 = 0x80 | opcode
    if n < 126:
        return _H2.pack(b1, n) + payload
    if n < 1 << 16:
        return _H4.pack(b1, 126, n) + payload
    return _H10.pack(b1, 127, n) + payload


class ConnectionClosed(Exception):
    pass


class WsConn:
    """The server side of one WebSocket connection."""

    def __init__(self, sock: socket.socket, path: str, query: dict):
        self.sock = sock
        self.path = path
        self.query = query
        self.opened = time.monotonic()
        self.lock = threading.Lock()
        self.closed = False
        self.received: list[tuple[float, int, bytes]] = []  # (monotonic, opcode, payload)
        self.state: dict = {}  # for the fake's own per-connection data
        self._buf = b""

    # -- sending --------------------------------------------------------------
    def send_frames(self, data: bytes) -> None:
        with self.lock:
            if self.closed:
                raise ConnectionClosed()
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed() from exc

    def send_text(self, text) -> None:
        if isinstance(text, str):
            text = text.encode()
        self.send_frames(encode_frame(OP_TEXT, text))

    def send_ping(self, payload: bytes) -> None:
        self.send_frames(encode_frame(OP_PING, payload))

    def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            self.send_frames(encode_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()))
        except ConnectionClosed:
            pass
        self.abort()

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
                ready, _, _ = select.select([self.sock], [], [], timeout)
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

    def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next client frame ``(opcode, payload)``; TimeoutError if none arrives."""
        b1, b2 = self._read(2, timeout)
        opcode = b1 & 0x0F
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2, None))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8, None))[0]
        mask = self._read(4, None) if b2 & 0x80 else b""
        payload = self._read(n, None) if n else b""
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.received.append((time.monotonic(), opcode, payload))
        if opcode == OP_CLOSE:
            self.close(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1000)
            raise ConnectionClosed()
        return opcode, payload


class FakeServer:
    """Accept loop plus hooks. Subclasses implement ``on_http`` and ``on_ws``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        self.host = host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.conns: list[WsConn] = []
        self.conns_lock = threading.Lock()
        self.accepted = 0
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def url_ws(self) -> str:
        return "ws://%s:%d" % (self.host, self.port)

    @property
    def url_http(self) -> str:
        return "http://%s:%d" % (self.host, self.port)

    def start(self) -> "FakeServer":
        self._spawn(self._accept_loop, "fake-accept")
        return self

    def _spawn(self, target, name: str, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def stop(self) -> None:
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
        for conn in self.open_connections():
            conn.abort()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2.0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def open_connections(self) -> list[WsConn]:
        with self.conns_lock:
            return [c for c in self.conns if not c.closed]

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
        except (OSError, ValueError):
            sock.close()
            return
        if request is None:
            sock.close()
            return
        method, target, headers = request
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if headers.get("upgrade", "").lower() == "websocket" and "sec-websocket-key" in headers:
            accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest())
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            conn = WsConn(sock, parts.path, query)
            with self.conns_lock:
                self.conns.append(conn)
            try:
                self.on_ws(conn)
            except ConnectionClosed:
                pass
            finally:
                conn.abort()
            return
        status, extra, body = self.on_http(method, parts.path, query, headers)
        head = "HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n" % (status, _REASONS.get(status, "OK"), len(body))
        head += "".join("%s: %s\r\n" % kv for kv in extra.items())
        try:
            sock.sendall(head.encode() + b"\r\n" + body)
        except OSError:
            pass
        sock.close()

    @staticmethod
    def _read_request(sock: socket.socket):
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
            if len(data) > 65536:
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
    def on_http(self, method: str, path: str, query: dict, headers: dict) -> tuple[int, dict, bytes]:
        return 404, {"Content-Type": "text/plain"}, b"not found"

    def on_ws(self, conn: WsConn) -> None:
        while True:
            conn.recv()


_REASONS = {200: "OK", 404: "Not Found", 418: "I'm a teapot", 429: "Too Many Requests", 500: "Internal Server Error"}
