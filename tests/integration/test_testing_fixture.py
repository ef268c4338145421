"""ptth_sync.testing: an application served through a real router and tunnel in the test process."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator, Tuple

import pytest
from flask import Flask, Response, request

from ptth_sync.testing import ptth_tunnel as ptth_tunnel  # the fixture, as pytest_plugins in conftest.py gives it
from ptth_sync.testing import serve_through_tunnel
from tests import apps

flask_app = Flask(__name__)


@flask_app.get("/foo")
def foo() -> str:
    return "bar"


@flask_app.post("/echo")
def echo() -> bytes:
    return request.get_data()


@flask_app.get("/stream")
def stream() -> Response:
    def generate() -> Iterator[bytes]:
        yield b"first;"
        yield b"second"

    return Response(generate(), mimetype="text/plain")


def address(url: str) -> Tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1"
    assert parts.port is not None
    return parts.hostname, parts.port


def get(url: str) -> Tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_context_manager_serves_a_plain_wsgi_app():
    with serve_through_tunnel(apps.hello) as url:
        assert url.startswith("http://127.0.0.1:")
        assert get(url + "/foo") == (200, b"bar")
        assert get(url + "/other") == (200, b"hello")


def test_context_manager_serves_a_flask_app():
    with serve_through_tunnel(flask_app) as url:
        assert get(url + "/foo") == (200, b"bar")


def test_post_body_reaches_the_app():
    body = os.urandom(300 * 1024)  # over the router's small-body limit: streamed through the tunnel
    with serve_through_tunnel(flask_app) as url:
        post = urllib.request.Request(url + "/echo", data=body, method="POST")
        with urllib.request.urlopen(post, timeout=10) as response:
            assert response.status == 200
            assert response.read() == body


def test_chunked_request_body_reaches_the_app():
    with serve_through_tunnel(apps.echo) as url:
        conn = http.client.HTTPConnection(*address(url), timeout=10)
        try:
            conn.request("POST", "/", body=iter([b"one,", b"two,", b"three"]), encode_chunked=True)
            response = conn.getresponse()
            assert response.status == 200
            assert response.read() == b"one,two,three"
        finally:
            conn.close()


def test_flask_streamed_response_arrives_whole():
    with serve_through_tunnel(flask_app) as url:
        conn = http.client.HTTPConnection(*address(url), timeout=10)
        try:
            conn.request("GET", "/stream")
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Transfer-Encoding") == "chunked"
            assert response.read() == b"first;second"
        finally:
            conn.close()


def test_response_is_streamed_as_the_app_produces_it():
    client_has_first = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        # Sent only after the client saw the first piece: a buffered response would never get here in time.
        yield b"second" if client_has_first.wait(10) else b"buffered"

    with serve_through_tunnel(app) as url:
        conn = http.client.HTTPConnection(*address(url), timeout=10)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            received = b""
            while len(received) < len(b"first"):
                piece = response.read1(64)
                assert piece, "the response ended early"
                received += piece
            assert received == b"first"
            client_has_first.set()
            assert response.read() == b"second"
        finally:
            client_has_first.set()
            conn.close()


@pytest.mark.parametrize("app", [apps.hello, flask_app], ids=["wsgi", "flask"])
def test_requests_share_one_keep_alive_connection(app):
    with serve_through_tunnel(app) as url:
        conn = http.client.HTTPConnection(*address(url), timeout=10)
        try:
            sockets = []
            for _ in range(4):
                conn.request("GET", "/foo")
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, b"bar")
                assert not response.will_close
                sockets.append(conn.sock)
            assert sockets[0] is not None
            assert all(sock is sockets[0] for sock in sockets)
        finally:
            conn.close()


def test_exit_leaves_no_thread_running():
    before = set(threading.enumerate())
    with serve_through_tunnel(apps.hello, tunnels=2) as url:
        assert get(url + "/foo") == (200, b"bar")
        assert len(set(threading.enumerate()) - before) > 0
    assert set(threading.enumerate()) - before == set()


def test_exit_cuts_an_idle_keep_alive_connection_and_leaves_no_thread_running():
    before = set(threading.enumerate())
    with serve_through_tunnel(apps.hello) as url:
        conn = http.client.HTTPConnection(*address(url), timeout=10)
        conn.request("GET", "/foo")
        assert conn.getresponse().read() == b"bar"
    try:
        assert set(threading.enumerate()) - before == set()
        assert conn.sock is not None
        assert conn.sock.recv(1) == b""  # closed by the server
    finally:
        conn.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_exit_closes_every_socket():
    before = open_fds()
    with serve_through_tunnel(flask_app, tunnels=2) as url:
        assert get(url + "/foo") == (200, b"bar")
        assert open_fds() > before
    assert open_fds() == before


def test_url_refuses_connections_after_exit():
    with serve_through_tunnel(apps.hello) as url:
        assert get(url + "/foo") == (200, b"bar")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address(url), timeout=5).close()


def test_closing_one_tunnel_leaves_another_serving_without_waiting_for_it():
    before = set(threading.enumerate())
    with serve_through_tunnel(apps.hello) as outer_url:
        conn = http.client.HTTPConnection(*address(outer_url), timeout=10)
        try:
            with serve_through_tunnel(flask_app) as inner_url:
                assert get(inner_url + "/foo") == (200, b"bar")
                conn.request("GET", "/foo")  # a connection to the outer tunnel, opened in the inner's lifetime
                assert conn.getresponse().read() == b"bar"
                started = time.monotonic()
            # Not held up by the outer tunnel's idle keep-alive connection (5 s).
            assert time.monotonic() - started < 3
            conn.request("GET", "/foo")
            assert conn.getresponse().read() == b"bar"
        finally:
            conn.close()
    assert set(threading.enumerate()) - before == set()


def test_token_is_presented_by_the_backend_and_required_by_the_router():
    with serve_through_tunnel(apps.hello, token="s3cret", threads=2, timeout=5) as url:
        assert get(url + "/foo") == (200, b"bar")


def test_fixture_returns_the_url_of_a_served_app(ptth_tunnel):
    url = ptth_tunnel(flask_app)
    assert get(url + "/foo") == (200, b"bar")


def test_fixture_serves_several_apps_at_once(ptth_tunnel):
    flask_url = ptth_tunnel(flask_app)
    plain_url = ptth_tunnel(apps.hello, tunnels=2)
    assert flask_url != plain_url
    assert get(flask_url + "/foo") == (200, b"bar")
    assert get(plain_url + "/other") == (200, b"hello")
