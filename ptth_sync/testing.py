"""Test a WSGI application behind a real router and tunnel, inside the test process.

::

    from ptth_sync.testing import serve_through_tunnel

    with serve_through_tunnel(app) as url:
        assert urllib.request.urlopen(url + "/foo").status == 200

With pytest, add ``pytest_plugins = ["ptth_sync.testing"]`` to the root
``conftest.py`` and ask for the ``ptth_tunnel`` fixture, a factory::

    def test_foo(ptth_tunnel):
        url = ptth_tunnel(app)

Everything listens on loopback ports chosen by the system: a :class:`~ptth_sync.Router`
accepting tunnels, an HTTP/1.1 server for the public side (the router's own
connection loop, with gunicorn's parser and writer, keep-alive and chunked
bodies, WebSockets, a thread per client connection) and a :class:`~ptth_sync.Backend`
serving the application through the tunnel. pytest is needed only for the fixture.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, Optional, Set

from gunicorn.config import Config
from gunicorn.workers.base import Worker

from .addresses import format_address
from .backend import Backend
from .backend.wsgi import WSGIApp
from .router import Router
from .router.worker import ClientConnectionLoop

__all__ = ["serve_through_tunnel"]

log = logging.getLogger("ptth_sync.testing")

#: Seconds to wait for each thread to end when the tunnel is taken down.
SHUTDOWN_TIMEOUT = 10.0

_running = 0  # instances of serve_through_tunnel not yet exited
_running_lock = threading.Lock()


@contextlib.contextmanager
def serve_through_tunnel(
    app: WSGIApp,
    *,
    threads: int = 16,
    tunnels: int = 1,
    token: Optional[str] = None,
    timeout: float = 30.0,
    startup_timeout: float = 10.0,
) -> Iterator[str]:
    """Serve ``app`` through a router and tunnel on loopback; yields the router's URL.

    ``threads`` and ``tunnels`` are the backend's (requests run at once, and
    connections to the router); with a ``token`` the router requires it and
    the backend presents it; ``timeout`` is the router's wait for a response
    (504 after). Yields once all ``tunnels`` are in the router's pool (raises
    :class:`TimeoutError` if that takes over ``startup_timeout`` seconds). On
    exit, client connections are cut, backend and router closed and their
    threads joined.
    """
    global _running
    existing = set(threading.enumerate())
    router = Router(timeout=timeout, token=token)
    with _running_lock:
        _running += 1
    server: Optional[_HTTPServer] = None
    backend: Optional[Backend] = None
    try:
        tunnel_address = router.listen_tunnels("127.0.0.1:0")
        server = _HTTPServer(router)
        backend = Backend(tunnel_address, app, threads=threads, tunnels=tunnels, token=token).start()
        _wait_for_tunnels(router, backend, tunnels, startup_timeout)
        yield server.url
    finally:
        if server is not None:
            server.stop()
        if backend is not None:
            backend.close()
        router.close()
        if server is not None:
            server.join(SHUTDOWN_TIMEOUT)
        with _running_lock:
            _running -= 1
            last = _running == 0
        if last:  # else threads started since ``existing`` may belong to a tunnel still up
            _join_new_threads(existing, SHUTDOWN_TIMEOUT)


def _wait_for_tunnels(router: Router, backend: Backend, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(router.pool) < count:
        if backend.wait_refused(0.01):  # the poll interval, or at once if refused
            msg = f"the router refused the tunnel: {backend.refused}"
            raise RuntimeError(msg)
        if time.monotonic() > deadline:
            msg = f"{len(router.pool)} of {count} tunnels up after {timeout}s"
            raise TimeoutError(msg)


def _join_new_threads(existing: Set[threading.Thread], timeout: float) -> None:
    """Wait for the threads ptth_sync started since ``existing`` was taken."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread in existing or thread is threading.current_thread() or not thread.name.startswith("ptth-"):
            continue
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            log.warning("Thread %s still running after the tunnel was closed", thread.name)


class _AccessLog(logging.LoggerAdapter):  # type: ignore[type-arg]  # subscriptable from Python 3.11 only
    """gunicorn's logger interface on ``ptth_sync.testing``; access lines at DEBUG."""

    def access(self, resp: Any, req: Any, environ: Dict[str, Any], request_time: timedelta) -> None:
        self.debug("%s %s %s", req.method, req.uri, resp.status)


class _HTTPServer(ClientConnectionLoop):
    """The router's public side: a thread per client connection, as the router's worker serves it."""

    handle_error = Worker.handle_error  # gunicorn's error pages (400, 500, ...)

    def __init__(self, router: Router) -> None:
        self.wsgi = router
        self.cfg = Config()
        self.cfg.set("keepalive", 5)
        self.log = _AccessLog(log, {})
        self.alive = True
        self.nr = 0
        self.max_requests = sys.maxsize
        self._lock = threading.Lock()
        self._clients: Dict[socket.socket, threading.Thread] = {}
        self._listener = socket.create_server(("127.0.0.1", 0))
        host, port = self._listener.getsockname()[:2]
        self.url = f"http://{format_address((host, port))}"
        self._thread_name = f"ptth-http {port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"ptth-http-accept {port}", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, addr = self._listener.accept()
            except OSError:
                if not self.alive:
                    return
                time.sleep(0.1)  # out of file descriptors, say: do not spin
                continue
            thread = threading.Thread(target=self._serve, args=(client, addr), name=self._thread_name, daemon=True)
            with self._lock:
                if not self.alive:
                    client.close()
                    return
                self._clients[client] = thread
            thread.start()

    def _serve(self, client: socket.socket, addr: Any) -> None:
        try:
            self.serve_connection(self._listener, client, addr)
        finally:
            with self._lock:
                self._clients.pop(client, None)

    def stop(self) -> None:
        """Stop accepting and cut every client connection."""
        with self._lock:
            self.alive = False
            clients = list(self._clients)
        _shutdown(self._listener)
        self._listener.close()
        for client in clients:
            _shutdown(client)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._acceptor.join(timeout)
        with self._lock:
            threads = list(self._clients.values())
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


try:
    import pytest
except ImportError:  # the fixture needs pytest; the context manager does not
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def ptth_tunnel() -> Iterator[Callable[..., str]]:
        """A factory: ``ptth_tunnel(app, **options)`` serves ``app`` as :func:`serve_through_tunnel` does.

        Returns the URL; every tunnel started is closed at teardown.
        """
        with contextlib.ExitStack() as stack:

            def start(app: WSGIApp, **options: Any) -> str:
                return stack.enter_context(serve_through_tunnel(app, **options))

            yield start
