"""The router: a WSGI application that proxies each request through a tunnel."""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union, cast

from gunicorn.http.errors import ChunkMissingTerminator, InvalidChunkExtension, InvalidChunkSize
from h2.errors import ErrorCodes

from ..access import TunnelAccess
from ..addresses import Address, AddressLike, format_address, parse_address
from ..engine import Connection, ConnectionSettings, Stream
from ..errors import ConnectionClosed, PTTHError, StreamReset, StreamTimeout
from ..handshake import HandshakeFailed, HandshakeRefused, accept_upgrade
from ..headers import InvalidHeader, header_list_size, request_headers, response_headers, response_status
from ..origins import ANY, request_origin
from ..tls import TLSChannel
from .admin import PUBLISH_INTERVAL, AdminServer, SharedMetrics, is_loopback
from .checks import CLOSE_CONNECTION, check_request
from .fleet import WorkerFleet
from .limits import descriptor_budget
from .metrics import RouterMetrics, merge, opening_failure_reason
from .opening import PendingTunnels
from .pool import TunnelPool

__all__ = ["TUNNELS_FULL", "Proxied", "Router"]

log = logging.getLogger("ptth_sync.router")

StartResponse = Callable[..., Any]

#: Request bodies up to this size (with a known length) are read before the
#: stream opens: they go out with the headers and can be retried elsewhere.
SMALL_BODY = 64 * 1024
#: Bytes read from ``wsgi.input`` at a time when streaming a request body: as
#: much as gunicorn's reader takes from the socket at once, so it hands its
#: blocks over whole instead of copying what is left of each.
UPLOAD_CHUNK = 1024 * 1024

_NO_BODY_STATUSES = (204, 304)
#: Tunnel connections that may be opening at once, per accept loop (see opening.py).
MAX_PENDING_TUNNELS = 256


class _Full:
    """The type of :data:`TUNNELS_FULL`."""

    def __repr__(self) -> str:
        return "TUNNELS_FULL"


#: What :meth:`Router.begin` returns when the tunnel it chose has no stream free.
TUNNELS_FULL = _Full()


class _Prepared:
    """A request that passed the router's checks, with its HTTP/2 headers."""

    __slots__ = ("body", "headers", "method", "origin", "target")

    def __init__(
        self, headers: List[Tuple[bytes, bytes]], method: str, target: str, body: _RequestBody, origin: str
    ) -> None:
        self.headers = headers
        self.method = method
        self.target = target
        self.body = body
        self.origin = origin


class Proxied:
    """A request :meth:`Router.begin` sent on a tunnel; its response comes through ``stream``."""

    __slots__ = ("code", "done", "prepared", "sent", "started", "stream", "streamed", "tunnel")

    def __init__(self, prepared: _Prepared, stream: Stream, tunnel: Connection, started: float) -> None:
        self.prepared = prepared
        self.stream = stream
        self.tunnel = tunnel
        self.started = started
        self.code = 502  # until the response headers say otherwise
        #: Body bytes passed on to the client.
        self.sent = 0
        self.done = False
        #: The caller streams the request body (it cannot be sent again).
        self.streamed = False


class TunnelBroken(PTTHError):
    """The tunnel failed after the response started: the client connection must be aborted."""


#: What a stopping worker tells each backend as it asks for a new tunnel (GOAWAY debug data).
_LEAVING = "router worker stopping: connect again"


