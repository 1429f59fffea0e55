"""Our RFC 6455 frame reader (mdlogger/wsframes.py) on real loopback sockets.

1. Differential: Hypothesis builds byte streams of server frames (every length encoding, fragments,
   control frames between fragments, a close or a plain end) and cuts them into arbitrary recv
   sizes; our reader and websocket-client's own frame parser read the same bytes over real TCP
   connections and must give the same messages, the same pongs and the same close code.
2. Bad frames: each rule the reader enforces gives its close code, its counter and its exception;
   an oversized frame is refused from its header, without its payload being read; a frame that
   stalls or drips ends after the deadline; what the reader holds stays under the limit plus a chunk.
3. A worker against the loopback Binance fake (hostile frames written on a hijacked connection): it
   closes, counts, reconnects and goes on storing trades; then the real service, whose worker keeps
   its pid and whose rows are exactly the trades sent.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading

import pytest
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdlogger import records as rec
from mdlogger import wsframes
from mdlogger.exchanges.base import SymbolInfo
from mdlogger.fakes.binance import FakeBinance
from mdlogger.fakes.wsserver import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, ConnectionClosed,
                                     WsConn, raw_frame)
from mdlogger.frames import ConnectionLost
from mdlogger.reader import read_rows
from mdlogger.stats import WORKER_FIELDS, Block, Note
from mdlogger.transport import FrameReader as PipeReader
from mdlogger.worker import Worker, WorkerSpec
from mdlogger.wsframes import (CHUNK, FrameStalled, FrameTooLarge, ProtocolError, WsReader)

from helpers import (SPECS, all_subscribed, assert_tables_whole, fake_settings, service, service_config, today,
                     wait_for)

LIMIT = 1 << 20


# -- real sockets ---------------------------------------------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (client, server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


class CutSocket:
    """A real socket whose reads are cut at given sizes (cycled): each recv asks the kernel for at most
    the next size, so a reader meets frames split at those boundaries."""

    def __init__(self, sock: socket.socket, cuts):
        self.sock = sock
        self.cuts = list(cuts) or [1 << 20]
        self.i = 0

    def _cut(self, n: int) -> int:
        cut = self.cuts[self.i % len(self.cuts)]
        self.i += 1
        return min(n, cut)

    def recv(self, n):  # (websocket-client's reads)
        return self.sock.recv(self._cut(n))

    def recv_into(self, buffer, nbytes: int = 0):  # (our reader's)
        return self.sock.recv_into(buffer, self._cut(nbytes or len(buffer)))

    def __getattr__(self, name):
        return getattr(self.sock, name)


def client_ws(sock, timeout: float = 5.0) -> websocket.WebSocket:
    """websocket-client's object on an already open socket, as after its handshake."""
    ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=False)
    ws.sock = sock
    ws.connected = True
    ws.settimeout(timeout)
    return ws


def send_in_thread(sock: socket.socket, data: bytes, end: bool = True) -> threading.Thread:
    def run():
        try:
            sock.sendall(data)
            if end:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reader closed first (a bad frame): what it did not read does not matter

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


READ_BACK_SECS = 30.0  # a safety net only: reading back ends at the client's FIN, which comes at once


def client_frames(server: socket.socket, client: socket.socket | None = None) -> list[tuple[int, bytes]]:
    """Every frame the client sent (unmasked), read on the server side until the client's end (``client``,
    if given, is shut for writing first: a FIN, never the RST a close with unread data would send).

    The reads block on the socket itself (its own timeout as a safety net), never a ``select``: select()
    cannot watch a descriptor above 1023, which a socket gets in a long test run that holds many files,
    and its ValueError, like a timeout or a reset, used to end the reading silently, losing frames the
    client did send. Only the client's FIN ends the reading; anything else fails the test."""
    if client is not None:
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    server.settimeout(READ_BACK_SECS)
    conn = WsConn(server, "/", {})
    out = []
    while True:
        try:
            out.append(conn.read_frame()[1:])
        except ConnectionClosed as exc:
            if type(exc) is not ConnectionClosed or exc.__cause__ is not None:
                raise AssertionError("reading back the client's frames failed after %r: %r (cause %r)"
                                     % (out, exc, exc.__cause__)) from exc
            return out  # the client's FIN


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


# -- 1. differential against websocket-client -------------------------------------------------------------

