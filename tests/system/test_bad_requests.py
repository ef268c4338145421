"""One bad request is one failed request: the router answers it itself and no tunnel is touched.

A real router process and a real backend process; the bad requests go over
raw sockets, as a hostile or clumsy client would send them, while a large
download runs on the same (only) tunnel. Each test checks the client's answer,
that the download completes intact, and that the router logged no
``Tunnel removed``.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest

from tests.conftest import wait_until
from tests.system.test_slow_clients import status, worker_pid

DOWNLOAD_MIB = 20


def raw_exchange(address: Tuple[str, int], data: bytes, close_after_send: bool = False, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the router sends back until it closes (or ``timeout``)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        if close_after_send:
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        return bytes(received)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


class Download(threading.Thread):
    """A large download through the router, running while the bad requests arrive."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.result: Optional[Tuple[int, int]] = None
        self.error: Optional[BaseException] = None
        self.started_body = threading.Event()

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            conn.request("GET", f"/download?mib={DOWNLOAD_MIB}")
            response = conn.getresponse()
            total = len(response.read(65536))
            self.started_body.set()
            while True:
                # Slowly at first, so that the bad requests arrive while it runs.
                chunk = response.read(1024 * 1024)
                if not chunk:
                    break
                total += len(chunk)
                time.sleep(0.01)
            self.result = (response.status, total)
            conn.close()
        except BaseException as exc:
            self.error = exc
            self.started_body.set()

    def assert_complete(self) -> None:
        self.join(60)
        assert self.error is None, self.error
        assert self.result == (200, DOWNLOAD_MIB * 1024 * 1024)


@pytest.fixture
def tunnel(router_process, backend_process):
    router = router_process()
    backend = backend_process("tests.apps:multi", router.tunnel_address, "--tunnels", "1")
    router.wait_tunnels(1)
    return router, backend


@pytest.fixture
def download(tunnel):
    router, _ = tunnel
    download = Download(router.http_host, router.http_port)
    download.start()
    assert download.started_body.wait(15)
    yield download
    download.join(60)


def assert_no_tunnel_lost(router, backend) -> None:
    assert router.count_lines("Tunnel removed") == 0, router.output()
    assert backend.count_lines("lost") == 0, backend.output()