class Router:
    """A WSGI application that forwards every request to a tunnel.

    Backends connect to the address given to :meth:`listen_tunnels`; requests
    are spread round-robin over the live tunnels. ``timeout`` bounds the wait
    for the backend's response (504) and for each later piece of it;
    ``tunnel_wait`` is how long a request may wait for a tunnel to appear
    before it gets a 503; ``max_body_size`` (bytes, None for no limit) is the
    largest request body forwarded: a larger one gets a 413. With a ``token``,
    a backend must open its tunnel with the PTTH upgrade and that bearer
    token; without one, both the upgrade and the plain wire are accepted.
    ``tokens`` maps more tokens to the origins each may register (see
    :mod:`ptth_sync.access`). A WebSocket (``Upgrade: websocket``) is relayed
    over an extended CONNECT stream to a backend that takes them (see
    ``ptth_sync/router/websocket.py``), and closed after
    ``websocket_idle_timeout`` seconds without a byte either way (0: never).

    A backend may register its tunnel for an origin
    (``https://api.example.com``): requests are then routed by their scheme
    and ``Host`` to the tunnels of that origin, round-robin within it, and
    tunnels registered for no origin serve every other host. A host that no
    tunnel serves, while other origins are served, gets ``421 Misdirected
    Request``.
    With an ``ssl_context`` (a server context; see :func:`server_context`)
    tunnels are TLS, the backend being the TLS client.

    :attr:`metrics` counts requests, bytes and tunnels; :meth:`listen_admin`
    serves them (``/metrics``, ``/status``, ``/healthz``).
    """

    def __init__(
        self,
        timeout: float = 30.0,
        tunnel_wait: float = 0.0,
        settings: ConnectionSettings = ConnectionSettings(),
        max_body_size: Optional[int] = None,
        token: Optional[str] = None,
        handshake_timeout: float = 10.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        tokens: Optional[Mapping[str, Iterable[str]]] = None,
        websocket_idle_timeout: float = 300.0,
    ) -> None:
        self.timeout = timeout
        self.websocket_idle_timeout = websocket_idle_timeout
        self.ssl_context = ssl_context
        self.token = token or None
        self.access = TunnelAccess(self.token, tokens)
        self.handshake_timeout = handshake_timeout
        self.tunnel_wait = tunnel_wait
        self.max_body_size = max_body_size
        self.settings = settings
        self.pool = TunnelPool()
        #: Set when several router processes share the listeners (see fleet.py).
        self.fleet: Optional[WorkerFleet] = None
        self.metrics = RouterMetrics()
        #: Set when several router processes answer the admin endpoints together (see admin.py).
        self.shared_metrics: Optional[SharedMetrics] = None
        self._listeners: List[Tuple[socket.socket, bool]] = []  # and whether this router owns it
        self._acceptors: List[threading.Thread] = []
        self._wake: Optional[Tuple[int, int]] = None  # a pipe that wakes the accept loops
        self._admin_servers: List[AdminServer] = []
        self._publishing = False
        self._stopping = threading.Event()
        self._connections: Dict[int, Connection] = {}
        self._origins: Dict[int, str] = {}  # of the tunnels not yet ready
        self._lock = threading.Lock()
        self._gone = threading.Condition(self._lock)  # a tunnel's close callback has finished
        self._closed = False
        #: The worker stops and let its tunnels go to the next (see :meth:`hand_over`).
        self._handed_over = False
        self._tls_openings = 0  # TLS handshakes running, each on a thread
        #: A loop that starts plain tunnels and reads and writes them itself instead of threads of their
        #: own (a router worker's front: see tunnel_reading.py); it returns False once it no longer does.
        self.tunnel_loop: Optional[Callable[[Connection, bytes], bool]] = None

    # -- tunnels --------------------------------------------------------------

    @staticmethod
    def bind_tunnels(addr: AddressLike, backlog: int = 1024) -> socket.socket:
        """Bind and listen on ``addr`` without accepting yet (for pre-fork servers)."""
        return _bind(addr, backlog)

    def listen_tunnels(self, addr: AddressLike = "127.0.0.1:8887") -> Address:
        """Accept tunnels on ``addr`` in the background; returns the address bound."""
        sock = self.bind_tunnels(addr)
        host, port = sock.getsockname()[:2]
        self.serve_tunnels(sock, owned=True)
        return (host, port)

    def serve_tunnels(self, sock: socket.socket, owned: bool = False) -> None:
        """Accept tunnels on an already listening socket, in a background thread.

        The socket may be shared with other processes (a pre-fork server):
        :meth:`close` then only closes this process's descriptor of it. An
        ``owned`` socket is shut down too.
        """
        with self._lock:
            if self._closed:
                msg = "router is closed"
                raise ConnectionClosed(msg, request_sent=False)
            if self._wake is None:
                self._wake = os.pipe()  # made here, not before a fork: it wakes this process's loops only
            wake_fd = self._wake[0]
            self._listeners.append((sock, owned))
        name = format_address(sock.getsockname()[:2])
        thread = threading.Thread(target=self._accept_loop, args=(sock, wake_fd), name=f"ptth-accept {name}",
                                  daemon=True)
        with self._lock:
            self._acceptors.append(thread)
        thread.start()

    def add_tunnel(
        self, sock: socket.socket, initial_data: bytes = b"", origin: str = ANY, start: bool = True
    ) -> Connection:
        """Start serving as the HTTP/2 client on a connected socket a backend dialled.

        ``initial_data``: bytes already read from the socket that belong to
        HTTP/2; ``origin``: what the tunnel serves, in normal form (``*``: any
        host). With ``start`` False the connection is registered but not
        started: the caller starts it (or passes it to :meth:`discard_unstarted`).
        """
        connection = Connection(
            sock,
            client_side=True,
            settings=self.settings,
            on_ready=self._tunnel_ready,
            on_close=self._tunnel_closed,
            initial_data=initial_data,
        )
        with self._lock:
            if self._closed:
                sock.close()
                msg = "router is closed"
                raise ConnectionClosed(msg, request_sent=False)
            self._connections[id(connection)] = connection
            self._origins[id(connection)] = origin
        if start:
            self.start_connection(connection)
        return connection

    def start_connection(self, connection: Connection, initial_data: bytes = b"") -> None:
        """Start a tunnel's connection: in :attr:`tunnel_loop` if set, else with its threads."""
        adopt = self.tunnel_loop
        sock = connection.sock
        loopable = isinstance(sock, TLSChannel) or (isinstance(sock, socket.socket)
                                                    and not isinstance(sock, ssl.SSLSocket))
        if adopt is None or not loopable or not adopt(connection, initial_data):
            connection.start(initial_data)

    def start_tunnel(
        self, sock: socket.socket, initial_data: bytes, origin: str, start: bool = True
    ) -> Optional[Connection]:
        """:meth:`add_tunnel` for a connection whose opening just completed; None if the router closed."""
        try:
            return self.add_tunnel(sock, initial_data, origin, start)
        except ConnectionClosed:
            if self.fleet is not None:
                self.fleet.tunnel_removed()
            return None

    def discard_unstarted(self, connection: Connection) -> None:
        """Forget a connection :meth:`add_tunnel` registered with ``start=False`` (its opening failed)."""
        with self._lock:
            self._connections.pop(id(connection), None)
            self._origins.pop(id(connection), None)
            self._gone.notify_all()

    def tunnel_wait_now(self) -> float:
        """How long a request may wait for a tunnel to appear: ``tunnel_wait``, or longer while tunnels that
        another worker handed over are expected here (see fleet.py)."""
        if self.fleet is None or self._handed_over:  # (a worker that stops waits for none: they go elsewhere)
            return self.tunnel_wait
        return max(self.tunnel_wait, self.fleet.handover_left())

    def _expecting_tunnels(self) -> bool:
        """Tunnels a worker handed over are on their way to the others (see fleet.py)."""
        return self.fleet is not None and self.fleet.handover_left() > 0

    def hand_over(self) -> int:
        """The worker stops: it takes no more tunnels, and asks each backend to dial its tunnel again (to
        the workers that stay, or the fresh ones of a reload); requests in flight finish on the tunnels
        they use, which close once they are done or at the worker's exit. Returns the tunnels let go."""
        with self._lock:
            if self._handed_over or self._closed:
                return 0
            self._handed_over = True
            connections = [connection for connection in self._connections.values() if connection.alive]
            wake = self._wake
            admin_servers = list(self._admin_servers)
        if wake is not None:
            os.write(wake[1], b"x")  # the tunnel acceptor ends (close() joins it)
        for server in admin_servers:  # the admin listener is left to the other workers too
            server.stop_accepting()
        if self.fleet is not None:
            self.fleet.leave(handing_over=bool(connections))
        for connection in connections:
            connection.leave(_LEAVING)
        if connections:
            log.info("Handing %d tunnel(s) over: their backends connect again; requests in flight finish here",
                     len(connections))
        return len(connections)

    def takes_clients(self) -> bool:
        """Whether this process should take public connections now (always, unless in a fleet)."""
        return self.fleet is None or len(self.pool) > 0 or self.fleet.total() == 0

    def close(self) -> None:
        """Stop accepting tunnels, close every tunnel and stop serving the admin endpoints."""
        with self._lock:
            self._closed = True
            listeners, self._listeners = self._listeners, []
            connections = list(self._connections.values())
            admin_servers, self._admin_servers = self._admin_servers, []
            publishing, self._publishing = self._publishing, False
            acceptors, self._acceptors = self._acceptors, []
            wake, self._wake = self._wake, None
        if wake is not None:
            os.write(wake[1], b"x")
        for thread in acceptors:
            if thread is not threading.current_thread():
                thread.join(2.0)
        for sock, owned in listeners:
            if owned:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            sock.close()  # a shared listener stays open in the processes that share it
        if wake is not None:
            os.close(wake[0])
            os.close(wake[1])
        for connection in connections:
            connection.close("router closed")
        for connection in connections:
            if connection.started:  # (one still opening has no reader to wait for)
                connection.wait_closed(2.0)
        with self._lock:  # the drops are counted once the close callbacks have run
            self._gone.wait_for(lambda: not self._connections, 2.0)
        self._stopping.set()
        if publishing and self.shared_metrics is not None:
            self.shared_metrics.publish(self.snapshot())  # this process's last word, for the others
        for server in admin_servers:
            server.close()

    def _accept_loop(self, listener: socket.socket, wake_fd: int) -> None:
        """Accept tunnels until :meth:`close` writes to the wake pipe.

        Non-blocking, because the listener may be shared by several router
        processes: whichever accepts first takes the tunnel. In a fleet, a
        worker holding more tunnels than another leaves it a moment to.
        Connections still opening wait in this loop's poller without threads
        (:class:`~ptth_sync.router.opening.PendingTunnels`); over TLS, the
        handshake takes a thread, and at most as many run at once as may wait.
        """
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        _, max_pending = descriptor_budget()
        max_pending = min(max_pending, MAX_PENDING_TUNNELS)
        pending = PendingTunnels(self, poller, max_pending)
        listener_fd = listener.fileno()
        paused_until = 0.0
        try:
            while True:
                timeout = pending.timeout_ms()
                if paused_until:
                    if time.monotonic() >= paused_until:
                        paused_until = 0.0
                        poller.register(listener, select.POLLIN)
                    else:
                        timeout = 100 if timeout < 0 else min(timeout, 100)
                events = poller.poll(timeout)
                if self._closed or self._handed_over:
                    return
                for fd, _ in events:
                    if fd in pending:
                        pending.readable(fd)
                pending.expire()
                if not any(fd == listener_fd for fd, _ in events):
                    continue
                if self.fleet is not None and self.fleet.spread and not self.fleet.least_loaded():
                    time.sleep(0.05)  # a less loaded worker takes it; if none has within a moment, we do
                    if self._closed:
                        return
                # In a fleet, one at a time: each tunnel goes to the least loaded process.
                for _ in range(1 if self.fleet is not None and self.fleet.spread else 64):
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break  # another worker took it, or the backlog is empty
                    except OSError as exc:
                        if self._closed:
                            return
                        log.warning("Accepting a tunnel failed: %s", exc)
                        if len(pending):
                            pending.shed_oldest()
                        # Out of descriptors, say: rest the listener a moment rather than spin on it.
                        poller.unregister(listener)
                        paused_until = time.monotonic() + 0.1
                        break
                    if self.fleet is not None:
                        self.fleet.tunnel_added()  # counted from now, so the next one goes elsewhere
                    if self.ssl_context is None:
                        sock.setblocking(False)
                        pending.add(sock, _peer(sock))
                    elif self._tls_openings >= max_pending:
                        log.warning("Refused a tunnel connection from %s: %d TLS handshakes already running",
                                    _peer(sock), max_pending)
                        sock.close()
                        if self.fleet is not None:
                            self.fleet.tunnel_removed()
                    else:
                        with self._lock:
                            self._tls_openings += 1
                        threading.Thread(target=self._open_tunnel, args=(sock,), name="ptth-handshake",
                                         daemon=True).start()
        finally:
            pending.close_all()

    def _open_tunnel(self, sock: socket.socket) -> None:
        peer = _peer(sock)
        try:
            if not self._open_and_add(sock, peer) and self.fleet is not None:
                self.fleet.tunnel_removed()
        finally:
            with self._lock:
                self._tls_openings -= 1

    def _open_and_add(self, sock: socket.socket, peer: str) -> bool:
        """Handshake and start the tunnel; False when it never became a connection."""
        try:
            if self.ssl_context is not None:
                channel = TLSChannel(sock, self.ssl_context, server_side=True)
                try:
                    channel.do_handshake(self.handshake_timeout)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("Tunnel from %s failed the TLS handshake: %s", peer, exc)
                    self.metrics.opening_failed("timeout" if isinstance(exc, socket.timeout) else "tls")
                    sock.close()
                    return False
                sock = channel  # type: ignore[assignment]
            initial_data, origin = accept_upgrade(sock, self.access, self.handshake_timeout)
            self.add_tunnel(sock, initial_data, origin or ANY)
            return True
        except HandshakeRefused as exc:
            log.warning("Tunnel from %s refused: %s", peer, exc.reason)
            self.metrics.opening_failed("unauthorized" if exc.status == 401 else "forbidden")
        except ConnectionClosed:
            pass  # the router closed meanwhile
        except (HandshakeFailed, OSError) as exc:
            log.warning("Tunnel from %s failed to open: %s", peer, exc)
            self.metrics.opening_failed(_handshake_failure(exc))
        sock.close()
        return False

    def _tunnel_ready(self, connection: Connection) -> None:
        with self._lock:
            origin = self._origins.pop(id(connection), ANY)
            handed_over = self._handed_over
        if handed_over:  # (it opened as the worker began to stop: it goes to the next one too)
            connection.leave(_LEAVING)
        self.metrics.tunnel_added(connection, origin)
        self.pool.add(connection, origin)
        log.info("Tunnel added: %s", connection.name)

    def _tunnel_closed(self, connection: Connection, reason: str) -> None:
        if self.fleet is not None:
            self.fleet.tunnel_removed()
        if self.pool.remove(connection):
            self.metrics.tunnel_dropped(connection, reason)
            log.info("Tunnel removed: %s: %s", connection.name, reason)
        else:
            self.metrics.opening_failed(opening_failure_reason(reason))
            log.warning("Tunnel from %s closed before it was ready: %s", connection.name, reason)
        with self._lock:
            self._connections.pop(id(connection), None)
            self._origins.pop(id(connection), None)
            self._gone.notify_all()

    # -- admin ----------------------------------------------------------------

    @staticmethod
    def bind_admin(addr: AddressLike) -> socket.socket:
        """Bind and listen on ``addr`` for the admin endpoints without serving yet (for pre-fork servers)."""
        return _bind(addr, 64)

    def listen_admin(self, addr: AddressLike) -> Address:
        """Serve ``/metrics``, ``/status`` and ``/healthz`` on ``addr`` in the background; returns the address bound.

        Keep it on loopback: it shows every tunnel's peer and the router's traffic.
        """
        sock = self.bind_admin(addr)
        host, port = sock.getsockname()[:2]
        if not is_loopback(host):
            log.warning("The admin listener on %s is reachable beyond this host: it shows every tunnel's "
                        "address and the router's traffic to anyone who connects", format_address((host, port)))
        self.serve_admin(sock)
        return (host, port)

    def serve_admin(self, sock: socket.socket) -> None:
        """Serve the admin endpoints on an already listening socket, in background threads.

        With :attr:`shared_metrics` set, the socket may be one all router
        processes serve: this one then also publishes its snapshot for them.
        """
        server = AdminServer(sock, self.admin_view, self._expecting_tunnels)
        with self._lock:
            closed = self._closed
            if not closed:
                self._admin_servers.append(server)
                publish = self.shared_metrics is not None and not self._publishing
                self._publishing = self._publishing or publish
        if closed:
            server.close()
            msg = "router is closed"
            raise ConnectionClosed(msg, request_sent=False)
        server.start()
        if publish:
            threading.Thread(target=self._publish_loop, name="ptth-metrics", daemon=True).start()

    def snapshot(self) -> Dict[str, Any]:
        """This process's counters, gauges and live tunnels, JSON-able (see :mod:`ptth_sync.router.metrics`)."""
        origins = self.pool.origins()
        pid = os.getpid()
        return {
            "pid": pid,
            "counters": self.metrics.counters(),
            "origins": origins,
            "waiting": sum(self.pool.waiting(origin) for origin in origins),
            "websockets": self.metrics.websockets_open,
            "tunnels": self.metrics.tunnels(pid),
        }

    def admin_view(self) -> Dict[str, Any]:
        """What the admin endpoints present: this process's snapshot, added to the other workers' when shared."""
        if self.shared_metrics is not None:
            return self.shared_metrics.collect(self.snapshot())
        return merge([self.snapshot()])

    def _publish_loop(self) -> None:
        shared = self.shared_metrics
        while shared is not None and not self._stopping.wait(PUBLISH_INTERVAL):
            shared.publish(self.snapshot())

    # -- requests -------------------------------------------------------------

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        prepared = self._prepare(environ, start_response)
        if not isinstance(prepared, _Prepared):
            return prepared
        if "HTTP_UPGRADE" in environ:
            from .websocket import is_websocket_request, proxy_websocket  # (built on this module)

            if is_websocket_request(environ):
                return proxy_websocket(self, environ, start_response, prepared)
        return self._proxy(environ, start_response, prepared)

    def _prepare(self, environ: Dict[str, Any], start_response: StartResponse) -> Union[_Prepared, List[bytes]]:
        """Check a request and translate its headers; or answer it at once (start_response called)."""
        refusal = check_request(environ)
        if refusal is not None:
            log.info("%s %s: %d, %s", environ.get("REQUEST_METHOD"), environ.get("RAW_URI", ""), refusal.code,
                     refusal.detail)
            if refusal.close:
                environ[CLOSE_CONNECTION] = True
            self.metrics.request_done(refusal.code, None, 0)
            return _error(start_response, refusal.code, refusal.phrase, refusal.detail, refusal.headers)
        try:
            headers = request_headers(environ)
        except InvalidHeader as exc:
            return self._reply_error(start_response, 400, "Bad Request", str(exc))
        method = environ["REQUEST_METHOD"]
        target = headers[3][1].decode("latin-1")
        body = _RequestBody(environ, self.max_body_size)
        if body.too_large:
            log.info("%s %s: 413, a body of %s bytes over the limit of %d", method, target, body.length,
                     self.max_body_size)
            return self._reply_error(start_response, 413, *_too_large(self.max_body_size))
        origin: Optional[str]  # None: no tunnel serves the request's host
        origin = ANY
        if self.pool.has_origins:
            origin = self._route(environ)
            if origin is None:
                host = environ.get("HTTP_HOST", "")
                return self._reply_error(start_response, 421, "Misdirected Request",
                                         f"no backend serves the host {host!r}")
        return _Prepared(headers, method, target, body, origin)

    def begin(
        self,
        environ: Dict[str, Any],
        start_response: StartResponse,
        listener: Callable[[Stream], None],
        queued: Optional[Set[Connection]] = None,
        stream_body: bool = False,
    ) -> Union[Proxied, List[bytes], _Full, None]:
        """Start proxying a request without blocking, for callers that serve clients from an event loop.

        For a request whose body (if any) is in ``environ["wsgi.input"]``
        already and small. Returns the router's own answer (``start_response``
        called), or a :class:`Proxied` request whose stream calls ``listener``
        as its response arrives (see :meth:`respond`), or None when the request
        needs a thread (a tunnel to wait for, a tunnel that failed), or
        :data:`TUNNELS_FULL` when the tunnel chosen has no stream free now:
        then nothing was sent, and ``__call__`` or a later ``begin`` serves
        the same environ. A WebSocket opening always needs a thread (None).
        With a ``queued`` set, the request is only queued on its
        tunnel, which is added to the set: the caller sends it
        (``send_queued()``). With ``stream_body`` the request's body (of a
        known length) is not read here: the stream stays open for the caller
        to send it (:meth:`Stream.try_send`), and such a request is never
        retried on another tunnel.
        """
        if "HTTP_UPGRADE" in environ:
            from .websocket import is_websocket_request  # (built on this module)

            if is_websocket_request(environ):
                return None  # a WebSocket opens on a thread (see __call__)
        prepared = self._prepare(environ, start_response)
        if not isinstance(prepared, _Prepared):
            return prepared
        body = prepared.body
        streamed = stream_body and body.present
        if body.present and not streamed and (body.length is None or body.length > SMALL_BODY):
            return None
        tunnel = self.pool.choose(exclude=(), wait=0.0, origin=prepared.origin)
        if tunnel is None:
            if self.tunnel_wait_now() > 0:
                return None
            return self._reply_error(start_response, 503, "Service Unavailable", "no tunnel is connected")
        headers = prepared.headers
        limit = tunnel.peer_max_header_list_size
        if limit is not None and header_list_size(headers) > limit:
            log.info("%s %s: 431, headers of %d bytes over the backend's %d", prepared.method, prepared.target,
                     header_list_size(headers), limit)
            return self._reply_error(start_response, 431, "Request Header Fields Too Large",
                                     f"the request's headers exceed the backend's limit of {limit} bytes")
        small = body.read_small() if body.present and not streamed else None
        if body.failure is not None:
            return self._reply_client_body_error(environ, start_response, prepared.method, prepared.target, None,
                                                 body)
        started = time.monotonic()
        full = False
        try:
            stream = tunnel.try_open_stream(headers, small or b"", listener, send=queued is None,
                                            end_stream=not streamed)
            full = stream is None
        except ConnectionClosed:
            stream = None
        if stream is not None and queued is not None:
            queued.add(tunnel)
        if small is not None and stream is None:  # for __call__ or the next begin: the body again
            environ["wsgi.input"] = io.BytesIO(small)
        if full:
            return TUNNELS_FULL
        if stream is None:
            return None
        body.sent = len(small or b"")
        proxied = Proxied(prepared, stream, tunnel, started)
        proxied.streamed = streamed
        return proxied

    def respond(self, proxied: Proxied, start_response: StartResponse) -> Optional[List[bytes]]:
        """The response headers of a :class:`Proxied` request arrived: pass them to ``start_response``.

        Returns None when a body follows (read it from the stream), else the
        whole body: empty, or the router's 502 when the backend's headers are
        invalid (that stream is reset; the tunnel carries on).
        """
        stream = proxied.stream
        prepared = proxied.prepared
        try:
            headers = cast("List[Tuple[bytes, bytes]]", stream.headers)  # they arrived (a string: no run-time cost)
            code, status = response_status(headers)
            wsgi_headers = response_headers(headers)
        except InvalidHeader as exc:
            log.warning("%s %s: 502, tunnel %s sent a malformed response: %s", prepared.method, prepared.target,
                        proxied.tunnel.name, exc)
            stream.close(ErrorCodes.PROTOCOL_ERROR)
            proxied.done = True
            return self._reply_error(start_response, 502, "Bad Gateway", "the backend sent an invalid response",
                                     proxied.started, prepared.body)
        proxied.code = code
        start_response(status, wsgi_headers)
        if prepared.method == "HEAD" or code in _NO_BODY_STATUSES:
            stream.close()
            self.finished(proxied)
            return []
        return None

    def failed(
        self, proxied: Proxied, exc: Exception, environ: Dict[str, Any], start_response: StartResponse
    ) -> Optional[List[bytes]]:
        """A :class:`Proxied` request's stream failed before its response headers.

        Returns None when the request provably never reached an application:
        ``__call__`` may serve the same environ again, on another tunnel. Else
        the router's 502, or 504 for a :class:`StreamTimeout`.
        """
        prepared = proxied.prepared
        proxied.stream.close()
        proxied.done = True
        if isinstance(exc, StreamTimeout):
            return self._gateway_timeout(start_response, prepared.method, prepared.target, proxied.tunnel,
                                         proxied.started, prepared.body)
        if _retryable(exc) and not proxied.streamed:
            log.info("%s %s: retrying (%s)", prepared.method, prepared.target, exc)
            small = prepared.body.read_small() if prepared.body.present else None
            if small is not None:
                environ["wsgi.input"] = io.BytesIO(small)
            return None
        log.warning("%s %s: tunnel %s failed before the response: %s", prepared.method, prepared.target,
                    proxied.tunnel.name, exc)
        return self._reply_error(start_response, 502, "Bad Gateway", "the tunnel failed before the response",
                                 proxied.started, prepared.body)

    def no_stream_free(self, start_response: StartResponse, method: str, target: str) -> List[bytes]:
        """A request waited ``timeout`` seconds for a tunnel with a stream free: 503 (logged)."""
        log.warning("%s %s: 503, no tunnel had a stream free within %gs", method, target, self.timeout)
        return self._reply_error(start_response, 503, "Service Unavailable",
                                 "no tunnel had a stream free in time")

    def client_body_failed(
        self, proxied: Proxied, environ: Dict[str, Any], start_response: StartResponse
    ) -> List[bytes]:
        """A :class:`Proxied` request's client failed to send its body (``body.failure`` says how).

        Its stream is reset (the tunnel is untouched); the answer is a 400, and the connection closes.
        """
        proxied.stream.close()
        proxied.done = True
        prepared = proxied.prepared
        return self._reply_client_body_error(environ, start_response, prepared.method, prepared.target,
                                             proxied.started, prepared.body)

    def client_body_too_large(
        self, proxied: Proxied, environ: Dict[str, Any], start_response: StartResponse
    ) -> List[bytes]:
        """A :class:`Proxied` request's chunked body grew over ``max_body_size``: its stream is reset; the
        answer is a 413, and the connection closes."""
        proxied.stream.close()
        proxied.done = True
        environ[CLOSE_CONNECTION] = True
        return self._reply_error(start_response, 413, *_too_large(self.max_body_size), proxied.started,
                                 proxied.prepared.body)

    def body_cut_short(self, environ: Dict[str, Any], start_response: StartResponse, method: str, target: str,
                       received: int, length: int) -> List[bytes]:
        """A request's small body was cut short before it went to any tunnel: 400, and the connection closes."""
        body = _RequestBody(environ)
        body.failure = f"the client sent {received} of the {length} bytes of its Content-Length"
        return self._reply_client_body_error(environ, start_response, method, target, None, body)

    def finished(self, proxied: Proxied, broken: bool = False) -> None:
        """Count a :class:`Proxied` request that is over, and release its stream."""
        proxied.stream.close()
        if not proxied.done:
            proxied.done = True
            self.metrics.request_done(proxied.code, proxied.started, proxied.prepared.body.sent, proxied.sent,
                                      proxied.tunnel, broken)

    def _proxy(self, environ: Dict[str, Any], start_response: StartResponse, prepared: _Prepared) -> Iterable[bytes]:
        headers, method, target, body, origin = (prepared.headers, prepared.method, prepared.target, prepared.body,
                                                 prepared.origin)
        tried: List[Connection] = []
        started: Optional[float] = None  # when the router first called a tunnel for this request
        while True:
            tunnel = self.pool.choose(exclude=tried, wait=self.tunnel_wait_now() if not tried else 0.0, origin=origin)
            if tunnel is None:
                if tried:
                    return self._reply_error(start_response, 502, "Bad Gateway",
                                             "the tunnel failed before the response", started, body)
                return self._reply_error(start_response, 503, "Service Unavailable", "no tunnel is connected")
            limit = tunnel.peer_max_header_list_size
            if limit is not None and header_list_size(headers) > limit:
                # Sent anyway, the backend's h2 would fail the whole tunnel.
                log.info("%s %s: 431, headers of %d bytes over the backend's %d", method, target,
                         header_list_size(headers), limit)
                return self._reply_error(start_response, 431, "Request Header Fields Too Large",
                                         f"the request's headers exceed the backend's limit of {limit} bytes",
                                         started, body)
            if started is None:
                started = time.monotonic()
            try:
                stream, response = self._exchange(tunnel, headers, body)
            except _ClientBodyFailed:
                return self._reply_client_body_error(environ, start_response, method, target, started, body)
            except _NoStreamFree:
                return self.no_stream_free(start_response, method, target)
            except StreamTimeout:
                if body.failure is not None:
                    return self._reply_client_body_error(environ, start_response, method, target, started, body)
                return self._gateway_timeout(start_response, method, target, tunnel, started, body)
            except (ConnectionClosed, StreamReset) as exc:
                if body.failure is not None:
                    return self._reply_client_body_error(environ, start_response, method, target, started, body)
                if body.too_large:
                    return self._reply_error(start_response, 413, *_too_large(self.max_body_size), started, body)
                if _retryable(exc) and body.replayable and not tried:  # once, never more
                    log.info("%s %s: retrying on another tunnel (%s)", method, target, exc)
                    tried.append(tunnel)
                    continue
                log.warning("%s %s: tunnel %s failed before the response: %s", method, target, tunnel.name, exc)
                return self._reply_error(start_response, 502, "Bad Gateway", "the tunnel failed before the response",
                                         started, body)
            break
        try:
            code, status = response_status(response)
            wsgi_headers = response_headers(response)
        except InvalidHeader as exc:
            log.warning("%s %s: 502, tunnel %s sent a malformed response: %s", method, target, tunnel.name, exc)
            stream.close(ErrorCodes.PROTOCOL_ERROR)  # a stream error (RFC 9113 8.1.1): the tunnel carries on
            body.finish()
            return self._reply_error(start_response, 502, "Bad Gateway", "the backend sent an invalid response",
                                     started, body)
        start_response(status, wsgi_headers)
        if method == "HEAD" or code in _NO_BODY_STATUSES:
            stream.close()
            body.finish()
            self.metrics.request_done(code, started, body.sent, 0, tunnel)
            return []
        return _ResponseBody(stream, body, self.timeout, self.metrics, code, started, tunnel, f"{method} {target}")

    def _gateway_timeout(
        self,
        start_response: StartResponse,
        method: str,
        target: str,
        tunnel: Connection,
        started: Optional[float],
        body: Optional[_RequestBody] = None,
    ) -> List[bytes]:
        """The backend did not answer within ``timeout`` seconds: 504 (logged, as a proxy does)."""
        log.warning("%s %s: 504, tunnel %s sent no response within %gs", method, target, tunnel.name, self.timeout)
        return self._reply_error(start_response, 504, "Gateway Timeout", "the backend did not answer in time",
                                 started, body)

    def _reply_error(
        self,
        start_response: StartResponse,
        code: int,
        phrase: str,
        detail: str,
        started: Optional[float] = None,
        body: Optional[_RequestBody] = None,
    ) -> List[bytes]:
        """Answer the client with an error of the router's own, and count it."""
        self.metrics.request_done(code, started, body.sent if body is not None else 0)
        return _error(start_response, code, phrase, detail)

    def _reply_client_body_error(
        self,
        environ: Dict[str, Any],
        start_response: StartResponse,
        method: str,
        target: str,
        started: Optional[float],
        body: _RequestBody,
    ) -> List[bytes]:
        """The client's body failed (cut short, or badly chunked): 400, and the connection closes.

        Its stream, if one was open, was reset with CANCEL; the tunnel is untouched.
        """
        log.info("%s %s: 400, %s", method, target, body.failure)
        environ[CLOSE_CONNECTION] = True
        return self._reply_error(start_response, 400, "Bad Request", str(body.failure), started, body)

    def route(self, environ: Dict[str, Any]) -> Optional[str]:
        """The origin whose tunnels would serve a request now (``*``: the default pool); None: no tunnel does."""
        return self._route(environ) if self.pool.has_origins else ANY

    def _route(self, environ: Dict[str, Any]) -> Optional[str]:
        """The origin whose tunnels serve this request (``*``: the default pool); None when none does."""
        origin = request_origin(environ.get("wsgi.url_scheme", "http"), environ.get("HTTP_HOST", ""))
        if origin is not None and self.pool.knows(origin):
            return origin
        if self.pool.tunnels(ANY):
            return ANY
        return None

    def _exchange(
        self, tunnel: Connection, headers: List[Tuple[bytes, bytes]], body: _RequestBody
    ) -> Tuple[Stream, Any]:
        """Open a stream, start sending the body and wait for the response headers."""
        small = body.read_small()
        if body.failure is not None:
            raise _ClientBodyFailed  # nothing was sent: the tunnel never saw this request
        try:
            stream = tunnel.open_stream(headers, end_stream=not body.present, timeout=self.timeout)
        except StreamTimeout:
            raise _NoStreamFree from None
        try:
            if small is not None:
                try:
                    stream.send_data(small, end_stream=True, timeout=self.timeout)
                    body.sent += len(small)
                except StreamReset as exc:
                    # An early response: the backend answered without the body and asks for no more with
                    # NO_ERROR, which must not discard its response (RFC 9113 section 8.1). Else a failure.
                    if not (exc.remote and exc.error_code == ErrorCodes.NO_ERROR):
                        raise
            elif body.present:
                body.start_upload(stream, self.timeout)
            return stream, stream.wait_headers(self.timeout)
        except BaseException:
            stream.close()
            body.finish()
            raise


