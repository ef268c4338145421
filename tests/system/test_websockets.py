"""WebSockets through a real router process and a real backend process (RFC 8441 extended CONNECT).

The application is a Flask app with flask-sock (``tests/websocket_apps.py``),
written as for ``gunicorn -k gthread``; the clients are websocket-client and
websockets, as a user's would be. What the application's WebSockets saw is
asked of the backend process over HTTP (``/events``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import urllib.request
from typing import Any, Dict, List

import pytest
import websocket
from websockets.sync.client import connect as websockets_connect

from tests.conftest import wait_until
from tests.system.test_admin import Admin, value
from tests.system.test_slow_clients import status, worker_pid
from tests.system.test_worker import start_gunicorn, wait_tunnels

MIB = 1024 * 1024
APP = "tests.websocket_apps:app"


def finish(ws: websocket.WebSocket) -> None:
    """Close the client's WebSocket and its connection (websocket-client leaves the socket open once it has
    answered a Close frame of the server's)."""
    ws.close()
    ws.shutdown()


def ws_url(router, path: str = "/echo") -> str:
    return router.url.replace("http://", "ws://") + path


def open_ws(router, path: str = "/echo", timeout: float = 15.0) -> websocket.WebSocket:
    return websocket.create_connection(ws_url(router, path), timeout=timeout)


def app_events(router) -> Dict[str, Any]:
    with urllib.request.urlopen(router.url + "/events", timeout=10) as response:
        return json.loads(response.read())


def close_frame_of(ws: websocket.WebSocket) -> tuple:
    """Read until the server's Close frame: ``(code, reason)``."""
    for _ in range(1000):
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            return int.from_bytes(data[:2], "big"), data[2:].decode()
    raise AssertionError("no Close frame")


