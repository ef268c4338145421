"""The router's gunicorn worker: connections and relayed requests in a selector, threads for the rest.

The worker's main thread holds every waiting connection (accept, TLS
handshake, a request head still arriving, idle keep-alive) in a
:class:`~ptth_sync.router.front.ClientFront`. A connection with a complete
request head is parsed there with gunicorn's HTTP/1.1 parser and, most of the
time, relayed without a thread (:mod:`ptth_sync.router.relay`: no body, a body
of known length, a chunked one). The rest (a WebSocket opening, a wait for a
tunnel, a retry) goes to a pool thread, which calls the application, writes
the response with gunicorn's writer,
and keeps the connection while the next request follows within
:attr:`RouterWorker.linger` seconds (gunicorn's ``gthread`` hands every
keep-alive connection back to its poller after each request, which costs a
thread hand-off per request). Everything else is gunicorn's: the arbiter,
signals, hooks, error pages, the access log, ``max_requests``.

Settings, with their gunicorn meaning: ``threads`` is the number of requests
proxied at once; ``keepalive`` how long an idle connection is kept;
``timeout`` bounds each socket read or write of a request in progress;
``graceful_timeout`` how long requests in flight may take on SIGTERM. One
more, :attr:`ClientConnectionLoop.header_timeout`, bounds the whole request
head: a client that trickles it ("slowloris") is closed, having cost a socket.
:class:`ClientConnectionLoop` alone (a thread per connection) serves the
in-process test server of :mod:`ptth_sync.testing`.
"""

from __future__ import annotations

import collections
import errno
import os
import queue
import select
import socket
import ssl
import threading
import time
from datetime import datetime
from typing import Any, Callable, Deque, Dict, List, Optional, Set

from gunicorn import http, sock, util
from gunicorn.http import wsgi
from gunicorn.http.body import ChunkedReader, LengthReader

from ..gunicorn_base import SettingsSnapshot, ThreadedWorker
from ..websocket import going_away_delay
from .app import SMALL_BODY, TUNNELS_FULL, Proxied, TunnelBroken
from .checks import CLOSE_CONNECTION
from .front import ClientFront, WaitingClient, head_complete
from .http1 import RouterResponse, refuses_request_line, request_parser
from .limits import descriptor_budget
from .relay import Relay, ResponseSink
from .tunnel_reading import LoopReading
from .websocket import WEBSOCKET, AcceptedWebSocket, WebSocketRelay, relay_on_this_thread

__all__ = ["ClientConnectionLoop", "RouterWorker"]


class _ElasticPool:
    """Daemon threads started on demand up to ``limit``; idle ones end after a while."""

    def __init__(self, limit: int, idle_timeout: float = 60.0) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
            elif self._threads < self.limit:
                self._threads += 1
                threading.Thread(target=self._run, args=(task,), name="ptth-http", daemon=True).start()
                return
        self._tasks.put(task)

    def _run(self, task: Optional[Callable[[], None]]) -> None:
        while True:
            if task is not None:
                task()
                with self._lock:
                    self._idle += 1
            try:
                task = self._tasks.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody claimed an idle thread: this one may go
                        self._idle -= 1
                        self._threads -= 1
                        return
                task = None  # a task was promised to an idle thread: wait for it


