"""The HTTP/2 engine over real loopback TCP: flow control, deadlock freedom, death, thread hygiene."""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import List, Tuple

import pytest

from ptth_sync.connection import Connection, ConnectionSettings, Stream
from ptth_sync.errors import ConnectionClosed
from tests.conftest import wait_until
from tests.integration.conftest import echo_in_thread

MIB = 1024 * 1024
REQUEST = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"test")]


def tcp_pair(buffer_size: int = 0) -> Tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair, optionally with small socket buffers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.socket()
    if buffer_size:
        for sock in (client, listener):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def connection_pair(on_request, buffer_size: int = 0, server_settings=ConnectionSettings()):
    client_sock, server_sock = tcp_pair(buffer_size)
    server = Connection(server_sock, client_side=False, on_request=on_request, settings=server_settings, name="server")
    client = Connection(client_sock, client_side=True, name="client")
    server.start()
    client.start()
    assert client.wait_ready(5)
    assert server.wait_ready(5)
    return client, server


def drain(stream: Stream, timeout: float = 30) -> int:
    total = 0
    while True:
        data = stream.read(-1, timeout)
        if not data:
            return total
        total += len(data)


def test_upload_and_download_at_full_speed_on_one_tunnel_do_not_deadlock():
    """64 MiB each way on one stream at once, windows far larger than the 64 KiB socket buffers."""
    size = 64 * MIB
    piece = b"u" * MIB
    results = {}

    def on_request(stream: Stream) -> None:
        def download() -> None:
            stream.send_headers([(b":status", b"200")])
            for _ in range(size // MIB):
                stream.send_data(piece)
            stream.end()

        def upload() -> None:
            results["server received"] = drain(stream)

        # on_request runs on the reader thread: hand the work over at once.
        threading.Thread(target=download, daemon=True).start()
        threading.Thread(target=upload, daemon=True).start()

    client, server = connection_pair(on_request, buffer_size=64 * 1024)
    try:
        stream = client.open_stream(REQUEST)

        def send_body() -> None:
            for _ in range(size // MIB):
                stream.send_data(piece)
            stream.end()

        sender = threading.Thread(target=send_body)
        sender.start()
        stream.wait_headers(60)
        results["client received"] = drain(stream, 60)
        sender.join(60)
        assert not sender.is_alive()
        stream.close()
        wait_until(lambda: "server received" in results, 60, what="the server to finish reading")
        assert results == {"client received": size, "server received": size}
    finally:
        client.close()
        server.close()


def test_slow_consumer_slows_the_producer():
    """A receiver that does not read holds the sender at its stream window; reading releases it."""
    settings = ConnectionSettings(stream_window=256 * 1024)
    sent: List[int] = [0]
    finished = threading.Event()

    def on_request(stream: Stream) -> None:
        def respond() -> None:
            stream.send_headers([(b":status", b"200")])
            for _ in range(64):
                stream.send_data(b"d" * 65536)
                sent[0] += 65536
            stream.end()
            finished.set()
            stream.close()

        threading.Thread(target=respond, daemon=True).start()

    client_sock, server_sock = tcp_pair()
    server = Connection(server_sock, client_side=False, on_request=on_request, name="server")
    client = Connection(client_sock, client_side=True, settings=settings, name="client")
    server.start()
    client.start()
    try:
        assert client.wait_ready(5)
        stream = client.open_stream(REQUEST, end_stream=True)
        stream.wait_headers(5)
        # The sender fills the receiver's window (256 KiB) and must stop there.
        wait_until(lambda: stream._buffered >= 256 * 1024, what="the receive window to fill")
        assert sent[0] <= 256 * 1024 + 65536
        assert not finished.is_set()
        assert drain(stream) + 256 * 1024 >= 64 * 65536 - stream._buffered
        assert finished.wait(10)
        stream.close()
    finally:
        client.close()
        server.close()


def test_every_waiting_thread_is_woken_when_the_connection_dies():
    started = threading.Barrier(4)
    errors: List[BaseException] = []

    def on_request(stream: Stream) -> None:
        pass  # never answers

    client, server = connection_pair(on_request)
    streams = [client.open_stream(REQUEST) for _ in range(3)]

    def wait_headers(stream: Stream) -> None:
        started.wait(5)
        try:
            stream.wait_headers()
        except ConnectionClosed as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait_headers, args=(s,)) for s in streams]
    for waiter in waiters:
        waiter.start()
    started.wait(5)
    server.sock.shutdown(socket.SHUT_RDWR)  # the backend's side dies abruptly
    for waiter in waiters:
        waiter.join(5)
    assert [w.is_alive() for w in waiters] == [False] * 3
    assert len(errors) == 3
    assert client.wait_closed(5)
    assert not client.alive
    server.close()