def _peer(sock: socket.socket) -> str:
    try:
        return format_address(sock.getpeername()[:2])
    except OSError:
        return "?"


def _bind(addr: AddressLike, backlog: int) -> socket.socket:
    """A TCP socket bound to ``addr`` and listening."""
    address = parse_address(addr)  # type: ignore[arg-type]
    infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _handshake_failure(exc: Exception) -> str:
    """The refusal category of a tunnel opening that failed with ``exc``."""
    if isinstance(exc, socket.timeout) or (isinstance(exc, HandshakeFailed) and str(exc).startswith("no complete")):
        return "timeout"
    if isinstance(exc, HandshakeFailed):
        return "bad_request"
    return "network"


def _retryable(exc: Exception) -> bool:
    """True when the request provably never reached an application."""
    if isinstance(exc, ConnectionClosed):
        return not exc.request_sent
    return isinstance(exc, StreamReset) and exc.error_code == ErrorCodes.REFUSED_STREAM


class _ClientBodyFailed(PTTHError):
    """The client's request body failed before anything was sent to a tunnel."""


class _NoStreamFree(PTTHError):
    """No stream of the tunnel chosen came free within ``timeout``: nothing was sent."""


class _RequestBody:
    """The client's request body: read up front when small, else streamed by an upload thread."""

    def __init__(self, environ: Dict[str, Any], max_size: Optional[int] = None) -> None:
        self._input: Any = environ.get("wsgi.input")
        length_text = environ.get("CONTENT_LENGTH") or ""
        self.length = int(length_text) if length_text.isdigit() else None
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        self.present = bool(self.length) or (self.length is None and chunked)
        self.max_size = max_size
        #: Set when the body is (or turned out, while streaming) over ``max_size``.
        self.too_large = max_size is not None and self.length is not None and self.length > max_size
        self._small: Optional[bytes] = None
        self._upload: Optional[threading.Thread] = None
        #: Bytes of the body forwarded to backends (final once :meth:`finish` returned).
        self.sent = 0
        #: Why the client's body could not be forwarded (it ended early or was badly framed), if it failed.
        self.failure: Optional[str] = None

    @property
    def replayable(self) -> bool:
        """True while the body can be sent again (kept in memory, or not read at all)."""
        return self._small is not None or self._upload is None

    def read_small(self) -> Optional[bytes]:
        """The whole body when it is known to be small, else None."""
        if self._small is None and self.present and self.length is not None and self.length <= SMALL_BODY:
            try:
                data = self._read_exactly(self.length)
            except Exception as exc:  # the client's side failed (disconnect, bad framing)
                self.failure = body_failure(exc)
                return None
            if len(data) < self.length:
                self.failure = f"the client sent {len(data)} of the {self.length} bytes of its Content-Length"
                return None
            self._small = data
        return self._small

    def _read_exactly(self, size: int) -> bytes:
        parts = []
        while size > 0:
            data = self._input.read(size)
            if not data:
                break
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    def start_upload(self, stream: Stream, timeout: float) -> None:
        self._upload = threading.Thread(target=self._pump, args=(stream, timeout), name="ptth-upload", daemon=True)
        self._upload.start()

    def _pump(self, stream: Stream, timeout: float) -> None:
        try:
            remaining = self.length
            sent = 0
            while remaining is None or remaining > 0:
                size = UPLOAD_CHUNK if remaining is None else min(UPLOAD_CHUNK, remaining)
                data = self._input.read(size)
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                sent += len(data)
                if self.max_size is not None and sent > self.max_size:
                    log.info("request body over the %d-byte limit: upload stopped", self.max_size)
                    self.too_large = True
                    stream.reset(ErrorCodes.CANCEL)
                    return
                stream.send_data(data, timeout=timeout)
                self.sent = sent
            if remaining:
                self.failure = f"the client sent {sent} of the {self.length} bytes of its Content-Length"
                stream.reset(ErrorCodes.CANCEL)
                return
            stream.end()
        except (StreamReset, ConnectionClosed):
            pass  # the backend stopped the upload or the tunnel died: the reader side reports it
        except StreamTimeout:
            stream.reset(ErrorCodes.CANCEL)
        except Exception as exc:  # the client's side failed (disconnect, bad chunked encoding)
            self.failure = body_failure(exc)
            stream.reset(ErrorCodes.CANCEL)

    def finish(self, timeout: Optional[float] = None) -> None:
        """Wait for the upload thread (its stream is closed or finished by now)."""
        if self._upload is not None:
            self._upload.join(timeout)


