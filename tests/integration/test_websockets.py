"""WebSockets through an in-process router and backend: ``ptth_sync.testing``, the router's checks,
and what the backend makes of an application's answer on ``environ["gunicorn.socket"]``."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import socket
from typing import Any, Dict, List, Tuple

import pytest
import websocket

from ptth_sync import Backend, Router
from ptth_sync.testing import ptth_tunnel as ptth_tunnel  # the fixture, as pytest_plugins in conftest.py gives it
from ptth_sync.testing import serve_through_tunnel
from ptth_sync.websocket import accept_value
from tests import apps, websocket_apps
from tests.conftest import wait_until

KEY = base64.b64encode(b"0123456789abcdef").decode()


def finish(ws: websocket.WebSocket) -> None:
    """Close the client's WebSocket and its connection (websocket-client leaves the socket open once it has
    answered a Close frame of the server's)."""
    ws.close()
    ws.shutdown()


def ws_url(url: str, path: str = "/echo") -> str:
    return url.replace("http://", "ws://") + path


def handshake(url: str, path: str = "/echo", **headers: str) -> Tuple[int, Dict[str, str], bytes, socket.socket]:
    """Send an opening handshake by hand; the answer's status, headers and what came with them, and the socket."""
    host, port = url[len("http://") :].rsplit(":", 1)
    fields = {"Host": f"{host}:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13", **headers}
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v) + "\r\n"
    sock.sendall(head.encode())
    received = b""
    while b"\r\n\r\n" not in received:
        data = sock.recv(65536)
        if not data:
            break
        received += data
    head_bytes, _, rest = received.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    answer = {}
    for line in lines[1:]:
        name, _, text = line.partition(":")
        answer[name.strip().lower()] = text.strip()
    return int(lines[0].split()[1]), answer, rest, sock


def read_body(sock: socket.socket, rest: bytes, length: int) -> bytes:
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            break
        rest += data
    return rest


def test_the_testing_fixture_relays_a_flask_sock_websocket(ptth_tunnel):
    url = ptth_tunnel(websocket_apps.app)
    ws = websocket.create_connection(ws_url(url), timeout=10)
    try:
        for n in range(500):
            ws.send(f"m{n}")
            assert ws.recv() == f"m{n}"
        payload = os.urandom(3 * 1024 * 1024)
        ws.send_binary(payload)
        assert ws.recv() == payload
        ws.send("close 4003")
        opcode, frame = ws.recv_data_frame(True)
        assert (opcode, frame.data[:2]) == (websocket.ABNF.OPCODE_CLOSE, (4003).to_bytes(2, "big"))
    finally:
        finish(ws)
    leaving = websocket.create_connection(ws_url(url), timeout=10)
    leaving.send("name fixture-client")
    assert leaving.recv() == "hello fixture-client"
    leaving.close(status=4001, reason=b"client leaves")
    leaving.shutdown()
    seen = wait_until(lambda: [e for e in list(websocket_apps._events) if e["name"] == "fixture-client"],
                      what="the app to see the client's close")
    assert seen == [{"name": "fixture-client", "event": "closed", "code": 4001, "message": "client leaves"}]


def test_the_101_carries_the_accept_value_of_the_clients_key_and_no_body(ptth_tunnel):
    url = ptth_tunnel(websocket_apps.app)
    code, headers, rest, sock = handshake(url)
    try:
        assert code == 101
        assert headers["upgrade"] == "websocket"
        assert headers["connection"].lower() == "upgrade"
        assert headers["sec-websocket-accept"] == accept_value(KEY)
        assert "content-length" not in headers
        assert "transfer-encoding" not in headers
        assert rest == b""
    finally:
        sock.close()


def test_an_unsupported_websocket_version_gets_426_naming_version_13(ptth_tunnel):
    url = ptth_tunnel(websocket_apps.app)
    code, headers, _, sock = handshake(url, **{"Sec-WebSocket-Version": "8"})
    sock.close()
    assert code == 426
    assert headers["sec-websocket-version"] == "13"


