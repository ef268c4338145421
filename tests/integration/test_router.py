"""Router and backends in one process, over real loopback tunnels."""

from __future__ import annotations

import gc
import io
import json
import logging
import re
import socket
import sys
import threading
import time
from collections import Counter
from typing import List

import pytest
from h2.errors import ErrorCodes

from ptth_sync import Backend, Router
from ptth_sync.router.app import TunnelBroken
from tests import apps
from tests.conftest import wait_until
from tests.wsgi_client import wsgi_request


def named(name: str):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [name.encode()]

    return app


def test_round_robin_is_exact_over_three_tunnels(router, start_backend):
    for name in "abc":
        start_backend(named(name))
    served = Counter(wsgi_request(router, "GET", "/").body for _ in range(30))
    assert served == {b"a": 10, b"b": 10, b"c": 10}


def test_dead_tunnel_is_removed_at_once_and_never_chosen(router, start_backend):
    keep = start_backend(named("keep"))
    gone = start_backend(named("gone"))
    for connection in gone.connections:
        connection.sock.shutdown(socket.SHUT_RDWR)  # dies abruptly, no GOAWAY
    gone.close()
    wait_until(lambda: len(router.pool) == 1, what="the dead tunnel to leave the pool")
    assert {wsgi_request(router, "GET", "/").body for _ in range(10)} == {b"keep"}
    assert keep.connections


def test_no_tunnel_gives_503(router):
    response = wsgi_request(router, "GET", "/")
    assert response.code == 503


def test_tunnel_wait_holds_a_request_until_a_tunnel_appears(router, start_backend):
    router.tunnel_wait = 10
    results: List[int] = []
    waiter = threading.Thread(target=lambda: results.append(wsgi_request(router, "GET", "/foo").code))
    waiter.start()
    start_backend(apps.hello)
    waiter.join(10)
    assert results == [200]


def test_backend_that_does_not_answer_in_time_gives_504(router, start_backend, caplog):
    router.timeout = 0.3
    start_backend(apps.sleepy)
    with caplog.at_level(logging.WARNING, logger="ptth_sync.router"):
        assert wsgi_request(router, "GET", "/?s=2").code == 504
    assert re.search(r"GET /\?s=2: 504, tunnel \S+ sent no response within 0.3s", caplog.text)


def test_no_stream_free_within_the_timeout_gives_503_with_a_line(router, caplog):
    router.timeout = 0.3
    host = {"Host": "app.example.test"}
    # On the upgrade wire (here for an origin) the backend allows as many streams as it has threads: one.
    backend = Backend(router.tunnel_address, apps.slow_stream, threads=1, origins=["http://app.example.test"]).start()
    try:
        wait_until(lambda: len(router.pool) == 1, what="the tunnel")
        busy = wsgi_request(router, "GET", "/", headers=host)  # its stream stays open: the body waits for /release
        assert busy.code == 200
        try:
            with caplog.at_level(logging.WARNING, logger="ptth_sync.router"):
                assert wsgi_request(router, "GET", "/other", headers=host).code == 503
            assert "GET /other: 503, no tunnel had a stream free within 0.3s" in caplog.text
        finally:
            apps._gate.set()
            busy.iterable.close()  # type: ignore[attr-defined]
        # The stream comes free once the backend's thread let go of the reset one (until then: refused, 502).
        wait_until(lambda: wsgi_request(router, "GET", "/release", headers=host).code == 200, what="a free stream")
    finally:
        backend.close()


def test_tunnel_breaking_before_the_response_gives_502(router, start_backend):
    holder = {}

    def breaker(environ, start_response):
        for connection in holder["backend"].connections:
            connection.sock.shutdown(2)
        time.sleep(0.05)
        start_response("200 OK", [])
        return [b"too late"]

    holder["backend"] = start_backend(breaker)
    assert wsgi_request(router, "GET", "/").code == 502