class _ResponseBody:
    """The WSGI iterable that streams the backend's response as it arrives."""

    def __init__(
        self,
        stream: Stream,
        body: _RequestBody,
        timeout: float,
        metrics: RouterMetrics,
        code: int,
        started: Optional[float],
        tunnel: Connection,
        request: str,
    ) -> None:
        self._stream = stream
        self._request = request  # "GET /path", for the log
        self._body = body
        self._timeout = timeout
        self._metrics: Optional[RouterMetrics] = metrics
        self._code = code
        self._started = started
        self._tunnel = tunnel
        self._sent = 0  # to the client
        self._broken = False

    def __iter__(self) -> Iterator[bytes]:
        stream = self._stream
        while True:
            try:
                data = stream.read(-1, self._timeout)
            except (ConnectionClosed, StreamReset, StreamTimeout) as exc:
                log.warning("Aborted response to %s: stream %d failed mid-response: %s", self._request, stream.id,
                            exc)
                self._broken = True
                msg = f"stream {stream.id} failed mid-response: {exc}"
                raise TunnelBroken(msg) from None
            if not data:
                return
            yield data
            self._sent += len(data)

    def close(self) -> None:
        self._stream.close()
        self._body.finish()
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.request_done(self._code, self._started, self._body.sent, self._sent, self._tunnel, self._broken)


#: gunicorn's errors for a malformed chunked body (OSError subclasses in gunicorn 26, not a client that left).
_BAD_CHUNKS = (InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension)


def body_failure(exc: Exception) -> str:
    """Why reading a client's body failed, as a sentence."""
    if isinstance(exc, OSError) and not isinstance(exc, _BAD_CHUNKS):  # gunicorn's NoMoreData too: the client left
        return f"the client's body ended early: {exc or type(exc).__name__}"
    return f"the client's body is malformed: {exc or type(exc).__name__}"


def _too_large(limit: Optional[int]) -> Tuple[str, str]:
    """The phrase and detail of a 413."""
    return "Content Too Large", f"the request body exceeds {limit} bytes"


def _error(
    start_response: StartResponse, code: int, phrase: str, detail: str, extra: Sequence[Tuple[str, str]] = ()
) -> List[bytes]:
    body = f"{code} {phrase}: {detail}\n".encode()
    start_response(
        f"{code} {phrase}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *extra],
    )
    return [body]
