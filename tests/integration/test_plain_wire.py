"""How many streams a backend's tunnel admits: 250 on the plain wire, ``threads`` on the PTTH upgrade wire.

On the plain wire the router may be a Go ``http2.Transport`` (the Go seed's),
which dials a new connection once one is full: the backend advertises what
Go's own http2.Server does and queues the requests above its threads.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from ptth_sync import Backend, Router
from ptth_sync.backend import PLAIN_WIRE_STREAMS
from tests.conftest import wait_until
from tests.h2peer import H2Peer
from tests.wsgi_client import wsgi_request

PROMPT = 5.0


class GatedApp:
    """A WSGI app that records each path and holds every request until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.paths: List[str] = []
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        with self._lock:
            self.paths.append(environ["PATH_INFO"])
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            self.gate.wait(30)
        finally:
            with self._lock:
                self.running -= 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]


def advertised(router: Router) -> int:
    (tunnel,) = router.pool.tunnels()
    return tunnel._h2.remote_settings.max_concurrent_streams


def advertises(frame: Any) -> Optional[int]:
    """The MAX_CONCURRENT_STREAMS a (non-ACK) SETTINGS frame carries, if any."""
    if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
        return frame.settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
    return None


def fake_router() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(PROMPT)
    return listener


# -- what is advertised ----------------------------------------------------------------


def test_a_plain_wire_tunnel_advertises_250_streams_whatever_its_threads(router, start_backend):
    start_backend(GatedApp(), threads=4)
    assert advertised(router) == PLAIN_WIRE_STREAMS == 250


def test_a_plain_wire_tunnel_with_more_threads_advertises_its_threads(router, start_backend):
    start_backend(GatedApp(), threads=300)
    assert advertised(router) == 300


def test_the_backends_settings_on_the_plain_wire_say_250():
    listener = fake_router()
    backend = Backend(listener.getsockname(), GatedApp(), threads=4).start()
    try:
        peer = H2Peer(listener.accept()[0])
        peer.client_handshake()  # returns once the backend's ACK came, after every SETTINGS it sent first
        values = [advertises(f) for f in peer.received if advertises(f) is not None]
        assert values[-1] == 250, values  # h2's initial SETTINGS say 100; ours follow at once
        peer.close()
    finally:
        backend.close()
        listener.close()


def test_an_upgrade_wire_tunnel_advertises_its_threads():
    router = Router(timeout=10, token="s3cret")
    address = router.listen_tunnels("127.0.0.1:0")
    backend = Backend(address, GatedApp(), threads=5, token="s3cret").start()
    try:
        wait_until(lambda: len(router.pool) == 1, what="the tunnel")
        assert advertised(router) == 5
    finally:
        backend.close()
        router.close()


def test_a_tunnel_registered_for_an_origin_advertises_its_threads(router):
    backend = Backend(router.tunnel_address, GatedApp(), threads=6, origins=["https://api.example.test"]).start()
    try:
        wait_until(lambda: len(router.pool) == 1, what="the tunnel")
        assert advertised(router) == 6
    finally:
        backend.close()


# -- queueing above the threads --------------------------------------------------------


def test_32_concurrent_requests_to_4_threads_all_succeed_queued_on_the_backend(router, start_backend):
    app = GatedApp()
    backend = start_backend(app, threads=4)
    (tunnel,) = backend.connections
    paths = [f"/r{i}" for i in range(32)]
    with ThreadPoolExecutor(32) as clients:
        futures = [clients.submit(lambda p=p: wsgi_request(router, "GET", p).body) for p in paths]
        # Every request reached the backend while only 4 run: the other 28 wait in its queue.
        wait_until(lambda: tunnel.active_streams == 32, what="32 streams open on the backend")
        assert app.running == 4
        app.gate.set()
        bodies = [future.result(timeout=30) for future in futures]
    assert bodies == [p.encode() for p in paths]
    assert app.most_running == 4
    assert sorted(app.paths) == sorted(paths)


def test_queued_requests_run_in_arrival_order():
    listener = fake_router()
    app = GatedApp()
    backend = Backend(listener.getsockname(), app, threads=1).start()
    try:
        peer = H2Peer(listener.accept()[0])
        peer.client_handshake()
        for stream_id in range(1, 41, 2):
            peer.send(peer.headers(stream_id, request(f"/{stream_id}"), flags=["END_HEADERS", "END_STREAM"]))
        wait_until(lambda: app.paths, what="the first request in the app")
        app.gate.set()
        peer.read_until(lambda f: is_end(f, 39), 30)
        assert app.paths == [f"/{i}" for i in range(1, 41, 2)]
        peer.close()
    finally:
        backend.close()
        listener.close()


def test_a_request_reset_while_queued_never_reaches_the_app():
    listener = fake_router()
    app = GatedApp()
    backend = Backend(listener.getsockname(), app, threads=1).start()
    try:
        peer = H2Peer(listener.accept()[0])
        peer.client_handshake()
        peer.send(peer.headers(1, request("/first"), flags=["END_HEADERS", "END_STREAM"]))
        wait_until(lambda: app.paths == ["/first"], what="the first request holding the only thread")
        peer.send(
            peer.headers(3, request("/reset"), flags=["END_HEADERS", "END_STREAM"]),
            RstStreamFrame(3, ErrorCodes.CANCEL),
            peer.headers(5, request("/after"), flags=["END_HEADERS", "END_STREAM"]),
        )
        (tunnel,) = backend.connections
        wait_until(lambda: tunnel.active_streams == 3, what="both requests queued behind the first")
        app.gate.set()
        peer.read_until(lambda f: is_end(f, 5), 30)
        assert app.paths == ["/first", "/after"]
        peer.close()
    finally:
        backend.close()
        listener.close()


def request(path: str) -> List[tuple]:
    return [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "test")]


def is_end(frame: Any, stream_id: int) -> bool:
    return frame.stream_id == stream_id and isinstance(frame, (DataFrame, HeadersFrame)) and "END_STREAM" in frame.flags