def test_refused_stream_is_retried_on_another_tunnel(router, start_backend):
    class RefusingBackend(Backend):
        def _on_request(self, stream):
            stream.reset(ErrorCodes.REFUSED_STREAM)

    start_backend(apps.hello)
    refusing = RefusingBackend(router.tunnel_address, apps.hello).start()
    try:
        wait_until(lambda: len(router.pool) == 2, what="both tunnels")
        assert [wsgi_request(router, "GET", "/foo").body for _ in range(6)] == [b"bar"] * 6
        assert [wsgi_request(router, "POST", "/foo", b"small body").body for _ in range(4)] == [b"bar"] * 4
    finally:
        refusing.close()


def test_an_early_response_with_a_no_error_reset_is_passed_on_not_a_502(router, monkeypatch):
    """RFC 9113 section 8.1: a backend may answer before the body and reset with NO_ERROR to stop it."""

    class EarlyBackend(Backend):
        def _on_request(self, stream):
            stream.send_response([(b":status", b"200"), (b"content-length", b"5")], b"early", end_stream=True)
            stream.reset(ErrorCodes.NO_ERROR)

    backend = EarlyBackend(router.tunnel_address, apps.hello).start()
    try:
        wait_until(lambda: len(router.pool) == 1, what="the tunnel")
        (tunnel,) = router.pool.tunnels()
        open_stream = tunnel.open_stream

        def open_stream_then_wait(*args, **kwargs):
            # The order a loaded machine may give: the response and its reset are in before the body goes.
            stream = open_stream(*args, **kwargs)
            send_data = stream.send_data

            def send_data_late(*args, **kwargs):
                wait_until(lambda: stream._error is not None, what="the early response and its reset")
                return send_data(*args, **kwargs)

            stream.send_data = send_data_late
            return stream

        monkeypatch.setattr(tunnel, "open_stream", open_stream_then_wait)
        response = wsgi_request(router, "POST", "/", b"small body")
        assert (response.code, response.body) == (200, b"early")
    finally:
        backend.close()


