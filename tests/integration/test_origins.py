"""Named origins and several routers, with real Routers and Backends over loopback."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, Dict, List

import pytest

from ptth_sync import Backend, HandshakeRefused, Router
from ptth_sync.addresses import format_address
from tests.conftest import wait_until
from tests.wsgi_client import WSGIResponse, make_environ


def app_saying(word: str) -> Callable:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        body = f"{word} {environ.get('HTTP_HOST', '')}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def get(router: Router, host: str, scheme: str = "http") -> WSGIResponse:
    """GET / with this ``Host`` on a router whose public side speaks ``scheme``."""
    environ = make_environ("GET", "/", headers={"Host": host})
    environ["wsgi.url_scheme"] = scheme
    captured: Dict[str, Any] = {}

    def start_response(status: str, headers: list, exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, headers

    iterable = router(environ, start_response)
    return WSGIResponse(captured["status"], captured["headers"], iterable)


def serve(router: Router, backends: List[Backend], word: str, **options: Any) -> Backend:
    backend = Backend(router.tunnel_address, app_saying(word), threads=4, **options).start()
    backends.append(backend)
    return backend


def test_requests_go_to_the_tunnels_of_their_origin_and_the_rest_to_the_default_pool(router, backends):
    serve(router, backends, "api", origins=["http://api.example.com"], tunnels=2)
    serve(router, backends, "www", origins=["https://www.example.com", "http://www.example.com"])
    serve(router, backends, "default")
    wait_until(lambda: len(router.pool) == 5, what="five tunnels")
    assert router.pool.origins() == {
        "*": 1, "http://api.example.com": 2, "https://www.example.com": 1, "http://www.example.com": 1,
    }
    for _ in range(4):
        assert get(router, "api.example.com").body == b"api api.example.com"
        assert get(router, "API.example.com:80").body == b"api API.example.com:80"
        assert get(router, "www.example.com", scheme="https").body == b"www www.example.com"
        assert get(router, "www.example.com").body == b"www www.example.com"
        assert get(router, "other.example.com").body == b"default other.example.com"
        # The API's origin is http only; port 8080 is another origin.
        assert get(router, "api.example.com", scheme="https").body == b"default api.example.com"
        assert get(router, "api.example.com:8080").body == b"default api.example.com:8080"


def test_requests_are_spread_round_robin_within_an_origin(router, backends):
    first = serve(router, backends, "one", origins=["http://api.example.com"])
    wait_until(lambda: len(router.pool) == 1, what="the first tunnel")
    serve(router, backends, "two", origins=["http://api.example.com"])
    wait_until(lambda: len(router.pool) == 2, what="the second tunnel")
    words = [get(router, "api.example.com").body.split()[0] for _ in range(10)]
    assert sorted(words) == [b"one"] * 5 + [b"two"] * 5
    assert first.connections


def test_a_host_nobody_serves_gets_421_and_a_served_origin_without_tunnels_503(router, backends):
    backend = serve(router, backends, "api", origins=["http://api.example.com"])
    wait_until(lambda: len(router.pool) == 1, what="the tunnel")
    response = get(router, "nobody.example.com")
    assert response.code == 421
    assert b"nobody.example.com" in response.body
    backend.close()
    wait_until(lambda: len(router.pool) == 0, what="the tunnel to leave")
    response = get(router, "api.example.com")
    assert response.code == 503
    assert get(router, "nobody.example.com").code == 421


def test_a_router_without_origins_serves_every_host_from_the_default_pool(router, backends):
    serve(router, backends, "default")
    wait_until(lambda: len(router.pool) == 1, what="the tunnel")
    assert get(router, "anything.example.com").body == b"default anything.example.com"
    assert get(router, "").code == 200


def test_a_token_may_register_only_its_origins_and_a_refusal_is_403(backends, caplog):
    router = Router(timeout=5, tokens={"api-key": ["http://api.example.com"], "any-key": ["*"]})
    router.tunnel_address = router.listen_tunnels("127.0.0.1:0")
    try:
        good = serve(router, backends, "api", origins=["http://api.example.com"], token="api-key")
        wait_until(lambda: len(router.pool) == 1, what="the allowed tunnel")
        wrong_origin = serve(router, backends, "www", origins=["http://www.example.com"], token="api-key")
        assert wrong_origin.wait_refused(10)
        assert wrong_origin.refused.status == 403
        default_pool = serve(router, backends, "default", token="api-key")
        assert default_pool.wait_refused(10)
        assert default_pool.refused.status == 403
        stranger = serve(router, backends, "x", origins=["http://api.example.com"], token="nope")
        assert stranger.wait_refused(10)
        assert stranger.refused.status == 401
        assert isinstance(stranger.refused, HandshakeRefused)
        serve(router, backends, "any", token="any-key")
        wait_until(lambda: len(router.pool) == 2, what="the any-origin tunnel")
        assert get(router, "api.example.com").body == b"api api.example.com"
        assert get(router, "www.example.com").body == b"any www.example.com"
        assert good.connections
        assert "may not register origin http://www.example.com" in caplog.text
    finally:
        router.close()


def test_a_bad_origin_in_the_upgrade_gets_400(router):
    with socket.create_connection(router.tunnel_address, timeout=5) as sock:
        sock.sendall(b"GET /.well-known/ptth/ftp%3A%2F%2Fx/ HTTP/1.1\r\nHost: r\r\nConnection: upgrade\r\n"
                     b"Upgrade: ptth\r\n\r\n")
        answer = sock.recv(1024)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert len(router.pool) == 0


def test_an_origin_that_is_no_origin_is_refused_by_the_backend_at_once():
    with pytest.raises(ValueError, match="not an origin"):
        Backend("127.0.0.1:1", app_saying("x"), origins=["api.example.com"])


# -- several routers -----------------------------------------------------------------------


def two_routers_on_one_port() -> List[Router]:
    """Routers on 127.0.0.1 and 127.0.0.2 sharing a port number, as one DNS name's routers would."""
    for _ in range(20):
        second = Router(timeout=5)
        _, port = second.listen_tunnels("127.0.0.2:0")
        first = Router(timeout=5)
        try:
            first.listen_tunnels(("127.0.0.1", port))
        except OSError:
            first.close()
            second.close()
            continue
        first.tunnel_address = ("127.0.0.1", port)
        second.tunnel_address = ("127.0.0.2", port)
        return [first, second]
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")