class _ClientSocket:
    """The client socket as gunicorn's parser sees it: reads of a request head share one deadline."""

    __slots__ = ("_deadline", "_io_timeout", "_sock")

    def __init__(self, sock: socket.socket, io_timeout: Optional[float]) -> None:
        self._sock = sock
        self._io_timeout = io_timeout
        self._deadline: Optional[float] = None
        sock.settimeout(io_timeout)

    @property
    def raw(self) -> socket.socket:
        return self._sock

    def expect_head(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds

    @property
    def in_head(self) -> bool:
        """True while a request head is being read."""
        return self._deadline is not None

    def head_done(self) -> None:
        self._deadline = None
        self._sock.settimeout(self._io_timeout)

    def recv(self, size: int) -> bytes:
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                msg = "timed out"
                raise TimeoutError(msg)
            self._sock.settimeout(remaining)
        return self._sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class ClientConnectionLoop:
    """One client connection served on the calling thread, request after request.

    Parses each request with gunicorn's HTTP/1.1 parser, calls ``self.wsgi``
    (a :class:`~ptth_sync.router.Router`), writes the response with gunicorn's
    writer and waits up to ``cfg.keepalive`` seconds on the socket for the
    next. The host provides what a gunicorn worker has: ``cfg``, ``log``,
    ``wsgi``, ``alive``, ``nr``, ``max_requests`` and ``handle_error``.
    """

    #: Seconds a client has to send a whole request head (line and headers).
    header_timeout: float = 10.0

    cfg: Any
    log: Any
    wsgi: Any
    alive: bool
    nr: int
    max_requests: int
    handle_error: Callable[..., None]

    def _server_name(self, listener: Any) -> Any:
        """The listener's address (kept: requests still served as the worker stops, its listeners closed)."""
        names = self.__dict__.setdefault("_server_names", {})
        name = names.get(id(listener))
        if name is None:
            name = names[id(listener)] = listener.getsockname()
        return name

    def serve_connection(self, listener: Any, raw: socket.socket, addr: Any) -> None:
        """Serve requests on ``raw`` until it closes, fails or the host stops; then close it."""
        req = None
        client = raw
        try:
            if self.cfg.is_ssl:
                raw = client = sock.ssl_wrap_socket(raw, self.cfg)
            client = _ClientSocket(raw, self.cfg.timeout or None)
            parser = request_parser(self.cfg, client, addr)
            first = True
            while self.alive:
                if not first and not self._wait_for_next_request(raw, parser):
                    break
                first = False
                client.expect_head(self.header_timeout)
                req = next(parser)
                client.head_done()
                if not self._handle_request(listener, req, client, addr):
                    break
        except TimeoutError:
            if isinstance(client, _ClientSocket) and client.in_head:
                self.log.info("Closing connection from %s: request head not received within %gs",
                              addr[0] if addr else "?", self.header_timeout)
        except (StopIteration, http.errors.NoMoreData):
            pass  # the client closed
        except ssl.SSLError as exc:
            if exc.args[0] != ssl.SSL_ERROR_EOF:
                self.handle_error(req, client, addr, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, None):
                self.log.exception("Socket error processing request.")
        except BaseException as exc:
            self.handle_error(req, client, addr, exc)
        finally:
            util.close_graceful(raw)

    def _wait_for_next_request(self, raw: socket.socket, parser: Any) -> bool:
        """Wait up to ``keepalive`` seconds for the next request; False to close the connection."""
        buffered = parser.unreader.buf
        buffered.seek(0, os.SEEK_END)
        if buffered.tell() or (isinstance(raw, ssl.SSLSocket) and raw.pending()):
            return True  # pipelined: already here
        if not self.cfg.keepalive:
            return False
        poller = select.poll()  # not select(): descriptors may exceed 1024 here
        poller.register(raw, select.POLLIN)
        self._set_idle(raw, True)
        try:
            readable = poller.poll(self.cfg.keepalive * 1000)
        finally:
            self._set_idle(raw, False)
        return bool(readable) and self.alive

    def _set_idle(self, client: socket.socket, idle: bool) -> None:
        """Called as ``client`` starts (True) and stops (False) waiting for its next request."""

    def _handle_request(
        self, listener: Any, req: Any, client: socket.socket, addr: Any, begun: Optional[Relay] = None
    ) -> bool:
        """Serve one request; True to keep the connection for another.

        ``begun``: the request was taken up without a thread (pre_request
        called, response and environ made) and comes here to finish.
        """
        environ: dict = {}
        resp = None
        try:
            if begun is None:
                self.cfg.pre_request(self, req)
                request_start = datetime.now()
                resp, environ = wsgi.create(req, client, addr, self._server_name(listener), self.cfg,
                                             response_class=RouterResponse)
                environ["wsgi.multithread"] = True
                self._count_request(resp)
            else:
                resp, environ, request_start = begun.resp, begun.environ, begun.request_start
                resp.sock = client
            environ[WEBSOCKET] = None  # this server can take the connection over (see websocket.py)
            respiter = self.wsgi(environ, resp.start_response)
            if environ.get(CLOSE_CONNECTION) or not self.alive:  # what the client sent next cannot be trusted,
                resp.force_close()  # or the worker stops: the client is told not to send another request
            try:
                for item in respiter:
                    resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, "close"):
                    respiter.close()
            if environ.get(WEBSOCKET) is not None:  # answered 101: the connection carries a WebSocket now
                self._websocket_opened(environ[WEBSOCKET], client, req.unreader.take_buffered())
                return False
            return not resp.should_close()
        except TunnelBroken:
            # The response had started (the router logged why): cut the connection so the client sees it incomplete.
            _shutdown(client)
            return False
        except OSError:
            raise
        except (Exception, SystemExit):
            if resp is not None and resp.headers_sent:
                self.log.exception("Error handling request")
                _shutdown(client)
                return False
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")


    def _websocket_opened(self, accepted: AcceptedWebSocket, client: Any, early: bytes) -> None:
        """The request became a WebSocket (``early``: what the client sent after its head): relay it here."""
        relay_on_this_thread(accepted, getattr(client, "raw", client), early)

    def _count_request(self, resp: Any) -> None:
        """A request starts: count it toward ``max_requests``; close after it when the worker stops."""
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
        if not self.alive or not self.cfg.keepalive or not self.wsgi.takes_clients():
            # (A router process with no tunnel among others that have some
            # answers, then lets the client reconnect to one of them.)
            resp.force_close()