def test_a_missing_or_malformed_key_gets_400(ptth_tunnel):
    url = ptth_tunnel(websocket_apps.app)
    for key in ("", "not base64!", base64.b64encode(b"short").decode()):
        code, _, _, sock = handshake(url, **{"Sec-WebSocket-Key": key})
        sock.close()
        assert code == 400, key


def test_an_upgrade_without_the_connection_option_is_an_ordinary_get(ptth_tunnel):
    """``Upgrade`` is only a header unless ``Connection`` names it: the app sees a plain GET (and Flask
    answers a WebSocket route's mismatch with 400)."""
    url = ptth_tunnel(websocket_apps.app)
    code, _, _, sock = handshake(url, "/plain", Connection="keep-alive")
    sock.close()
    assert code == 200


def test_a_backend_that_does_not_announce_the_connect_protocol_gets_501_and_keeps_its_tunnel():
    router = Router(timeout=10)
    try:
        address = router.listen_tunnels("127.0.0.1:0")
        backend = Backend(address, apps.hello)
        backend.settings = dataclasses.replace(backend.settings, enable_connect_protocol=False)
        backend.plain_settings = dataclasses.replace(backend.plain_settings, enable_connect_protocol=False)
        with backend:
            wait_until(lambda: len(router.pool) == 1, what="the tunnel")
            environ = _environ()
            environ["ptth_sync.websocket"] = None  # a server that could relay it
            answer = _call(router, environ)
            assert answer[0].startswith("501")
            assert b"SETTINGS_ENABLE_CONNECT_PROTOCOL" in answer[2]
            assert _call(router, _environ(upgrade=False))[2] == b"bar"
            assert len(router.pool) == 1
    finally:
        router.close()


def test_a_router_served_by_another_wsgi_server_answers_websockets_501(ptth_tunnel):
    """Mounted in a WSGI server that cannot hand the connection over, the router says so, touching no tunnel."""
    router = Router(timeout=10)
    try:
        status, _, body = _call(router, _environ())
    finally:
        router.close()
    assert status.startswith("501")
    assert b"cannot relay WebSockets" in body


def test_an_app_answering_200_without_accepting_gets_the_client_a_501(ptth_tunnel):
    url = ptth_tunnel(websocket_apps.raw_socket_app)
    code, headers, rest, sock = handshake(url, "/ignore")
    body = read_body(sock, rest, int(headers["content-length"]))
    sock.close()
    assert code == 501
    assert b"did not accept this WebSocket" in body


def test_a_refusal_written_on_the_socket_is_passed_on_with_its_body(ptth_tunnel):
    url = ptth_tunnel(websocket_apps.raw_socket_app)
    code, headers, rest, sock = handshake(url, "/refuse")
    try:
        assert code == 403
        assert headers["content-type"] == "text/plain"
        body = rest
        while not body.endswith(b"0\r\n\r\n"):  # the body ends with the stream: chunked to the client
            data = sock.recv(65536)
            if not data:
                break
            body += data
    finally:
        sock.close()
    assert body == b"7\r\ngo away\r\n0\r\n\r\n"


def test_an_app_accepting_with_start_response_101_sends_its_iterable_as_frames(ptth_tunnel):
    url = ptth_tunnel(websocket_apps.raw_socket_app)
    ws = websocket.create_connection(ws_url(url, "/accept"), timeout=10)
    try:
        assert ws.recv() == "hello"
        opcode, frame = ws.recv_data_frame(True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_CLOSE, b"\x03\xe8")
    finally:
        finish(ws)