SIZES = st.one_of(st.integers(0, 125), st.integers(126, 400), st.integers(65530, 65541), st.just(70_000))


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@st.composite
def streams(draw):
    """(bytes of a valid server stream, recv cut sizes, how it ends)."""
    frames = []
    seed = draw(st.integers(0, 1 << 30))

    def control():
        op = draw(st.sampled_from([OP_PING, OP_PONG]))
        frames.append(raw_frame(op, payload(seed + len(frames), draw(st.integers(0, 125)))))

    def encoding(n):
        choices = [None, None, None, 64] + ([16] if n < 1 << 16 else [])
        return draw(st.sampled_from(choices))  # None: the minimal one; else non-minimal, as senders may

    for _ in range(draw(st.integers(0, 5))):
        for _ in range(draw(st.integers(0, 2))):
            control()
        op = draw(st.sampled_from([OP_TEXT, OP_TEXT, OP_BINARY]))
        sizes = draw(st.lists(SIZES, min_size=1, max_size=4))
        for i, n in enumerate(sizes):
            last = i == len(sizes) - 1
            frames.append(raw_frame(op if i == 0 else OP_CONT, payload(seed + len(frames), n), fin=last,
                                    length_bits=encoding(n)))
            if not last:
                for _ in range(draw(st.integers(0, 2))):
                    control()
    ending = draw(st.sampled_from(["eof", "close", "close without code"]))
    if ending == "close":
        code = draw(st.sampled_from([1000, 1001, 1011, 1013, 3000, 4999]))
        frames.append(raw_frame(OP_CLOSE, struct.pack("!H", code) + b"bye"))
    elif ending == "close without code":
        frames.append(raw_frame(OP_CLOSE))
    cuts = draw(st.lists(st.one_of(st.integers(1, 16), st.integers(1, 3000), st.integers(1, 80_000)),
                         min_size=1, max_size=12))
    data = b"".join(frames)
    floor = len(data) // 2000  # (a big stream in tiny reads would take long; small streams meet every cut)
    return data, [max(cut, floor) for cut in cuts], ending


def read_ours(data: bytes, cuts) -> tuple[list, list, str]:
    client, server = tcp_pair()
    messages = []
    try:
        reader = WsReader(client_ws(CutSocket(client, cuts)), LIMIT, on_binary=lambda d: messages.append((OP_BINARY, d)))
        sender = send_in_thread(server, data)
        try:
            for message in reader.messages:
                if message is not None:
                    messages.append((OP_TEXT, message))
        except ConnectionLost as exc:
            end = str(exc)
        sender.join()
        sent = client_frames(server, client)
    finally:
        client.close()
        server.close()
    return messages, sent, end


def read_theirs(data: bytes, cuts) -> tuple[list, list, int | None]:
    client, server = tcp_pair()
    messages = []
    code = None
    try:
        ws = client_ws(CutSocket(client, cuts))
        sender = send_in_thread(server, data)
        try:
            while True:
                opcode, frame = ws.recv_data_frame(control_frame=True)
                if opcode in (OP_TEXT, OP_BINARY):
                    messages.append((opcode, bytes(frame.data)))
                elif opcode == OP_CLOSE:
                    code = close_code(frame.data) or "no code"
                    break
        except websocket.WebSocketConnectionClosedException:
            code = "eof"
        sender.join()
        sent = client_frames(server, client)
    finally:
        client.close()
        server.close()
    return messages, sent, code


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(streams())
def test_our_reader_reads_what_websocket_client_reads(stream):
    data, cuts, ending = stream
    ours, our_sent, our_end = read_ours(data, cuts)
    theirs, their_sent, their_code = read_theirs(data, cuts)
    assert ours == theirs
    pongs = [p for op, p in our_sent if op == OP_PONG]
    assert pongs == [p for op, p in their_sent if op == OP_PONG]  # every ping answered with its payload
    assert len(pongs) == sum(1 for _ in iter_pings(data))
    if ending == "eof":
        assert their_code == "eof" and "without a close frame" in our_end
    else:
        assert our_end.startswith("closed by the exchange: ")
        if their_code == "no code":
            assert our_end.endswith("no code")
            assert our_sent[-1] == (OP_CLOSE, struct.pack("!H", 1000))  # a close without a code: 1000
        else:
            assert our_end.startswith("closed by the exchange: code %d bye" % their_code)
            assert our_sent[-1] == (OP_CLOSE, struct.pack("!H", their_code))  # the code echoed


