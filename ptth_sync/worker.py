"""The backend as a gunicorn worker: ``gunicorn -k ptth_sync.worker.TunnelWorker app:app``.

Every worker process dials the router(s) itself and keeps its own tunnels,
so ``--workers 4`` shows four tunnels per router and the router balances over
the processes. Inside a worker, the backend's engine and WSGI bridge do the
work (:class:`ptth_sync.backend.Backend`, ``handle_request``); this class adds
what makes it a gunicorn worker: the arbiter's heartbeat, signals, request
counting for ``max_requests``, the server hooks and the access log.

Configuration comes from the environment, because gunicorn builds its
command line before it imports a worker class and drops config-file keys it
does not know (``--env``/``raw_env`` work too):

- ``PTTH_CONNECT=HOST:PORT[,HOST:PORT...]``: the routers (default
  127.0.0.1:8887), at most 64;
- ``PTTH_TUNNELS=N``: connections per router per worker (default 1, at most 1000);
- ``PTTH_MAX_BACKOFF=SECONDS``: the longest wait between two dials of a router
  that is down (default 5);
- ``PTTH_ORIGIN=https://api.example.com[,ORIGIN...]``: register the tunnels
  for these origins, so the router sends them those hosts' requests only
  (each origin gets ``PTTH_TUNNELS`` connections of its own);
- ``PTTH_TOKEN`` (or ``PTTH_TOKEN_FILE``): open each tunnel with the PTTH
  upgrade and this bearer token; a router that refuses it stops gunicorn;
- ``PTTH_TLS=1``: dial the routers over TLS, verifying their certificates
  (``PTTH_CAFILE`` for a private CA; ``PTTH_CERTFILE``/``PTTH_KEYFILE`` to
  present a client certificate for mutual TLS; either implies ``PTTH_TLS``).

What no redial can change (a refused token, a token, TLS or a client
certificate required, TLS on one side only, an HTTP port instead of a tunnel
listener) stops gunicorn as a boot error (exit status 3), after one line.

gunicorn's own settings keep their meaning: ``threads`` (at most 10,000)
sizes the request pool, and is advertised to the router as the tunnel's
concurrent-stream limit on the PTTH upgrade wire (250 or more on the plain
wire, the requests above ``threads`` waiting their turn, see
:class:`~ptth_sync.backend.Backend`);
``graceful_timeout`` bounds the drain on SIGTERM, on ``max_requests`` and on
SIGHUP; ``timeout`` is the heartbeat deadline, kept by the main loop as
gthread keeps it: a hung request thread does not stop the heartbeat (it holds
one of the ``threads`` slots until it returns), only a stuck process does.

gunicorn binds a listening socket whatever the worker (127.0.0.1:8000 by
default; only ``bind = []`` in a config file avoids it). The application is
not served there: it is reached through the router only. Each worker answers
any HTTP request on that socket with its tunnel status, ``200`` while it has
a live tunnel and ``503`` while it has none, for local health checks.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import sys
import threading
import time
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gunicorn import SERVER_SOFTWARE
from gunicorn.arbiter import Arbiter

from .addresses import Address, format_address, parse_addresses
from .backend import Backend
from .backend.wsgi import handle_request
from .cli import MAX_BACKOFF_DEFAULT, MIN_BACKOFF_MAX, check_backoff_max, check_routers, check_threads, check_tunnels
from .engine import Stream
from .gunicorn_base import SettingsSnapshot, ThreadedWorker
from .origins import normalize_origin
from .siblings import HANDOVER_WAIT, Siblings
from .tls import TLSConfigError, client_context

__all__ = [
    "TunnelRequest",
    "TunnelWorker",
    "tunnel_backoff",
    "tunnel_options",
    "tunnel_origins",
    "tunnel_security",
    "tunnel_threads",
]

DEFAULT_CONNECT = "127.0.0.1:8887"
#: Health-check connections answered at once on gunicorn's listening socket.
HEALTH_CONNECTIONS = 8
#: Seconds a health-check client has to send its request.
HEALTH_TIMEOUT = 5.0
#: Seconds past graceful_timeout a stopping worker waits for its tunnels to close.
STOP_MARGIN = 2.0
#: The workers of this master (made in the master by TunnelWorker.check_config, before the first fork).
_siblings: Optional[Siblings] = None


def tunnel_options(environ: Mapping[str, str]) -> Tuple[List[Address], int]:
    """The routers to dial and the tunnels per router, from the ``PTTH_*`` variables.

    Raises ValueError with a one-line reason for anything the worker must not
    run with, a token above all.
    """
    try:
        addresses = parse_addresses(environ.get("PTTH_CONNECT") or DEFAULT_CONNECT)
        check_routers(len(addresses))
    except ValueError as exc:
        msg = f"PTTH_CONNECT: {exc}"
        raise ValueError(msg) from None
    text = environ.get("PTTH_TUNNELS") or "1"
    if not (text.isdigit() and int(text) >= 1):
        msg = f"PTTH_TUNNELS must be a whole number of at least 1, not {text!r}"
        raise ValueError(msg)
    try:
        tunnels = check_tunnels(int(text))
    except ValueError as exc:
        msg = f"PTTH_TUNNELS: {exc}"
        raise ValueError(msg) from None
    return addresses, tunnels


def tunnel_backoff(environ: Mapping[str, str]) -> float:
    """The cap on the redial delay, in seconds, from ``PTTH_MAX_BACKOFF``; ValueError when it is no such number."""
    text = environ.get("PTTH_MAX_BACKOFF") or ""
    if not text:
        return MAX_BACKOFF_DEFAULT
    try:
        return check_backoff_max(float(text))
    except ValueError:
        msg = f"PTTH_MAX_BACKOFF must be a number of seconds of at least {MIN_BACKOFF_MAX:g}, not {text!r}"
        raise ValueError(msg) from None


def tunnel_threads(threads: int) -> int:
    """gunicorn's ``threads`` setting, when within the bound; ValueError with a one-line reason."""
    try:
        return check_threads(threads)
    except ValueError as exc:
        msg = f"--threads: {exc}"
        raise ValueError(msg) from None


