"""Each way to misconfigure a router or a backend, as real processes: one line, on the side of the mistake.

A backend that cannot succeed by dialling again says why on one line (naming the fix) and exits 1,
or stops gunicorn as a boot error (3); a router that is down or answers "try later" is redialled.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import ssl
import threading
import time

import pytest

from tests.conftest import PYTHON, Process, wait_until
from tests.system.test_backend_limits import refusing_port, retry_delays
from tests.system.test_security import certs  # noqa: F401  (the module's certificates fixture)
from tests.system.test_worker import start_gunicorn

pytest.importorskip("trustme")

#: Every refusal is told within this many seconds of starting the backend.
PROMPT = 8.0


def refusal(process: Process, fix: str) -> str:
    """The backend's refusal line, after checking it exited 1 promptly and said it once."""
    assert process.wait(PROMPT) == 1, process.output()
    lines = [line for line in process.lines if "refused the tunnel" in line]
    assert len(lines) == 1, process.output()
    assert "[ERROR]" in lines[0]
    assert re.search(fix, lines[0]), lines[0]
    assert process.count_lines("retrying|reconnecting") == 0, process.output()
    return lines[0]


def backend(processes, connect: str, *extra: str, app: str = "tests.apps:hello") -> Process:
    process = Process([PYTHON, "-m", "ptth_sync.backend", "--connect", connect, *extra, app])
    processes.append(process)
    return process


# -- tokens ----------------------------------------------------------------------------------


def test_a_backend_without_a_token_is_told_the_router_wants_one(router_process, processes):
    router = router_process("--token", "tok-123")
    line = refusal(backend(processes, router.tunnel_address),
                   r"refused the tunnel: this router requires a token: give the backend --token or --token-file")
    assert f"Router at {router.tunnel_address} " in line
    router.wait_for_line(r"Tunnel from \S+ refused: plain-wire tunnel refused: .*no --token")


def test_a_wrong_token_names_the_options_to_check(router_process, processes):
    router = router_process("--token", "tok-123")
    refusal(backend(processes, router.tunnel_address, "--token", "wrong"),
            r"refused the tunnel: 401 Unauthorized; the token is wrong or missing: .*--token or --token-file")


# -- TLS ----------------------------------------------------------------------------------------


def test_a_router_certificate_for_another_name_names_the_fix_and_is_redialled(router_process, processes,
                                                                              tmp_path):
    """The certificate is trusted but names only ``localhost``; the backend dials 127.0.0.1."""
    import trustme

    ca = trustme.CA()
    server, ca_file = tmp_path / "server.pem", tmp_path / "ca.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(server)
    ca.cert_pem.write_to_path(ca_file)
    router = router_process("--certfile", str(server))
    dialer = backend(processes, router.tunnel_address, "--cafile", str(ca_file))
    dialer.wait_for_line(r"certificate is not valid for '127\.0\.0\.1'.*"
                         r"\(dial a name the router's certificate holds: --connect NAME:PORT\); retrying")
    served = backend(processes, f"localhost:{router.tunnel_port}", "--cafile", str(ca_file))
    served.wait_for_line("Tunnel to localhost:")
    assert dialer.proc.poll() is None  # still redialling: a certificate is often fixed on the router


def test_mutual_tls_without_a_client_certificate_is_told_to_the_backend(router_process, processes, certs):  # noqa: F811
    router = router_process("--certfile", certs["server"], "--ca-certs", certs["ca"])
    refusal(backend(processes, router.tunnel_address, "--cafile", certs["ca"]),
            r"refused the tunnel: it requires a client certificate \(mutual TLS\); "
            r"start the backend with --certfile and --keyfile")
    router.wait_for_line(r"Tunnel from \S+ failed the TLS handshake: the backend presented no client certificate, "
                         r"which this router requires \(--ca-certs\): start it with --certfile and --keyfile")


@pytest.mark.parametrize("wire", ["plain", "upgrade"])
def test_a_plain_backend_against_a_tls_router_is_told_to_use_tls(router_process, processes, certs, wire):  # noqa: F811
    router = router_process("--certfile", certs["server"], "--token", "tok")
    extra = ("--token", "tok") if wire == "upgrade" else ()
    line = refusal(backend(processes, router.tunnel_address, *extra),
                   r"this router's tunnel listener requires TLS: start the backend with --tls")
    if wire == "upgrade":
        assert "refused the tunnel: 426 Upgrade Required;" in line
    router.wait_for_line(r"Tunnel from \S+ failed the TLS handshake: it (dialled without TLS|sent a plain HTTP/1.1 "
                         r"request), and this listener requires TLS: start the backend with --tls")