def test_the_close_echo_is_read_back_on_a_socket_above_fd_setsize():
    """A long run (the whole suite in one worker) holds many files, and a socket then gets a descriptor
    above 1023, which select() refuses: the read-back used to end there without a word, so the close our
    reader had echoed looked never sent (IndexError on the frames sent). Both ends of the pair are put
    above 1023 here; the close and a pong must be read back all the same."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("RLIMIT_NOFILE hard limit %d: no descriptor above 1023 to be had" % hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    held = []
    base = os.open(os.devnull, os.O_RDONLY)
    try:
        while not held or held[-1] < 1024:  # the lowest free descriptors, until every one below 1024 is taken
            held.append(os.dup(base))
        data = raw_frame(OP_PING, b"above") + raw_frame(OP_CLOSE, struct.pack("!H", 1001) + b"bye")
        client, server = tcp_pair()
        try:
            assert client.fileno() >= 1024 and server.fileno() >= 1024
            reader = WsReader(client_ws(client), LIMIT)
            send_in_thread(server, data).join()
            messages, exc, _ = read_until_lost(reader)
            assert messages == [] and str(exc) == "closed by the exchange: code 1001 bye"
            sent = client_frames(server, client)
        finally:
            client.close()
            server.close()
    finally:
        for fd in held:
            os.close(fd)
        os.close(base)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert sent == [(OP_PONG, b"above"), (OP_CLOSE, struct.pack("!H", 1001))]


def iter_pings(data: bytes):
    """The pings of a valid stream (walks the headers)."""
    pos = 0
    while pos < len(data):
        b1, n = data[pos], data[pos + 1] & 0x7F
        start = pos + 2
        if n == 126:
            n, start = struct.unpack_from("!H", data, pos + 2)[0], pos + 4
        elif n == 127:
            n, start = struct.unpack_from("!Q", data, pos + 2)[0], pos + 10
        if b1 & 0x0F == OP_PING:
            yield data[start:start + n]
        pos = start + n


# -- 2. bad frames, deadlines, memory ---------------------------------------------------------------------

class Faults:
    def __init__(self):
        self.seen = []

    def __call__(self, kind, sample):
        self.seen.append((kind, sample))


def read_until_lost(reader: WsReader):
    """Read messages until the connection ends; returns (messages, the exception, Nones yielded)."""
    messages, nones = [], 0
    try:
        for message in reader.messages:
            if message is None:
                nones += 1
            else:
                messages.append(message)
    except ConnectionLost as exc:
        return messages, exc, nones
    raise AssertionError("the generator ended without a reason")


TEXT = raw_frame(OP_TEXT, b'{"ok":1}')
BAD = [
    # (what, bytes after a good text frame, exception, close code, websocket-client refuses it too)
    ("masked server frame", raw_frame(OP_TEXT, b"hello", mask=b"abcd"), ProtocolError, 1002, False),
    ("RSV1", raw_frame(OP_TEXT, b"x", rsv=4), ProtocolError, 1002, True),
    ("RSV2", raw_frame(OP_TEXT, b"x", rsv=2), ProtocolError, 1002, True),
    ("RSV3", raw_frame(OP_BINARY, b"x", rsv=1), ProtocolError, 1002, True),
    ("opcode 3", raw_frame(3, b"x"), ProtocolError, 1002, True),
    ("opcode 7", raw_frame(7, b""), ProtocolError, 1002, True),
    ("opcode 0xB", raw_frame(0xB, b"x"), ProtocolError, 1002, True),
    ("opcode 0xF", raw_frame(0xF, b"x"), ProtocolError, 1002, True),
    ("ping of 126 bytes", raw_frame(OP_PING, b"p" * 126), ProtocolError, 1002, True),
    ("ping with a 16-bit length", raw_frame(OP_PING, b"p", length_bits=16), ProtocolError, 1002, False),
    ("fragmented ping", raw_frame(OP_PING, b"p", fin=False), ProtocolError, 1002, True),
    ("fragmented close", raw_frame(OP_CLOSE, b"\x03\xe8", fin=False), ProtocolError, 1002, False),
    ("close of one byte", raw_frame(OP_CLOSE, b"\x03"), ProtocolError, 1002, True),
    ("close code 1005", raw_frame(OP_CLOSE, struct.pack("!H", 1005)), ProtocolError, 1002, True),
    ("close code 999", raw_frame(OP_CLOSE, struct.pack("!H", 999)), ProtocolError, 1002, True),
    ("close code 2000", raw_frame(OP_CLOSE, struct.pack("!H", 2000)), ProtocolError, 1002, True),
    ("64-bit length, top bit set", struct.pack("!BBQ", 0x81, 127, 1 << 63), ProtocolError, 1002, False),
    ("continuation without a start", raw_frame(OP_CONT, b"x"), ProtocolError, 1002, True),
    ("text inside a fragmented message", raw_frame(OP_TEXT, b"a", fin=False) + raw_frame(OP_TEXT, b"b"),
     ProtocolError, 1002, True),
    ("binary inside a fragmented message", raw_frame(OP_TEXT, b"a", fin=False) + raw_frame(OP_BINARY, b"b"),
     ProtocolError, 1002, True),
    ("600 MiB announced, nothing follows", raw_frame(OP_TEXT, length=600 << 20), FrameTooLarge, 1009, False),
    ("limit + 1 with a 64-bit length", raw_frame(OP_TEXT, length=LIMIT + 1, length_bits=64), FrameTooLarge, 1009,
     False),
    ("binary over the limit", raw_frame(OP_BINARY, length=LIMIT + 1), FrameTooLarge, 1009, False),
    ("fragments passing the limit", raw_frame(OP_TEXT, b"a" * 1000, fin=False) + raw_frame(OP_PING, b"p")
     + raw_frame(OP_CONT, length=LIMIT - 999), FrameTooLarge, 1009, False),
]


@pytest.mark.parametrize("what, bad, exc_type, code, theirs_too", BAD, ids=[b[0] for b in BAD])
def test_each_bad_frame_closes_with_its_code_and_is_counted_once(what, bad, exc_type, code, theirs_too):
    client, server = tcp_pair()
    faults = Faults()
    try:
        reader = WsReader(client_ws(client), LIMIT, on_fault=faults)
        send_in_thread(server, TEXT + bad, end=False)  # the connection stays open: the reader must act alone
        messages, exc, _ = read_until_lost(reader)
        assert messages == [b'{"ok":1}']
        assert type(exc) is exc_type and exc.code == code
        assert faults.seen == [(exc_type.kind, faults.seen[0][1])] and faults.seen[0][1]
        assert reader.ended is exc
        reader.close()  # nothing more is sent, nothing is awaited
        sent = client_frames(server, client)
    finally:
        client.close()
        server.close()
    assert [(op, close_code(p)) for op, p in sent if op != OP_PONG] == [(OP_CLOSE, code)]  # (pongs: pings answered)
    if code == 1009:
        assert reader.peak < 64 << 10  # the header was enough: no payload was awaited or held
    if theirs_too:  # websocket-client's parser refuses the same bytes
        client, server = tcp_pair()
        try:
            ws = client_ws(client)
            send_in_thread(server, TEXT + bad, end=False)
            assert ws.recv_data_frame()[1].data == b'{"ok":1}'
            with pytest.raises(websocket.WebSocketProtocolException):
                while True:
                    ws.recv_data_frame(control_frame=True)
        finally:
            client.close()
            server.close()


def test_an_oversized_frame_followed_by_its_payload_is_refused_holding_at_most_a_chunk():
    client, server = tcp_pair()
    faults = Faults()
    try:
        reader = WsReader(client_ws(client), LIMIT, on_fault=faults)
        # 8 MiB of the payload of a 600 MiB frame follow its header (the socket buffers are full of it)
        t = send_in_thread(server, raw_frame(OP_TEXT, length=600 << 20) + bytes(8 << 20), end=False)
        _, exc, _ = read_until_lost(reader)
        assert isinstance(exc, FrameTooLarge) and "629145600 bytes" in str(exc)
        assert reader.peak <= LIMIT + CHUNK
        assert [k for k, _ in faults.seen] == ["oversized"]
    finally:
        client.close()
        server.close()
        t.join()


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_quiet_connection_holds_a_page_of_its_receive_buffer_not_all_of_it():
    # 40 connections that each got one small message: with a zero-filled buffer each would own all of its
    # CHUNK (40 x 256 KiB = 10 MiB); the mapping is backed only where a recv wrote.
    pairs = [tcp_pair() for _ in range(40)]
    try:
        before = resident_bytes()
        readers = []
        for client, server in pairs:
            server.sendall(raw_frame(OP_TEXT, b'{"n":1}'))
            reader = WsReader(client_ws(client), LIMIT)
            assert next(m for m in reader.messages if m is not None) == b'{"n":1}'
            readers.append(reader)
        grown = resident_bytes() - before
        assert grown < len(pairs) * CHUNK // 4, "%d KiB for %d quiet connections" % (grown >> 10, len(pairs))
    finally:
        for client, server in pairs:
            client.close()
            server.close()


def test_a_frame_exactly_at_the_limit_passes_and_one_byte_more_does_not():
    client, server = tcp_pair()
    try:
        reader = WsReader(client_ws(client), 1000)
        send_in_thread(server, raw_frame(OP_TEXT, b"a" * 1000) + raw_frame(OP_TEXT, b"b" * 500, fin=False)
                       + raw_frame(OP_CONT, b"c" * 500) + raw_frame(OP_TEXT, b"d" * 1001), end=False)
        messages, exc, _ = read_until_lost(reader)
        assert messages == [b"a" * 1000, b"b" * 500 + b"c" * 500]
        assert isinstance(exc, FrameTooLarge)
    finally:
        client.close()
        server.close()


def test_a_limit_sized_frame_in_pieces_is_held_within_the_limit_and_a_chunk():
    client, server = tcp_pair()
    big = payload(1, LIMIT)
    try:
        reader = WsReader(client_ws(CutSocket(client, [1000, 70_000, CHUNK])), LIMIT)
        send_in_thread(server, raw_frame(OP_TEXT, b"x" * 200) + raw_frame(OP_TEXT, big) + TEXT)
        messages, exc, _ = read_until_lost(reader)
        assert messages == [b"x" * 200, big, b'{"ok":1}']
        assert "without a close frame" in str(exc)
        assert LIMIT <= reader.peak <= LIMIT + CHUNK + 14
    finally:
        client.close()
        server.close()


def test_pings_between_fragments_are_answered_with_their_payload_and_binary_goes_aside():
    client, server = tcp_pair()
    binary = []
    try:
        reader = WsReader(client_ws(client), LIMIT, on_binary=binary.append)
        send_in_thread(server, raw_frame(OP_TEXT, b"ab", fin=False) + raw_frame(OP_PING, b"1234")
                       + raw_frame(OP_PONG, b"x") + raw_frame(OP_CONT, b"cd", fin=False) + raw_frame(OP_PING, b"")
                       + raw_frame(OP_CONT, b"ef") + raw_frame(OP_BINARY, b"\x00\x01")
                       + raw_frame(OP_CLOSE, struct.pack("!H", 1001) + b"going away"))
        messages, exc, _ = read_until_lost(reader)
        assert messages == [b"abcdef"] and binary == [b"\x00\x01"]
        assert str(exc) == "closed by the exchange: code 1001 going away"
        assert not isinstance(exc, wsframes.FrameFault)
        reader.close()  # the exchange closed: our close already went, nothing is awaited
        sent = client_frames(server, client)
    finally:
        client.close()
        server.close()
    assert sent == [(OP_PONG, b"1234"), (OP_PONG, b""), (OP_CLOSE, struct.pack("!H", 1001))]


def test_a_stalled_frame_ends_after_the_deadline_and_yields_meanwhile():
    client, server = tcp_pair()
    faults = Faults()
    try:
        reader = WsReader(client_ws(client, timeout=0.05), LIMIT, on_fault=faults, deadline=0.5)
        frame = raw_frame(OP_TEXT, b"z" * 300)
        send_in_thread(server, TEXT + frame[:100], end=False)  # then nothing: the rest never comes
        messages, exc, nones = read_until_lost(reader)
        assert messages == [b'{"ok":1}'] and isinstance(exc, FrameStalled) and exc.code == 1008
        assert str(exc) == "frame incomplete after 0.5 s"
        assert nones >= 1  # the caller had its turns (socket timeouts) while the frame was incomplete
        assert [k for k, _ in faults.seen] == ["stalled"]
        assert [(op, close_code(p)) for op, p in client_frames(server, client)] == [(OP_CLOSE, 1008)]
    finally:
        client.close()
        server.close()


def test_a_dripping_frame_ends_after_the_deadline_though_bytes_keep_coming():
    client, server = tcp_pair()
    stop = threading.Event()
    conn = WsConn(server, "/", {}).hijack()
    frame = raw_frame(OP_TEXT, b"z" * 5000)
    dripper = threading.Thread(target=conn.drip, args=(frame, 0.01, stop), daemon=True)
    try:
        # the socket timeout is longer than the drip's pace: every recv returns a byte, none times out
        reader = WsReader(client_ws(client, timeout=1.0), LIMIT, deadline=0.5)
        dripper.start()
        messages, exc, nones = read_until_lost(reader)
        assert messages == [] and isinstance(exc, FrameStalled)
        assert nones >= 2  # each byte gave the caller its turn
    finally:
        stop.set()
        dripper.join()
        client.close()
        server.close()


def test_our_close_waits_for_the_exchange_close_and_drops_what_comes_before_it():
    client, server = tcp_pair()
    conn = WsConn(server, "/", {})
    answered = threading.Event()

    def exchange():
        conn.send_text(b"late")
        try:
            conn.recv()  # our close: answered with a close, then ConnectionClosed
        except ConnectionClosed:
            answered.set()

    t = threading.Thread(target=exchange, daemon=True)
    t.start()
    try:
        reader = WsReader(client_ws(client), LIMIT)
        reader.close(timeout=5.0)
        assert answered.is_set() or wait_for(answered.is_set, timeout=5, what="the exchange's answer")
        assert [(op, close_code(p)) for _, op, p in conn.received] == [(OP_CLOSE, 1000)]
        assert str(reader.ended) == "closed by us"
    finally:
        t.join()
        client.close()
        server.close()


def make_cert(tmp_path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    return key, cert


def test_the_reader_works_over_tls(tmp_path):
    """wss: frames across TLS records and several frames in one record, read through SSLSocket.recv
    with socket timeouts (data already decrypted inside the SSL object is never missed)."""
    key, cert = make_cert(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    raw_client, raw_server = tcp_pair()
    texts = [raw_frame(OP_TEXT, b'{"n":%d}' % i) for i in range(2000)]
    frames = texts[:500] + [raw_frame(OP_PING, b"tls")] + texts[500:700] + [raw_frame(OP_TEXT, payload(2, 100_000))]
    data = b"".join(frames + texts[700:])
    result = {}

    def serve():
        tls = server_ctx.wrap_socket(raw_server, server_side=True)
        for i in range(0, len(data), 7000):  # records of up to 7000 bytes: frames cut across them
            tls.sendall(data[i:i + 7000])
        tls.settimeout(READ_BACK_SECS)  # a blocking read, no select() (see client_frames)
        conn = WsConn(tls, "/", {})
        result["pong"] = conn.read_frame()[1:]
        tls.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    tls_client = client_ctx.wrap_socket(raw_client, server_hostname="localhost")
    try:
        reader = WsReader(client_ws(tls_client, timeout=0.05), LIMIT)
        got = []
        for message in reader.messages:
            if message is not None:
                got.append(message)
                if len(got) == 2001:
                    break
        assert got[:700] == [b'{"n":%d}' % i for i in range(700)]
        assert got[700] == payload(2, 100_000)
        assert got[701:] == [b'{"n":%d}' % i for i in range(700, 2000)]
        t.join(10)
        assert result["pong"] == (OP_PONG, b"tls")
    finally:
        tls_client.close()
        raw_server.close()


# -- 3. a worker against the fake, hostile frames on a hijacked connection --------------------------------

class ProbeWorker(Worker):
    """The real worker, keeping each link it opens (to look at its reader afterwards)."""

    def _open(self, sink):
        link = super()._open(sink)
        self.links.append(link)
        return link


class WorkerRun:
    """A Worker run in a thread of the test against ``fake``, its pipe drained here."""

    def __init__(self, fake, tmp_path, symbols):
        settings = fake_settings(fake, symbols, data_path=str(tmp_path))
        infos = tuple(SymbolInfo(n, n.replace("-", ""), *n.split("-")) for n in symbols)
        self.rfd, wfd = os.pipe()
        self.stats = Block(WORKER_FIELDS)
        self.worker = ProbeWorker(WorkerSpec(0, "binance", 0, infos), settings, wfd, self.stats, Note())
        self.worker.links = []
        self.pipe = PipeReader(self.rfd)
        self.ids: list[int] = []
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.worker.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive()
        os.close(self.rfd)

    def trade_ids(self) -> list[int]:
        self.pipe.fill()
        for kind, records in self.pipe.frames_ready():
            if kind == rec.KIND_TRADES:
                self.ids.extend(row[1] for row in rec.TRADE_WIRE.iter_unpack(records))
        return self.ids


def closes(conn) -> list:
    """The codes of the close frames a fake's connection received."""
    return [close_code(p) for _, op, p in list(conn.received) if op == OP_CLOSE]