def test_a_new_stream_on_a_dead_connection_is_refused_as_never_sent():
    client, server = connection_pair(lambda stream: None)
    server.close()
    assert client.wait_closed(5)
    with pytest.raises(ConnectionClosed) as info:
        client.open_stream(REQUEST)
    assert info.value.request_sent is False


def late_answers(release: threading.Event):
    """An ``on_request`` that answers each request ``200 late`` once ``release`` is set (on a thread of its own)."""

    def on_request(stream: Stream) -> None:
        def respond() -> None:
            release.wait(10)
            stream.send_response([(b":status", b"200")], b"late", end_stream=True)
            stream.close()

        threading.Thread(target=respond, daemon=True).start()

    return on_request


def test_leave_announces_goaway_and_the_streams_in_flight_still_finish_both_ways():
    """The client's GOAWAY(NO_ERROR) from leave(): the server keeps it as a notice (stock h2 would close its
    state and refuse to send the response), answers the request in flight and the one the client had
    taken in, and the connection stays open until the client closes it."""
    release = threading.Event()
    noticed: List[bytes] = []

    on_request = late_answers(release)

    client_sock, server_sock = tcp_pair()
    server = Connection(server_sock, client_side=False, on_request=on_request, name="server",
                        on_goaway_notice=lambda connection: noticed.append(connection.goaway_notice))
    client = Connection(client_sock, client_side=True, name="client")
    server.start()
    client.start()
    try:
        assert client.wait_ready(5)
        in_flight = client.open_stream(REQUEST, end_stream=True)
        wait_until(lambda: server.active_streams == 1, what="the server to see the stream")
        client.leave("going: connect again")
        wait_until(lambda: noticed, what="the server to see the notice")
        assert noticed == [b"going: connect again"]
        assert server.alive
        assert server.goaway_received is None  # (a notice, not an end)
        taken_in = client.open_stream(REQUEST, end_stream=True)  # a request it had already taken in
        release.set()
        for stream in (in_flight, taken_in):
            assert stream.wait_headers(5) == [(b":status", b"200")]
            assert stream.read(-1, 5) == b"late"
        assert client.alive
        assert server.alive
    finally:
        client.close()
        server.close()
    assert server.wait_closed(5)


def test_a_goaway_with_an_error_still_ends_the_connection_on_the_server():
    """Only NO_ERROR is a notice: a GOAWAY that reports an error ends the server's connection as before."""
    client, server = connection_pair(lambda stream: None)
    try:
        client.close("failing", error_code=2)  # INTERNAL_ERROR
        assert server.wait_closed(5)
        assert server.goaway_received is not None
        assert server.goaway_received[0] == 2
        assert server.goaway_notice is None
    finally:
        server.close()


def test_drain_refuses_new_streams_and_lets_open_ones_finish():
    release = threading.Event()

    on_request = late_answers(release)

    client, server = connection_pair(on_request)
    try:
        in_flight = client.open_stream(REQUEST, end_stream=True)
        wait_until(lambda: server.active_streams == 1, what="the server to see the stream")
        drained: List[bool] = []
        drainer = threading.Thread(target=lambda: drained.append(server.drain(10)))
        drainer.start()
        wait_until(lambda: not client.accepting_streams, what="the client to see the drain")
        with pytest.raises(ConnectionClosed) as info:
            client.open_stream(REQUEST, end_stream=True)
        assert info.value.request_sent is False
        release.set()
        assert in_flight.wait_headers(5) == [(b":status", b"200")]
        assert in_flight.read(-1, 5) == b"late"
        drainer.join(10)
        assert drained == [True]
        assert client.wait_closed(5)
    finally:
        client.close()
        server.close()