def test_an_app_using_the_socket_then_answering_through_its_framework_keeps_the_websocket_clean(ptth_tunnel):
    """As a Django view would: simple-websocket on ``gunicorn.socket``, then an HttpResponse that goes nowhere."""
    url = ptth_tunnel(websocket_apps.raw_socket_app)
    ws = websocket.create_connection(ws_url(url, "/echo"), timeout=10)
    try:
        ws.send("once")
        assert ws.recv() == "once"
        opcode, frame = ws.recv_data_frame(True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert frame.data[:2] == (1000).to_bytes(2, "big")
    finally:
        finish(ws)


def test_the_backend_counts_its_open_websockets_and_they_count_against_its_streams():
    """With 2 threads, a backend serves 2 WebSockets at once; the router's tunnel shows 2 streams."""
    from ptth_sync.backend.websocket import open_websockets

    with serve_through_tunnel(websocket_apps.app, threads=2, token="t") as url:
        sockets: List[websocket.WebSocket] = []
        try:
            for n in range(2):
                sockets.append(websocket.create_connection(ws_url(url), timeout=10))
                sockets[-1].send(f"name {n}")
                assert sockets[-1].recv() == f"hello {n}"
            assert open_websockets() == 2
        finally:
            for ws in sockets:
                finish(ws)
        wait_until(lambda: open_websockets() == 0, what="the WebSockets to end")


def _environ(upgrade: bool = True) -> Dict[str, Any]:
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": "GET", "PATH_INFO": "/foo", "RAW_URI": "/foo", "QUERY_STRING": "",
        "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "localhost", "SERVER_PORT": "80", "HTTP_HOST": "localhost",
        "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
    }
    if upgrade:
        environ.update({"HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade", "HTTP_SEC_WEBSOCKET_KEY": KEY,
                        "HTTP_SEC_WEBSOCKET_VERSION": "13"})
    return environ


def _call(app: Any, environ: Dict[str, Any]) -> Tuple[str, List[Tuple[str, str]], bytes]:
    answer: List[Any] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: answer.extend([status, headers])))
    return answer[0], answer[1], body


@pytest.mark.parametrize("path", ["/echo"])
def test_the_app_sees_the_request_as_under_gunicorn(ptth_tunnel, path):
    """GET, Upgrade and Connection, the client's key and version, and a socket in ``gunicorn.socket``."""
    seen: Dict[str, Any] = {}

    def app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        seen.update({k: v for k, v in environ.items() if isinstance(v, str)})
        seen["socket"] = type(environ["gunicorn.socket"]).__name__
        start_response("404 Not Found", [("Content-Length", "0")])
        return []

    url = ptth_tunnel(app)
    code, _, _, sock = handshake(url, path + "?x=1", **{"Sec-WebSocket-Protocol": "chat"})
    sock.close()
    assert code == 404
    assert seen["REQUEST_METHOD"] == "GET"
    assert (seen["PATH_INFO"], seen["QUERY_STRING"]) == (path, "x=1")
    assert (seen["HTTP_UPGRADE"], seen["HTTP_CONNECTION"]) == ("websocket", "Upgrade")
    assert (seen["HTTP_SEC_WEBSOCKET_KEY"], seen["HTTP_SEC_WEBSOCKET_VERSION"]) == (KEY, "13")
    assert seen["HTTP_SEC_WEBSOCKET_PROTOCOL"] == "chat"
    assert seen["socket"] == "TunnelSocket"
    assert "CONTENT_LENGTH" not in seen


def test_an_acceptance_with_headers_past_the_routers_limit_is_refused_and_the_tunnel_carries_on(ptth_tunnel,
                                                                                                 caplog):
    """A 101 whose headers exceed the router's SETTINGS_MAX_HEADER_LIST_SIZE: the backend refuses to send it
    (the router would otherwise fail the whole tunnel on it), the client gets an error, the next request works."""
    url = ptth_tunnel(websocket_apps.raw_socket_app)
    code, _, _, sock = handshake(url, "/accept-with-70000-bytes-of-headers")
    sock.close()
    assert code == 502
    assert any("exceed the router's limit of 65536 bytes" in record.getMessage() for record in caplog.records)
    ws = websocket.create_connection(ws_url(url, "/accept"), timeout=10)
    try:
        assert ws.recv() == "hello"
    finally:
        finish(ws)
