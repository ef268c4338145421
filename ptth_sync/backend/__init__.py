"""The backend: dial routers and serve a WSGI application through the tunnels."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
import signal
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, cast

from ..addresses import Address, AddressLike, format_address, parse_addresses
from ..cli import (
    LOG_DATE_FORMAT,
    LOG_FORMAT,
    MAX_BACKOFF_DEFAULT,
    check_backoff_max,
    check_routers,
    check_threads,
    check_tunnels,
)
from ..engine import Connection, ConnectionSettings, Stream
from ..handshake import HandshakeFailed, HandshakeRefused, dial_upgrade, goaway_refusal, wrong_answer_refusal
from ..origins import ANY, normalize_origin
from ..tls import TLSChannel
from ..websocket import going_away_delay
from .pool import ThreadPool
from .websocket import close_websockets
from .wsgi import WSGIApp, handle_request

__all__ = ["Backend", "serve_wsgi"]

log = logging.getLogger("ptth_sync.backend")

#: Loopback addresses a name such as ``localhost`` resolves to: one router, dialled by name.
_LOOPBACK_PAIR = {"127.0.0.1", "::1"}
#: Why a dialler's tunnel ended when the router asked for a new one (it connects again at once).
_MOVED = "the router asked for a new tunnel"
#: A tunnel the router asks to replace sooner than this after it was dialled is replaced with backoff (seconds).
_MOVES_APART = 1.0

#: Concurrent streams a plain-wire tunnel advertises at least (as Go's http2.Server does).
PLAIN_WIRE_STREAMS = 250
#: Per-stream receive window on the plain wire, where that many requests may wait for a thread.
PLAIN_WIRE_STREAM_WINDOW = 256 * 1024


def resolve_addresses(host: str, port: int) -> List[str]:
    """The addresses ``host`` resolves to (the system's resolver), in its order, without repeats."""
    found: List[str] = []
    for _family, _type, _proto, _name, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if sockaddr[0] not in found:
            found.append(cast(str, sockaddr[0]))
    return found


class _Route:
    """One tunnel's way to a router: the address as configured, the IP dialled, the origin registered."""

    __slots__ = ("address", "ip", "origin", "retired")

    def __init__(self, address: Address, ip: Optional[str], origin: Optional[str]) -> None:
        self.address = address
        self.ip = ip  # None: connect by the configured name
        self.origin = origin
        #: Set when the name no longer resolves to ``ip``: no redial once the tunnel drops.
        self.retired = threading.Event()

    @property
    def name(self) -> str:
        name = format_address(self.address)
        if self.ip is not None and self.ip != self.address[0]:
            name += f" ({self.ip})"
        return name if self.origin is None else f"{name} for {self.origin}"


class Backend:
    """Keeps ``tunnels`` connections to each router (per origin) and serves ``app`` on them.

    The non-blocking form of :func:`serve_wsgi`::

        backend = Backend("127.0.0.1:8887", app).start()
        ...
        backend.stop(graceful_timeout=30)   # drain, then close

    A lost connection, or one that fails before its HTTP/2 SETTINGS arrive,
    is redialled forever with exponential backoff and jitter, each attempt
    logged: the delay grows with every failed connect or handshake, never
    beyond ``backoff_max`` seconds (default 5), and starts again from
    ``backoff_initial`` once a tunnel was established (the router's SETTINGS
    received). A router that restarts has its tunnels back within
    ``backoff_max`` seconds of listening again. What no redial can change is
    not retried: a refusal (bad token, origin not allowed, a token or TLS
    required, a client certificate missing or rejected), TLS on one side
    only, a peer that answers in HTTP/1.1 (an HTTP port, not a tunnel
    listener). :attr:`refused` is then set, one line logged, and the backend
    stops.

    Concurrency: ``threads`` pool threads run the requests of every tunnel,
    taking them in arrival order. On the PTTH upgrade wire (a ``token`` or
    ``origins``) each tunnel advertises ``threads`` as its
    SETTINGS_MAX_CONCURRENT_STREAMS, and the router holds further requests
    until a stream ends. On the plain wire (no token, no origin) a tunnel
    advertises ``max(threads, 250)``, as Go's http2.Server advertises 250: a
    Go ``http2.Transport`` (the Go seed's router) dials a new connection when
    one is full, which the seed's router cannot give it. The requests above
    ``threads`` then wait in the pool's queue; a tunnel never has more
    streams open than it advertises (more is a protocol error of the peer),
    so with up to 250 threads at most 250 requests per tunnel wait. A request
    reset while it waits never reaches the application.

    ``threads`` (at most 10,000), ``tunnels`` (at most 1,000 per router
    address) and the number of routers in ``addr`` (at most 64) are bounded:
    see :mod:`ptth_sync.cli`; the constructor raises ValueError past a limit.

    ``origins`` (``["https://api.example.com"]``) registers the tunnels for
    those origins: the router sends them the requests for those hosts only.
    Each origin gets ``tunnels`` connections of its own to each router.

    A router given by name (``routers.example.com:8887``) that resolves to
    several addresses is several routers: the backend keeps tunnels to each
    address, and resolves the name again every ``resolve_interval`` seconds
    so that a router added later receives tunnels too (a name that resolves
    to loopback only, such as ``localhost``, is dialled as one router). The
    tunnels to an address that no longer resolves are not redialled once they
    drop. ``resolver(host, port)`` returns the addresses of a name (default:
    the system's resolver).

    ``request_handler(stream)``, when given, runs each request on a pool
    thread instead of ``handle_request(stream, app)``: a server embedding the
    backend (the gunicorn worker) wraps the WSGI bridge with its own request
    counting, hooks and access log.
    """

    #: The first delay between two dials of one tunnel, and the default cap (``backoff_max``), in seconds.
    #: Each delay is drawn between half its ceiling and the ceiling (jitter), the ceiling doubling per failure.
    backoff_initial = 0.1
    backoff_max = MAX_BACKOFF_DEFAULT

    def __init__(
        self,
        addr: AddressLike,
        app: WSGIApp,
        *,
        threads: int = 16,
        tunnels: int = 1,
        token: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        connect_timeout: float = 10.0,
        request_handler: Optional[Callable[[Stream], object]] = None,
        ping_interval: float = ConnectionSettings.ping_interval,
        ping_timeout: float = ConnectionSettings.ping_timeout,
        origins: Optional[Iterable[str]] = None,
        resolve_interval: float = 30.0,
        resolver: Callable[[str, int], Sequence[str]] = resolve_addresses,
        backoff_max: float = MAX_BACKOFF_DEFAULT,
    ) -> None:
        self.addresses: List[Address] = parse_addresses(addr)
        _check("threads", check_threads, threads)
        _check("tunnels", check_tunnels, tunnels)
        _check("addr", check_routers, len(self.addresses))
        _check("backoff_max", check_backoff_max, backoff_max)
        self.backoff_max = backoff_max
        self.origins: List[str] = []
        for origin in origins or ():
            normal = normalize_origin(origin)
            if normal not in self.origins:
                self.origins.append(normal)
        self.resolve_interval = resolve_interval
        self.resolver = resolver
        self.app = app
        self.threads = threads
        self.tunnels = tunnels
        self.token = token or None
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        #: Set when dialling cannot succeed as configured (a refused token, say): the backend stops.
        self.refused: Optional[HandshakeRefused] = None
        self._refused_event = threading.Event()
        self.request_handler = request_handler or self._handle_request
        #: The tunnels' settings on the PTTH upgrade wire, and on the plain wire.
        self.settings = ConnectionSettings(
            max_concurrent_streams=threads, ping_interval=ping_interval, ping_timeout=ping_timeout,
            enable_connect_protocol=True,  # WebSockets (see backend/websocket.py)
        )
        # Up to 250 requests may wait there, each buffering up to its stream
        # window of body: a smaller window keeps that bounded (64 MiB a tunnel).
        self.plain_settings = dataclasses.replace(
            self.settings, max_concurrent_streams=max(threads, PLAIN_WIRE_STREAMS),
            stream_window=min(self.settings.stream_window, PLAIN_WIRE_STREAM_WINDOW),
            # A Go http2.Transport (the seed's router) sends its preface only with
            # its first request, which may come any time: no deadline for it.
            settings_timeout=0,
            # Our SETTINGS alone leave an HTTP/1.1 server (the router's HTTP port) waiting for a request
            # head: the probe makes it answer at once, and the answer tells the backend where it is.
            http1_probe=True,
        )
        self._pool = ThreadPool(threads)
        #: How long a tunnel the router went away from is kept for the requests it still sends (those it
        #: had taken in), before it is drained and closed from this side (seconds); the router closes it
        #: sooner, once its requests are done.
        self.moved_tunnel_timeout = 60.0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: Dict[int, Connection] = {}
        self._dialers: List[threading.Thread] = []
        self._resolved: Dict[Address, Dict[Optional[str], List[_Route]]] = {}
        self._routes: List[_Route] = []
        self._started = False

    # -- public -------------------------------------------------------------

    def start(self) -> Backend:
        """Start the request pool and one dialer per tunnel; returns self."""
        if self._started:
            return self
        self._started = True
        self._pool.start()
        names = []
        scheme = "tcp" if self.ssl_context is None else "tls"
        for address in self.addresses:
            log.info("Dialing %s://%s and serving HTTP/2 traffic", scheme, format_address(address))
            if _is_ip(address[0]):
                self._start_dialers(address, None)
            else:
                names.append(address)
        if self.origins:
            log.info("Registering the tunnels for %s", ", ".join(self.origins))
        if names:
            threading.Thread(target=self._resolve_forever, args=(names,), name="ptth-resolver", daemon=True).start()
        return self

    def _start_dialers(self, address: Address, ip: Optional[str]) -> List[_Route]:
        """``tunnels`` dialers per origin to one router."""
        routes = [_Route(address, ip, origin) for origin in cast(List[Optional[str]], self.origins or [None])]
        with self._lock:
            if self._stopping.is_set():
                return []
            self._routes.extend(routes)
            for route in routes:
                for index in range(self.tunnels):
                    dialer = threading.Thread(target=self._dial_forever, args=(route,),
                                              name=f"ptth-dialer {route.name}#{index}", daemon=True)
                    dialer.start()
                    self._dialers.append(dialer)
        return routes

    def _resolve_forever(self, names: List[Address]) -> None:
        """Keep tunnels to every address each name resolves to, resolving again now and then."""
        failures = 0
        while not self._stopping.is_set():
            failed = False
            for address in names:
                failed |= not self._resolve(address)
            failures = failures + 1 if failed else 0
            delay = self.resolve_interval
            if failed:
                delay = min(delay, self._backoff(failures - 1))
            self._stopping.wait(delay)

    def _resolve(self, address: Address) -> bool:
        """Dial the new addresses of one name, retire the ones gone; False when resolving failed."""
        host, port = address
        known = self._resolved.setdefault(address, {})
        try:
            found: List[Optional[str]] = list(dict.fromkeys(self.resolver(host, port)))
        except OSError as exc:
            log.warning("Resolving %s failed: %s; %d known address(es) kept", host, exc, len(known))
            return False
        if not found:
            log.warning("%s resolves to no address; %d known address(es) kept", host, len(known))
            return False
        if set(found) == _LOOPBACK_PAIR:
            found = [None]  # one local router: let the connection try each address, as before
        for ip in found:
            if ip not in known:
                if ip is not None:
                    log.info("%s resolves to %s: dialing it", host, ip)
                known[ip] = self._start_dialers(address, ip)
        for ip in [ip for ip in known if ip not in found]:
            log.info("%s no longer resolves to %s: its tunnels are not redialled once they close", host, ip)
            for route in known.pop(ip):
                route.retired.set()
        return True

    @property
    def connections(self) -> List[Connection]:
        """The tunnels currently up."""
        with self._lock:
            return [c for c in self._connections.values() if c.alive]

    @property
    def wanted_tunnels(self) -> int:
        """How many tunnels the backend is keeping (or redialling) now: per router address and origin."""
        with self._lock:
            return self.tunnels * sum(1 for route in self._routes if not route.retired.is_set())

    def wait_connected(self, count: int = 1, timeout: Optional[float] = None) -> bool:
        """Block until ``count`` tunnels are up (their SETTINGS exchanged)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if sum(1 for c in self.connections if c.ready) >= count:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def stop(self, graceful_timeout: float = 30.0) -> bool:
        """Stop dialling, drain every tunnel for at most ``graceful_timeout`` s, close.

        Requests in flight finish (within the deadline); new ones are refused so
        the router sends them elsewhere. Returns True when all finished in time.
        """
        self._stopping.set()
        connections = self.connections
        started = time.monotonic()
        deadline = started + max(graceful_timeout, 0.0)
        results: List[bool] = []
        drainers = [
            threading.Thread(target=lambda c=c: results.append(c.drain(max(deadline - time.monotonic(), 0.0))))
            for c in connections
        ]
        for thread in drainers:
            thread.start()
        # A WebSocket does not end by itself: the ones still open are closed just before the deadline.
        websockets_at = started + going_away_delay(max(graceful_timeout, 0.0))
        for thread in drainers:
            thread.join(max(websockets_at - time.monotonic(), 0.0))
        if any(thread.is_alive() for thread in drainers):
            closed = close_websockets(connections)
            if closed:
                log.info("Closing %d WebSocket(s) still open at the graceful timeout", closed)
        for thread in drainers:
            thread.join()
        with self._lock:
            connections = list(self._connections.values())
        for connection in connections:
            connection.close("backend stopped")
        with self._lock:
            dialers = list(self._dialers)
        for dialer in dialers:
            dialer.join(max(deadline - time.monotonic(), 0.0) + 1.0)
        self._pool.stop(max(deadline - time.monotonic(), 0.0) + 0.1)
        return all(results)

    def close(self) -> None:
        """Stop at once: in-flight requests are cut."""
        self.stop(graceful_timeout=0)

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- the dial loop --------------------------------------------------------

    def _dial_forever(self, route: _Route) -> None:
        """Keep one tunnel to ``route`` up until the backend stops or the route is retired."""
        attempt = 0  # failures since the last established tunnel
        name = route.name
        while not self._stopping.is_set() and not route.retired.is_set():
            dialled_at = time.monotonic()
            try:
                sock, initial_data = self._dial(route)
            except HandshakeRefused as exc:
                self._refuse(name, exc)
                return
            except (OSError, HandshakeFailed) as exc:
                delay, attempt = self._backoff(attempt), attempt + 1
                log.warning("Connecting to %s failed: %s; retrying in %.1fs (attempt %d)", name, _describe(exc),
                            delay, attempt)
                self._stopping.wait(delay)
                continue
            outcome = self._serve(route, sock, initial_data)
            if outcome is None:
                return
            established, reason, refusal = outcome
            if refusal is not None:
                self._refuse(name, refusal)
                return
            if self._stopping.is_set() or route.retired.is_set():
                return
            if reason is _MOVED:
                # At once: the router waits for this tunnel in another of its processes. A router that asks
                # within moments of the dial is followed with backoff, not in a loop (each old tunnel lingers).
                if time.monotonic() - dialled_at >= _MOVES_APART:
                    attempt = 0
                    continue
                delay, attempt = self._backoff(attempt), attempt + 1
                log.warning("Tunnel to %s: the router asked for a new tunnel within %gs of the dial; connecting "
                            "again in %.1fs", name, _MOVES_APART, delay)
                self._stopping.wait(delay)
                continue
            if established:
                attempt = 0  # it served: the next failure starts the backoff again
            delay, attempt = self._backoff(attempt), attempt + 1
            log.warning("Tunnel to %s lost: %s; reconnecting in %.1fs%s", name, reason, delay,
                        "" if established else f" (attempt {attempt})")
            self._stopping.wait(delay)

    def _refuse(self, name: str, refusal: HandshakeRefused) -> None:
        """Stop the backend for good: a router said no, or cannot be a tunnel listener as configured."""
        refusal.router = name
        with self._lock:
            first = self.refused is None
            if first:
                self.refused = refusal
        if first:
            log.error("%s", refusal)
        self._stopping.set()
        self._refused_event.set()

    def _serve(self, route: _Route, sock: Any, initial_data: bytes
               ) -> Optional[Tuple[bool, str, Optional[HandshakeRefused]]]:
        """Run one tunnel until it closes; None when the backend began stopping first.

        Returns whether the tunnel was established (the router's SETTINGS
        arrived), why it closed, and the refusal its closing shows, if any (a
        GOAWAY refusing the plain wire, an HTTP/1.1 answer, a TLS alert).
        """
        settings = self.settings if self._upgrades(route) else self.plain_settings
        over = threading.Event()  # closed, or the router is going away from it (see below)
        connection = Connection(
            sock,
            client_side=False,
            settings=settings,
            on_request=self._on_request,
            on_close=lambda _connection, _reason: over.set(),
            on_goaway_notice=lambda _connection: over.set(),
            name=route.name,
            initial_data=initial_data,
        )
        with self._lock:
            if self._stopping.is_set():  # stop() began while we were dialling
                sock.close()
                return None
            self._connections[id(connection)] = connection
        connection.start()
        connection.wait_ready(settings.settings_timeout + 1.0 if settings.settings_timeout > 0 else None)
        # (Not `ready`: a tunnel that opened and died before this thread looked was established all the same.)
        established = connection.was_ready
        if established:
            log.info("Tunnel to %s established", route.name)
        over.wait()
        if connection.goaway_notice is not None and not self._stopping.is_set():
            # The router's process is stopping (a reload, say): it waits for this tunnel in its other
            # processes. What it had taken in still comes here, and is served until it closes this one.
            in_flight = connection.active_streams
            log.info("Tunnel to %s: the router asked for a new one (%s); connecting again, %d request(s) "
                     "finishing on this one", route.name, connection.goaway_notice[:200].decode("latin-1"),
                     in_flight)
            threading.Thread(target=self._finish_moved, args=(connection,), name="ptth-moved",
                             daemon=True).start()
            return established, _MOVED, None
        connection.wait_closed()
        with self._lock:
            self._connections.pop(id(connection), None)
        return established, connection.close_reason or "closed", _refusal(connection, sock, established)

    def _finish_moved(self, connection: Connection) -> None:
        """Serve a tunnel the router is going away from until the router closes it, once the requests it had
        taken in are answered (or :attr:`moved_tunnel_timeout`: then it is drained); :meth:`stop` meanwhile
        drains it as the others."""
        if not connection.wait_closed(self.moved_tunnel_timeout):
            connection.drain(10.0)
            connection.wait_closed()
        with self._lock:
            self._connections.pop(id(connection), None)

    def _dial(self, route: _Route) -> Tuple[Any, bytes]:
        """Connect, wrap in TLS and upgrade as configured; the socket and bytes already read."""
        host, port = route.address
        sock = socket.create_connection((route.ip or host, port), timeout=self.connect_timeout)
        channel: Any = sock
        try:
            sock.settimeout(None)
            if self.ssl_context is not None:
                channel = TLSChannel(sock, self.ssl_context, server_side=False, server_hostname=host)
                channel.do_handshake(self.connect_timeout)
            initial_data = b""
            if self._upgrades(route):
                initial_data = dial_upgrade(channel, format_address(route.address), self.token,
                                            route.origin or ANY, timeout=self.connect_timeout)
        except (OSError, HandshakeFailed) as exc:
            sock.close()
            refusal = channel.refusal(exc) if isinstance(channel, TLSChannel) else None
            if refusal is not None:
                raise refusal from exc
            raise
        except BaseException:
            sock.close()
            raise
        return channel, initial_data

    def _upgrades(self, route: _Route) -> bool:
        """Whether the tunnel opens with the PTTH upgrade (a token or an origin); else the plain wire."""
        return self.token is not None or route.origin is not None

    def wait_refused(self, timeout: Optional[float] = None) -> bool:
        """Block until a router refuses this backend (True) or ``timeout`` passes (False)."""
        return self._refused_event.wait(timeout)

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with equal jitter."""
        ceiling: float = min(self.backoff_max, self.backoff_initial * (2 ** min(attempt, 30)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _on_request(self, stream: Stream) -> None:
        # Runs on the reader thread: hand over, never block.
        self._pool.submit(self.request_handler, stream)

    def _handle_request(self, stream: Stream) -> None:
        handle_request(stream, self.app, None)


def serve_wsgi(
    addr: AddressLike,
    app: WSGIApp,
    threads: int = 16,
    tunnels: int = 1,
    token: Optional[str] = None,
    ssl_context: Optional[ssl.SSLContext] = None,
    graceful_timeout: float = 30.0,
    origins: Optional[Iterable[str]] = None,
    backoff_max: float = MAX_BACKOFF_DEFAULT,
    **options: Any,
) -> None:
    """Dial the router(s) at ``addr`` and serve ``app`` through the tunnels. Blocks.

    ``origins``: serve only the requests for these origins
    (``["https://api.example.com"]``); ``backoff_max``: the longest delay
    between two dials of a tunnel, in seconds; see :class:`Backend`.
    ``options`` go to :class:`Backend` (``resolve_interval``,
    ``ping_interval``, ``ping_timeout``, ``connect_timeout``).

    Called from the main thread, it returns after SIGTERM (requests in flight
    finish, for at most ``graceful_timeout`` seconds) or SIGINT (at once).
    Raises :class:`~ptth_sync.handshake.HandshakeRefused` when dialling
    cannot succeed as configured (a router refuses the ``token`` or the
    origin, wants a token or TLS, or a client certificate; TLS on one side
    only; an HTTP port dialled instead of a tunnel listener), after logging
    it on one line; ValueError for a count over its limit (``threads``,
    ``tunnels``, routers: see :mod:`ptth_sync.cli`). Every other failure (a
    router down or restarting) is retried with backoff.
    """
    backend = Backend(addr, app, threads=threads, tunnels=tunnels, token=token, ssl_context=ssl_context,
                      origins=origins, backoff_max=backoff_max, **options)
    _log_to_stderr_unless_configured()
    stop = threading.Event()
    graceful = {"value": False}
    previous = {}
    in_main = threading.current_thread() is threading.main_thread()

    def on_signal(signum: int, _frame: Any) -> None:
        graceful["value"] = signum == signal.SIGTERM
        stop.set()

    if in_main:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    backend.start()
    try:
        while not stop.wait(0.2):
            if backend.refused is not None:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if graceful["value"]:
            log.info("Stopping: letting requests in flight finish (at most %ss)", graceful_timeout)
            backend.stop(graceful_timeout)
        else:
            backend.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if backend.refused is not None:
        raise backend.refused


def _refusal(connection: Connection, sock: Any, established: bool) -> Optional[HandshakeRefused]:
    """The refusal a closed tunnel's last words show: a GOAWAY, a TLS alert, an HTTP/1.1 answer; else None."""
    if connection.goaway_received is not None:
        refusal = goaway_refusal(*connection.goaway_received)
        if refusal is not None:
            return refusal
    if isinstance(sock, TLSChannel):
        refusal = sock.refusal()
        if refusal is not None:
            return refusal
    if established:
        return None
    return wrong_answer_refusal(connection.first_bytes, tls=isinstance(sock, TLSChannel))


#: OpenSSL's verify codes for a certificate that does not name what was dialled (host name, IP address).
_NAME_MISMATCH = (62, 64)


def _describe(exc: BaseException) -> str:
    """A failed dial, for the retry line: with the fix when the router's certificate is not trusted."""
    if getattr(exc, "reason", None) == "CERTIFICATE_VERIFY_FAILED":
        if getattr(exc, "verify_code", None) in _NAME_MISMATCH:
            return f"{exc} (dial a name the router's certificate holds: --connect NAME:PORT)"
        return f"{exc} (--cafile FILE trusts a private CA)"
    return str(exc)


def _check(name: str, check: Callable[[Any], Any], value: Any) -> None:
    """Run one of the ``ptth_sync.cli`` bounds, naming the argument in its ValueError."""
    try:
        check(value)
    except ValueError as exc:
        msg = f"{name}: {exc}"
        raise ValueError(msg) from None


def _log_to_stderr_unless_configured() -> None:
    """Give ``ptth_sync``'s log lines a stderr handler when the application has set up no logging.

    As gunicorn and Flask's development server do: without it, the tunnel's
    lines (dialing, established, lost) would go nowhere. An application that
    configured logging (a handler on the root logger or on ``ptth_sync``) keeps
    its own set-up.
    """
    package = logging.getLogger("ptth_sync")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