def test_thread_count_returns_to_baseline_after_100_tunnels():
    def on_request(stream: Stream) -> None:
        stream.send_response([(b":status", b"204")], end_stream=True)
        stream.close()

    baseline = threading.active_count()
    for _ in range(100):
        client, server = connection_pair(on_request)
        stream = client.open_stream(REQUEST, end_stream=True)
        assert stream.wait_headers(5) == [(b":status", b"204")]
        stream.close()
        client.close()
        assert client.wait_closed(5)
        assert server.wait_closed(5)
    wait_until(lambda: threading.active_count() <= baseline, 10, what="threads to exit")


def test_many_concurrent_streams_share_one_connection():
    def on_request(stream: Stream) -> None:
        def respond() -> None:
            body = drain(stream)
            stream.send_response([(b":status", b"200")], str(body).encode(), end_stream=True)
            stream.close()

        threading.Thread(target=respond, daemon=True).start()

    client, server = connection_pair(on_request)
    results: List[bytes] = []
    lock = threading.Lock()

    def one(size: int) -> None:
        stream = client.open_stream(REQUEST)
        stream.send_data(b"z" * size, end_stream=True)
        stream.wait_headers(10)
        data = stream.read(-1, 10)
        stream.close()
        with lock:
            results.append(data)

    try:
        sizes = [i * 50_000 for i in range(1, 41)]
        threads = [threading.Thread(target=one, args=(size,)) for size in sizes]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, 30 - (time.monotonic() - start)))
        assert sorted(int(r) for r in results) == sizes
    finally:
        client.close()
        server.close()