def subscribed_conn(fake):
    """The fake's one open (not hijacked) connection once it is subscribed."""
    conns = fake.open_connections()
    return conns[0] if len(conns) == 1 and all_subscribed(fake) else None


def pushed_and_stored(fake, run, n: int, what: str) -> None:
    pushed = [t["t"] for t in fake.push_trades("BTC-USDT", n)]
    wait_for(lambda: run.trade_ids()[-n:] == pushed, timeout=20, what=what)


def test_a_worker_closes_an_oversized_frame_from_its_header_counts_it_and_goes_on(tmp_path):
    with FakeBinance(symbols=["BTC-USDT"], mode="script", ping_interval=60.0) as fake, \
            WorkerRun(fake, tmp_path, ["BTC-USDT"]) as run:
        conn = wait_for(lambda: subscribed_conn(fake), what="a subscribed connection")
        pushed_and_stored(fake, run, 3, "trades before")
        conn.hijack().send_raw(raw_frame(OP_TEXT, length=600 << 20))  # the header, then nothing at all
        wait_for(lambda: run.stats.get("oversized_closes") == 1, what="the close counted")
        wait_for(lambda: closes(conn), what="our close frame")
        assert closes(conn) == [1009]
        assert run.stats.get("drop_oversized") == 1 and run.stats.get("parse_errors") == 1
        first = run.worker.links[0].reader
        assert isinstance(first.ended, FrameTooLarge) and first.peak < 64 << 10, (  # never took the payload
            [(type(link.reader.ended).__name__, str(link.reader.ended), link.reader.peak) for link in run.worker.links])
        new = wait_for(lambda: subscribed_conn(fake) not in (None, conn) and subscribed_conn(fake),
                       what="a new subscribed connection")
        assert new is not conn
        pushed_and_stored(fake, run, 3, "trades after the reconnect")
        assert len(run.trade_ids()) == 6 and len(set(run.ids)) == 6
        assert run.stats.get("protocol_errors") == 0 and run.stats.get("stalled_frames") == 0