def bind_to_cpu(index: int) -> Optional[int]:
    """Bind this process to the ``index``-th CPU it may run on (modulo their number); returns that CPU.

    A router worker does one core's work at most (its threads share the
    GIL); on one CPU its threads hand the GIL to each other without waking a
    second core each time, which costs less CPU per request and adds less
    latency (docs/performance.md). None where CPU affinity is not available.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[index % len(cpus)]
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        return None
    return cpu


class RouterWorker(ClientConnectionLoop, ThreadedWorker):
    """gunicorn worker: waiting connections in a selector, simple requests relayed without a thread.

    The main thread runs a :class:`~ptth_sync.router.front.ClientFront`:
    accepts, TLS handshakes, partial request heads and idle keep-alive
    connections cost a socket and a buffer there; the same loop reads the
    plain tunnels (:mod:`~ptth_sync.router.tunnel_reading`) and serves simple
    requests without a thread (:mod:`~ptth_sync.router.relay`). Any other
    request goes to a pool thread, which serves it and the requests that
    follow at once (within :attr:`linger` seconds of each response, the usual
    pace of a busy keep-alive client), then gives the connection back.
    """

    #: After a response, how long a thread waits for the next request before giving the connection back.
    linger: float = 0.5
    #: Serve simple requests without a thread (see :mod:`ptth_sync.router.relay`).
    relay_requests: bool = True
    #: Bind the worker process to one CPU (``--cpu-affinity auto``; see :func:`bind_to_cpu`).
    cpu_affinity: bool = False
    #: The tunnels the main loop reads (set by :meth:`run`).
    _reading: LoopReading

    def init_process(self) -> None:
        # gunicorn's parser, environ and response read settings per request: each is looked up once instead.
        self.cfg = SettingsSnapshot(self.cfg)
        if self.cpu_affinity:  # before any thread starts: they inherit it
            cpu = bind_to_cpu(self.age - 1)
            if cpu is not None:
                self.log.info("Worker %d bound to CPU %d", self.pid, cpu)
        self._pool = _ElasticPool(self.cfg.threads)
        self._front: Optional[ClientFront] = None
        self._relays: Dict[int, Relay] = {}
        self._relays_lock = threading.Lock()
        self._next_relay_check = 0.0
        #: Tunnels with relayed requests queued but not sent yet (main thread only).
        self._queued: Set[Any] = set()
        #: Relayed requests waiting for a tunnel with a stream free, oldest first (main thread only).
        self._parked: Dict[Optional[str], Deque[Relay]] = {}
        #: Relayed requests that need a thread after all, found so on a tunnel's reader (under _relays_lock).
        self._retries: List[Relay] = []
        #: WebSockets opened by a request thread, for it to hand over once it let go of the connection.
        self._opened: Dict[int, Any] = {}
        super().init_process()

    def run(self) -> None:
        clients, _ = descriptor_budget()
        context = sock.ssl_context(self.cfg) if self.cfg.is_ssl else None
        if context is not None:  # as nginx and HAProxy: a client may not renegotiate (a cheap DoS, CVE-2011-1473)
            context.options |= ssl.OP_NO_RENEGOTIATION
        front = self._front = ClientFront(
            self._handoff,
            self.wake,
            header_timeout=self.header_timeout,
            keepalive=self.cfg.keepalive,
            max_connections=clients,
            max_head=self.cfg.limit_request_line + self.cfg.limit_request_fields * self.cfg.limit_request_field_size,
            ssl_context=context,
            may_accept=self.wsgi.takes_clients,
            refuses_first_line=lambda head, peer: refuses_request_line(self.cfg, head, peer),
            after_events=self._after_events,
            busy_readable=self._busy_readable,
        )
        for listener in self.sockets:
            front.add_listener(listener)
            self._server_name(listener)  # (known before the listeners close: requests served as the worker stops)
        front.watch(self.PIPE[0], self.drain_pipe)
        reading = self._reading = LoopReading(front, self.wake)
        self.wsgi.tunnel_loop = reading.adopt  # the tunnels accepted from now on are read in this loop
        interval = min(1.0, self.timeout / 2 if self.timeout else 1.0)
        next_beat = 0.0
        try:
            while self.alive:
                now = time.monotonic()
                if now >= next_beat:  # (the arbiter's heartbeat, not at every wake-up: each costs two syscalls)
                    next_beat = now + interval / 2
                    self.notify()
                    if not self.is_parent_alive():
                        break
                # In a fleet of router processes, one without a tunnel leaves clients to the others.
                taking = self.wsgi.takes_clients()
                front.set_accepting(taking)
                front.poll(reading.timeout(interval if taking else min(interval, 0.1)))
                reading.run_timers()
                self._check_relays()
            self._stop_gracefully()
        finally:
            self.wsgi.tunnel_loop = None
            reading.stop()  # each tunnel gets its reader thread back: the router closes them as before

    def _handoff(self, client: WaitingClient) -> None:
        if not (self.relay_requests and self._relay(client)):
            self._to_thread(client)

    def _to_thread(self, client: WaitingClient, begun: Optional[Relay] = None) -> None:
        """(Main thread.) A thread serves the connection: the front stops watching it first."""
        assert self._front is not None
        self._front.release(client)
        self._pool.submit(lambda: self._serve_client(client, begun))

    # -- requests without a thread (see relay.py) --------------------------------

    def _relay(self, client: WaitingClient) -> bool:
        """Serve the request in ``client.buffer`` without a thread if it is simple; False if it needs one."""
        if not self.alive:
            return False
        parser = request_parser(self.cfg, _NO_MORE_BYTES, client.addr)
        parser.unreader.unread(bytes(client.buffer))
        try:
            req = next(parser)
        except Exception:
            return False  # a thread parses it again and answers it as gunicorn does
        reader = req.body.reader
        chunked = type(reader) is ChunkedReader  # decoded as it arrives (see Relay.start_chunked_upload)
        if not chunked and type(reader) is not LengthReader:
            return False  # another reader (gunicorn makes none for a request): a thread serves it
        length = 0 if chunked else reader.length
        buffered = len(parser.unreader.buf.getbuffer())
        # (A TLS client that waits for "100 Continue" gets it from the relay, whose writes a TLS
        # socket can take, see Relay._flush: its small body is streamed, as a larger one is.)
        if (length > buffered and length <= SMALL_BODY and client.need == 0
                and not (req._expected_100_continue and isinstance(client.sock, ssl.SSLSocket))):
            # A small body goes out with its headers, in one piece that another tunnel could
            # take again: it waits in the front until it is all here, as the head did.
            assert self._front is not None
            if req._expected_100_continue:  # the client waits for this before it sends the body
                try:
                    client.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n", socket.MSG_DONTWAIT)
                except OSError:
                    pass  # (a client that cannot take 25 bytes sends its body after its own delay)
            self._front.collect_body(client, len(client.buffer) - buffered, length, f"{req.method} {req.uri}",
                                     self.wsgi.timeout)
            return True
        if client.need:
            client.need = 0
            req._expected_100_continue = False  # answered while the body was collected
        streamed = chunked or length > SMALL_BODY or length > buffered  # else the whole body is here
        self.cfg.pre_request(self, req)
        request_start = datetime.now()
        resp, environ = wsgi.create(req, ResponseSink(), client.addr, self._server_name(client.listener), self.cfg,
                                     response_class=RouterResponse)
        environ["wsgi.multithread"] = True
        self._count_request(resp)
        relay = client.owner = Relay(self, client, parser, req, resp, environ, request_start, self.wsgi.timeout)
        relay.body_length, relay.body_buffered, relay.streamed, relay.chunked = length, buffered, streamed, chunked
        with self._relays_lock:
            self._relays[id(relay)] = relay
        if client.cut_short:
            client.cut_short = False
            with relay.lock:
                relay.answer(self.wsgi.body_cut_short(environ, resp.start_response, req.method, req.uri, buffered,
                                                      length))
            return True
        relay.origin = self.wsgi.route(environ)
        line = self._parked.get(relay.origin)
        if line:
            line.append(relay)  # after those that wait already for a stream of the same tunnels
        else:
            self._begin(relay)
        return True

    def _begin(self, relay: Relay) -> None:
        """(Main thread.) Send a relayed request on a tunnel, answer it, give it to a thread, or park it
        until a tunnel has a stream free."""
        environ, resp = relay.environ, relay.resp
        streamed = relay.streamed
        with relay.lock:
            try:
                outcome = self.wsgi.begin(environ, resp.start_response, relay.on_stream, self._queued,
                                          stream_body=streamed)
            except Exception:
                self.log.exception("Error handling request %s", relay.req.uri)
                relay.abort(broken=False)
                return
            if outcome is TUNNELS_FULL:
                line = self._parked.get(relay.origin)
                if line is None:
                    line = self._parked[relay.origin] = collections.deque()
                line.append(relay)
                return
            if outcome is None:
                relay.done = True
                self.retry(relay)
            elif isinstance(outcome, Proxied):
                relay.proxied = outcome
                if relay.chunked:
                    relay.start_chunked_upload(relay.parser.unreader.take_buffered())
                elif streamed:
                    initial = relay.req.body.read(min(relay.body_length, relay.body_buffered))
                    relay.start_upload(initial, relay.body_length - len(initial))
            else:
                if streamed:  # the body is still coming: the connection cannot carry another request
                    environ[CLOSE_CONNECTION] = True
                    resp.force_close()
                relay.answer(outcome)
        if streamed:
            self.want_events(relay)

    def _begin_parked(self) -> None:
        """(Main thread.) Start the relayed requests that wait for a stream, oldest first in each line (one line
        per origin: the requests for one origin never wait for another's tunnels), while tunnels take them."""
        for origin, line in list(self._parked.items()):
            while line:
                relay = line.popleft()
                if relay.done:  # timed out meanwhile (see Relay.check)
                    continue
                self._begin(relay)
                if line and line[-1] is relay:  # still full: it goes back to the head of the line
                    line.rotate(1)
                    break
            if not line:
                del self._parked[origin]

    def _after_events(self) -> None:
        self._reading.take_adopted()
        self._send_queued()

    def _send_queued(self) -> None:
        """After a batch of events: start parked requests; send the requests relayed meanwhile, one write per
        tunnel; give threads the requests that need one after all."""
        if self._retries:
            with self._relays_lock:
                retries, self._retries = self._retries, []
            for relay in retries:
                self._to_thread(relay.client, relay)
        if self._parked:
            self._begin_parked()
        if self._queued:
            for tunnel in self._queued:
                tunnel.send_queued()
            self._queued.clear()

    def unpark(self, relay: Relay) -> bool:
        """(Main thread.) Take a relay out of the line for a stream; False if it was not in it."""
        line = self._parked.get(relay.origin)
        if line is None or relay not in line:
            return False
        line.remove(relay)
        if not line:
            del self._parked[relay.origin]
        return True

    def retry(self, relay: Relay) -> None:
        """A relayed request needs a thread after all (a tunnel to wait for, another tunnel to try)."""
        relay.client.owner = None
        with self._relays_lock:
            self._relays.pop(id(relay), None)
            if threading.current_thread() is not threading.main_thread() or self._reading.reading:
                self._retries.append(relay)  # the main loop hands it over (see _send_queued)
                relay = None
        if relay is None:
            self.wake()
        else:
            self._to_thread(relay.client, relay)

    def _busy_readable(self, client: WaitingClient) -> None:
        """(Main thread.) A client sent more while its request is relayed: if the response is whole,
        wait for the thread sending its last bytes to finish (it holds the relay's lock until the
        connection is given back)."""
        relay = client.owner
        if relay is not None and relay.ending:
            with relay.lock:
                pass

    def want_events(self, relay: Relay) -> None:
        assert self._front is not None
        self._front.want_events(relay.client.sock, relay)

    def request_done(self, relay: Relay) -> None:
        """A relayed request is over: the access log and the post_request hook."""
        if getattr(self.log, "access_log_enabled", True):
            try:
                self.log.access(relay.resp, relay.req, relay.environ, datetime.now() - relay.request_start)
            except Exception:
                self.log.exception("Error writing the access log")
        try:
            self.cfg.post_request(self, relay.req, relay.environ, relay.resp)
        except Exception:
            self.log.exception("Exception in post_request hook")

    def finish(self, relay: Relay, keep: bool) -> None:
        """A relayed request is over: its connection waits for the next request, or closes."""
        assert self._front is not None
        with self._relays_lock:
            self._relays.pop(id(relay), None)
        client = relay.client
        client.owner = None
        # What the router did not forward of a body that came whole (a streamed one was read off the socket).
        if keep and self.alive and relay.body_length and not relay.streamed:
            try:
                while relay.req.body.read(65536):
                    pass
            except Exception:
                keep = False
        if keep and self.alive:
            client.buffer = bytearray(relay.parser.unreader.take_buffered())
        # Closed by the front too, which may be watching the socket for room to write.
        self._front.give_back(client, keep and self.alive)
        if self._parked:
            self.wake()  # a stream is free: the loop starts a parked request

    # -- WebSockets (see websocket.py) ----------------------------------------------

    def _websocket_opened(self, accepted: AcceptedWebSocket, client: Any, early: bytes) -> None:
        # Relayed from the selector, without a thread, once this thread let go of the connection (_serve_client).
        self._opened[threading.get_ident()] = (accepted, early)

    def _relay_websocket(self, client: WaitingClient) -> bool:
        """(A request thread, done with ``client``.) Hand its WebSocket to the selector; False if it has none."""
        opened = self._opened.pop(threading.get_ident(), None)
        if opened is None:
            return False
        accepted, early = opened
        relay = WebSocketRelay(accepted, client.sock, early, self, client)
        try:
            client.sock.setblocking(False)
        except OSError:
            pass
        with self._relays_lock:
            self._relays[id(relay)] = relay  # (for its idle timeout: see _check_relays)
        relay.start()
        return True

    def websocket_closed(self, relay: WebSocketRelay) -> None:
        """A WebSocket is over: its connection closes."""
        assert self._front is not None
        with self._relays_lock:
            self._relays.pop(id(relay), None)
        self._front.give_back(relay.client, False)

    def _close_websockets(self) -> None:
        """(Stopping.) Close the WebSockets still open, with ``1001 Going Away``."""
        with self._relays_lock:
            relays = [relay for relay in self._relays.values() if isinstance(relay, WebSocketRelay)]
        if relays:
            self.log.info("Closing %d WebSocket(s) still open at the graceful timeout", len(relays))
        for relay in relays:
            relay.going_away()

    def _check_relays(self) -> None:
        now = time.monotonic()
        if now < self._next_relay_check:
            return
        self._next_relay_check = now + 0.25
        with self._relays_lock:
            relays = list(self._relays.values())
        for relay in relays:
            relay.check(now)

    def _stop_gracefully(self) -> None:
        """Close waiting connections; give busy ones ``graceful_timeout`` to finish."""
        front = self._front
        assert front is not None
        front.set_accepting(False)
        self.wsgi.hand_over()  # new requests go to the workers that stay (or come), with the tunnels
        for listener in self.sockets:
            try:
                listener.close()
            except OSError:
                pass
        started = time.monotonic()
        deadline = started + self.cfg.graceful_timeout
        websockets_at = started + going_away_delay(self.cfg.graceful_timeout)
        front.poll(0)  # requests that arrived already are served (and told the connection closes), not cut
        while front.close_waiting():
            if websockets_at is not None and time.monotonic() >= websockets_at:
                websockets_at = None
                self._close_websockets()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.log.warning("Graceful timeout: %d connections still busy", front.connections)
                return
            self.notify()
            wait = min(remaining, 0.5)
            if websockets_at is not None:
                wait = min(wait, max(websockets_at - time.monotonic(), 0.0))
            front.poll(self._reading.timeout(wait))
            self._reading.run_timers()
            self._check_relays()

    def _serve_client(self, client: WaitingClient, begun: Optional[Relay] = None) -> None:
        """Serve the requests that follow at once on ``client``; then give it back or close it.

        ``begun``: the first request was taken up without a thread and needs one after all.
        """
        assert self._front is not None
        keep = False
        try:
            keep = self._serve_requests(client, begun)
        except (StopIteration, http.errors.NoMoreData):
            pass  # the client closed
        except ssl.SSLError as exc:
            if exc.args[0] != ssl.SSL_ERROR_EOF:
                self.handle_error(None, client.sock, client.addr, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, None):
                self.log.exception("Socket error processing request.")
        except BaseException as exc:
            self.handle_error(None, client.sock, client.addr, exc)
        if self._relay_websocket(client):
            return
        if keep and self.alive:
            self._front.give_back(client)
            return
        util.close_graceful(client.sock)
        self._front.closed()
        self.wake()  # a thread freed up, or the stop loop counts connections

    def _serve_requests(self, client: WaitingClient, begun: Optional[Relay] = None) -> bool:
        """The request loop on one connection; True when it should wait in the selector for the next one."""
        raw = client.sock
        raw.setblocking(True)
        io_socket = _ClientSocket(raw, self.cfg.timeout or None)
        try:
            return self._request_loop(client, io_socket, begun)
        except TimeoutError:
            if io_socket.in_head:
                self.log.info("Closing connection from %s: request head not received within %gs", client.peer,
                              self.header_timeout)
            else:
                self.log.info("Closing connection from %s: no progress for %gs (it stopped reading the response "
                              "or sending its body)", client.peer, self.cfg.timeout)
            return False

    def _request_loop(self, client: WaitingClient, io_socket: _ClientSocket, begun: Optional[Relay] = None) -> bool:
        raw = client.sock
        if begun is None:
            parser = request_parser(self.cfg, io_socket, client.addr)
            parser.unreader.unread(bytes(client.buffer))
        else:
            parser = begun.parser
            parser.unreader.sock = io_socket
        client.buffer = bytearray()
        while True:
            client.started = True
            if begun is None:
                io_socket.expect_head(self.header_timeout)
                req = next(parser)
                io_socket.head_done()
            else:
                req = begun.req
            if not self._handle_request(client.listener, req, io_socket, client.addr, begun) or not self.alive:
                return False
            begun = None
            # The next request may use the connection only once this one's body is gone.
            if not parser.finish_body(deadline=time.monotonic() + 1.0):
                return False
            buffered = parser.unreader.buf.getvalue()
            if head_complete(buffered):
                continue  # pipelined: already here
            client.started = False
            if not buffered and self._next_request_soon(raw):
                raw.setblocking(False)
                try:
                    data = raw.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    data = None
                finally:
                    raw.settimeout(self.cfg.timeout or None)
                if data == b"":
                    return False  # the client closed
                if data:
                    parser.unreader.unread(data)
                    if head_complete(data):
                        continue
            client.buffer = bytearray(parser.unreader.take_buffered())
            return bool(self.cfg.keepalive)

    def _next_request_soon(self, raw: Any) -> bool:
        """Wait up to :attr:`linger` seconds for the client's next bytes."""
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return True
        poller = select.poll()  # not select(): descriptors may exceed 1024 here
        poller.register(raw, select.POLLIN)
        return bool(poller.poll(self.linger * 1000))


class _NoMoreBytes:
    """The source of a request parsed from bytes received already: there are no more."""

    @staticmethod
    def recv(size: int) -> bytes:
        return b""


_NO_MORE_BYTES = _NoMoreBytes()


def _shutdown(client: socket.socket) -> None:
    try:
        client.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