def socket_closed(ws: websocket.WebSocket) -> bool:
    """True once the connection ends (after any Close frame); False if it stays open past the client's timeout."""
    try:
        for _ in range(1000):
            opcode, _ = ws.recv_data_frame(True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                continue
    except (websocket.WebSocketConnectionClosedException, ConnectionError):
        return True
    except websocket.WebSocketTimeoutException:
        return False
    return False


@pytest.fixture
def ws_router(router_process, backend_process):
    """A router (with its admin listener) and the flask-sock app behind it, 128 threads."""
    router = router_process("--admin", "127.0.0.1:0")
    router.backend = backend_process(APP, router.tunnel_address, "--threads", "128")
    router.wait_tunnels(1)
    return router


def test_a_flask_sock_app_echoes_10000_messages(ws_router):
    ws = open_ws(ws_router)
    try:
        for n in range(10000):
            ws.send(f"message {n}")
            assert ws.recv() == f"message {n}"
    finally:
        finish(ws)
    assert ws_router.count_lines("Tunnel removed") == 0


def test_16_mib_of_binary_messages_come_back_intact_past_max_body_size(router_process, backend_process):
    """1 MiB messages both ways; ``--max-body-size`` does not apply to a WebSocket."""
    router = router_process("--max-body-size", "1024")
    backend_process(APP, router.tunnel_address)
    router.wait_tunnels(1)
    sent, received = hashlib.sha256(), hashlib.sha256()
    ws = open_ws(router)
    try:
        for _ in range(16):
            payload = os.urandom(MIB)
            sent.update(payload)
            ws.send_binary(payload)
            echoed = ws.recv()
            assert isinstance(echoed, bytes)
            received.update(echoed)
    finally:
        finish(ws)
    assert received.hexdigest() == sent.hexdigest()


def test_100_concurrent_websockets_on_one_tunnel_hold_no_router_thread(ws_router):
    """100 open WebSockets on one tunnel, each answering in turn; idle, they cost the router no thread."""
    worker = worker_pid(ws_router.pid)
    admin = Admin(ws_router)
    warm = open_ws(ws_router)  # the first opening starts the thread that opens WebSockets
    finish(warm)
    threads_before = status(worker, "Threads")
    sockets: List[websocket.WebSocket] = []
    try:
        for n in range(100):
            sockets.append(open_ws(ws_router))
            sockets[-1].send(f"name {n}")
        for n, ws in enumerate(sockets):
            assert ws.recv() == f"hello {n}"
        threads_idle = status(worker, "Threads")
        assert value(admin.scrape(), "websockets_open") == 100
        assert admin.status()["websockets_open"] == 100
        results: Dict[int, str] = {}

        def talk(n: int, ws: websocket.WebSocket) -> None:
            for round_ in range(20):
                ws.send(f"{n}/{round_}")
                results[n] = ws.recv()

        talkers = [threading.Thread(target=talk, args=(n, ws)) for n, ws in enumerate(sockets)]
        for thread in talkers:
            thread.start()
        for thread in talkers:
            thread.join(60)
        assert results == {n: f"{n}/19" for n in range(100)}
    finally:
        for ws in sockets:
            finish(ws)
    # An opening runs on a pool thread for a moment (the pool may grow by a few, which then idle
    # there); the 100 open WebSockets hold none.
    assert threads_idle - threads_before < 10, (threads_before, threads_idle)
    wait_until(lambda: value(admin.scrape(), "websockets_open") == 0, what="the WebSockets to close")
    samples = admin.scrape()
    assert value(samples, "websockets_total") == 101
    assert value(samples, "requests_total", code="101") == 101
    assert value(samples, "websocket_bytes_total", direction="to_client") > 0
    assert ws_router.count_lines("Tunnel removed") == 0


def test_pings_are_answered_both_ways(router_process, backend_process):
    """The client's PING gets its PONG; the app's own pings (simple-websocket's, every 0.2 s, waiting on the
    socket in a selector) get theirs, so the WebSocket outlives many of them."""
    router = router_process()
    backend_process("tests.websocket_apps:pinging()", router.tunnel_address)
    router.wait_tunnels(1)
    ws = open_ws(router)
    try:
        ws.ping(b"are you there")
        pongs: List[bytes] = []
        pings = 0
        for _ in range(1000):
            opcode, frame = ws.recv_data_frame(True)  # (websocket-client answers a PING by itself)
            if opcode == websocket.ABNF.OPCODE_PONG:
                pongs.append(frame.data)
            elif opcode == websocket.ABNF.OPCODE_PING:
                pings += 1
            if pongs and pings >= 5:
                break
        assert (pongs, pings) == ([b"are you there"], 5)
        ws.send("still here")
        assert ws.recv() == "still here"
    finally:
        finish(ws)


def test_a_websockets_client_with_permessage_deflate_and_keepalive_pings(ws_router):
    """The ``websockets`` library negotiates permessage-deflate through the tunnel and pings as it goes."""
    with websockets_connect(ws_url(ws_router), ping_interval=0.1, open_timeout=15) as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
        for n in range(200):
            ws.send("x" * 1000 + str(n))
            assert ws.recv(timeout=15) == "x" * 1000 + str(n)
        ws.ping().wait(15)


def test_close_codes_travel_both_ways(ws_router):
    ws = open_ws(ws_router)
    ws.send("name from-client")
    assert ws.recv() == "hello from-client"
    ws.close(status=4001, reason=b"client leaves")
    other = open_ws(ws_router)
    try:
        other.send("name from-app")
        assert other.recv() == "hello from-app"
        other.send("close 4002")
        assert close_frame_of(other) == (4002, "bye from the app")
    finally:
        finish(other)
    closed = wait_until(lambda: [e for e in app_events(ws_router)["events"] if e["name"] == "from-client"],
                        what="the app to see the client's close")
    assert closed == [{"name": "from-client", "event": "closed", "code": 4001, "message": "client leaves"}]


def test_a_backend_killed_mid_conversation_closes_the_clients_websocket(router_process, backend_process):
    """SIGKILL: the tunnel's socket closes at once, and with it every WebSocket on it."""
    router = router_process()
    backend = backend_process(APP, router.tunnel_address)
    router.wait_tunnels(1)
    ws = open_ws(router, timeout=15)
    ws.send("before")
    assert ws.recv() == "before"
    backend.proc.kill()
    assert socket_closed(ws)
    finish(ws)
    router.wait_for_line("Tunnel removed: .*peer closed the connection")


def test_a_frozen_backend_is_given_up_after_the_ping_timeout_and_its_websockets_closed(router_process,
                                                                                     backend_process):
    """SIGSTOP: nothing closes the tunnel's socket; the router's PING goes unanswered, and the client's
    WebSocket is closed with the tunnel (the client's timeout, 20 s, is well past PING's 1 + 1 s)."""
    router = router_process("--ping-interval", "1", "--ping-timeout", "1")
    backend = backend_process(APP, router.tunnel_address)
    router.wait_tunnels(1)
    ws = open_ws(router, timeout=20)
    ws.send("before")
    assert ws.recv() == "before"
    backend.proc.send_signal(signal.SIGSTOP)
    try:
        assert socket_closed(ws)
        router.wait_for_line("Tunnel removed: .*no answer to PING")
    finally:
        backend.proc.send_signal(signal.SIGCONT)
        finish(ws)


def test_a_client_that_vanishes_ends_the_apps_receive(ws_router):
    """A client that resets its connection without a Close frame: the app's ``receive()`` ends."""
    ws = open_ws(ws_router)
    ws.send("name vanishing")
    assert ws.recv() == "hello vanishing"
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    ws.sock.close()
    ended = wait_until(lambda: [e for e in app_events(ws_router)["events"] if e["name"] == "vanishing"],
                       what="the app's receive to end")
    assert ended[0]["event"] == "closed"
    assert app_events(ws_router)["open"] == 0


def test_a_client_killed_mid_conversation_ends_the_apps_receive(ws_router, processes):
    """A client process killed with SIGKILL: its kernel closes the connection; the app's receive ends."""
    from tests.conftest import PYTHON, Process

    script = ("import websocket, sys, time; ws = websocket.create_connection(sys.argv[1], timeout=15); "
              "ws.send('name killed'); print(ws.recv(), flush=True); time.sleep(60)")
    client = Process([PYTHON, "-c", script, ws_url(ws_router)])
    processes.append(client)
    client.wait_for_line("hello killed")
    client.proc.kill()
    ended = wait_until(lambda: [e for e in app_events(ws_router)["events"] if e["name"] == "killed"],
                       what="the app's receive to end")
    assert ended[0]["event"] == "closed"


def test_an_idle_websocket_is_closed_with_1001_after_the_idle_timeout(router_process, backend_process):
    router = router_process("--websocket-idle-timeout", "1")
    backend_process(APP, router.tunnel_address)
    router.wait_tunnels(1)
    ws = open_ws(router)
    try:
        ws.send("name idle")
        assert ws.recv() == "hello idle"
        assert close_frame_of(ws) == (1001, "idle timeout")
    finally:
        finish(ws)
    wait_until(lambda: [e for e in app_events(router)["events"] if e["name"] == "idle"],
               what="the app's receive to end")
    router.wait_for_line("Closing WebSocket /echo from 127.0.0.1: nothing sent either way for 1s")


def test_a_router_drain_closes_open_websockets_with_1001_at_the_graceful_timeout(router_process, backend_process):
    router = router_process("--graceful-timeout", "2")
    backend_process(APP, router.tunnel_address)
    router.wait_tunnels(1)
    ws = open_ws(router)
    ws.send("name draining")
    assert ws.recv() == "hello draining"
    router.signal(signal.SIGTERM)
    try:
        assert close_frame_of(ws) == (1001, "server going away")
        assert socket_closed(ws)
    finally:
        finish(ws)
    assert router.wait(15) == 0
    assert router.count_lines("Closing 1 WebSocket") == 1


def test_a_backend_drain_closes_open_websockets_with_1001_and_the_app_sees_the_close(router_process,
                                                                                      backend_process):
    router = router_process()
    backend = backend_process(APP, router.tunnel_address, "--graceful-timeout", "2")
    router.wait_tunnels(1)
    ws = open_ws(router)
    ws.send("name drained")
    assert ws.recv() == "hello drained"
    events_before = app_events(router)
    backend.signal(signal.SIGTERM)
    try:
        assert close_frame_of(ws) == (1001, "server going away")
        assert socket_closed(ws)
    finally:
        finish(ws)
    assert backend.wait(15) == 0
    backend.wait_for_line("Closing 1 WebSocket")
    assert "Traceback" not in backend.output()
    assert events_before["open"] == 1


def test_a_websocket_the_app_refuses_is_an_ordinary_response(ws_router):
    """A WebSocket request to a plain route: Flask's own 400 reaches the client as an HTTP response."""
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        open_ws(ws_router, "/plain")
    assert refused.value.status_code == 400
    with pytest.raises(websocket.WebSocketBadStatusException) as missing:
        open_ws(ws_router, "/nowhere")
    assert missing.value.status_code == 404
    with urllib.request.urlopen(ws_router.url + "/plain", timeout=10) as response:  # the tunnel carries on
        assert response.read() == b"plain"


# -- the backend as a gunicorn worker: gunicorn -k ptth_sync.worker.TunnelWorker ---------------------


def test_the_gunicorn_tunnel_worker_serves_flask_sock_websockets_and_logs_them(router_process, processes,
                                                                                tmp_path):
    """Echo, binary, close codes; the access log shows ``"GET /echo HTTP/1.1" 101`` as under gthread."""
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, "--threads", "8", "--access-logfile", "-", app=APP)
    wait_tunnels(router, server, 1)
    ws = open_ws(router)
    try:
        for n in range(1000):
            ws.send(f"message {n}")
            assert ws.recv() == f"message {n}"
        payload = os.urandom(MIB)
        ws.send_binary(payload)
        assert ws.recv() == payload
        ws.send("close 4004")
        assert close_frame_of(ws) == (4004, "bye from the app")
    finally:
        finish(ws)
    leaving = open_ws(router)
    leaving.send("name worker-client")
    assert leaving.recv() == "hello worker-client"
    leaving.close(status=4001, reason=b"client leaves")
    leaving.shutdown()
    seen = wait_until(lambda: [e for e in app_events(router)["events"] if e["name"] == "worker-client"],
                      what="the app to see the client's close")
    assert seen == [{"name": "worker-client", "event": "closed", "code": 4001, "message": "client leaves"}]
    server.wait_for_line(r'"GET /echo HTTP/1\.1" 101 ')
    assert "Traceback" not in server.output()


