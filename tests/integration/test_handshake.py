"""The PTTH upgrade with a token, against a real Router over loopback."""

from __future__ import annotations

import logging
import socket
import threading
from typing import List

import pytest
from h2.errors import ErrorCodes

from ptth_sync import Router
from ptth_sync.addresses import format_address
from ptth_sync.connection import Connection, Stream
from ptth_sync.handshake import (
    TLS_REQUIRED,
    TOKEN_REQUIRED,
    HandshakeFailed,
    HandshakeRefused,
    dial_upgrade,
    goaway_refusal,
    plaintext_answer,
)
from tests.conftest import wait_until
from tests.wsgi_client import wsgi_request

TOKEN = "s3cret-t0ken"


@pytest.fixture
def token_router():
    router = Router(timeout=5, token=TOKEN, handshake_timeout=1.0)
    router.tunnel_address = router.listen_tunnels("127.0.0.1:0")
    yield router
    router.close()


def answer(stream: Stream) -> None:
    def respond() -> None:
        stream.send_response([(b":status", b"200"), (b"content-length", b"2")], b"ok", end_stream=True)
        stream.close()

    threading.Thread(target=respond, daemon=True).start()


def open_tunnel(router: Router, token, connections: List[Connection]) -> Connection:
    """What a backend does: connect, upgrade with ``token``, serve HTTP/2 on the socket."""
    sock = socket.create_connection(router.tunnel_address, timeout=5)
    leftover = dial_upgrade(sock, format_address(router.tunnel_address), token)
    connection = Connection(sock, client_side=False, on_request=answer, initial_data=leftover)
    connection.start()
    connections.append(connection)
    return connection


@pytest.fixture
def connections():
    opened: List[Connection] = []
    yield opened
    for connection in opened:
        connection.close()


def test_the_right_token_opens_a_tunnel_that_serves(token_router, connections):
    open_tunnel(token_router, TOKEN, connections)
    wait_until(lambda: len(token_router.pool) == 1, what="the tunnel in the pool")
    assert wsgi_request(token_router, "GET", "/").body == b"ok"


@pytest.mark.parametrize("token", ["bad-guess-123", None, TOKEN + "x", ""])
def test_a_wrong_or_missing_token_is_refused_with_401_and_logged_without_the_token(
    token_router, connections, caplog, token
):
    caplog.set_level(logging.INFO, logger="ptth_sync.router")
    with pytest.raises(HandshakeRefused) as info:
        open_tunnel(token_router, token, connections)
    assert info.value.status == 401
    wait_until(lambda: "refused: wrong or missing token" in caplog.text, what="the refusal in the log")
    assert len(token_router.pool) == 0
    assert TOKEN not in caplog.text
    assert not token or token not in caplog.text


def test_a_token_router_refuses_the_plain_wire_with_a_goaway_that_says_why(token_router, connections, caplog):
    sock = socket.create_connection(token_router.tunnel_address, timeout=5)
    plain = Connection(sock, client_side=False, on_request=answer)
    plain.start()  # the seed's wire: HTTP/2 SETTINGS straight away
    connections.append(plain)
    assert plain.wait_closed(5)
    assert "plain-wire tunnel refused" in caplog.text
    assert len(token_router.pool) == 0
    assert plain.goaway_received == (ErrorCodes.INADEQUATE_SECURITY, TOKEN_REQUIRED.encode())
    refusal = goaway_refusal(*plain.goaway_received)
    assert refusal is not None
    assert refusal.detail == TOKEN_REQUIRED


def test_a_router_without_a_token_accepts_both_the_upgrade_and_the_plain_wire(router, connections):
    open_tunnel(router, None, connections)
    open_tunnel(router, "any token at all", connections)
    sock = socket.create_connection(router.tunnel_address, timeout=5)
    plain = Connection(sock, client_side=False, on_request=answer)
    plain.start()
    connections.append(plain)
    wait_until(lambda: len(router.pool) == 3, what="three tunnels")
    assert {wsgi_request(router, "GET", "/").body for _ in range(6)} == {b"ok"}


def test_a_handshake_that_stalls_is_closed_at_the_deadline(token_router, caplog):
    with socket.create_connection(token_router.tunnel_address, timeout=5) as sock:
        sock.sendall(b"GET /.well-known/ptth/*/ HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        assert sock.recv(1024) == b""  # closed by the router after handshake_timeout (1 s)
    wait_until(lambda: "no complete upgrade request within 1s" in caplog.text, what="the deadline in the log")
    assert len(token_router.pool) == 0


def test_an_upgrade_to_a_foreign_path_gets_404(token_router):
    with socket.create_connection(token_router.tunnel_address, timeout=5) as sock:
        sock.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: ptth\r\nConnection: upgrade\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 404")


def test_a_plain_http_request_on_the_tunnel_port_is_told_where_to_go(token_router, caplog):
    """``curl http://router:8887/``: a 404 whose body names the HTTP port, and one line in the log."""
    with socket.create_connection(token_router.tunnel_address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\n\r\n")
        answer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"\r\nContent-Length: %d" % len(body) in head
    assert b"tunnel port" in body
    assert b"HTTP port (--http)" in body
    wait_until(lambda: "HTTP clients belong on the router's HTTP port (--http)" in caplog.text,
               what="the line in the log")
    assert len(token_router.pool) == 0


def answered(answer: bytes) -> Exception:
    """What the backend's upgrade raises when a peer answers it with ``answer`` and closes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
        server.sendall(answer)
        server.shutdown(socket.SHUT_WR)
        try:
            dial_upgrade(client, "x:1", TOKEN)
        except (HandshakeRefused, HandshakeFailed) as exc:
            return exc
        finally:
            client.close()
            server.close()
    pytest.fail("the upgrade succeeded")


@pytest.mark.parametrize(("answer", "status"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 404),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", 101),
])
def test_an_answer_no_tunnel_listener_gives_is_not_retried(answer, status):
    refusal = answered(answer)
    assert isinstance(refusal, HandshakeRefused)
    assert refusal.status == status
    assert "an HTTP server answered, not a tunnel listener" in str(refusal)


@pytest.mark.parametrize("status", [502, 503, 504, 429, 408])
def test_an_answer_that_means_try_later_is_retried(status):
    failure = answered(f"HTTP/1.1 {status} Later\r\nContent-Length: 0\r\n\r\n".encode())
    assert isinstance(failure, HandshakeFailed)
    assert f"answered the upgrade with {status} Later" in str(failure)


def test_426_with_upgrade_tls_says_the_router_requires_tls():
    refusal = answered(plaintext_answer(b"GET /.well-known/ptth/*/ HTTP/1.1\r\n")[0])
    assert isinstance(refusal, HandshakeRefused)
    assert refusal.status == 426
    assert refusal.fix == TLS_REQUIRED


def test_a_tls_alert_where_the_upgrade_answer_belongs_says_the_router_speaks_tls():
    refusal = answered(b"\x15\x03\x01\x00\x02\x02\x46")  # a fatal protocol_version alert
    assert isinstance(refusal, HandshakeRefused)
    assert "it answered in TLS; start the backend with --tls" in str(refusal)


def test_a_router_that_closes_during_the_upgrade_is_retried():
    failure = answered(b"")
    assert isinstance(failure, HandshakeFailed)