def test_ten_concurrent_slow_requests_share_one_tunnel(router, start_backend):
    """Multiplexing: 10 requests of 0.5 s over ONE tunnel finish well within 1.5 s."""
    start_backend(apps.sleepy, tunnels=1, threads=16)
    assert len(router.pool) == 1
    codes: List[int] = []
    threads = [threading.Thread(target=lambda: codes.append(wsgi_request(router, "GET", "/?s=0.5").code))
               for _ in range(10)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    elapsed = time.monotonic() - start
    assert codes == [200] * 10
    assert elapsed < 1.5


def test_response_streams_before_the_app_has_finished(router, start_backend):
    start_backend(apps.slow_stream)
    response = wsgi_request(router, "GET", "/stream")
    chunks = iter(response.iterable)
    assert next(chunks) == b"first\n"  # arrives while the app still waits for /release
    assert wsgi_request(router, "GET", "/release").body == b"released"
    assert b"".join(chunks) == b"second\n"
    response.close()


def test_request_body_streams_to_the_backend(router, start_backend):
    start_backend(apps.count)
    body = b"x" * (5 * 1024 * 1024 + 3)
    assert wsgi_request(router, "POST", "/", body).body == str(len(body)).encode()


def test_chunked_request_body_without_content_length(router, start_backend):
    start_backend(apps.environ_json)
    response = wsgi_request(router, "POST", "/", b"chunk one, chunk two", chunked=True)
    environ = json.loads(response.body)
    assert environ["body"] == "chunk one, chunk two"
    assert "CONTENT_LENGTH" not in environ
    assert "HTTP_TRANSFER_ENCODING" not in environ


def test_large_echo_flows_both_ways_at_once(router, start_backend):
    start_backend(apps.echo)
    body = bytes(range(256)) * (16 * 1024 * 4)  # 16 MiB
    response = wsgi_request(router, "PUT", "/", body)
    assert response.body == body


def test_forwarded_headers_and_hop_by_hop_filtering(router, start_backend):
    start_backend(apps.environ_json)
    response = wsgi_request(
        router, "GET", "/p%20q/r?x=1&y=%2F",
        headers={
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Cookie": "a=1; b=2",
            "Content-Type": "text/plain",
        },
        remote_addr="198.51.100.7",
    )
    environ = json.loads(response.body)
    assert environ["HTTP_X_FORWARDED_FOR"] == "203.0.113.9, 198.51.100.7"
    assert environ["REMOTE_ADDR"] == "198.51.100.7"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "http"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["HTTP_X_FORWARDED_HOST"] == "example.test:8888"
    assert environ["HTTP_HOST"] == "example.test:8888"
    assert environ["SERVER_NAME"] == "example.test"
    assert environ["SERVER_PORT"] == "8888"
    assert environ["PATH_INFO"] == "/p q/r"
    assert environ["QUERY_STRING"] == "x=1&y=%2F"
    assert environ["RAW_URI"] == "/p%20q/r?x=1&y=%2F"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["CONTENT_TYPE"] == "text/plain"
    assert environ["HTTP_TE"] == "trailers"
    for hop in ("HTTP_CONNECTION", "HTTP_X_SECRET", "HTTP_KEEP_ALIVE"):
        assert hop not in environ
    assert environ["wsgi.multithread"] is True
    assert environ["wsgi.multiprocess"] is False


def test_repeated_response_headers_are_kept(router, start_backend):
    def cookies(environ, start_response):
        start_response("200 OK", [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Connection", "close")])
        return [b""]

    start_backend(cookies)
    response = wsgi_request(router, "GET", "/")
    assert response.header_values("set-cookie") == ["a=1", "b=2"]
    assert response.header("connection") is None


@pytest.mark.parametrize(("method", "status"), [("HEAD", "200 OK"), ("GET", "204 No Content"),
                                                ("GET", "304 Not Modified")])
def test_head_204_and_304_carry_no_body(router, start_backend, method, status):
    def body_anyway(environ, start_response):
        start_response(status, [("Content-Type", "text/plain")])
        return [b"this body must not be sent"]

    start_backend(body_anyway)
    response = wsgi_request(router, method, "/")
    assert response.status == status
    assert response.body == b""


def test_app_that_raises_gives_500_and_the_tunnel_lives_on(router, start_backend, caplog):
    def broken(environ, start_response):
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        return apps.hello(environ, start_response)

    start_backend(broken)
    assert wsgi_request(router, "GET", "/boom").code == 500
    assert "RuntimeError: boom" in caplog.text  # the traceback is in the log
    assert wsgi_request(router, "GET", "/foo").body == b"bar"
    assert len(router.pool) == 1


def test_app_failing_mid_body_aborts_the_client_response(router, start_backend):
    start_backend(apps.fails_mid_body)
    response = wsgi_request(router, "GET", "/")
    with pytest.raises(TunnelBroken):
        b"".join(response.iterable)
    response.close()
    assert len(router.pool) == 1
    again = wsgi_request(router, "GET", "/")
    assert again.code == 200
    with pytest.raises(TunnelBroken):
        again.body  # noqa: B018


def test_exc_info_write_callable_and_close_are_honoured(router, start_backend):
    closed = threading.Event()

    class Body:
        def __init__(self, parts):
            self.parts = parts

        def __iter__(self):
            return iter(self.parts)

        def close(self):
            closed.set()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("changed my mind")
        except ValueError:
            write = start_response("418 I'm a Teapot", [("Content-Type", "text/plain")], sys.exc_info())
        write(b"written ")
        return Body([b"iterated"])

    start_backend(app)
    response = wsgi_request(router, "GET", "/")
    assert response.code == 418
    assert response.body == b"written iterated"
    assert closed.wait(5)


def test_content_length_mismatch_never_looks_complete(router, start_backend):
    def short(environ, start_response):
        start_response("200 OK", [("Content-Length", "100")])
        return [b"only ten b"]

    start_backend(short)
    response = wsgi_request(router, "GET", "/")
    with pytest.raises(TunnelBroken):
        b"".join(response.iterable)
    response.close()
    assert len(router.pool) == 1


def test_backend_reconnects_after_the_router_restarts(start_backend):
    first = Router()
    address = first.listen_tunnels("127.0.0.1:0")
    backend = Backend(address, apps.hello).start()
    try:
        wait_until(lambda: len(first.pool) == 1, what="the first tunnel")
        first.close()
        wait_until(lambda: not backend.connections, what="the backend to notice")
        second = Router()
        second.listen_tunnels(address)
        try:
            wait_until(lambda: len(second.pool) == 1, 15, what="the backend to reconnect")
            assert wsgi_request(second, "GET", "/foo").body == b"bar"
        finally:
            second.close()
    finally:
        backend.close()


def test_wsgi_input_supports_readline_and_iteration(router, start_backend):
    def lines(environ, start_response):
        stream = environ["wsgi.input"]
        first = stream.readline()
        rest = list(stream)
        start_response("200 OK", [])
        return [json.dumps([first.decode(), [r.decode() for r in rest]]).encode()]

    start_backend(lines)
    body = b"one\ntwo\nthree"
    response = wsgi_request(router, "POST", "/", wsgi_input=io.BytesIO(body), headers={"Content-Length": "13"})
    assert json.loads(response.body) == ["one\n", ["two\n", "three"]]


def test_tunnels_option_keeps_that_many_connections(router, start_backend):
    backend = start_backend(apps.hello, tunnels=3)
    assert len(router.pool) == 3
    assert len(backend.connections) == 3


def test_a_list_of_addresses_keeps_tunnels_to_each_router(router):
    other = Router()
    other_address = other.listen_tunnels("127.0.0.1:0")
    backend = Backend([router.tunnel_address, other_address], apps.hello).start()
    try:
        wait_until(lambda: len(router.pool) == 1 and len(other.pool) == 1, what="a tunnel to each router")
        assert wsgi_request(router, "GET", "/foo").body == b"bar"
        assert wsgi_request(other, "GET", "/foo").body == b"bar"
    finally:
        backend.close()
        other.close()


def test_backend_stop_drains_requests_in_flight(router, start_backend):
    backend = start_backend(apps.sleepy)
    results: List[int] = []
    client = threading.Thread(target=lambda: results.append(wsgi_request(router, "GET", "/?s=0.5").code))
    client.start()
    wait_until(lambda: any(c.active_streams for c in backend.connections), what="the request to arrive")
    assert backend.stop(graceful_timeout=10) is True
    client.join(10)
    assert results == [200]
    wait_until(lambda: len(router.pool) == 0, what="the drained tunnel to leave")


def test_threads_return_to_baseline_after_many_backends_come_and_go(router, start_backend):
    start_backend(apps.hello)  # the router's own threads exist from here on
    baseline = threading.active_count()
    for _ in range(20):
        backend = Backend(router.tunnel_address, apps.hello, threads=4, tunnels=2).start()
        wait_until(lambda: len(router.pool) == 3, what="two more tunnels")
        assert wsgi_request(router, "GET", "/foo").body == b"bar"
        backend.close()
        wait_until(lambda: len(router.pool) == 1, what="the two tunnels to leave")
    wait_until(lambda: threading.active_count() <= baseline, 10, what=f"threads back to {baseline}")


def test_backend_threads_are_advertised_as_max_concurrent_streams(router):
    """On the PTTH upgrade wire (here for an origin); the plain wire's 250: tests/integration/test_plain_wire.py."""
    backend = Backend(router.tunnel_address, apps.hello, threads=5, origins=["https://app.example.test"]).start()
    try:
        wait_until(lambda: len(router.pool) == 1, what="the tunnel")
        (tunnel,) = router.pool.tunnels()
        assert tunnel._h2.remote_settings.max_concurrent_streams == 5
    finally:
        backend.close()


def test_request_headers_over_the_backend_limit_get_431_and_the_tunnel_lives(router, start_backend):
    start_backend(apps.hello)
    (tunnel,) = router.pool.tunnels()
    huge = {f"X-Big-{i}": "v" * 8000 for i in range(10)}  # 80 KB: over the 64 KiB the backend accepts
    assert wsgi_request(router, "GET", "/foo", headers=huge).code == 431
    assert wsgi_request(router, "GET", "/foo").body == b"bar"
    assert router.pool.tunnels() == [tunnel]


def test_a_body_over_the_limit_gets_413_by_length_or_while_streaming(router, start_backend):
    router.max_body_size = 1000
    start_backend(apps.count)
    assert wsgi_request(router, "POST", "/", b"x" * 1000).body == b"1000"
    assert wsgi_request(router, "POST", "/", b"x" * 1001).code == 413
    assert wsgi_request(router, "POST", "/", b"x" * 5000, chunked=True).code == 413
    assert wsgi_request(router, "POST", "/", b"x" * 999, chunked=True).body == b"999"
    assert len(router.pool) == 1


def test_a_refused_request_is_retried_once_and_no_more(router, start_backend):
    refusals: List[int] = []

    class RefusingBackend(Backend):
        def _on_request(self, stream):
            refusals.append(stream.id)
            stream.reset(ErrorCodes.REFUSED_STREAM)

    backends = [RefusingBackend(router.tunnel_address, apps.hello).start() for _ in range(3)]
    try:
        wait_until(lambda: len(router.pool) == 3, what="three refusing tunnels")
        assert wsgi_request(router, "GET", "/foo").code == 502
        assert len(refusals) == 2  # the first try and one retry
    finally:
        for backend in backends:
            backend.close()


@pytest.mark.parametrize("fault", ["str body", "no start_response", "raises before start_response",
                                   "raises after start_response"])
def test_misbehaving_app_gets_500_before_anything_was_sent_and_the_tunnel_lives(router, start_backend, fault):
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/ok":
            return apps.hello(environ, start_response)
        if fault == "raises before start_response":
            raise ValueError("before")
        if fault == "no start_response":
            return [b"body without status"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        if fault == "raises after start_response":
            raise ValueError("after")
        return ["a str, not bytes"]

    start_backend(app)
    assert wsgi_request(router, "GET", "/bad").code == 500
    assert wsgi_request(router, "GET", "/ok").body == b"hello"
    assert len(router.pool) == 1


def test_a_response_cut_short_by_a_reset_leaves_nothing_to_the_garbage_collector(router, start_backend):
    """The backend frees a request's objects (the body piece it was sending among them) as soon as the
    request ends when the router resets its stream mid-response (a client that went away), not at a
    full collection: 256 KiB pieces of cut downloads once piled up to 64 MiB between collections."""
    made, freed = [], []
    closed = threading.Event()

    class Piece(bytes):
        def __del__(self):
            freed.append(1)

    def endless(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def body():
            try:
                while True:
                    made.append(1)
                    yield Piece(b"x" * 65536)
            finally:
                closed.set()

        return body()

    start_backend(endless)
    (tunnel,) = router.pool.tunnels()
    gc.collect()
    gc.disable()
    try:
        stream = tunnel.open_stream([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"test"),
                                     (b":path", b"/")], end_stream=True)
        stream.wait_headers(timeout=10)
        assert stream.read(65536, timeout=10)
        stream.reset(ErrorCodes.CANCEL)  # the backend meets the reset as it sends its next piece
        assert closed.wait(10)
        wait_until(lambda: len(freed) == len(made), timeout=5,
                   what=lambda: f"the pieces freed without the garbage collector: {len(freed)} of {len(made)}")
    finally:
        gc.enable()
