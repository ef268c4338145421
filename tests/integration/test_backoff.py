"""The backend's redial backoff, against real listeners and a real Router on loopback."""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, List, Tuple

import pytest

from ptth_sync import Backend, Router
from tests import apps
from tests.conftest import wait_until

#: A cap small enough for a quick test; the first delay 10 ms, so the cap is reached within a second.
CAP = 1.0
FIRST = 0.01


class RecordingBackend(Backend):
    """A Backend that records every redial delay it draws: ``(attempt, delay)``."""

    backoff_initial = FIRST

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delays: List[Tuple[int, float]] = []
        self._delays_lock = threading.Lock()

    def _backoff(self, attempt: int) -> float:
        delay = super()._backoff(attempt)
        with self._delays_lock:
            self.delays.append((attempt, delay))
        return delay

    def attempts(self) -> List[int]:
        with self._delays_lock:
            return [attempt for attempt, _ in self.delays]

    def forget(self) -> None:
        with self._delays_lock:
            self.delays.clear()


def reserved_port() -> socket.socket:
    """A bound but not listening socket: its port refuses connections and stays ours until closed."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ClosingListener:
    """Accepts connections on loopback and closes each at once: a peer that hangs up before the handshake."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="closing listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the 0.1 s timeout: look at the stop flag again
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def start(backends: List[Backend], address: Any, **options: Any) -> RecordingBackend:
    backend = RecordingBackend(address, apps.hello, backoff_max=CAP, **options)
    backends.append(backend.start())
    return backend


def grew(backend: RecordingBackend, count: int) -> Callable[[], bool]:
    return lambda: len(backend.attempts()) >= count


def assert_growing(attempts: List[int]) -> None:
    """Each failure drew the next delay: 0, 1, 2, ... with no reset in between."""
    assert attempts == list(range(attempts[0], attempts[0] + len(attempts))), attempts


# -- growth ----------------------------------------------------------------------------


def test_refused_connects_keep_growing_the_backoff_up_to_the_cap(backends):
    holder = reserved_port()
    try:
        backend = start(backends, holder.getsockname())
        wait_until(grew(backend, 10), what="ten refused connects")
        attempts = backend.attempts()[:10]
        assert attempts[0] == 0
        assert_growing(attempts)
        assert all(delay <= CAP for _, delay in backend.delays)
        assert backend.delays[9][1] >= CAP / 2  # 10 ms doubled 9 times: capped, jitter within the cap
    finally:
        holder.close()


@pytest.mark.parametrize("wire", ["plain", "upgrade"])
def test_a_peer_that_closes_before_the_handshake_keeps_growing_the_backoff(backends, wire):
    listener = ClosingListener()
    try:
        options = {"token": "s3cret"} if wire == "upgrade" else {}
        backend = start(backends, listener.address, **options)
        wait_until(grew(backend, 6), what="six failed handshakes")
        assert_growing(backend.attempts()[:6])
        assert listener.accepted >= 6  # the connects succeeded: the handshakes failed
    finally:
        listener.close()


# -- reset ------------------------------------------------------------------------------


def test_an_established_tunnel_resets_the_backoff(backends):
    holder = reserved_port()
    port = holder.getsockname()[1]
    router = Router(timeout=5)
    try:
        backend = start(backends, ("127.0.0.1", port))
        wait_until(grew(backend, 6), what="six refused connects")
        holder.close()
        router.listen_tunnels(("127.0.0.1", port))
        wait_until(lambda: len(router.pool) == 1, CAP + 3, what="the tunnel")
        backend.forget()
        for connection in backend.connections:  # the tunnel dies, as a bad request may kill it
            connection.sock.shutdown(socket.SHUT_RDWR)
        wait_until(lambda: backend.attempts(), what="the redial after the lost tunnel")
        assert backend.attempts()[0] == 0
        wait_until(lambda: len(router.pool) == 1, CAP + 3, what="the tunnel back")
    finally:
        router.close()
        holder.close()


def test_failures_after_an_established_tunnel_grow_from_the_start_again(backends):
    router = Router(timeout=5)
    address = router.listen_tunnels("127.0.0.1:0")
    try:
        backend = start(backends, address)
        wait_until(lambda: len(router.pool) == 1, what="the tunnel")
        router.close()  # the tunnel is lost; nothing listens any more
        wait_until(grew(backend, 5), what="five redials")
        attempts = backend.attempts()[:5]
        assert attempts[0] == 0
        assert_growing(attempts)
    finally:
        router.close()


# -- a router that restarts -------------------------------------------------------------


def test_a_restarted_router_has_its_tunnels_back_within_the_cap(backends):
    first = Router(timeout=5)
    address = first.listen_tunnels("127.0.0.1:0")
    second = Router(timeout=5)
    try:
        backend = start(backends, address, tunnels=2)
        wait_until(lambda: len(first.pool) == 2, what="both tunnels")
        first.close()
        # Down long enough for the delays to reach the cap: 10 ms doubled 7 times is past 1 s.
        wait_until(lambda: sum(1 for a in backend.attempts() if a >= 7) >= 4, 15, what="redials at the cap")
        second.listen_tunnels(address)
        wait_until(lambda: len(second.pool) == 2, CAP + 3, what="both tunnels on the restarted router")
    finally:
        first.close()
        second.close()
