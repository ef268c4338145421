"""The blocking HTTP/2 connection engine that serves both tunnel roles: :class:`Connection`.

A :class:`Connection` owns one socket and one ``h2`` state machine. The router
uses it as the HTTP/2 client, the backend as the HTTP/2 server.

Theory of operation
-------------------

Threads. Exactly one *reader* per connection calls ``recv``; it feeds the
bytes to h2 under the connection lock and dispatches the resulting events to
their :class:`~ptth_sync.engine.stream.Stream` (:mod:`~ptth_sync.engine.reader`,
:mod:`~ptth_sync.engine.events`). The reader is a thread of the connection's
own, or the caller's event loop (``start(read_in_thread=False)``, then
:meth:`Connection.read_available` when the socket is readable). Any number
of *user* threads (router request threads, backend pool threads) open
streams, send and read through :class:`~ptth_sync.engine.stream.Stream`
methods (:mod:`~ptth_sync.engine.streamops`).
One *writer* thread sends the bytes the reader produced (window updates,
SETTINGS and PING acknowledgements) that the socket did not take at once; the
caller's event loop may do that instead (``start(on_unsent=...)``).

The lock. ``self._lock`` guards the h2 object, the stream table and every
stream's buffers, and it is never held across socket I/O
(:class:`~ptth_sync.engine.state.ConnectionState` says why).

Write order. HPACK state makes wire order matter: the bytes h2 produces go to
an ordered outbox while the lock is still held, and one thread at a time
sends it; the reader never waits for a write (:mod:`~ptth_sync.engine.outbox`).

Flow control. A sender waits until h2 reports a positive window; a receiver
acknowledges DATA only when its consumer takes it, so a slow consumer slows
the producer (:mod:`~ptth_sync.engine.streamops`). The connection-level window
is opened to the maximum at start: per-stream windows bound the buffering,
and one slow stream cannot starve the others.

Death. When the connection fails, for whatever reason, every waiting thread is
woken at once with :class:`~ptth_sync.errors.ConnectionClosed`; the reader
closes the socket and calls ``on_close`` exactly once.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import h2.exceptions
import hyperframe.frame
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from ..errors import ConnectionClosed, StreamTimeout
from ..sockets import peer_name, shutdown
from ..waiting import WaitQueue
from .allocator import _tune_allocator
from .h2compat import _H2Configuration, _H2Connection
from .limits import AbuseLimits
from .outbox import Outbox
from .reader import ReaderLoop
from .settings import _DEFAULT_WINDOW, _MAX_WINDOW, HTTP1_PROBE, ConnectionSettings
from .stream import Header, Stream

__all__ = ["Connection", "ConnectionSettings", "Header", "Stream"]


class Connection(ReaderLoop):
    """A blocking HTTP/2 connection over a socket, for the client or the server role.

    ``on_ready(conn)`` runs (on the reader thread) once the peer's first
    SETTINGS arrived; ``on_request(stream)`` (server role) for each new
    request; ``on_close(conn, reason)`` exactly once when the connection is
    gone. Callbacks must not block.

    The methods here are the public API and the life cycle; the internals
    are in the layers this class builds on (:mod:`~ptth_sync.engine.state`).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        client_side: bool,
        settings: ConnectionSettings = ConnectionSettings(),
        on_ready: Optional[Callable[[Connection], None]] = None,
        on_request: Optional[Callable[[Stream], None]] = None,
        on_close: Optional[Callable[[Connection, str], None]] = None,
        on_goaway_notice: Optional[Callable[[Connection], None]] = None,
        name: str = "",
        initial_data: bytes = b"",
    ) -> None:
        self.sock = sock
        #: A TLS channel's read that never waits for the network (see ReaderLoop._receive_available); None: a socket.
        self._tls_receive: Optional[Callable[[int], bytes]] = getattr(sock, "recv_if_ready", None)
        self._initial_data = initial_data
        self.client_side = client_side
        self.settings = settings
        self.name = name or peer_name(sock)
        self._on_ready = on_ready
        self._on_request = on_request
        self._on_close = on_close
        self._on_goaway_notice = on_goaway_notice
        # Outbound checks are ours: both roles send header blocks they built
        # themselves, lower-cased and without connection-specific headers
        # (ptth_sync.headers), which saves h2 a second pass per request.
        # Inbound checks stay on for the server role: a request may come from
        # anything. The client role (the router) checks each response once
        # itself as it turns it into HTTP/1.1 (headers.response_status and
        # response_headers), and h2's pass over it would be a second one.
        config = _H2Configuration(
            header_list_limit=self.settings.max_header_list_size,
            decoded_header_list_bound=self.settings.max_header_block,
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=not client_side,
            normalize_inbound_headers=not client_side,
        )
        self._h2 = _H2Connection(config)
        _tune_allocator()
        self._lock = threading.Lock()
        self._outbox = Outbox(sock, self._lock, self._h2.take_output, self._fail)
        self._capacity_waiting = WaitQueue()  # open_stream at the stream limit, drain
        # Stream slots freed by the last batch: wake that many waiters, not all
        # of them (hundreds of threads may wait for a tunnel's few slots);
        # None wakes every one (the limit itself changed).
        self._slots_freed: Optional[int] = 0
        self._streams: Dict[int, Stream] = {}
        self._error: Optional[ConnectionClosed] = None
        self._ready = threading.Event()
        #: The connection became ready at some point: the peer's SETTINGS arrived and did not come with
        #: its end (it stays True once the connection is dead, unlike :attr:`ready`).
        self.was_ready = False
        self._closed = threading.Event()
        self._draining = False
        self._pending_drain_ack = False
        self._started_at = time.monotonic()
        self._last_received = self._started_at
        self._ping_sent_at: Optional[float] = None
        self._limits = AbuseLimits(settings, now=self._started_at)
        self.close_reason: Optional[str] = None
        #: The peer's first bytes (at most 256) and its GOAWAY's (error code, debug data), once received.
        self.first_bytes = b""
        self.goaway_received: Optional[Tuple[int, bytes]] = None
        #: Server role: the client announced it is going away (GOAWAY with NO_ERROR; its debug data) while
        #: the streams in flight go on: it opens no more (see :meth:`leave`).
        self.goaway_notice: Optional[bytes] = None
        self._leaving = False  # client role: leave() was called
        self._reader: Optional[threading.Thread] = None
        self._writer: Optional[threading.Thread] = None
        self._started = False
        self._prepared = False

    # -- life cycle --------------------------------------------------------

    def start(
        self,
        initial_data: bytes = b"",
        read_in_thread: bool = True,
        on_unsent: Optional[Callable[[], None]] = None,
    ) -> None:
        """Send our preface and settings and start the reader and writer threads.

        ``initial_data``: more bytes already read from the socket (after :meth:`prepare`).
        With ``read_in_thread`` False no reader thread starts: the caller's
        own loop reads instead (:meth:`read_available`), for a plain socket or
        a :class:`~ptth_sync.tls.TLSChannel`.
        With ``on_unsent`` no writer thread starts either: bytes the socket did
        not take at once wait for the caller's loop, which ``on_unsent()`` tells
        (from any thread) and which then calls :meth:`send_queued` once the
        socket is writable.
        """
        self._initial_data += initial_data
        self.prepare()
        self._started = True
        if on_unsent is None:
            self._start_writer()
        else:
            self._outbox.on_unsent = on_unsent
        if read_in_thread:
            self.read_in_thread()
        self._outbox.send_without_blocking()

    def read_in_thread(self) -> None:
        """Start the reader thread (and the writer thread, if the caller's loop sent instead); for a
        connection the caller's loop read, once that loop stops reading it."""
        if self._writer is None:
            with self._lock:
                self._outbox.on_unsent = None
            self._start_writer()
        self._reader = threading.Thread(target=self._read_loop, name=f"ptth-reader {self.name}", daemon=True)
        self._reader.start()

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._outbox.write_loop, name=f"ptth-writer {self.name}", daemon=True)
        self._writer.start()
        self._outbox.kick()

    @property
    def unsent(self) -> bool:
        """Bytes are queued that the socket has not taken yet (or, over TLS, encrypted and waiting for room)."""
        return self._outbox.unsent

    # -- reading from the caller's loop (started with read_in_thread=False) --

    def read_available(self) -> Optional[str]:
        """The socket is readable: take in what it holds, without blocking, and act on it.

        Returns None, or the reason the connection ended: the caller then
        stops watching the socket and calls :meth:`end_reading` with it.
        Listeners and callbacks run on the caller's thread, as on a reader's.
        """
        return self._receive_available()

    def next_timer(self) -> Optional[float]:
        """When :meth:`run_timers` has something to do next (``time.monotonic()`` time); None: never."""
        return self._timer_due()

    def run_timers(self) -> Optional[str]:
        """Act on a due timer (PING the peer, or give up on it); the reason the connection ended, if it did."""
        due = self._timer_due()
        if due is None or due > time.monotonic():
            return None
        return self._on_quiet()

    def end_reading(self, reason: str) -> None:
        """The caller's loop is done with this connection's socket: close it, and call ``on_close``."""
        self._end_reading(reason, final_send_may_block=False)

    def prepare(self) -> None:
        """Queue our preface and settings, with no thread yet; :meth:`start` does it if not done.

        :meth:`send_prepared` then sends what the socket takes at once: a
        router can greet a silent peer without spending threads on it.
        """
        if self._prepared:
            return
        self._prepared = True
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # Defensive: not a TCP socket (a socketpair in tests)
            pass
        s = self.settings
        local = {
            SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
        }
        if self.client_side:
            local[SettingCodes.ENABLE_PUSH] = 0
        elif s.enable_connect_protocol:
            local[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        with self._lock:
            self._h2.initiate_connection()
            self._h2.update_settings(local)
            if s.http1_probe and not self.client_side:
                self._h2.ping(HTTP1_PROBE)
            # Before the peer's ACK of these settings, as h2 would only then: see accept_frames_up_to.
            self._h2.accept_frames_up_to(s.max_frame_size)
            self._h2.increment_flow_control_window(_MAX_WINDOW - _DEFAULT_WINDOW)
            self._outbox.queue_output()

    def send_prepared(self) -> None:
        """Before :meth:`start`: send what is queued as far as the socket takes it without blocking."""
        self._outbox.send_without_blocking()

    @property
    def started(self) -> bool:
        """True once :meth:`start` ran (its reader and writer are threads, or the caller's loop)."""
        return self._started

    @property
    def alive(self) -> bool:
        """True until the connection has failed or been closed."""
        return self._error is None

    @property
    def ready(self) -> bool:
        """True once the peer's SETTINGS arrived and the connection is alive."""
        return self._ready.is_set() and self._error is None

    @property
    def accepting_streams(self) -> bool:
        """Client role: alive, ready, and the peer has not announced a drain."""
        return self.ready and self._h2.remote_settings.max_concurrent_streams > 0

    @property
    def peer_enables_connect_protocol(self) -> bool:
        """Client role: the peer announced SETTINGS_ENABLE_CONNECT_PROTOCOL (it takes WebSockets, RFC 8441)."""
        return self._h2.remote_settings.enable_connect_protocol == 1

    @property
    def peer_max_header_list_size(self) -> Optional[int]:
        """The largest header block the peer accepts (RFC 9113 size: names + values + 32 each)."""
        return self._h2.remote_settings.max_header_list_size

    @property
    def active_streams(self) -> int:
        """Streams this side still tracks."""
        return len(self._streams)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Block until the peer's SETTINGS arrived; False on timeout or death."""
        self._ready.wait(timeout)
        return self.ready

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the connection is fully closed (reader finished)."""
        return self._closed.wait(timeout)

    def close(self, reason: str = "closed", error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY, fail every stream still open and close the socket."""
        with self._lock:
            if self._error is not None:
                return
            try:
                self._h2.close_connection(error_code=error_code)
                self._outbox.queue_output()
            except h2.exceptions.ProtocolError:
                pass
            self._fail(reason)
        self._outbox.send_final_bytes()
        shutdown(self.sock)

    def leave(self, message: str) -> None:
        """Client role: announce that this side is going away, while the streams in flight go on.

        Sends GOAWAY with NO_ERROR (RFC 9113 §6.8: the peer may finish what
        is in flight and connect again elsewhere); responses still arrive, and
        streams may still be opened until the peer announces its drain (our
        backend does at once: ``SETTINGS_MAX_CONCURRENT_STREAMS = 0``), for
        requests the caller had already taken in. Stock h2 would close its
        state on sending it, so the frame is written beside h2's output.
        :meth:`close` ends the connection as before.
        """
        with self._lock:
            if self._error is not None or self._leaving:
                return
            self._leaving = True
            frame = hyperframe.frame.GoAwayFrame(0)
            frame.error_code = ErrorCodes.NO_ERROR
            frame.additional_data = message.encode()[:200]
            self._outbox.queue_output()  # (h2's output first: wire order)
            data = frame.serialize()
            self._outbox.buffers.append(data)
            self._outbox.queued_bytes += len(data)
        self._outbox.send_without_blocking()

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Server role: refuse new streams, let open ones finish, then GOAWAY.

        Announces ``SETTINGS_MAX_CONCURRENT_STREAMS = 0`` (stock h2 cannot keep
        a connection usable after sending GOAWAY), waits until the peer has
        acknowledged it and no stream is left, then closes. Returns True when
        every stream finished before ``timeout``.
        """
        with self._lock:
            if self._error is None and not self._draining:
                self._draining = True
                self._pending_drain_ack = True
                self._h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 0})
                self._outbox.queue_output()
        self._outbox.flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = True
        with self._lock:
            while self._error is None and (self._pending_drain_ack or self._streams):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    finished = False
                    break
                self._capacity_waiting.wait(self._lock, remaining)
        self.close("drained" if finished else "drain timed out")
        return finished

    # -- client role -------------------------------------------------------

    def open_stream(
        self, headers: Sequence[Header], end_stream: bool = False, timeout: Optional[float] = None
    ) -> Stream:
        """Client role: open a stream with a request header block.

        Waits (up to ``timeout``) while the peer's concurrent-stream limit is
        reached. Raises :class:`ConnectionClosed` with ``request_sent=False``
        when the connection is dead, draining or out of stream IDs, so the
        caller may use another connection.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._stream_free_locked():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    msg = "no stream slot on the tunnel in time"
                    raise StreamTimeout(msg)
                self._capacity_waiting.wait(self._lock, remaining)
            stream = self._new_stream_locked(headers, end_stream)
            self._outbox.queue_output()
        self._outbox.flush()
        return stream

    def try_open_stream(
        self,
        headers: Sequence[Header],
        body: bytes = b"",
        listener: Optional[Callable[[Stream], None]] = None,
        send: bool = True,
        end_stream: bool = True,
    ) -> Optional[Stream]:
        """Client role, never blocking: open a stream and send a whole request, if it fits now.

        ``listener`` becomes the stream's :attr:`~Stream.listener` before the
        peer can answer. With ``send`` False the request is only queued: the
        caller sends it (with others) by calling :meth:`send_queued`. With
        ``end_stream`` False (and no ``body``) only the headers go: the caller
        sends the body with :meth:`Stream.try_send`.
        Returns None, having sent nothing, when the peer's concurrent-stream
        limit is reached or ``body`` exceeds the send window. Raises
        :class:`ConnectionClosed` (``request_sent=False``) when the connection
        is dead, draining or out of stream IDs. Bytes the socket does not take
        at once are left to the writer thread.
        """
        h2conn = self._h2
        total = len(body)
        with self._lock:
            if not self._stream_free_locked():
                return None
            if total and total > min(h2conn.remote_settings.initial_window_size, h2conn.outbound_flow_control_window):
                return None
            stream = self._new_stream_locked(headers, end_stream and not total)
            stream.listener = listener
            if total:
                self._send_data_locked(stream.id, body, end_stream)
                stream._local_ended = end_stream
            self._outbox.queue_output()
        if send:
            self._outbox.send_without_blocking()
        return stream

    def send_queued(self) -> None:
        """Send what is queued, without blocking: the socket takes what it can, the writer thread the rest."""
        self._outbox.send_without_blocking()

    def __repr__(self) -> str:
        role = "client" if self.client_side else "server"
        state = "alive" if self.alive else f"closed: {self._error.reason if self._error else ''}"
        return f"<Connection {role} {self.name} {state} streams={len(self._streams)}>"
