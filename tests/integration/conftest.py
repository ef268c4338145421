"""In-process tunnels: a real Router and real Backends talking over loopback TCP."""

from __future__ import annotations

import threading
from typing import Callable, List

import pytest

from ptth_sync import Backend, Router
from ptth_sync.connection import Stream
from tests.conftest import wait_until


@pytest.fixture
def router():
    router = Router(timeout=10)
    router.tunnel_address = router.listen_tunnels("127.0.0.1:0")
    yield router
    router.close()


@pytest.fixture
def start_backend(router):
    """Start a Backend serving ``app`` with ``tunnels`` connections; waits until the router has them."""
    backends: List[Backend] = []

    def start(app: Callable, tunnels: int = 1, threads: int = 16, wait: bool = True) -> Backend:
        before = len(router.pool)
        backend = Backend(router.tunnel_address, app, threads=threads, tunnels=tunnels).start()
        backends.append(backend)
        if wait:
            wait_until(lambda: len(router.pool) >= before + tunnels, what="tunnels in the router's pool")
        return backend

    yield start
    for backend in backends:
        backend.close()


@pytest.fixture
def backends():
    """A list to put Backends in; every one is closed at teardown."""
    started: List[Backend] = []
    yield started
    for backend in started:
        backend.close()


def echo_in_thread(stream: Stream) -> None:
    """An engine's ``on_request``: answer 200 and echo the body back as it comes, on a thread of its own."""

    def echo() -> None:
        stream.send_headers([(b":status", b"200")])
        while True:
            data = stream.read(-1, 10)
            if not data:
                break
            stream.send_data(data)
        stream.end()
        stream.close()

    threading.Thread(target=echo, daemon=True).start()