def test_a_gunicorn_worker_stopping_closes_its_websockets_with_1001(router_process, processes, tmp_path):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, "--threads", "8", "--graceful-timeout", "2", app=APP)
    wait_tunnels(router, server, 1)
    ws = open_ws(router)
    ws.send("name worker")
    assert ws.recv() == "hello worker"
    server.signal(signal.SIGTERM)
    try:
        assert close_frame_of(ws) == (1001, "server going away")
        assert socket_closed(ws)
    finally:
        finish(ws)
    assert server.wait(15) == 0
    server.wait_for_line("Closing 1 WebSocket")
    assert "Traceback" not in server.output()


def test_wss_through_an_https_router_and_a_tls_tunnel_with_a_token(router_process, backend_process, tmp_path):
    """TLS on both sides (the client's socket is relayed without a thread through TLS too), the PTTH upgrade
    wire with its stream limit of --threads, and large messages both ways."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_path, server_path = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca.cert_pem.write_to_path(ca_path)
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(server_path)
    router = router_process("--certfile", str(server_path), "--http-certfile", str(server_path),
                            "--http-keyfile", str(server_path), "--token", "tok")
    backend_process(APP, router.tunnel_address, "--cafile", str(ca_path), "--token", "tok", "--threads", "4")
    router.wait_tunnels(1)
    url = router.url.replace("https://", "wss://") + "/echo"
    sockets = [websocket.create_connection(url, timeout=15, sslopt={"ca_certs": str(ca_path)}) for _ in range(3)]
    try:
        for n, ws in enumerate(sockets):
            for m in range(200):
                ws.send(f"{n}/{m}")
                assert ws.recv() == f"{n}/{m}"
        payload = os.urandom(4 * MIB)
        sockets[0].send_binary(payload)
        assert sockets[0].recv() == payload
        sockets[1].send("close 4005")
        assert close_frame_of(sockets[1]) == (4005, "bye from the app")
    finally:
        for ws in sockets:
            finish(ws)
    assert router.count_lines("Tunnel removed") == 0


# -- the wire, frame by frame: a scripted HTTP/2 backend behind a real router -----------------------


def raw_handshake(router, path: str = "/chat?room=1") -> socket.socket:
    """Open a WebSocket by hand, with RFC 6455's sample key; the socket, past the router's head."""
    sock = socket.create_connection((router.http_host, router.http_port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: chat.example:8080\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n".encode())
    return sock


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        data = sock.recv(1)
        assert data, head
        head += data
    return head


def test_the_router_speaks_rfc_8441_to_the_backend_frame_by_frame(router_process):
    """The extended CONNECT's header block, the 101 for a 200, DATA both ways, and END_STREAM and RST_STREAM
    mapped to the client's TCP connection and back."""
    from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame

    from tests.h2peer import H2Peer

    router = router_process()
    host, port = router.tunnel_address.rsplit(":", 1)
    backend = H2Peer.connect((host, int(port)))
    try:
        backend.server_handshake(settings={0x8: 1})  # SETTINGS_ENABLE_CONNECT_PROTOCOL
        router.wait_tunnels(1)

        client = raw_handshake(router)
        request = backend.read_until(lambda f: isinstance(f, HeadersFrame), 10)
        block = dict(backend.header_blocks[request.stream_id][0])
        assert "END_STREAM" not in request.flags
        assert (block[b":method"], block[b":protocol"], block[b":scheme"]) == (b"CONNECT", b"websocket", b"http")
        assert (block[b":path"], block[b":authority"]) == (b"/chat?room=1", b"chat.example:8080")
        assert block[b"sec-websocket-key"] == b"dGhlIHNhbXBsZSBub25jZQ=="
        assert (block[b"sec-websocket-version"], block[b"sec-websocket-protocol"]) == (b"13", b"chat")
        assert b"upgrade" not in block
        assert b"connection" not in block
        backend.send(backend.headers(request.stream_id, [(":status", "200"), ("sec-websocket-protocol", "chat")]))
        head = read_head(client).decode().lower()
        assert head.startswith("http/1.1 101 switching protocols\r\n")
        assert "sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n" in head
        assert "sec-websocket-protocol: chat\r\n" in head
        client.sendall(b"from the client")
        data = backend.read_until(lambda f: isinstance(f, DataFrame), 10)
        assert (data.stream_id, data.data) == (request.stream_id, b"from the client")
        backend.send(DataFrame(request.stream_id, data=b"from the backend"))
        assert client.recv(100) == b"from the backend"
        backend.send(DataFrame(request.stream_id, data=b"", flags=["END_STREAM"]))  # END_STREAM: a FIN
        assert client.recv(100) == b""
        client.shutdown(socket.SHUT_WR)  # the client's FIN: END_STREAM
        end = backend.read_until(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags, 10)
        assert end.stream_id == request.stream_id
        client.close()

        reset_by_backend = raw_handshake(router)
        second = backend.read_until(lambda f: isinstance(f, HeadersFrame), 10)
        backend.send(backend.headers(second.stream_id, [(":status", "200")]))
        read_head(reset_by_backend)
        backend.send(RstStreamFrame(second.stream_id, error_code=0x2))  # RST_STREAM: the connection ends
        try:
            assert reset_by_backend.recv(100) == b""
        except ConnectionResetError:
            pass
        reset_by_backend.close()

        reset_by_client = raw_handshake(router)
        third = backend.read_until(lambda f: isinstance(f, HeadersFrame), 10)
        backend.send(backend.headers(third.stream_id, [(":status", "200")]))
        read_head(reset_by_client)
        reset_by_client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        reset_by_client.close()  # a reset connection: RST_STREAM(CANCEL)
        reset = backend.read_until(lambda f: isinstance(f, RstStreamFrame), 10)
        assert (reset.stream_id, reset.error_code) == (third.stream_id, 0x8)

        refused = raw_handshake(router, "/private")
        fourth = backend.read_until(lambda f: isinstance(f, HeadersFrame), 10)
        backend.send(backend.headers(fourth.stream_id, [(":status", "403"), ("content-length", "6")]),
                     DataFrame(fourth.stream_id, data=b"denied", flags=["END_STREAM"]))
        answer = b""
        while not answer.endswith(b"denied"):
            data = refused.recv(4096)
            assert data, answer
            answer += data
        refused.close()
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    finally:
        backend.close()
    assert router.count_lines("Tunnel removed") == 0