def tunnel_origins(environ: Mapping[str, str]) -> List[str]:
    """The origins to register, from ``PTTH_ORIGIN`` (comma-separated); ValueError when one is no origin."""
    try:
        return [normalize_origin(o) for o in (environ.get("PTTH_ORIGIN") or "").split(",") if o.strip()]
    except ValueError as exc:
        msg = f"PTTH_ORIGIN: {exc}"
        raise ValueError(msg) from None


def tunnel_security(environ: Mapping[str, str]) -> Tuple[Optional[str], Optional[ssl.SSLContext]]:
    """The token and the TLS context to dial with, from ``PTTH_TOKEN[_FILE]`` and ``PTTH_TLS``/``PTTH_CA...``.

    Raises ValueError with a one-line reason (a token file that cannot be
    read, a certificate that does not load).
    """
    token = environ.get("PTTH_TOKEN") or None
    token_file = environ.get("PTTH_TOKEN_FILE")
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as file:
                token = file.readline().strip() or None
        except OSError as exc:
            msg = f"PTTH_TOKEN_FILE: cannot read {token_file}: {exc.strerror}"
            raise ValueError(msg) from None
        if token is None:
            msg = f"PTTH_TOKEN_FILE: {token_file} is empty"
            raise ValueError(msg)
    context = None
    cafile, certfile, keyfile = (environ.get(name) or None for name in ("PTTH_CAFILE", "PTTH_CERTFILE", "PTTH_KEYFILE"))
    if keyfile and not certfile:
        msg = "PTTH_KEYFILE needs PTTH_CERTFILE (the client certificate the key belongs to)"
        raise ValueError(msg)
    if environ.get("PTTH_TLS", "").lower() in ("1", "true", "yes", "on") or cafile or certfile:
        try:
            context = client_context(cafile, certfile, keyfile,
                                     options=("PTTH_CAFILE", "PTTH_CERTFILE", "PTTH_KEYFILE"))
        except (TLSConfigError, OSError, ssl.SSLError) as exc:
            raise ValueError(str(exc)) from None
    return token, context


class TunnelRequest:
    """A tunnelled request under the names gunicorn's hooks and access log read.

    Mirrors ``gunicorn.http.Request``: ``headers`` is a list of
    ``(UPPER-CASE-NAME, value)`` str pairs, ``uri`` the raw request target.
    """

    __slots__ = ("fragment", "headers", "method", "path", "query", "scheme", "uri", "version")

    def __init__(self, header_block: Sequence[Tuple[bytes, bytes]]) -> None:
        self.method = self.uri = self.scheme = self.fragment = ""
        self.version = (1, 1)  # the environ's SERVER_PROTOCOL: the router speaks HTTP/1.1 to clients
        self.headers: List[Tuple[str, str]] = []
        authority = protocol = ""
        for name, value in header_block:
            text = value.decode("latin-1")
            if name == b":method":
                self.method = text
            elif name == b":protocol":
                protocol = text
            elif name == b":path":
                self.uri = text
            elif name == b":scheme":
                self.scheme = text
            elif name == b":authority":
                authority = text
            elif name[:1] != b":":
                self.headers.append((name.decode("latin-1").upper(), text))
        if authority and not any(name == "HOST" for name, _ in self.headers):
            self.headers.insert(0, ("HOST", authority))
        if protocol:  # a WebSocket (RFC 8441), as the application sees it: a GET with Upgrade
            self.method = "GET"
            self.headers += [("UPGRADE", protocol), ("CONNECTION", "Upgrade")]
        self.path, _, self.query = self.uri.partition("?")

    def __repr__(self) -> str:
        return f"<TunnelRequest {self.method} {self.uri}>"


