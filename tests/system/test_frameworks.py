"""Flask and Django applications served through a real router process and a real backend process."""

from __future__ import annotations

import http.client
import json
import os

import pytest
import websocket

from tests.conftest import PYTHON, ROOT, Process

DJANGO_DIR = ROOT / "examples" / "django_app"
MIB = 1024 * 1024
#: A Host header unlike the router's own address, to show it is forwarded as sent.
HOST = "app.example.test:8080"


def fetch(router, method, path, body=None, headers=None):
    """``(status, headers, body)`` for one request to the router, over http.client."""
    connection = http.client.HTTPConnection(router.http_host, router.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.msg, response.read()
    finally:
        connection.close()


@pytest.fixture
def flask_router(router_process, backend_process):
    """A router with ``examples.flask_app:app`` behind it."""
    router = router_process()
    backend_process("examples.flask_app:app", router.tunnel_address)
    router.wait_tunnels(1)
    return router


@pytest.fixture
def django_router(router_process, processes):
    """A router with the Django project of ``examples/django_app`` behind it."""
    router = router_process()
    args = [PYTHON, "-m", "ptth_sync.backend", "--connect", router.tunnel_address, "mysite.wsgi:application"]
    processes.append(Process(args, env={"PYTHONPATH": str(ROOT)}, cwd=DJANGO_DIR))
    router.wait_tunnels(1)
    return router


@pytest.fixture(params=["flask", "django"])
def framework_router(request):
    """Each framework's router in turn."""
    return request.getfixturevalue(f"{request.param}_router")


def test_framework_app_answers_foo_through_the_tunnel(framework_router):
    """``GET /foo`` → ``bar``."""
    status, headers, body = fetch(framework_router, "GET", "/foo")
    assert (status, body) == (200, b"bar")
    assert headers["Content-Type"].startswith("text/")


def test_framework_app_echoes_websocket_messages_through_the_tunnel(framework_router):
    """flask-sock in the Flask example, simple-websocket in a Django view: ``/ws`` echoes text and bytes."""
    ws = websocket.create_connection(framework_router.url.replace("http://", "ws://") + "/ws", timeout=30)
    try:
        for n in range(100):
            ws.send(f"message {n}")
            assert ws.recv() == f"message {n}"
        payload = os.urandom(MIB)
        ws.send_binary(payload)
        assert ws.recv() == payload
    finally:
        ws.close()
        ws.shutdown()
    assert framework_router.count_lines("Traceback") == 0


def test_framework_app_answers_head_without_a_body(framework_router):
    """``HEAD /foo``: the GET answer's headers (length 3), no body."""
    status, headers, body = fetch(framework_router, "HEAD", "/foo")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == "3"


def test_framework_app_echoes_a_one_mib_body_intact(framework_router):
    """A 1 MiB POST body (streamed by the router) comes back byte for byte."""
    payload = os.urandom(MIB)
    status, _, body = fetch(
        framework_router, "POST", "/echo", body=payload, headers={"Content-Type": "application/octet-stream"}
    )
    assert status == 200
    assert len(body) == len(payload)
    assert body == payload


def test_framework_app_sees_client_address_host_and_scheme(framework_router):
    """REMOTE_ADDR is the client (last X-Forwarded-For hop), Host is as sent, scheme is http."""
    status, _, body = fetch(framework_router, "GET", "/whoami", headers={"Host": HOST})
    assert status == 200
    seen = json.loads(body)
    assert seen["remote_addr"] == "127.0.0.1"
    assert seen["host"] == HOST
    assert seen["scheme"] == "http"
    assert seen["path"] == "/whoami"


def test_framework_app_sees_the_routers_address_as_host_by_default(framework_router):
    """Without a custom Host header the app sees the address the client dialled."""
    _, _, body = fetch(framework_router, "GET", "/whoami")
    assert json.loads(body)["host"] == f"{framework_router.http_host}:{framework_router.http_port}"


def test_framework_app_decodes_percent_encoded_query_args(framework_router):
    """Repeated and UTF-8 percent-encoded query arguments arrive decoded."""
    status, _, body = fetch(framework_router, "GET", "/whoami?a=1&a=2&b=%C3%A9&c=x%20y%26z")
    assert status == 200
    assert json.loads(body)["args"] == {"a": ["1", "2"], "b": ["é"], "c": ["x y&z"]}


def test_flask_app_routes_a_percent_encoded_path(flask_router):
    """``/wh%6Fami`` is routed as ``/whoami``; the query is decoded too."""
    status, _, body = fetch(flask_router, "GET", "/wh%6Fami?a=1&a=2&b=%C3%A9")
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/whoami"
    assert seen["args"] == {"a": ["1", "2"], "b": ["é"]}


def test_flask_app_does_not_match_a_route_with_an_encoded_space(flask_router):
    """``/whoami%20x`` is decoded to ``/whoami x``, which is no route: 404."""
    status, _, _ = fetch(flask_router, "GET", "/whoami%20x")
    assert status == 404


def test_django_app_sees_a_percent_encoded_utf8_path_decoded(django_router):
    """``/whoami/caf%C3%A9%20x%2Fy%25`` reaches Django as ``/whoami/café x/y%``."""
    status, _, body = fetch(django_router, "GET", "/whoami/caf%C3%A9%20x%2Fy%25?a=1&a=2&b=%C3%A9")
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/whoami/café x/y%"
    assert seen["args"] == {"a": ["1", "2"], "b": ["é"]}


def test_django_app_sets_two_cookies_through_the_tunnel(django_router):
    """Both ``Set-Cookie`` headers of one response reach the client, unmerged."""
    status, headers, body = fetch(django_router, "GET", "/cookies")
    assert (status, body) == (200, b"cookies set")
    cookies = headers.get_all("Set-Cookie")
    assert len(cookies) == 2, cookies
    assert cookies[0].startswith("flavour=chocolate;")
    assert "HttpOnly" in cookies[0]
    assert cookies[1].startswith("size=large;")
    assert "Max-Age=3600" in cookies[1]


def test_django_app_refuses_get_on_a_post_view(django_router):
    """Django's own error answers (405 with ``Allow``) pass through the tunnel unchanged."""
    status, headers, _ = fetch(django_router, "GET", "/echo")
    assert status == 405
    assert headers["Allow"] == "POST, PUT"


def test_django_app_enforces_csrf_on_views_not_exempted(django_router):
    """A POST to a view without ``csrf_exempt`` meets Django's CSRF check: 403."""
    status, _, _ = fetch(django_router, "POST", "/foo", body=b"x")
    assert status == 403