def requests_in_threads(client: Connection, threads: int, each: int) -> None:
    failures: List[BaseException] = []

    def requests() -> None:
        try:
            for _ in range(each):
                stream = client.open_stream(REQUEST, end_stream=True, timeout=10)
                stream.wait_headers(10)
                assert stream.read(-1, 10) == b"ok"
                stream.close()
        except BaseException as exc:  # reported below
            failures.append(exc)

    workers = [threading.Thread(target=requests) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not failures


@pytest.mark.parametrize(("limit", "threads"), [(5, 8), (100, 4)])
def test_the_peers_stream_limit_holds_and_closed_streams_are_forgotten_over_many_requests(limit, threads):
    """The client does not count h2's open streams at every request; the peer's limit still holds."""
    active = []
    most = [0]
    lock = threading.Lock()

    def on_request(stream: Stream) -> None:
        def respond() -> None:
            with lock:
                active.append(stream)
                most[0] = max(most[0], len(active))
            drain(stream)
            stream.send_response([(b":status", b"200")], b"ok", end_stream=True)
            stream.close()
            with lock:
                active.remove(stream)

        threading.Thread(target=respond, daemon=True).start()

    client, server = connection_pair(on_request, server_settings=ConnectionSettings(max_concurrent_streams=limit))
    try:
        requests_in_threads(client, threads, 200)
        assert 1 <= most[0] <= min(limit, threads)
        assert len(client._h2.streams) <= 64 + threads  # closed streams are dropped as they go
    finally:
        client.close()
        server.close()


def test_bodies_arrive_intact_whatever_the_piece_sizes_window_and_socket_buffers():
    """Random bytes each way, written and read in pieces of odd sizes, through small windows and buffers.

    DATA leaves as slices of the writer's objects and arrives as the reader's
    blocks: every byte must still come out once, in order.
    """
    rng = random.Random(11)
    up = rng.randbytes(5 * MIB + 333)
    down = rng.randbytes(6 * MIB + 77)
    write_sizes = [1, 9, 4095, 4096, 65_537, 300_000, MIB, MIB + 5, 2 * MIB + 1]
    read_sizes = [1, 1000, 16_384, 65_536, 250_000, MIB, -1]
    settings = ConnectionSettings(stream_window=300_000)
    received = {}

    def write(stream: Stream, data: bytes, seed: int) -> None:
        pick = random.Random(seed)
        position = 0
        while position < len(data):
            size = pick.choice(write_sizes)
            stream.send_data(data[position : position + size])
            position += size
        stream.end()

    def read(stream: Stream, seed: int) -> bytes:
        pick = random.Random(seed)
        parts = []
        while True:
            piece = stream.read(pick.choice(read_sizes), 30)
            if not piece:
                return b"".join(parts)
            parts.append(piece)

    def on_request(stream: Stream) -> None:
        def respond() -> None:
            stream.send_headers([(b":status", b"200")])
            write(stream, down, 1)

        def consume() -> None:
            received["server"] = read(stream, 2)

        threading.Thread(target=respond, daemon=True).start()
        threading.Thread(target=consume, daemon=True).start()

    client_sock, server_sock = tcp_pair(buffer_size=32 * 1024)
    server = Connection(server_sock, client_side=False, on_request=on_request, settings=settings, name="server")
    client = Connection(client_sock, client_side=True, settings=settings, name="client")
    server.start()
    client.start()
    try:
        assert client.wait_ready(5)
        stream = client.open_stream(REQUEST)
        sender = threading.Thread(target=write, args=(stream, up, 3))
        sender.start()
        stream.wait_headers(30)
        received["client"] = read(stream, 4)
        sender.join(30)
        wait_until(lambda: "server" in received, 30, what="the server to read the upload")
        assert received["client"] == down
        assert received["server"] == up
        stream.close()
    finally:
        client.close()
        server.close()


def test_closing_a_stream_never_waits_on_a_full_socket():
    """A listener closes streams on the reader thread: the RST_STREAM is queued, not waited for.

    The peer reads nothing and the socket is full; no thread of the connection runs (so none
    holds the write lock): closing must still return at once.
    """
    client_sock, peer = tcp_pair(buffer_size=4096)
    client = Connection(client_sock, client_side=True, name="client")
    client.prepare()
    stream = client.try_open_stream(REQUEST, b"x" * 60000, send=False, end_stream=False)
    assert stream is not None
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(5)
    try:
        assert not closer.is_alive(), "closing the stream waited on the socket"
    finally:
        client_sock.close()
        peer.close()


class _ReadsRecorded(socket.socket):
    """A TCP socket that records each read it is asked for: ``(method, size)``."""

    reads: List[Tuple[str, int]]

    def recv(self, size: int, *args) -> bytes:  # type: ignore[override]
        self.reads.append(("recv", size))
        return super().recv(size, *args)

    def recv_into(self, buffer, size: int = 0, *args) -> int:  # type: ignore[override]
        self.reads.append(("recv_into", size))
        return super().recv_into(buffer, size, *args)


def test_reads_of_whatever_is_there_are_kept_at_their_size_and_large_payloads_as_they_come():
    """``recv(256 KiB)`` makes 256 KiB and shrinks it to the few frames that came: read after read, that
    left the reader thread's heap in pieces (chunked uploads: a backend 30 -> 38 MiB in a minute)."""
    settings = ConnectionSettings()
    client_sock, server_sock = tcp_pair()
    recorded = _ReadsRecorded(fileno=server_sock.detach())
    recorded.reads = []
    big = bytes(range(256)) * 4096 * 4  # 4 MiB: large DATA frames, read as they come

    server = Connection(recorded, client_side=False, on_request=echo_in_thread, name="server")
    client = Connection(client_sock, client_side=True, name="client")
    server.start()
    client.start()
    try:
        assert client.wait_ready(5)
        for body in (b"small", big, b"x" * 4096, b"again"):
            stream = client.open_stream(REQUEST)

            def send(stream: Stream = stream, body: bytes = body) -> None:
                stream.send_data(body)
                stream.end()

            sender = threading.Thread(target=send)  # (the echo answers while the body still comes)
            sender.start()
            stream.wait_headers(10)
            received = b""
            while True:
                data = stream.read(-1, 10)
                if not data:
                    break
                received += data
            sender.join(10)
            stream.close()
            assert received == body
    finally:
        client.close()
        server.close()
    asked = recorded.reads
    assert ("recv_into", settings.recv_size) in asked
    assert ("recv", settings.recv_size) not in asked
    # What recv still reads: the rest of a large DATA frame exactly, or the frame header after one.
    assert all(size >= 64 * 1024 or size <= 9 for method, size in asked if method == "recv")
    assert any(size >= 64 * 1024 for method, size in asked if method == "recv")
