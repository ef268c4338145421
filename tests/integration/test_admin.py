"""The admin endpoints of a real Router, with real Backends over loopback tunnels."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
from typing import Any, Dict, List, Tuple

import pytest

from ptth_sync import Backend, HandshakeRefused, Router
from ptth_sync.addresses import Address, format_address
from ptth_sync.handshake import dial_upgrade
from ptth_sync.router.app import TunnelBroken
from ptth_sync.router.metrics import CONTENT_TYPE, parse
from tests import apps
from tests.conftest import wait_until
from tests.wsgi_client import wsgi_request

TOKEN = "admin-test-token"


def fetch(admin: Address, path: str, method: str = "GET") -> Tuple[int, Dict[str, str], bytes]:
    conn = http.client.HTTPConnection(admin[0], admin[1], timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def scrape(admin: Address) -> Dict[Tuple[str, tuple], float]:
    code, headers, body = fetch(admin, "/metrics")
    assert code == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    return parse(body.decode())


def metric(admin: Address, name: str, **labels: str) -> float:
    return scrape(admin).get((f"ptth_router_{name}", tuple(labels.items())), 0.0)


def current_status(admin: Address) -> Dict[str, Any]:
    code, headers, body = fetch(admin, "/status")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)


@pytest.fixture
def admin(router) -> Address:
    return router.listen_admin("127.0.0.1:0")


def test_requests_are_counted_by_status_code_and_a_503_without_a_tunnel(router, admin, start_backend):
    assert wsgi_request(router, "GET", "/foo").code == 503
    start_backend(apps.hello)
    for _ in range(5):
        assert wsgi_request(router, "GET", "/foo").body == b"bar"
    samples = scrape(admin)
    assert samples[("ptth_router_requests_total", (("code", "200"),))] == 5
    assert samples[("ptth_router_requests_total", (("code", "503"),))] == 1
    assert samples[("ptth_router_request_duration_seconds_count", ())] == 5  # the 503 never reached a tunnel
    assert samples[("ptth_router_request_duration_seconds_bucket", (("le", "+Inf"),))] == 5
    assert samples[("ptth_router_tunnels", (("origin", "*"),))] == 1
    assert samples[("ptth_router_tunnel_connects_total", (("origin", "*"),))] == 1
    assert samples[("ptth_router_response_bytes_total", ())] == 15


def test_body_bytes_are_counted_both_ways_small_and_streamed(router, admin, start_backend):
    start_backend(apps.echo)
    small, large = b"s" * 10, b"L" * (300 * 1024)  # inline with the headers, and by the upload thread
    assert wsgi_request(router, "POST", "/", small).body == small
    assert wsgi_request(router, "POST", "/", large).body == large
    assert wsgi_request(router, "POST", "/", large, chunked=True).body == large
    samples = scrape(admin)
    total = len(small) + 2 * len(large)
    assert samples[("ptth_router_request_bytes_total", ())] == total
    assert samples[("ptth_router_response_bytes_total", ())] == total


def test_status_lists_every_tunnel_with_its_origin_peer_and_requests_served(router, admin):
    backends: List[Backend] = []
    try:
        backends.append(Backend(router.tunnel_address, apps.hello, threads=4).start())
        backends.append(Backend(router.tunnel_address, apps.hello, threads=4,
                                origins=["http://api.example.com"]).start())
        wait_until(lambda: len(router.pool) == 2, what="two tunnels")
        for _ in range(3):
            assert wsgi_request(router, "GET", "/foo").body == b"bar"
        assert wsgi_request(router, "GET", "/foo", headers={"Host": "api.example.com"}).body == b"bar"
        shown = current_status(admin)
        peers = {format_address(c.sock.getsockname()[:2]) for b in backends for c in b.connections}
    finally:
        for backend in backends:
            backend.close()
    assert shown["live_tunnels"] == 2
    assert shown["requests_total"] == 4
    assert shown["origins"] == {"*": 1, "http://api.example.com": 1}
    assert shown["workers"] == [os.getpid()]
    assert {tunnel["peer"] for tunnel in shown["tunnels"]} == peers
    served = {tunnel["origin"]: tunnel["requests_served"] for tunnel in shown["tunnels"]}
    assert served == {"*": 3, "http://api.example.com": 1}
    for tunnel in shown["tunnels"]:
        assert tunnel["worker_pid"] == os.getpid()
        assert tunnel["age_seconds"] >= 0
        assert tunnel["active_streams"] == 0
        assert tunnel["draining"] is False


def test_tunnels_are_shown_by_origin(router, admin):
    backend = Backend(router.tunnel_address, apps.hello, origins=["http://api.example.com"]).start()
    try:
        wait_until(lambda: len(router.pool) == 1, what="the tunnel")
        samples = scrape(admin)
    finally:
        backend.close()
    assert samples[("ptth_router_tunnels", (("origin", "http://api.example.com"),))] == 1
    assert samples[("ptth_router_tunnels", (("origin", "*"),))] == 0
    assert samples[("ptth_router_tunnel_connects_total", (("origin", "http://api.example.com"),))] == 1


def test_a_request_in_flight_is_an_active_stream_on_its_tunnel(router, admin, start_backend):
    release = threading.Event()

    def held(environ, start_response):
        release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    start_backend(held)
    results: List[bytes] = []
    client = threading.Thread(target=lambda: results.append(wsgi_request(router, "GET", "/").body))
    client.start()
    try:
        wait_until(lambda: metric(admin, "active_streams") == 1, what="one active stream")
        assert [tunnel["active_streams"] for tunnel in current_status(admin)["tunnels"]] == [1]
    finally:
        release.set()
        client.join(10)
    assert results == [b"done"]
    wait_until(lambda: metric(admin, "active_streams") == 0, what="no active stream")
    assert current_status(admin)["tunnels"][0]["requests_served"] == 1


def test_a_request_waiting_for_a_tunnel_is_shown_until_one_arrives(router, admin, start_backend):
    router.tunnel_wait = 10
    results: List[int] = []
    client = threading.Thread(target=lambda: results.append(wsgi_request(router, "GET", "/foo").code))
    client.start()
    wait_until(lambda: metric(admin, "requests_waiting") == 1, what="a waiting request")
    assert current_status(admin)["requests_waiting"] == 1
    start_backend(apps.hello)
    client.join(10)
    assert results == [200]
    assert metric(admin, "requests_waiting") == 0


def test_healthz_answers_503_without_a_live_tunnel_and_200_with_one(router, admin, start_backend):
    code, _, body = fetch(admin, "/healthz")
    assert (code, body) == (503, b"no live tunnel\n")
    start_backend(apps.hello)
    code, headers, body = fetch(admin, "/healthz")
    assert (code, body) == (200, b"ok\n")
    code, headers, body = fetch(admin, "/healthz", "HEAD")
    assert (code, body, headers["Content-Length"]) == (200, b"", "3")


def test_healthz_answers_200_without_a_tunnel_while_a_stopping_worker_hands_its_tunnels_over(router, admin,
                                                                                             start_backend):
    """A reload: the worker that stops asks its backends to dial again (fleet.py); until their tunnels arrive,
    requests wait for them and /healthz stays 200, so that a load balancer does not take the router out."""
    from ptth_sync.router.fleet import WorkerFleet

    fleet = router.fleet = WorkerFleet(slots=4, spread=False)
    assert fetch(admin, "/healthz")[0] == 503
    fleet.leave(handing_over=True)  # (as another worker does when it hands its tunnels over)
    code, _, body = fetch(admin, "/healthz")
    assert (code, body) == (200, b"ok\n")
    results: List[int] = []
    client = threading.Thread(target=lambda: results.append(wsgi_request(router, "GET", "/foo").code))
    client.start()  # with --tunnel-wait 0, it waits for the tunnels on their way
    wait_until(lambda: metric(admin, "requests_waiting") == 1, what="a waiting request")
    start_backend(apps.hello)
    client.join(10)
    assert results == [200]


def test_unknown_paths_get_404_and_other_methods_405(admin):
    assert fetch(admin, "/")[0] == 404
    assert fetch(admin, "/metrics/extra")[0] == 404
    for method in ("POST", "DELETE", "BREW"):
        code, headers, _ = fetch(admin, "/metrics", method)
        assert (code, headers["Allow"]) == (405, "GET, HEAD")
    code, headers, body = fetch(admin, "/metrics?x=1", "HEAD")
    assert (code, body) == (200, b"")


def test_a_backend_that_stops_is_a_goaway_drop_and_one_that_vanishes_a_peer_closed_drop(router, admin, start_backend):
    start_backend(apps.hello).close()
    wait_until(lambda: metric(admin, "tunnel_drops_total", reason="goaway") == 1, what="a GOAWAY drop")
    vanishing = start_backend(apps.hello)
    for connection in vanishing.connections:
        connection.sock.shutdown(socket.SHUT_RDWR)  # no GOAWAY
    wait_until(lambda: metric(admin, "tunnel_drops_total", reason="peer_closed") == 1, what="a peer-closed drop")
    assert metric(admin, "tunnel_drops_total", reason="goaway") == 1
    assert metric(admin, "tunnels", origin="*") == 0


def test_closing_the_router_counts_its_tunnels_as_router_closed_and_stops_the_admin_listener(start_backend):
    router = Router(timeout=10)
    router.tunnel_address = router.listen_tunnels("127.0.0.1:0")
    admin = router.listen_admin("127.0.0.1:0")
    backend = Backend(router.tunnel_address, apps.hello).start()
    try:
        wait_until(lambda: len(router.pool) == 1, what="the tunnel")
        router.close()
    finally:
        backend.close()
    assert router.metrics.counters()["drops"]["router_closed"] == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(admin, timeout=5).close()


def test_a_response_cut_by_its_tunnel_is_counted_as_broken(router, admin, start_backend):
    start_backend(apps.fails_mid_body)
    response = wsgi_request(router, "GET", "/")
    with pytest.raises(TunnelBroken):
        b"".join(response.iterable)
    response.close()
    samples = scrape(admin)
    assert samples[("ptth_router_responses_broken_total", ())] == 1
    assert samples[("ptth_router_requests_total", (("code", "200"),))] == 1


@pytest.fixture
def token_router():
    router = Router(timeout=5, token=TOKEN, handshake_timeout=1.0,
                    tokens={"api-token": ["http://api.example.com"]})
    router.tunnel_address = router.listen_tunnels("127.0.0.1:0")
    router.admin_address = router.listen_admin("127.0.0.1:0")
    yield router
    router.close()


def test_refused_and_failed_tunnel_openings_are_counted_by_reason(token_router):
    admin, address = token_router.admin_address, token_router.tunnel_address
    with socket.create_connection(address, timeout=5) as sock, pytest.raises(HandshakeRefused):
        dial_upgrade(sock, format_address(address), "wrong")
    with socket.create_connection(address, timeout=5) as sock, pytest.raises(HandshakeRefused):
        dial_upgrade(sock, format_address(address), "api-token", "http://www.example.com")
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: ptth\r\nConnection: upgrade\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 404")
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET /.well-known/ptth/*/ HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        assert sock.recv(1024) == b""
    wait_until(lambda: metric(admin, "tunnel_refusals_total", reason="timeout") == 1, what="the stalled opening")
    samples = scrape(admin)
    refusals = {labels[0][1]: count for (name, labels), count in samples.items()
                if name == "ptth_router_tunnel_refusals_total" and count}
    assert refusals == {"unauthorized": 1, "forbidden": 1, "bad_request": 1, "timeout": 1}
    assert samples[("ptth_router_tunnels", (("origin", "*"),))] == 0


def test_a_connection_that_breaks_http2_before_its_settings_is_a_refusal_not_a_drop(router, admin):
    with socket.create_connection(router.tunnel_address, timeout=5) as sock:
        sock.sendall(b"\x00\x00\x01\x04\x00\x00\x00\x00\x00\x00")  # a SETTINGS frame of one byte: malformed
        wait_until(lambda: metric(admin, "tunnel_refusals_total", reason="protocol_error") == 1,
                   what="the failed opening")
    assert sum(v for (name, _), v in scrape(admin).items() if name == "ptth_router_tunnel_drops_total") == 0


def test_an_admin_listener_beyond_loopback_is_warned_about(caplog):
    caplog.set_level(logging.WARNING, logger="ptth_sync.router")
    router = Router()
    try:
        router.listen_admin("0.0.0.0:0")
    finally:
        router.close()
    assert "admin listener on 0.0.0.0:" in caplog.text