@pytest.mark.parametrize("wire", ["plain", "upgrade"])
def test_a_tls_backend_against_a_plain_router_is_told_to_drop_tls(router_process, processes, certs, wire):  # noqa: F811
    router = router_process()
    extra = ("--origin", "http://app.example") if wire == "upgrade" else ()
    refusal(backend(processes, router.tunnel_address, "--cafile", certs["ca"], *extra),
            r"refused the tunnel: its tunnel listener does not speak TLS \(it sent a plain HTTP/2 preface\); "
            r"drop --tls")
    router.wait_for_line(r"Tunnel from \S+ refused: it began a TLS handshake, and this tunnel listener is plain: "
                         r"start the backend without --tls, or give the router --certfile and --keyfile")
    assert router.count_lines("Tunnel added") == 0


def test_tls_listeners_say_tls_and_https_and_a_tls_backend_says_tls(router_process, processes, certs):  # noqa: F811
    router = router_process("--certfile", certs["server"], "--http-certfile", certs["server"],
                            "--http-keyfile", certs["server"])
    router.wait_for_line(r"Listening for reverse tunnels on tls://127\.0\.0\.1:\d+$")
    router.wait_for_line(r"Listening for HTTP traffic on https://127\.0\.0\.1:\d+$")
    served = backend(processes, router.tunnel_address, "--cafile", certs["ca"])
    served.wait_for_line(rf"\[INFO\] Dialing tls://{re.escape(router.tunnel_address)} and serving HTTP/2 traffic$")
    router.wait_tunnels(1)


# -- the wrong port ---------------------------------------------------------------------------


def test_a_plain_backend_dialling_the_http_port_is_told_to_dial_tunnels(router_process, processes):
    router = router_process()
    started = time.monotonic()
    refusal(backend(processes, f"{router.http_host}:{router.http_port}"),
            r"refused the tunnel: 400 Bad Request; an HTTP server answered, not a tunnel listener: "
            r"if this is the router's HTTP port \(--http\), dial its --tunnels port instead")
    assert time.monotonic() - started < PROMPT


#: The backend's line when an HTTP port answered it (the router's --http, plain or HTTPS).
HTTP_PORT_FIX = (r"an HTTP server answered, not a tunnel listener: "
                 r"if this is the router's HTTP port \(--http\), dial its --tunnels port instead$")


def test_a_tls_backend_dialling_the_plain_http_port_is_told_at_once(router_process, processes, certs):  # noqa: F811
    router = router_process()
    started = time.monotonic()
    refusal(backend(processes, f"{router.http_host}:{router.http_port}", "--tls", "--cafile", certs["ca"]),
            r"\] Router at 127\.0\.0\.1:\d+ refused the tunnel: it answered in plain HTTP/1\.1, not TLS; "
            + HTTP_PORT_FIX)
    assert time.monotonic() - started < PROMPT  # not the router's --header-timeout (10 s)
    router.wait_for_line(r"\[INFO\] Connection from 127\.0\.0\.1:\d+ refused: it began a TLS handshake on this plain "
                         r"HTTP port: use http:// \(or give the router --http-certfile and --http-keyfile\); "
                         r"a backend dials the router's --tunnels port, not --http$")
    # A browser or curl saying https:// to the plain port fails at once too, not after the header timeout.
    started = time.monotonic()
    client = http.client.HTTPSConnection(router.http_host, router.http_port, timeout=PROMPT,
                                         context=ssl.create_default_context(cafile=certs["ca"]))
    with pytest.raises(ssl.SSLError):
        client.request("GET", "/")
    client.close()
    assert time.monotonic() - started < 2.0
    wait_until(lambda: router.count_lines("refused: it began a TLS handshake") == 2, PROMPT, what=router.output())
    assert router.count_lines("request head not received") == 0


@pytest.mark.parametrize("wire", ["plain", "upgrade"])
def test_a_plain_backend_dialling_the_https_port_is_told_at_once(router_process, processes, certs, wire):  # noqa: F811
    router = router_process("--http-certfile", certs["server"], "--http-keyfile", certs["server"])
    extra = ("--token", "tok") if wire == "upgrade" else ()
    refusal(backend(processes, f"{router.http_host}:{router.http_port}", *extra),
            r"\] Router at 127\.0\.0\.1:\d+ refused the tunnel: 400 Bad Request; " + HTTP_PORT_FIX)
    router.wait_for_line(r"\[INFO\] Connection from 127\.0\.0\.1:\d+ refused: it sent plain HTTP, not TLS, to this "
                         r"HTTPS port: use https://; a backend dials the router's --tunnels port, not --http$")
    assert router.count_lines("Connection from .* refused") == 1
    # Plain HTTP from a browser or curl gets the same 400 at once, in words (as nginx's "plain HTTP request ...").
    client = http.client.HTTPConnection(router.http_host, router.http_port, timeout=PROMPT)
    client.request("GET", "/")
    response = client.getresponse()
    assert response.status == 400
    assert response.read() == (b"The plain HTTP request was sent to an HTTPS port: use https:// "
                               b"(a backend dials the router's --tunnels port, not --http).\n")
    client.close()


