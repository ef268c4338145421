"""Client connections while they wait, held in one selector instead of threads.

A router thread is worth its cost only while a request is being proxied. Until
a connection has a complete request head it is just a socket and a buffer:
:class:`ClientFront` accepts connections without blocking, runs their TLS
handshakes, collects request heads as they trickle in and keeps idle
keep-alive connections, all in the worker's main thread. A connection reaches
a thread (``handoff``) only with a whole request head in its buffer; the
thread gives it back (:meth:`ClientFront.give_back`) when no next request
follows at once.

A connection stays registered in the selector while its request is relayed
without a thread (``relay.py``), so that the usual keep-alive round costs no
selector change and no wake-up of the loop: its next request wakes the loop
by itself. Bytes that arrive while the request is still being answered (a
pipelined request, or the client closing) only unregister it until it is back.
A connection that goes to a thread is unregistered first (:meth:`release`):
the thread owns the socket, and may close it.

What this protects, and how (the guards the thread-per-connection design had,
and more):

- a slow or silent client ("slowloris") costs a socket and a buffer, never a
  thread, and is closed ``header_timeout`` seconds after its head began
  (logged); an idle keep-alive connection is closed after ``keepalive``;
- a head larger than ``max_head`` is handed on as it is: gunicorn's parser
  answers it with its usual 4xx;
- descriptors: at most ``max_connections`` client connections are open. At
  the cap, and when ``accept`` fails for want of descriptors, the connection
  that has waited longest for a request (idle first, then the slowest head) is
  closed to make room, with a log line at most once a second: a flood of
  connections cannot take the worker down or lock real clients out.
"""

from __future__ import annotations

import collections
import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from ..handshake import looks_like_tls
from ..sockets import peer_name
from .http1 import refuses_bare_line_feeds

__all__ = ["ClientFront", "WaitingClient", "head_complete"]

log = logging.getLogger("ptth_sync.router")

#: Connections accepted per listener per wake-up, so that one busy listener cannot starve the rest.
_ACCEPT_BATCH = 64
#: How often, at most, the deadlines of waiting connections are checked (seconds).
_SWEEP_INTERVAL = 0.25
#: A connection closed while its client may still be sending (a request body the response did not
#: wait for) is read and discarded this long at most after the router's FIN, so that closing it does
#: not reset the connection under a response the client has not read yet (nginx's lingering close).
_LINGER_SECONDS = 5.0
#: At most this much of what such a client sends is read (and discarded) per turn of the loop.
_LINGER_READ = 1024 * 1024
#: After ``accept`` failed for want of descriptors, how long the listeners rest (seconds).
_EMFILE_PAUSE = 0.1


def head_complete(buffer: Any) -> bool:
    """True when ``buffer`` holds a whole HTTP/1.1 request head (up to the blank line).

    A blank line of bare line feeds ends one too when gunicorn's parser
    refuses it at once (400), as it does reading the socket itself: the
    client would otherwise wait for ``--header-timeout`` and get nothing.
    """
    return b"\r\n\r\n" in buffer or (b"\n\n" in buffer and refuses_bare_line_feeds())


class WaitingClient:
    """A client connection outside any thread: its socket, what it sent so far, and its deadline."""

    __slots__ = ("addr", "body_length", "buffer", "busy", "cut_short", "deadline", "handshaking", "lingering",
                 "listener", "need", "owner", "sock", "started", "watched", "what")

    def __init__(self, sock: Any, addr: Any, listener: Any, buffer: bytes = b"") -> None:
        self.sock = sock
        self.addr = addr
        self.listener = listener
        self.buffer = bytearray(buffer)
        self.handshaking = False  # a TLS handshake in progress
        self.busy = False  # its request is being served (it is not among the waiting connections)
        #: While busy: what serves its request without a thread, if anything (see ``busy_readable``).
        self.owner: Any = None
        #: The selector holds the socket for reading, with this client as its data (changed under the front's lock).
        self.watched = False
        self.started = False  # the request head has begun (its timeout applies, not keep-alive's)
        self.deadline = 0.0
        #: While a small request body is collected (see ClientFront.collect_body): the bytes the
        #: buffer must hold, and the request ("POST /path") for the log.
        self.need = 0
        self.body_length = 0
        self.what = ""
        #: The client closed its side before the whole small body came (see ClientFront.collect_body).
        self.cut_short = False
        #: Closing: the router sent its FIN, and discards what the client still sends (see ClientFront._linger).
        self.lingering = False

    @property
    def received_body(self) -> int:
        """While a body is collected: how much of it is here."""
        return len(self.buffer) - self.need + self.body_length if self.need else 0

    @property
    def peer(self) -> str:
        return str(self.addr[0]) if self.addr else "?"