def test_a_worker_ends_a_dripping_frame_after_the_deadline_without_freezing(tmp_path, monkeypatch):
    monkeypatch.setattr(wsframes, "FRAME_DEADLINE_SECS", 2.0)
    stop = threading.Event()
    with FakeBinance(symbols=["BTC-USDT"], mode="script", ping_interval=60.0) as fake, \
            WorkerRun(fake, tmp_path, ["BTC-USDT"]) as run:
        conn = wait_for(lambda: subscribed_conn(fake), what="a subscribed connection")
        pushed_and_stored(fake, run, 2, "trades before")
        conn.hijack()
        frame = raw_frame(OP_TEXT, b'{"stream":"btcusdt@trade","data":{}}' * 100)  # 3,700 bytes, one every 20 ms
        dripper = threading.Thread(target=conn.drip, args=(frame, 0.02, stop), daemon=True)
        dripper.start()
        try:
            beat = run.stats.get("heartbeat")
            # the loop keeps ticking while the frame drips (before: frozen in recv until killed)
            wait_for(lambda: run.stats.get("heartbeat") > beat and run.stats.get("stalled_frames") == 0
                     and dripper.is_alive(), what="a heartbeat during the drip")
            wait_for(lambda: run.stats.get("stalled_frames") == 1, what="the stalled frame counted")
            wait_for(lambda: closes(conn), what="our close frame")  # (sent just after the count)
            assert closes(conn) == [1008]
            assert str(run.worker.links[0].reader.ended) == "frame incomplete after 2 s"
            wait_for(lambda: subscribed_conn(fake) not in (None, conn), what="a new subscribed connection")
            pushed_and_stored(fake, run, 3, "trades after the reconnect")
            assert len(run.trade_ids()) == 5
        finally:
            stop.set()
            dripper.join()