def test_an_upgrading_backend_dialling_the_http_port_is_told_by_the_router_itself(router_process, processes):
    router = router_process()
    backend(processes, router.tunnel_address, app="examples.flask_app:app")
    router.wait_tunnels(1)
    # The upgrade request is not proxied to the application: the router answers it.
    refusal(backend(processes, f"{router.http_host}:{router.http_port}", "--token", "t"),
            r"refused the tunnel: 400 Bad Request; an HTTP server answered, not a tunnel listener")
    assert router.wait_for_line(r"400, this is the router's HTTP port: a backend dials its --tunnels port")


def test_an_upgrading_backend_dialling_the_http_port_of_a_router_with_no_tunnel_is_told_too(router_process, processes):
    router = router_process()  # no tunnel: any other request would get a 503
    refusal(backend(processes, f"{router.http_host}:{router.http_port}", "--token", "t"),
            r"refused the tunnel: 400 Bad Request; an HTTP server answered, not a tunnel listener")


class _TryLater(http.server.BaseHTTPRequestHandler):
    """What a proxy in front of a router that is down answers."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_503_from_a_proxy_is_retried_as_its_router_may_come_back(processes):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TryLater)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        waiting = backend(processes, f"{host}:{port}", "--token", "t", "--max-backoff", "0.2")
        waiting.wait_for_line(r"router answered the upgrade with 503 Service Unavailable \(if this is the router's "
                              r"HTTP port, dial its --tunnels port\); retrying in .* \(attempt 3\)")
        assert waiting.proc.poll() is None
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_given_to_connect_is_refused_at_once(processes):
    process = backend(processes, "http://127.0.0.1:8887")
    assert process.wait(PROMPT) == 2
    process.wait_for_line(r"error: argument --connect: 'http://127\.0\.0\.1:8887' is a URL, not a HOST:PORT "
                          r"address: give 127\.0\.0\.1:8887$")


# -- what stays retryable -----------------------------------------------------------------------


def test_a_router_that_is_down_is_still_redialled_and_then_served(processes, router_process):
    holder = refusing_port()
    address = f"127.0.0.1:{holder.getsockname()[1]}"
    waiting = backend(processes, address, "--max-backoff", "0.2")
    try:
        waiting.wait_for_line(r"Connection refused; retrying in .* \(attempt 4\)")
    finally:
        holder.close()
    router = router_process(tunnels=address)
    router.wait_tunnels(1, timeout=5)
    assert waiting.proc.poll() is None
    assert max(retry_delays(waiting)) <= 0.2


def test_a_router_that_accepts_and_closes_while_starting_is_redialled(processes):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        waiting = backend(processes, f"127.0.0.1:{listener.getsockname()[1]}", "--max-backoff", "0.2")
        for _ in range(3):  # as a router closing the connections still opening when it stops
            listener.settimeout(PROMPT)
            conn, _ = listener.accept()
            conn.close()
        # (Closed with the backend's greeting unread, a connection may be reset rather than closed.)
        waiting.wait_for_line(r"Tunnel to .* lost: (peer closed the connection|read failed: .*reset by peer); "
                              r"reconnecting .* \(attempt 3\)")
    assert waiting.proc.poll() is None


# -- under gunicorn -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["token", "tls"])
def test_gunicorn_stops_with_a_boot_error_and_one_line(router_process, processes, tmp_path, certs, case):  # noqa: F811
    if case == "token":
        router = router_process("--token", "tok")
        fix = r"this router requires a token: give the backend --token or --token-file \(PTTH_TOKEN under gunicorn\)"
    else:
        router = router_process("--certfile", certs["server"])
        fix = r"this router's tunnel listener requires TLS: start the backend with --tls \(PTTH_TLS=1 under gunicorn\)"
    server = start_gunicorn(processes, router, tmp_path)
    assert server.wait(15) == 3, server.output()
    assert server.count_lines(rf"\[ERROR\] Router at {re.escape(router.tunnel_address)} refused the tunnel: {fix}") == 1
    server.wait_for_line(r"Reason: Worker failed to boot")


def test_gunicorn_refuses_a_url_in_ptth_connect(processes, tmp_path):
    server = start_gunicorn(processes, None, tmp_path, env={"PTTH_CONNECT": "https://router.example:8887"})
    assert server.wait(15) == 1
    server.wait_for_line(r"Error: PTTH_CONNECT: 'https://router\.example:8887' is a URL, not a HOST:PORT address: "
                         r"give router\.example:8887")


# -- the router's own mistakes ------------------------------------------------------------------


def test_an_http_port_in_use_stops_the_router_at_once_before_it_says_listening(processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        router = Process([PYTHON, "-m", "ptth_sync.router", "--tunnels", "127.0.0.1:0", "--http", f"127.0.0.1:{port}"])
        processes.append(router)
        assert router.wait(PROMPT) == 1
    assert router.lines == [router.lines[0]], router.output()
    assert re.search(rf"\[ERROR\] Cannot listen for HTTP traffic on 127\.0\.0\.1:{port}: Address already in use: "
                     r"stop what holds it, or give --http another address$", router.lines[0])