class SocketWatcher:
    """Something the front watches a connection's socket for, while no thread has it.

    :meth:`interest` says which of ``selectors.EVENT_READ`` and
    ``EVENT_WRITE`` it waits for now (0: none); :meth:`on_events` runs in the
    front's loop when they happen. After a change of interest, from any
    thread, call :meth:`ClientFront.want_events`.
    """

    def interest(self) -> int:
        raise NotImplementedError

    def on_events(self, events: int) -> None:
        raise NotImplementedError


class ClientFront:
    """Accepts client connections and holds them in a selector until a request head is complete.

    Runs in one thread (the worker's main loop calls :meth:`poll`); threads
    hand connections back with :meth:`give_back`, which wakes the loop through
    ``wake``. ``handoff(client)`` must not block: it queues the client for a
    thread. ``may_accept()`` is asked before each ``accept``; ``after_events()``
    is called once the events of a wake-up are handled. ``busy_readable(client)``
    is called when a connection whose request is being served sends more: it
    may wait (briefly) for that request to end, so that the connection comes
    back without a round of unregistering, waking and registering again.
    """

    def __init__(
        self,
        handoff: Callable[[WaitingClient], None],
        wake: Callable[[], None],
        *,
        header_timeout: float,
        keepalive: float,
        max_connections: int,
        max_head: int,
        ssl_context: Optional[ssl.SSLContext] = None,
        may_accept: Callable[[], bool] = lambda: True,
        after_events: Callable[[], None] = lambda: None,
        busy_readable: Callable[[WaitingClient], None] = lambda client: None,
        refuses_first_line: Callable[[bytes, Any], bool] = lambda head, peer: False,
    ) -> None:
        self._handoff = handoff
        self._refuses_first_line = refuses_first_line
        self._busy_readable = busy_readable
        self._after_events = after_events
        self._may_accept = may_accept
        self._wake = wake
        self.header_timeout = header_timeout
        self.keepalive = keepalive
        self.max_connections = max_connections
        self.max_head = max_head
        self._ssl_context = ssl_context
        self._selector = selectors.DefaultSelector()
        self._listeners: List[Any] = []
        self._accepting = False
        self._paused_until = 0.0
        #: Waiting connections, oldest first (a dict keeps insertion order; re-inserted on each return).
        self._waiting: Dict[int, WaitingClient] = {}
        self._returned: Deque[Tuple[WaitingClient, bool]] = collections.deque()
        self._wake_pending = False  # a wake-up for the returned connections is on its way
        self._watch_changes: Deque[Tuple[Any, SocketWatcher]] = collections.deque()
        self._watched: Set[int] = set()  # descriptors registered for a SocketWatcher
        self._lock = threading.Lock()
        #: Client connections open, waiting or with a thread.
        self.connections = 0
        self._next_sweep = 0.0
        self._shed = 0
        self._shed_logged_at = 0.0

    # -- set-up -----------------------------------------------------------------

    def add_listener(self, listener: Any) -> None:
        listener.setblocking(False)
        self._listeners.append(listener)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the loop) whenever ``fd`` is readable: the worker's signal pipe."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def set_accepting(self, accepting: bool) -> None:
        """Take new connections or leave them in the listen backlog (for other processes)."""
        accepting = accepting and time.monotonic() >= self._paused_until
        if accepting == self._accepting:
            return
        self._accepting = accepting
        for listener in self._listeners:
            if accepting:
                self._selector.register(listener, selectors.EVENT_READ, listener)
            else:
                self._selector.unregister(listener)

    # -- the loop -----------------------------------------------------------------

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds and handle what is ready."""
        resting = self._paused_until - time.monotonic()
        if resting > 0:  # the listeners rest after an EMFILE: wake when they may accept again
            timeout = min(timeout, resting)
        try:
            events = self._selector.select(timeout)
        except InterruptedError:
            events = []
        self._take_returned()  # (before their events: a returned connection's next request may be among them)
        for key, mask in events:
            data = key.data
            if isinstance(data, WaitingClient):
                if data.busy:
                    # Its next request, sent as the last bytes of the response left: the response is
                    # most likely over by now, and the connection on its way back (not a wake-up away).
                    self._busy_readable(data)
                    self._take_returned()
                    if data.busy:  # its request is still being answered: what it sends next waits until then
                        self.release(data)
                        continue
                    if not data.watched:  # closed as it came back
                        continue
                self._on_readable(data)
            elif isinstance(data, SocketWatcher):
                data.on_events(mask)
                self._watch(key.fileobj, data)
            elif callable(data):
                data()
            else:
                self._accept(data)
        self._take_returned()
        self._take_watch_changes()
        self._after_events()
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_INTERVAL
            self._sweep(now)

    def give_back(self, client: WaitingClient, keep: bool = True) -> None:
        """From any thread: the connection waits for its next request here again (or is closed).

        A connection still registered for reading needs no wake-up: the loop
        takes it back at its next turn, and its next request is such a turn.
        """
        with self._lock:
            self._returned.append((client, keep))
            wake = not (keep and client.watched and not client.buffer) and not self._wake_pending
            if wake:
                self._wake_pending = True
        if wake:
            self._wake()

    def release(self, client: WaitingClient) -> None:
        """(In the loop.) Stop watching a connection whose request is served elsewhere (a thread may close it)."""
        with self._lock:
            client.watched = False
        self._unregister(client.sock)

    def want_events(self, sock: Any, watcher: SocketWatcher) -> None:
        """From any thread: ``watcher``'s interest in ``sock`` changed; the loop follows it."""
        with self._lock:
            wake = not self._watch_changes
            self._watch_changes.append((sock, watcher))
        if wake:
            self._wake()

    def collect_body(self, client: WaitingClient, head_length: int, body_length: int, what: str,
                     timeout: float) -> None:
        """(In the loop.) ``client``'s head is here and its small body is not: hand it on once the whole
        body is buffered, or close it after ``timeout`` seconds (logged, with ``what``)."""
        client.need = head_length + body_length
        client.body_length = body_length
        client.what = what
        client.started = True
        client.deadline = time.monotonic() + (timeout or self.header_timeout)
        self._wait(client)

    def watch_socket(self, sock: Any, watcher: SocketWatcher) -> None:
        """(In the loop.) Watch ``sock`` for what ``watcher`` wants (a tunnel's socket, say)."""
        self._watch(sock, watcher)

    def unwatch_socket(self, sock: Any) -> None:
        """(In the loop.) Stop watching ``sock``; before it is closed."""
        self._unregister(sock)

    def _take_watch_changes(self) -> None:
        if not self._watch_changes:
            return
        with self._lock:
            changes, self._watch_changes = self._watch_changes, collections.deque()
        for sock, watcher in changes:
            self._watch(sock, watcher)

    def _watch(self, sock: Any, watcher: SocketWatcher) -> None:
        """Register ``sock`` for what ``watcher`` wants now, or unregister it."""
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            key = None
        except (ValueError, OSError):  # closed meanwhile
            return
        events = watcher.interest()
        if key is not None and isinstance(key.data, WaitingClient):
            client = key.data
            if not client.busy or not events:
                return  # it waits for its next request (that watcher is over), or stays as it is meanwhile
            with self._lock:
                client.watched = False
            try:
                self._selector.modify(sock, events, watcher)
                self._watched.add(sock.fileno())
            except (ValueError, OSError):  # closed meanwhile: its watcher found out or will
                pass
            return
        try:
            if key is None:
                if events:
                    self._selector.register(sock, events, watcher)
                    self._watched.add(sock.fileno())
            elif not events:
                if key.data is watcher:
                    self._unregister(sock)
            elif key.events != events or key.data is not watcher:
                self._selector.modify(sock, events, watcher)
        except (ValueError, OSError):  # closed meanwhile: its watcher found out or will
            pass

    def _unregister(self, sock: Any) -> None:
        self._watched.discard(sock.fileno())
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    def closed(self) -> None:
        """From any thread: a connection a thread held is gone."""
        with self._lock:
            self.connections -= 1

    def close_waiting(self) -> int:
        """Close every waiting connection (the worker is stopping); returns how many are left with threads."""
        self._take_returned(closing=True)
        for client in list(self._waiting.values()):
            self._drop(client)
        return self.connections

    # -- accepting ------------------------------------------------------------------

    def _accept(self, listener: Any) -> None:
        for _ in range(_ACCEPT_BATCH):
            if not self._may_accept():
                return  # (another router process should take it: see RouterWorker.run)
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_descriptors(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            with self._lock:
                self.connections += 1
                over = self.connections > self.max_connections
            if over and not self._shed_one(f"connection limit of {self.max_connections} reached"):
                # Every connection is busy with a request: refuse the newcomer instead.
                sock.close()
                with self._lock:
                    self.connections -= 1
                continue
            self._start(sock, addr, listener)

    def _out_of_descriptors(self, exc: OSError) -> None:
        """``accept`` failed for want of descriptors: make room, and rest the listeners a moment."""
        self._shed_one(f"accept failed: {exc.strerror}")
        self._paused_until = time.monotonic() + _EMFILE_PAUSE
        self.set_accepting(False)

    def _start(self, sock: socket.socket, addr: Any, listener: Any) -> None:
        client = WaitingClient(sock, addr, listener)
        try:
            sock.setblocking(False)  # (an accepted socket blocks, whatever its listener does)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self._ssl_context is not None:
            client.handshaking = True  # wrapped in TLS once its first bytes are a TLS record (see _on_readable)
        client.deadline = time.monotonic() + self.header_timeout
        client.started = True
        self._wait(client)
        if client.handshaking:
            self._on_readable(client)  # the ClientHello may be there already

    # -- waiting connections ------------------------------------------------------------

    def _wait(self, client: WaitingClient) -> None:
        self._waiting[id(client)] = client
        client.busy = False
        if client.watched:
            return
        sock = client.sock
        try:
            if sock.fileno() in self._watched:  # still watched for its last request: one change, not two
                self._watched.discard(sock.fileno())
                self._selector.modify(sock, selectors.EVENT_READ, client)
            else:
                self._selector.register(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError, OSError):  # closed meanwhile
            self._drop(client)
            return
        with self._lock:
            client.watched = True

    def _unwait(self, client: WaitingClient) -> None:
        self._waiting.pop(id(client), None)
        with self._lock:
            client.watched = False
        self._unregister(client.sock)

    def _on_readable(self, client: WaitingClient) -> None:
        if client.lingering:
            if not self._discard(client):
                self._drop(client)
            return
        if client.handshaking and not self._handshake(client):
            return
        sock = client.sock
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError):
                return
            except ssl.SSLError as exc:
                if not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):  # (not a close without notice)
                    log.info("Closing connection from %s: TLS error: %s", client.peer, exc)
                self._drop(client)
                return
            except OSError:
                self._drop(client)
                return
            if not data:
                if client.need:  # its small body was cut short: answered (400), with no tunnel involved
                    client.cut_short = True
                    self._waiting.pop(id(client), None)
                    client.busy = True
                    self._handoff(client)
                    return
                self._drop(client)
                return
            if not client.started:
                client.started = True
                client.deadline = time.monotonic() + self.header_timeout
            previous = len(client.buffer)
            client.buffer += data
            if previous < 2 and self._ssl_context is None and looks_like_tls(client.buffer):
                self._refuse_other_protocol(client, "it began a TLS handshake on this plain HTTP port: use http:// "
                                            "(or give the router --http-certfile and --http-keyfile)",
                                            "This is a plain HTTP port: use http://")
                return
            window = client.buffer[max(previous - 3, 0) :]
            if (len(client.buffer) >= client.need if client.need
                    else head_complete(window) or len(client.buffer) > self.max_head
                    or self._first_line_refused(client, previous, data)):
                # Still registered: see release (a thread) and give_back (back from a relay).
                self._waiting.pop(id(client), None)
                client.busy = True
                self._handoff(client)
                return
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return

    def _first_line_refused(self, client: WaitingClient, previous: int, data: bytes) -> bool:
        """The head's first line has just come, and the parser refuses it already (see ``refuses_first_line``)."""
        return (b"\n" in data and client.buffer.find(b"\n", 0, previous) < 0
                and self._refuses_first_line(bytes(client.buffer), client.addr))

    def _handshake(self, client: WaitingClient) -> bool:
        """Move a TLS client's handshake on; True once it is done (the request may follow)."""
        sock = client.sock
        context = self._ssl_context
        assert context is not None
        if not isinstance(sock, ssl.SSLSocket):
            # The first bytes, peeked: a TLS record goes to OpenSSL, plain text is answered in kind.
            try:
                first = sock.recv(16, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                first = b""
            if not first:
                self._drop(client)
                return False
            if not (looks_like_tls(first) or first == b"\x16"):
                self._refuse_other_protocol(client, "it sent plain HTTP, not TLS, to this HTTPS port: use https://",
                                            "The plain HTTP request was sent to an HTTPS port: use https://")
                return False
            self._unregister(sock)
            try:
                client.sock = sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                self._selector.register(sock, selectors.EVENT_READ, client)  # (client.watched stays True)
            except (OSError, ValueError):
                self._drop(client)
                return False
        try:
            sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client.peer, exc)
            self._drop(client)
            return False
        client.handshaking = False
        return True

    def _refuse_other_protocol(self, client: WaitingClient, done: str, fix: str) -> None:
        """The client speaks TLS to a plain port or plain HTTP to a TLS one: answer in plain HTTP/1.1 and close.

        Its text names the fix; its status line tells a backend that dialled the wrong port (TLS or not).
        """
        sock = client.sock
        log.info("Connection from %s refused: %s; a backend dials the router's --tunnels port, not --http",
                 peer_name(sock), done)
        body = f"{fix} (a backend dials the router's --tunnels port, not --http).\n".encode()
        try:
            sock.send(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self._drop(client, graceful=True)

    def _take_returned(self, closing: bool = False) -> None:
        if not self._returned:
            return
        with self._lock:
            returned, self._returned = self._returned, collections.deque()
            self._wake_pending = False
        now = time.monotonic()
        for client, keep in returned:
            if not keep or closing:
                self._drop(client, graceful=True)
                continue
            try:
                if client.sock.gettimeout() != 0.0:  # a thread made it blocking
                    client.sock.setblocking(False)
            except OSError:
                self._drop(client)
                continue
            client.started = bool(client.buffer)
            client.deadline = now + (self.header_timeout if client.started else self.keepalive)
            if head_complete(client.buffer):
                client.busy = True
                self._handoff(client)  # pipelined: here already
            else:
                self._wait(client)
                if isinstance(client.sock, ssl.SSLSocket) and client.sock.pending() and client.watched:
                    self._on_readable(client)  # bytes OpenSSL holds already: the selector would not say so

    def _sweep(self, now: float) -> None:
        """Close the connections whose head or keep-alive time is up."""
        for client in list(self._waiting.values()):
            if client.deadline <= now:
                if client.need:
                    log.info("Closing connection from %s: %s: request body not complete in time (%d of %d bytes)",
                             client.peer, client.what, client.received_body,
                             client.body_length)
                elif client.started:
                    log.info("Closing connection from %s: request head not received within %gs", client.peer,
                             self.header_timeout)
                self._drop(client)

    def _shed_one(self, why: str) -> bool:
        """Close the connection that has waited longest, idle ones first; False when none waits.

        Logs at most once a second, with how many were closed or refused since.
        """
        victim = next((c for c in self._waiting.values() if not c.started), None)
        if victim is None:
            victim = next(iter(self._waiting.values()), None)
        if victim is not None:
            self._drop(victim)
        self._shed += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= 1.0:
            log.warning("Shedding client connections (%s): %d closed or refused to make room", why, self._shed)
            self._shed_logged_at = now
            self._shed = 0
        return victim is not None

    def _drop(self, client: WaitingClient, graceful: bool = False) -> None:
        """Close a connection; ``graceful``: FIN first, then what it still sends is read and discarded for a
        while (:meth:`_linger`), so that no RST cuts a response the client has not read yet."""
        self._unwait(client)
        sock = client.sock
        if graceful and not client.lingering and self._linger(client):
            return
        try:
            sock.close()
        except OSError:
            pass
        self._forget(client)

    def _linger(self, client: WaitingClient) -> bool:
        """Send FIN and wait, reading and discarding, until the client closes too or ``_LINGER_SECONDS``
        passed (:meth:`_sweep`); False when it has closed already.

        Closing a socket with unread input resets the connection, and a reset
        can destroy the end of the response at the client before it read it
        (a client still uploading a body the response did not wait for).
        Such a connection costs its socket meanwhile, and goes first when
        connections are shed. (A TLS socket stops using OpenSSL as it shuts
        down: what its client still sends is dropped as raw records.)
        """
        sock = client.sock
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        client.lingering = True
        if not self._discard(client):
            return False
        client.started = False
        client.need = 0
        client.buffer = bytearray()
        client.deadline = time.monotonic() + _LINGER_SECONDS
        self._wait(client)  # (which closes it, if it cannot be watched)
        return True

    def _discard(self, client: WaitingClient) -> bool:
        """Read and drop what a lingering client sent (``_LINGER_READ`` at most); False once it closed."""
        taken = 0
        while taken < _LINGER_READ:
            try:
                data = client.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            taken += len(data)
        return True

    def _forget(self, client: WaitingClient) -> None:
        with self._lock:
            self.connections -= 1

    @property
    def waiting(self) -> int:
        """Connections waiting for a request (idle or with a partial head)."""
        return len(self._waiting)