def test_a_backend_keeps_tunnels_to_every_router_it_is_given(backends):
    routers = [Router(timeout=5), Router(timeout=5)]
    try:
        addresses = [router.listen_tunnels("127.0.0.1:0") for router in routers]
        backend = Backend(addresses, app_saying("app"), tunnels=2).start()
        backends.append(backend)
        wait_until(lambda: all(len(router.pool) == 2 for router in routers), what="two tunnels to each router")
        assert backend.wanted_tunnels == 4
        for router in routers:
            assert get(router, "x.example").body == b"app x.example"
    finally:
        for router in routers:
            router.close()


def test_a_name_is_resolved_again_so_a_router_added_later_gets_tunnels(backends, caplog):
    caplog.set_level(logging.INFO, logger="ptth_sync")
    first, second = two_routers_on_one_port()
    port = first.tunnel_address[1]
    answers = {"value": ["127.0.0.1"]}
    lookups: List[str] = []
    looked_up = threading.Event()

    def resolver(host: str, wanted_port: int) -> List[str]:
        assert (host, wanted_port) == ("routers.test", port)
        lookups.append(host)
        looked_up.set()
        return list(answers["value"])

    try:
        backend = Backend(f"routers.test:{port}", app_saying("app"), resolve_interval=0.05, resolver=resolver,
                          origins=["http://api.example.com"]).start()
        backends.append(backend)
        wait_until(lambda: len(first.pool) == 1, what="a tunnel to the first router")
        assert len(second.pool) == 0
        answers["value"] = ["127.0.0.1", "127.0.0.2"]
        wait_until(lambda: len(second.pool) == 1, what="a tunnel to the router added later")
        assert backend.wanted_tunnels == 2
        assert get(second, "api.example.com").body == b"app api.example.com"
        # The name stops resolving to the second router: its tunnel is not redialled once it drops.
        answers["value"] = ["127.0.0.1"]
        wait_until(lambda: backend.wanted_tunnels == 1, what="the second router to be retired")
        second.close()
        wait_until(lambda: len(backend.connections) == 1, what="the tunnel to the second router to close")
        count = len(lookups)
        wait_until(lambda: len(lookups) > count + 3, what="more lookups")
        assert len(backend.connections) == 1
        assert "routers.test resolves to 127.0.0.2: dialing it" in caplog.text
        assert "no longer resolves to 127.0.0.2" in caplog.text
        assert get(first, "api.example.com").body == b"app api.example.com"
    finally:
        first.close()
        second.close()


def test_a_name_that_fails_to_resolve_is_retried_and_logged(backends, caplog):
    router = Router(timeout=5)
    address = router.listen_tunnels("127.0.0.1:0")
    failures = {"left": 2}

    def resolver(host: str, port: int) -> List[str]:
        if failures["left"]:
            failures["left"] -= 1
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [address[0]]

    try:
        backend = Backend(f"routers.test:{address[1]}", app_saying("app"), resolve_interval=30, resolver=resolver)
        backend.backoff_initial = 0.01
        backends.append(backend.start())
        wait_until(lambda: len(router.pool) == 1, what="the tunnel once the name resolves")
        assert "Resolving routers.test failed" in caplog.text
    finally:
        router.close()


def test_localhost_is_one_router_dialled_by_name(router, backends):
    port = router.tunnel_address[1]
    backend = Backend(f"localhost:{port}", app_saying("app"),
                      resolver=lambda host, p: ["::1", "127.0.0.1"]).start()
    backends.append(backend)
    wait_until(lambda: len(router.pool) == 1, what="the tunnel")
    assert backend.wanted_tunnels == 1
    assert format_address(router.tunnel_address).startswith("127.0.0.1:")