BAD_REQUESTS: Dict[str, Tuple[bytes, int]] = {
    "connect": (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    "no-host": (b"GET /foo HTTP/1.1\r\nUser-Agent: t\r\n\r\n", 400),
    "two-hosts": (b"GET /foo HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", 400),
    "gzip-chunked": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n", 501),
    "bad-chunk-size": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nhello\r\n0\r\n\r\n", 400),
    "bare-line-feeds": (b"GET /foo HTTP/1.1\nHost: x\n\n", 400),  # (printf ... | nc)
}


@pytest.mark.parametrize("name", BAD_REQUESTS.keys())
def test_a_bad_request_gets_its_status_and_costs_no_tunnel(tunnel, download, name):
    router, backend = tunnel
    request, expected = BAD_REQUESTS[name]
    # A second request follows on the same connection: the router closes
    # instead of reading it (what came after a bad message cannot be trusted).
    follow = b"GET /foo HTTP/1.1\r\nHost: ok.example\r\n\r\n"
    response = raw_exchange((router.http_host, router.http_port), request + follow)
    assert status_of(response) == expected, response[:300]
    if expected == 405:
        assert b"\r\nAllow: GET, HEAD, POST" in response
    assert response.lower().count(b"\r\ncontent-length: ") == 1, response  # one response, then the close
    assert b"\r\nConnection: close\r\n" in response, response[:300]  # and it says so
    download.assert_complete()
    assert_no_tunnel_lost(router, backend)


def _gunicorn_refuses_at_once(head: bytes) -> bool:
    """Whether gunicorn's own parser refuses ``head`` without waiting for more bytes (gunicorn 27 does)."""
    from gunicorn.config import Config
    from gunicorn.http.errors import ParseException
    from gunicorn.http.parser import RequestParser

    class NoMoreBytes:
        @staticmethod
        def recv(size: int) -> bytes:
            return b""

    parser = RequestParser(Config(), NoMoreBytes, ("127.0.0.1", 1))
    parser.unreader.unread(head)
    try:
        next(parser)
    except ParseException:
        return True
    except Exception:  # NoMoreData: it waits for CRLF CRLF, as it does serving the socket itself
        return False
    return False


BARE_LF_HEADS = [b"GET /foo HTTP/1.1\nHost: x\n\n", b"GET /foo HTTP/1.1\r\nHost: x\n\n", b"GET /foo HTTP/1.1\r\n\n"]


def test_heads_ending_in_bare_line_feeds_are_answered_as_gunicorn_would_and_hold_no_thread(tunnel):
    """``printf 'GET / HTTP/1.1\\nHost: x\\n\\n' | nc``: what gunicorn does reading the socket itself.

    gunicorn 27 answers 400 at once, and so does the router; gunicorn 26.2
    waits for CRLF CRLF, and the router's selector waits too (no thread),
    until --header-timeout.
    """
    router, backend = tunnel
    worker = worker_pid(router.pid)
    threads_before = status(worker, "Threads")
    sockets = [socket.create_connection((router.http_host, router.http_port), timeout=30) for _ in range(20)]
    try:
        for index, sock in enumerate(sockets):
            sock.sendall(BARE_LF_HEADS[index % len(BARE_LF_HEADS)])
        # A request on another connection: the loop has read the heads by the time it answers.
        assert raw_exchange((router.http_host, router.http_port),
                            b"GET /foo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b"bar")
        if all(_gunicorn_refuses_at_once(head) for head in BARE_LF_HEADS):
            for sock in sockets:
                assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
        else:  # they wait in the selector, as any head still coming does
            assert status(worker, "Threads") <= threads_before
    finally:
        for sock in sockets:
            sock.close()
    assert router.count_lines("request head not received") == 0
    assert_no_tunnel_lost(router, backend)


#: Request lines gunicorn refuses as soon as it has them, whatever follows.
BAD_REQUEST_LINES = [b"GET /\r\n", b"GET / HTTP/3.0\r\n", b"G@T / HTTP/1.1\r\n", b"GET foo HTTP/1.1\r\n",
                     b"PRI * HTTP/2.0\r\n"]


def test_a_request_line_gunicorn_refuses_is_answered_at_once_not_after_the_header_timeout(tunnel):
    """``GET /`` and a newline (an HTTP/0.9 client, a typo in ``nc``): gunicorn answers 400 at once; so does the router.

    The rest of the head cannot mend such a line: waiting for it would leave
    the client with nothing until ``--header-timeout`` (10 s here).
    """
    router, backend = tunnel
    for line in BAD_REQUEST_LINES:
        assert _gunicorn_refuses_at_once(line), line
        with socket.create_connection((router.http_host, router.http_port), timeout=5) as sock:
            sock.sendall(line)  # and nothing more, the connection open
            assert sock.recv(4096).startswith(b"HTTP/1.1 400 Bad Request\r\n"), line
    # Good lines: the rest of the head may follow, in pieces. (An empty line before the request
    # line: gunicorn 27 skips it, 26.2 refuses it at once; the router does as its gunicorn does.)
    good = [line for line in (b"GET /foo HTTP/1.1\r\n", b"\r\nGET /foo HTTP/1.1\r\n")
            if not _gunicorn_refuses_at_once(line)]
    for line in good:
        with socket.create_connection((router.http_host, router.http_port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for piece in (line, b"Host: x\r\n", b"Connection: close\r\n\r\n"):
                sock.sendall(piece)
                time.sleep(0.05)  # pieces, not one segment (not a synchronisation: any delay will do)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
            assert received.endswith(b"bar"), received
    wait_until(lambda: router.count_lines("Invalid request from ip=") == len(BAD_REQUEST_LINES), 10,
               what="each bad line to be logged once")
    assert router.count_lines("request head not received") == 0
    assert_no_tunnel_lost(router, backend)


def test_an_absolute_form_target_names_the_host(tunnel):
    """RFC 9112 §3.2.2: the authority in an absolute-form target replaces Host."""
    router, _ = tunnel
    request = b"GET http://target.example/foo HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"
    response = raw_exchange((router.http_host, router.http_port), request)
    assert status_of(response) == 200
    assert response.endswith(b"bar")


def test_a_small_upload_cut_short_is_answered_without_touching_the_tunnel(tunnel, download):
    """A client promises 100 bytes, sends 1 and closes its side (curl --max-time on a slow upload): a 400 that
    says why, as for a large body (the body had not gone to any tunnel yet)."""
    router, backend = tunnel
    request = b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx"
    response = raw_exchange((router.http_host, router.http_port), request, close_after_send=True)
    assert status_of(response) == 400, response
    assert b"\r\nConnection: close\r\n" in response
    assert response.endswith(b"the client sent 1 of the 100 bytes of its Content-Length\n")
    router.wait_for_line(r"POST /count: 400, the client sent 1 of the 100 bytes")
    download.assert_complete()
    assert_no_tunnel_lost(router, backend)
    assert backend.count_lines("Traceback") == 0


def test_a_large_upload_cut_short_resets_its_stream_only(tunnel, download):
    router, backend = tunnel
    request = b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 300_000
    response = raw_exchange((router.http_host, router.http_port), request, close_after_send=True)
    assert status_of(response) == 400, response[:300]
    assert b"\r\nConnection: close\r\n" in response
    router.wait_for_line(r"POST /count: 400, the client sent 300000 of the 10000000 bytes")
    download.assert_complete()
    assert_no_tunnel_lost(router, backend)
    assert backend.count_lines("Traceback") == 0


def test_response_headers_over_the_routers_limit_are_a_500_from_the_backend_not_a_lost_tunnel(tunnel, download):
    """The router accepts header blocks of 64 KiB; one larger would make it drop the whole tunnel."""
    router, backend = tunnel
    connection = http.client.HTTPConnection(router.http_host, router.http_port, timeout=10)
    try:
        connection.request("GET", "/big-headers?bytes=70000")
        response = connection.getresponse()
        assert (response.status, response.read()) == (500, b"Internal Server Error\n")
        connection.request("GET", "/big-headers?bytes=60000")  # under the limit, on the same connection
        response = connection.getresponse()
        assert (response.status, len(response.getheader("X-Big", "")), response.read()) == (200, 60000, b"ok")
    finally:
        connection.close()
    backend.wait_for_line(r"response headers of 702\d\d bytes exceed the router's limit of 65536 bytes")
    download.assert_complete()
    assert_no_tunnel_lost(router, backend)


def test_a_connect_flood_beside_steady_traffic_fails_no_good_request(tunnel):
    """100 CONNECT requests over a few seconds next to a bounded stream of good ones: none of those fails."""
    router, backend = tunnel
    address = (router.http_host, router.http_port)
    stop = threading.Event()
    outcomes: List[int] = []

    def good_traffic() -> None:
        conn = http.client.HTTPConnection(*address, timeout=10)
        deadline = time.monotonic() + 30
        while not stop.is_set() and len(outcomes) < 5000 and time.monotonic() < deadline:
            try:
                conn.request("GET", "/foo")
                response = conn.getresponse()
                outcomes.append(response.status if response.read() == b"bar" else -1)
            except (OSError, http.client.HTTPException):
                outcomes.append(-2)
                conn.close()
                conn = http.client.HTTPConnection(*address, timeout=10)
        conn.close()

    threads = [threading.Thread(target=good_traffic, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    connect = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n"
    for _ in range(100):
        assert status_of(raw_exchange(address, connect)) == 405
        time.sleep(0.02)  # spread over a few seconds, as a flood from one client would be
    stop.set()
    for thread in threads:
        thread.join(30)
    assert outcomes
    assert set(outcomes) == {200}, {code: outcomes.count(code) for code in set(outcomes)}
    wait_until(lambda: router.count_lines("CONNECT") >= 100, 10, what="the router to log the refusals")
    assert_no_tunnel_lost(router, backend)
