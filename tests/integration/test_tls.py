"""TLS on the tunnel (and mutual TLS), with certificates made at test time."""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
import threading
from typing import Any, List, Tuple

import pytest
from h2.errors import ErrorCodes

trustme = pytest.importorskip("trustme")

from ptth_sync import Router  # noqa: E402
from ptth_sync.addresses import format_address  # noqa: E402
from ptth_sync.connection import Connection, Stream  # noqa: E402
from ptth_sync.handshake import TLS_REQUIRED, TOKEN_REQUIRED, dial_upgrade  # noqa: E402
from ptth_sync.tls import TLSChannel, client_context, server_context  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.integration.conftest import echo_in_thread  # noqa: E402
from tests.wsgi_client import wsgi_request  # noqa: E402


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def pem_files(ca, tmp_path_factory):
    """PEM files: the CA, a good server certificate, an expired one, and a client certificate."""
    folder = tmp_path_factory.mktemp("certs")
    files = {"ca": folder / "ca.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
    for name, cert in {
        "server": ca.issue_cert("localhost", "127.0.0.1"),
        "expired": ca.issue_cert("localhost", "127.0.0.1", not_after=past,
                                 not_before=past - datetime.timedelta(days=30)),
        "client": ca.issue_cert("backend-1.example"),
    }.items():
        files[name] = folder / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(files[name])
    return files


def make_router(pem_files, cert: str = "server", mutual: bool = False, token=None) -> Router:
    context = server_context(str(pem_files[cert]), ca_certs=str(pem_files["ca"]) if mutual else None)
    router = Router(timeout=5, ssl_context=context, token=token, handshake_timeout=2)
    router.tunnel_address = router.listen_tunnels("127.0.0.1:0")
    return router


def answer(stream: Stream) -> None:
    def respond() -> None:
        stream.send_response([(b":status", b"200"), (b"content-length", b"3")], b"tls", end_stream=True)
        stream.close()

    threading.Thread(target=respond, daemon=True).start()


@pytest.fixture
def opened():
    connections: List[Connection] = []
    routers: List[Router] = []
    yield connections, routers
    for connection in connections:
        connection.close()
    for router in routers:
        router.close()


def dial(router: Router, context: ssl.SSLContext, opened, hostname: str = "localhost", token=None) -> TLSChannel:
    sock = socket.create_connection(router.tunnel_address, timeout=5)
    channel = TLSChannel(sock, context, server_side=False, server_hostname=hostname)
    try:
        channel.do_handshake(5)
    except BaseException:
        sock.close()
        raise
    leftover = dial_upgrade(channel, format_address(router.tunnel_address), token) if token else b""
    connection = Connection(channel, client_side=False, on_request=answer, initial_data=leftover)  # type: ignore[arg-type]
    connection.start()
    opened[0].append(connection)
    return channel


def test_a_tls_tunnel_with_a_valid_certificate_serves_and_negotiates_h2(pem_files, opened):
    router = make_router(pem_files)
    opened[1].append(router)
    channel = dial(router, client_context(cafile=str(pem_files["ca"])), opened)
    assert channel.selected_alpn_protocol == "h2"
    wait_until(lambda: len(router.pool) == 1, what="the TLS tunnel")
    assert [wsgi_request(router, "GET", "/").body for _ in range(5)] == [b"tls"] * 5


def test_large_bodies_cross_a_tls_tunnel_both_ways(pem_files, opened):
    router = make_router(pem_files)
    opened[1].append(router)
    echo_bytes = bytes(range(256)) * 4096 * 4  # 4 MiB

    sock = socket.create_connection(router.tunnel_address, timeout=5)
    channel = TLSChannel(sock, client_context(cafile=str(pem_files["ca"])), server_side=False,
                         server_hostname="localhost")
    channel.do_handshake(5)
    asked: List[Tuple[int, bool]] = []
    channel._ssl = _ReadsRecorded(channel._ssl, asked)
    connection = Connection(channel, client_side=False, on_request=echo_in_thread)  # type: ignore[arg-type]
    connection.start()
    opened[0].append(connection)
    wait_until(lambda: len(router.pool) == 1, what="the TLS tunnel")
    assert wsgi_request(router, "PUT", "/", echo_bytes).body == echo_bytes
    # Each read is asked for one record at most, into a buffer: asking OpenSSL for more makes it allocate
    # all of it and shrink it to the record it returns, MiB-sized blocks that left the backend's heap in
    # pieces; and even a record's 16 KiB so allocated and shrunk, read after read, did the same more slowly.
    assert asked
    assert max(size for size, _ in asked) <= 16384
    assert all(into_buffer for _, into_buffer in asked)


class _ReadsRecorded:
    """An SSLObject that records the sizes its reads are asked for, and whether into a buffer."""

    def __init__(self, ssl_object: Any, asked: List[Tuple[int, bool]]) -> None:
        self._ssl_object = ssl_object
        self._asked = asked

    def read(self, size: int = 1024, *args: Any) -> Any:
        self._asked.append((size, bool(args)))
        return self._ssl_object.read(size, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ssl_object, name)


def test_an_expired_certificate_is_refused_by_the_backend_and_no_tunnel_is_added(pem_files, opened, caplog):
    caplog.set_level(logging.INFO, logger="ptth_sync.router")
    router = make_router(pem_files, cert="expired")
    opened[1].append(router)
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        dial(router, client_context(cafile=str(pem_files["ca"])), opened)
    wait_until(lambda: "failed the TLS handshake" in caplog.text, what="the failure in the router's log")
    assert len(router.pool) == 0


def test_a_wrong_hostname_is_refused_by_the_backend(pem_files, opened):
    router = make_router(pem_files)
    opened[1].append(router)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|doesn.t match|not valid"):
        dial(router, client_context(cafile=str(pem_files["ca"])), opened, hostname="router.example")
    assert len(router.pool) == 0


def refusal_of_handshake(router: Router, context: ssl.SSLContext, opened: Any) -> Any:
    """Dial ``router`` with ``context`` as a backend would: what the backend makes of being refused."""
    sock = socket.create_connection(router.tunnel_address, timeout=5)
    channel = TLSChannel(sock, context, server_side=False, server_hostname="localhost")
    try:
        channel.do_handshake(5)
    except (ssl.SSLError, OSError) as exc:
        return channel.refusal(exc)  # TLS 1.2 fails in the handshake
    # TLS 1.3: the client finishes first; the router's alert (sent before it closes) ends the session.
    connection = Connection(channel, client_side=False, on_request=answer)  # type: ignore[arg-type]
    connection.start()
    opened[0].append(connection)
    assert connection.wait_closed(5)
    return channel.refusal()


def test_mutual_tls_refuses_a_backend_without_a_client_certificate(pem_files, opened, caplog):
    caplog.set_level(logging.INFO, logger="ptth_sync.router")
    router = make_router(pem_files, mutual=True)
    opened[1].append(router)
    context = client_context(cafile=str(pem_files["ca"]))
    refusal = refusal_of_handshake(router, context, opened)
    assert refusal is not None, "the backend was not told why"
    assert "client certificate" in refusal.reason
    assert "--certfile and --keyfile" in refusal.fix
    wait_until(lambda: "failed the TLS handshake: the backend presented no client certificate" in caplog.text,
               what="the refusal in the router's log")
    assert len(router.pool) == 0


def test_a_plain_wire_peer_of_a_tls_listener_is_told_in_a_goaway_to_use_tls(pem_files, opened, caplog):
    caplog.set_level(logging.INFO, logger="ptth_sync.router")
    router = make_router(pem_files)
    opened[1].append(router)
    sock = socket.create_connection(router.tunnel_address, timeout=5)
    plain = Connection(sock, client_side=False, on_request=answer)
    plain.start()
    opened[0].append(plain)
    assert plain.wait_closed(5)
    assert plain.goaway_received == (ErrorCodes.INADEQUATE_SECURITY, TLS_REQUIRED.encode())
    logged = "failed the TLS handshake: it dialled without TLS, and this listener requires TLS"
    wait_until(lambda: logged in caplog.text, what="the refusal in the router's log")
    assert len(router.pool) == 0


def test_an_http1_request_to_a_tls_listener_gets_426_upgrade_tls(pem_files, opened):
    router = make_router(pem_files)
    opened[1].append(router)
    with socket.create_connection(router.tunnel_address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer_bytes = b""
        while chunk := sock.recv(4096):
            answer_bytes += chunk
    assert answer_bytes.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nUpgrade: TLS/1.2, HTTP/1.1\r\n" in answer_bytes


def test_a_tls_client_of_a_plain_listener_learns_it_is_plain(opened, pem_files, caplog):
    caplog.set_level(logging.INFO, logger="ptth_sync.router")
    router = Router(timeout=5)
    router.tunnel_address = router.listen_tunnels("127.0.0.1:0")
    opened[1].append(router)
    sock = socket.create_connection(router.tunnel_address, timeout=5)
    channel = TLSChannel(sock, client_context(cafile=str(pem_files["ca"])), server_side=False,
                         server_hostname="localhost")
    with pytest.raises((ssl.SSLError, OSError)) as info:
        channel.do_handshake(5)
    sock.close()
    refusal = channel.refusal(info.value)
    assert refusal is not None
    assert "does not speak TLS" in refusal.reason
    assert refusal.fix.startswith("drop --tls")
    wait_until(lambda: "refused: it began a TLS handshake, and this tunnel listener is plain" in caplog.text,
               what="the refusal in the router's log")


def test_mutual_tls_admits_a_backend_with_a_client_certificate_and_a_token(pem_files, opened):
    router = make_router(pem_files, mutual=True, token="t0k")
    opened[1].append(router)
    context = client_context(cafile=str(pem_files["ca"]), certfile=str(pem_files["client"]))
    dial(router, context, opened, token="t0k")
    wait_until(lambda: len(router.pool) == 1, what="the mutual-TLS tunnel")
    assert wsgi_request(router, "GET", "/").body == b"tls"


def test_a_tls_handshake_that_stalls_is_closed_at_the_deadline(pem_files, opened, caplog):
    router = make_router(pem_files)
    opened[1].append(router)
    with socket.create_connection(router.tunnel_address, timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        assert sock.recv(1024) == b""
    wait_until(lambda: "failed the TLS handshake" in caplog.text, what="the deadline in the log")


def test_a_peer_that_stops_mid_tls_record_is_dropped_by_the_timers(pem_files, opened, caplog):
    from ptth_sync.connection import ConnectionSettings

    context = server_context(str(pem_files["server"]))
    router = Router(timeout=5, ssl_context=context, handshake_timeout=2,
                    settings=ConnectionSettings(settings_timeout=1.0))
    router.tunnel_address = router.listen_tunnels("127.0.0.1:0")
    opened[1].append(router)
    sock = socket.create_connection(router.tunnel_address, timeout=5)
    channel = TLSChannel(sock, client_context(cafile=str(pem_files["ca"])), server_side=False,
                         server_hostname="localhost")
    channel.do_handshake(5)
    try:
        sock.settimeout(5)
        assert channel.recv(24).startswith(b"PRI * HTTP/2.0")  # the router's reader is running now
        sock.sendall(b"\x17\x03\x03\x00\x40" + b"\x00" * 10)  # the start of a 64-byte record, then nothing
        wait_until(lambda: "peer sent no HTTP/2 SETTINGS within 1s" in caplog.text, 10,
                   what="the router to give up on the silent peer")
    finally:
        sock.close()
    assert len(router.pool) == 0


def test_a_client_certificate_from_another_ca_is_refused_and_both_sides_say_why(pem_files, opened, caplog,
                                                                                 tmp_path):
    caplog.set_level(logging.INFO, logger="ptth_sync.router")
    router = make_router(pem_files, mutual=True)
    opened[1].append(router)
    stranger = tmp_path / "stranger.pem"
    trustme.CA().issue_cert("backend-2.example").private_key_and_cert_chain_pem.write_to_path(stranger)
    refusal = refusal_of_handshake(router, client_context(cafile=str(pem_files["ca"]), certfile=str(stranger)),
                                   opened)
    assert refusal is not None, "the backend was not told why"
    assert refusal.reason == "it does not trust the client certificate's CA"
    wait_until(lambda: "failed the TLS handshake: the backend's client certificate is not trusted (" in caplog.text,
               what="the refusal in the router's log")
    assert "issue it from a CA in the router's --ca-certs" in caplog.text


def test_a_tls_token_router_tells_a_plain_wire_backend_in_a_goaway_that_it_wants_a_token(pem_files, opened):
    router = make_router(pem_files, token="t0k")
    opened[1].append(router)
    dial(router, client_context(cafile=str(pem_files["ca"])), opened)
    connection = opened[0][-1]
    assert connection.wait_closed(5)
    assert connection.goaway_received == (ErrorCodes.INADEQUATE_SECURITY, TOKEN_REQUIRED.encode())
    assert len(router.pool) == 0


def test_a_server_silent_through_the_tls_handshake_gets_a_hint_about_http_ports(pem_files):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts (in the backlog) and never answers, as an HTTP port waits for a request
        with socket.create_connection(listener.getsockname(), timeout=5) as sock:
            channel = TLSChannel(sock, client_context(cafile=str(pem_files["ca"])), server_side=False,
                                 server_hostname="localhost")
            with pytest.raises(TimeoutError, match=r"^no answer to the TLS handshake within 0.3s \(an HTTP port "
                                                   r"waits for a request: is this the router's --http port\?\)$"):
                channel.do_handshake(0.3)
            assert channel.refusal() is None  # retried: a router may just be slow