def test_a_worker_answers_pings_and_keeps_a_masked_frame_from_the_exchange_out(tmp_path):
    with FakeBinance(symbols=["BTC-USDT"], mode="script", ping_interval=60.0) as fake, \
            WorkerRun(fake, tmp_path, ["BTC-USDT"]) as run:
        conn = wait_for(lambda: subscribed_conn(fake), what="a subscribed connection")
        conn.send_ping(b"keepalive-1")
        wait_for(lambda: (OP_PONG, b"keepalive-1") in [(op, p) for _, op, p in conn.received], what="the pong")
        pushed_and_stored(fake, run, 2, "trades before")
        conn.hijack().send_raw(raw_frame(OP_TEXT, b'{"stream":"x"}', mask=b"\x01\x02\x03\x04"))
        wait_for(lambda: run.stats.get("protocol_errors") == 1, what="the protocol error counted")
        wait_for(lambda: closes(conn), what="our close frame")
        assert closes(conn) == [1002]
        wait_for(lambda: subscribed_conn(fake) not in (None, conn), what="a new subscribed connection")
        pushed_and_stored(fake, run, 2, "trades after the reconnect")


# -- the real service -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_service_worker_survives_an_oversized_and_a_dripping_frame_with_exact_rows(tmp_path):
    """Issue 10/11 reproductions in real processes: a 600 MiB frame announced (before: 1.27 GB of RSS), then a
    frame dripping a byte every 0.1 s (before: the loop froze until the heartbeat kill). The worker keeps its
    pid, counts both on /health, and the rows on disk are exactly the trades the fake sent."""
    data = os.path.join(str(tmp_path), "data")
    stop = threading.Event()
    with FakeBinance(symbols=["BTC-USDT"], mode="script", ping_interval=60.0) as fake, \
            service(tmp_path, service_config(data, [fake])) as svc:  # (heartbeat timeout 5 s: a frozen loop dies)
        shard = svc.wait_all_connected(1)[0]
        pid = shard["pid"]

        def stored():
            return svc.writer()["rows_trades"]

        conn = wait_for(lambda: subscribed_conn(fake), what="a subscribed connection")
        fake.push_trades("BTC-USDT", 5)
        wait_for(lambda: stored() >= 5, what="trades before")
        conn.hijack().send_raw(raw_frame(OP_TEXT, length=600 << 20))
        wait_for(lambda: svc.shards()[0]["frame_closes"]["oversized"] == 1, what="the oversized close on /health")
        conn = wait_for(lambda: subscribed_conn(fake) not in (None, conn) and subscribed_conn(fake),
                        what="a new subscribed connection")
        fake.push_trades("BTC-USDT", 5)
        wait_for(lambda: stored() >= 10, timeout=30, what="trades after the first reconnect")
        conn.hijack()
        dripper = threading.Thread(target=conn.drip, args=(raw_frame(OP_TEXT, b"x" * 1000), 0.1, stop), daemon=True)
        dripper.start()
        try:
            wait_for(lambda: svc.shards()[0]["frame_closes"]["stalled"] == 1, timeout=30,
                     what="the stalled frame on /health")
            wait_for(lambda: subscribed_conn(fake) not in (None, conn), what="a new subscribed connection")
            fake.push_trades("BTC-USDT", 5)
            wait_for(lambda: stored() >= 15, timeout=30, what="trades after the second reconnect")
        finally:
            stop.set()
            dripper.join()
        doc = svc.shards()[0]
        assert doc["pid"] == pid and doc["restarts"] == 0  # the same process throughout
        assert doc["parse_errors_by_reason"] == {"oversized": 1}
        assert doc["frame_closes"] == {"oversized": 1, "protocol_error": 0, "stalled": 1}
        assert svc.stop() == 0
    want = [SPECS["binance"]["trade"](e) for e in fake.sent_trades]
    assert len(want) == 15
    assert read_rows(data, "binance", "BTC-USDT", "TRADES", today()) == want
    assert_tables_whole(data)