class TunnelWorker(ThreadedWorker):
    """gunicorn worker that serves the application through reverse tunnels."""

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs in the master at start: fail fast on bad ``PTTH_*`` settings, explain the bound socket."""
        try:
            addresses, tunnels = tunnel_options({**os.environ, **cfg.env})
            origins = tunnel_origins({**os.environ, **cfg.env})
            tunnel_security({**os.environ, **cfg.env})
            tunnel_backoff({**os.environ, **cfg.env})
            tunnel_threads(cfg.threads)
        except ValueError as exc:
            # gunicorn prints a RuntimeError as one "Error: ..." line and exits 1.
            raise RuntimeError(str(exc)) from None
        global _siblings  # (made once, before the first fork: every worker shares it)
        if _siblings is None:
            _siblings = Siblings()
        log.info(
            "Each worker keeps %d tunnel(s) to %s%s and serves %d request(s) at once",
            tunnels, ", ".join(format_address(a) for a in addresses),
            f" for each of {', '.join(origins)}" if origins else "", cfg.threads,
        )
        if cfg.bind:
            log.info(
                "Also listening at %s: workers answer health checks there (200 with a live tunnel, 503 without), "
                "not the application; set bind = [] in a config file to listen on nothing",
                ", ".join(cfg.bind),
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # pre-fork, in the master: plain data only
        self.addresses: List[Address] = []
        self.tunnels = 1
        self.origins: List[str] = []
        self.max_backoff = MAX_BACKOFF_DEFAULT
        self.backend: Optional[Backend] = None
        self._lock = threading.Lock()  # nr and the health-check count
        self._health_busy = 0

    def init_process(self) -> None:
        self.cfg = SettingsSnapshot(self.cfg)  # (each request reads hooks and settings: each is looked up once)
        try:
            self.addresses, self.tunnels = tunnel_options({**os.environ, **self.cfg.env})
            self.origins = tunnel_origins({**os.environ, **self.cfg.env})
            self.token, self.ssl_context = tunnel_security({**os.environ, **self.cfg.env})
            self.max_backoff = tunnel_backoff({**os.environ, **self.cfg.env})
            tunnel_threads(self.cfg.threads)
        except ValueError as exc:  # the environment changed since check_config (SIGHUP)
            self.log.error("%s", exc)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        self._route_library_logs()
        if _siblings is not None:
            _siblings.join(self.age)
        super().init_process()  # last: it loads the app and calls run()

    def _route_library_logs(self) -> None:
        """Send ``ptth_sync``'s own log lines to gunicorn's error log (level, format, file)."""
        logger = logging.getLogger("ptth_sync")
        error_log = getattr(self.log, "error_log", None)
        if logger.handlers or error_log is None or not error_log.handlers:
            return  # configured by the user's logconfig, or gunicorn logs through the root logger
        logger.handlers = list(error_log.handlers)
        logger.setLevel(error_log.level)
        logger.propagate = False

    # -- the main loop -----------------------------------------------------------

    def run(self) -> None:
        self.backend = Backend(
            self.addresses, self.wsgi, threads=self.cfg.threads, tunnels=self.tunnels,
            token=self.token, ssl_context=self.ssl_context, request_handler=self.handle_stream, origins=self.origins,
            backoff_max=self.max_backoff,
        )
        for listener in self.sockets:
            listener.setblocking(False)
        self.backend.start()
        if _siblings is not None:
            threading.Thread(target=self._tell_siblings_when_connected, name="ptth-connected", daemon=True).start()
        watched = [*self.sockets, self.PIPE[0]]
        while self.alive:
            # The heartbeat does not depend on the tunnels: an idle or
            # redialling worker is a healthy one.
            self.notify()
            if not self.is_parent_alive():
                break
            if self.backend.refused is not None:
                # Final, and logged on one line by the backend: a boot error makes gunicorn stop.
                sys.exit(Arbiter.WORKER_BOOT_ERROR)
            readable, _, _ = select.select(watched, [], [], self._interval())
            for ready in readable:
                if ready == self.PIPE[0]:
                    self.drain_pipe()
                else:
                    self._accept_health_check(ready)
        self._stop_gracefully()

    def _interval(self) -> float:
        # self.timeout is half of --timeout (the arbiter passes it so); 0 disables it.
        return min(1.0, self.timeout) if self.timeout else 1.0

    def _tell_siblings_when_connected(self) -> None:
        backend = self.backend
        assert backend is not None
        assert _siblings is not None
        while self.alive:
            if backend.wait_connected(1, timeout=1.0):
                _siblings.connected()
                return

    def _wait_for_a_younger_worker(self) -> None:
        """(SIGHUP: gunicorn started new workers before it stopped this one.) Keep serving until one of them
        has a tunnel, for at most :data:`~ptth_sync.siblings.HANDOVER_WAIT` seconds (see siblings.py)."""
        if _siblings is None:
            return
        deadline = time.monotonic() + HANDOVER_WAIT
        waited = False
        while time.monotonic() < deadline:
            if _siblings.younger_connected(self.age) is not False:
                break  # one has a tunnel, or there is none (the whole master stops)
            if not waited:
                self.log.info("Serving until a new worker has a tunnel (at most %gs)", HANDOVER_WAIT)
                waited = True
            self.notify()
            select.select([self.PIPE[0]], [], [], 0.05)
        if waited:
            self.log.info("Draining: %s", "a new worker has a tunnel" if _siblings.younger_connected(self.age)
                          else f"no new worker had a tunnel within {HANDOVER_WAIT:g}s")

    def _stop_gracefully(self) -> None:
        """Drain every tunnel (no new streams, in-flight ones finish) for at most ``graceful_timeout``.

        After a reload, first keep serving until a new worker has a tunnel
        (:meth:`_wait_for_a_younger_worker`). The drain runs on a daemon
        thread so the main thread keeps the heartbeat going and SIGQUIT still
        ends the process at once.
        """
        self._wait_for_a_younger_worker()
        for listener in self.sockets:
            listener.close()
        backend = self.backend
        assert backend is not None
        finished: List[bool] = []
        stopper = threading.Thread(
            target=lambda: finished.append(backend.stop(self.cfg.graceful_timeout)), name="ptth-drain", daemon=True
        )
        stopper.start()
        # Backend.stop keeps to graceful_timeout; the margin is for closing up.
        deadline = time.monotonic() + self.cfg.graceful_timeout + STOP_MARGIN
        while stopper.is_alive() and time.monotonic() < deadline:
            self.notify()
            stopper.join(self._interval())
        if finished != [True]:
            self.log.warning("Graceful timeout (%ss): requests still in flight were cut", self.cfg.graceful_timeout)

    # -- one request, on a pool thread -------------------------------------------

    def handle_stream(self, stream: Stream) -> None:
        """Serve one tunnelled request as gthread serves one: count, hooks, app, access log."""
        if stream.cancelled:  # reset while it waited for a thread: nothing to serve, count or log
            stream.close()
            return
        req = TunnelRequest(stream.headers or [])
        seen: List[Dict[str, Any]] = []
        self._count_request()
        started = datetime.now()

        def app(environ: Dict[str, Any], start_response: Any) -> Any:
            seen.append(environ)
            environ["SERVER_SOFTWARE"] = SERVER_SOFTWARE
            environ["wsgi.multiprocess"] = self.cfg.workers > 1
            # Inside the app call, so that a failing hook is answered 500 as under gthread.
            self.cfg.pre_request(self, req)
            return self.wsgi(environ, start_response)

        resp = None
        try:
            resp = handle_request(stream, app)
        finally:
            environ = seen[0] if seen else {}
            if resp is not None and environ:
                try:
                    self.log.access(resp, req, environ, datetime.now() - started)
                except Exception:
                    self.log.exception("Error writing the access log")
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")

    def _count_request(self) -> None:
        with self._lock:
            self.nr += 1
            if self.nr < self.max_requests or not self.alive:
                return
            self.alive = False
        self.log.info("Autorestarting worker after current request.")
        self.wake()

    # -- health checks on gunicorn's listening socket ------------------------------

    def _accept_health_check(self, listener: Any) -> None:
        try:
            client, _ = listener.accept()
        except OSError as exc:  # another worker took it, or the client gave up
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        with self._lock:
            if self._health_busy >= HEALTH_CONNECTIONS:
                client.close()
                return
            self._health_busy += 1
        threading.Thread(target=self._answer_health_check, args=(client,), name="ptth-health", daemon=True).start()

    def _answer_health_check(self, client: socket.socket) -> None:
        try:
            client.settimeout(HEALTH_TIMEOUT)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                data = client.recv(4096)
                if not data:
                    break
                request += data
            backend = self.backend
            up = sum(1 for c in backend.connections if c.ready) if backend is not None else 0
            wanted = backend.wanted_tunnels if backend is not None else 0
            body = f"ptth_sync worker {os.getpid()}: {up} of {wanted} tunnels up\n"
            status = "200 OK" if up else "503 Service Unavailable"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n"
            )
            client.sendall(head.encode() + (b"" if request.startswith(b"HEAD ") else body.encode()))
        except OSError:
            pass
        finally:
            client.close()
            with self._lock:
                self._health_busy -= 1
