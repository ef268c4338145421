"""HTTPS clients are relayed without a thread, as plain HTTP ones are (ptth_sync/router/relay.py).

A real router process with ``--http-certfile`` and a real backend; the
clients are TLS sockets driven by hand, so that keep-alive, pipelining, a
body that ends in the same TLS record as the next request, and clients that
stop reading or sending are exercised exactly as sent. The router worker's
thread count shows that none of them needed a thread.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import select
import shutil
import socket
import ssl
import subprocess
import time
from typing import Iterator, List

import pytest

from tests.conftest import RouterProcess, wait_until
from tests.system.test_relay import read_responses
from tests.system.test_security import certs  # noqa: F401  (the module's certificates fixture)
from tests.system.test_slow_clients import status, worker_pid

#: HTTPS clients that stop reading, and ones that stop sending their body.
STALLED = 100


def https_router(router_process, backend_process, certs, *options: str) -> RouterProcess:  # noqa: F811
    router = router_process("--http-certfile", certs["server"], "--http-keyfile", certs["server"], *options)
    backend_process("tests.apps:multi", router.tunnel_address, "--threads", "256")
    router.wait_tunnels(1)
    return router


def tls_connect(router: RouterProcess, certs, timeout: float = 10.0) -> ssl.SSLSocket:  # noqa: F811
    context = ssl.create_default_context(cafile=certs["ca"])
    sock = socket.create_connection((router.http_host, router.http_port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname="localhost")


def https_get(router: RouterProcess, certs) -> bytes:  # noqa: F811
    with tls_connect(router, certs) as sock:
        sock.sendall(b"GET /foo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.fixture
def stalled_sockets() -> Iterator[List[ssl.SSLSocket]]:
    socks: List[ssl.SSLSocket] = []
    yield socks
    for sock in socks:
        sock.close()


def test_pipelined_https_requests_are_answered_in_order_without_a_thread(router_process, backend_process,
                                                                         certs):  # noqa: F811
    router = https_router(router_process, backend_process, certs)
    worker = worker_pid(router.pid)
    assert https_get(router, certs).endswith(b"bar")
    threads = status(worker, "Threads")
    body = bytes(range(256)) * 800  # 200 KiB: streamed to the backend, not sent with the head
    with tls_connect(router, certs) as sock:
        # The streamed body ends in the same TLS record as the next request: those bytes wait in
        # OpenSSL's buffer, where the selector cannot see them, once the body is read.
        sock.sendall(
            b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /download?mib=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            b"GET /download?mib=3 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n" % (len(body), body)
        )
        answers = read_responses(sock, ["GET", "HEAD", "POST", "POST", "GET", "GET"])  # type: ignore[arg-type]
        for _ in range(100):  # and keep-alive, one at a time
            sock.sendall(b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_responses(sock, ["GET"])[0][2] == b"bar"  # type: ignore[arg-type]
    assert [code for code, _, _ in answers] == [200] * 6
    assert answers[0][2] == b"bar"
    assert answers[1][1]["Content-Length"] == str(1024 * 1024)
    assert answers[2][2] == b"hello"
    assert answers[3][2] == body
    assert hashlib.sha256(answers[4][2]).hexdigest() == hashlib.sha256(bytes(range(256)) * 1024 * 12).hexdigest()
    assert answers[5][2].isdigit()
    assert status(worker, "Threads") == threads
    assert router.count_lines("Tunnel removed") == 0


def test_https_clients_that_stop_reading_or_sending_cost_no_thread_and_are_closed_after_the_timeout(
    router_process, backend_process, certs, stalled_sockets  # noqa: F811
):
    """100 HTTPS clients ask for 64 MiB and read nothing; 100 send 1 KiB of a 10 MB body and stop.

    The router's thread count stays put (each was a thread until --timeout before), a normal
    HTTPS GET is answered within a second, and after --timeout each stalled client is closed
    with a line.
    """
    router = https_router(router_process, backend_process, certs, "--timeout", "3")
    worker = worker_pid(router.pid)
    assert https_get(router, certs).endswith(b"bar")
    threads = status(worker, "Threads")
    readers, uploaders = [], []
    for _ in range(STALLED):
        sock = tls_connect(router, certs, timeout=30)
        sock.sendall(b"GET /download?mib=64 HTTP/1.1\r\nHost: x\r\n\r\n")
        readers.append(sock)
        sock = tls_connect(router, certs, timeout=30)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1024)
        uploaders.append(sock)
    stalled_sockets += readers + uploaders
    assert [sock.recv(17) for sock in readers] == [b"HTTP/1.1 200 OK\r\n"] * STALLED
    assert https_get(router, certs).endswith(b"bar")
    assert status(worker, "Threads") <= threads
    wait_until(lambda: router.count_lines("no progress for 3s") >= 2 * STALLED, 60,
               what=lambda: f"the stalled clients to be closed:\n{router.output()[-3000:]}")
    assert router.count_lines("it stopped reading the response") == STALLED
    assert router.count_lines("it stopped sending its body") == STALLED
    assert https_get(router, certs).endswith(b"bar")
    assert status(worker, "Threads") <= threads
    assert router.count_lines("Tunnel removed") == 0
    assert router.count_lines("Traceback") == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")
def test_a_client_may_not_renegotiate(router_process, backend_process, certs):  # noqa: F811
    """TLS 1.2 renegotiation, started by a client, is refused (as by nginx and HAProxy): a cheap DoS.

    OpenSSL 3 refuses it by default; the router's context says so itself for
    a Python built with OpenSSL 1.1.1.
    """
    router = https_router(router_process, backend_process, certs)
    client = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"{router.http_host}:{router.http_port}", "-tls1_2",
         "-CAfile", certs["ca"]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert client.stdin is not None
        assert client.stdout is not None
        output = b""

        def read_until(marker: bytes) -> None:
            nonlocal output
            deadline = time.monotonic() + 10
            while marker not in output and time.monotonic() < deadline:
                ready, _, _ = select.select([client.stdout], [], [], 0.5)
                if ready:
                    chunk = os.read(client.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    output += chunk
            assert marker in output, output.decode(errors="replace")

        client.stdin.write(b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n")
        client.stdin.flush()
        read_until(b"bar")
        client.stdin.write(b"R\n")  # s_client's command: renegotiate
        client.stdin.flush()
        read_until(b"no renegotiation")
    finally:
        client.kill()
        client.wait(10)
    assert https_get(router, certs).endswith(b"bar")


def test_a_corrupt_tls_record_ends_that_connection_only_with_a_line(router_process, backend_process, certs):  # noqa: F811
    """A client whose record fails its integrity check after the handshake (a bit flipped on the way):
    the router closes that connection and says why; other HTTPS clients carry on."""
    router = https_router(router_process, backend_process, certs)
    context = ssl.create_default_context(cafile=certs["ca"])
    for round_ in range(3):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with socket.create_connection((router.http_host, router.http_port), timeout=10) as raw:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    data = raw.recv(65536)
                    assert data, "the router closed during the handshake"
                    incoming.write(data)
            raw.sendall(outgoing.read())
            tls.write(b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n")
            record = bytearray(outgoing.read())
            record[-1] ^= 1
            raw.sendall(bytes(record))
            wait_until(lambda n=round_ + 1: router.count_lines("TLS error") == n, 10,
                       what=lambda: f"the router to log the bad record:\n{router.output()[-2000:]}")
        assert https_get(router, certs).endswith(b"bar")
    assert router.count_lines("Traceback") == 0


def test_an_https_client_still_uploading_when_answered_gets_the_answer(router_process, backend_process,
                                                                       certs):  # noqa: F811
    """As over plain HTTP (test_relay.py): the app answers without reading a 32 MB upload, and the
    client, which sends all of it before it reads, gets the answer rather than a reset."""
    router = https_router(router_process, backend_process, certs)
    context = ssl.create_default_context(cafile=certs["ca"])
    for _ in range(3):
        conn = http.client.HTTPSConnection("localhost", router.http_port, timeout=10, context=context)
        try:
            conn.request("POST", "/foo", body=b"x" * (32 * 1024 * 1024))
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"bar")
        finally:
            conn.close()
    assert https_get(router, certs).endswith(b"bar")
    assert router.count_lines("Traceback") == 0


def test_https_clients_that_wait_for_100_continue_then_trickle_a_small_body_cost_no_thread(
    router_process, backend_process, certs, stalled_sockets  # noqa: F811
):
    """50 HTTPS clients send a head with ``Expect: 100-continue`` and a 60,000-byte body, get their
    ``100 Continue``, then send the body in pieces: while it is incomplete, the router's thread count
    stays put (a thread each before), and then each gets its whole body counted."""
    router = https_router(router_process, backend_process, certs)
    worker = worker_pid(router.pid)
    assert https_get(router, certs).endswith(b"bar")
    threads = status(worker, "Threads")
    clients = []
    for _ in range(50):
        sock = tls_connect(router, certs)
        sock.sendall(b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\nExpect: 100-continue\r\n\r\n")
        clients.append(sock)
    stalled_sockets += clients
    assert [sock.recv(25) for sock in clients] == [b"HTTP/1.1 100 Continue\r\n\r\n"] * 50
    for _ in range(3):  # the bodies come in pieces; between them, the clients hold the router nothing
        for sock in clients:
            sock.sendall(b"x" * 1000)
        assert https_get(router, certs).endswith(b"bar")
        assert status(worker, "Threads") <= threads
    answers = []
    for sock in clients:
        sock.sendall(b"x" * 57000)
        answers.append(read_responses(sock, ["POST"])[0])
    assert [(code, body) for code, _, body in answers] == [(200, b"60000")] * 50
    assert router.count_lines("Traceback") == 0
