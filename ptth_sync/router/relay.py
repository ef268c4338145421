"""Proxied requests served without a thread: the front sends them, the tunnel's reader answers.

A simple request (no body, or a small one that arrived with its head) needs
no thread of its own: the thread that found its head complete (the
:class:`~ptth_sync.router.front.ClientFront` loop) parses it with gunicorn's
parser and sends it on a tunnel without blocking
(:meth:`~ptth_sync.router.Router.begin`); the tunnel's reader thread, as the
response arrives, formats it with gunicorn's response writer and sends it to
the client without blocking. A :class:`Relay` is that request's state
between the two.

What the threaded path guarded, and how it is kept here:

- a client that stops reading costs a socket and a buffer: what the client
  has not taken waits here, its flow-control credit is returned to the tunnel
  only once the client took it (so the backend is held back, and the buffer
  stays within one stream window), the client's socket waits for room in the
  front's selector, and a client that takes nothing for ``timeout`` seconds
  is closed (logged);
- a backend that does not answer in ``timeout`` seconds gets the client a
  504; one that stops mid-response aborts the client's connection;
- a response that ends badly is never passed off as complete: the client
  connection is cut;
- a client that sends its body slowly costs a socket too: its body is read
  only as the tunnel's window allows and as it arrives, a chunked one decoded
  as it arrives (:class:`~ptth_sync.router.chunked.ChunkedBody`, with
  gunicorn's own parsers), and a client that sends nothing for ``timeout``
  seconds is closed (logged);
- everything else (waiting for a tunnel, retries) goes to a thread as before.

A TLS client's socket is read and written here too, never by two threads at
once (OpenSSL's connection objects are not thread-safe): every read and write
of a relayed request holds its lock, and the front reads the socket again only
once the relay gave it back.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, List, Optional

from ..errors import StreamTimeout
from ..sockets import recv_without_blocking, send_without_blocking, unsent
from .app import UPLOAD_CHUNK, body_failure
from .checks import CLOSE_CONNECTION
from .chunked import ChunkedBody
from .front import SocketWatcher

if TYPE_CHECKING:
    from ..engine import Stream
    from .app import Proxied
    from .front import WaitingClient

__all__ = ["Relay", "ResponseSink"]

log = logging.getLogger("ptth_sync.router")

#: What a socket that cannot give bytes now raises (a TLS one: either way, as OpenSSL needs).
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError)
#: ``Relay._upload_left`` of a chunked body until its last chunk arrived.
_UNTIL_LAST_CHUNK = 1 << 62
#: What a socket that cannot take bytes now raises. (A TLS write that needs a read first would be a
#: renegotiation, which the router's TLS context refuses: an SSLWantReadError there is an error.)
_WRITE_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantWriteError)


class ResponseSink:
    """Where gunicorn's response writer puts its bytes, to be sent without blocking."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: List[Any] = []

    def sendall(self, data: Any) -> None:
        if data:
            self.parts.append(data)

    def send(self, data: Any) -> int:
        self.sendall(data)
        return len(data)

    def take(self) -> List[Any]:
        parts, self.parts = self.parts, []
        return parts


class Relay(SocketWatcher):
    """One request proxied without a thread: its client, its gunicorn objects, its stream.

    The host (the router's worker) provides ``finish(relay, keep)``,
    ``request_done(relay)``, ``retry(relay)`` and ``want_events(relay)``; see
    :meth:`on_stream`, :meth:`on_events` and :meth:`check`, which may run on
    different threads (one lock orders them).
    """

    def __init__(
        self,
        host: Any,
        client: WaitingClient,
        parser: Any,
        req: Any,
        resp: Any,
        environ: dict,
        request_start: datetime,
        timeout: float,
    ) -> None:
        self.host = host
        self.client = client
        self.parser = parser
        self.req = req
        self.resp = resp
        self.sink: ResponseSink = resp.sock
        self.environ = environ
        self.request_start = request_start
        self.timeout = timeout
        self.proxied: Optional[Proxied] = None
        #: The origin whose tunnels serve it (its line when it waits for a stream: see RouterWorker._begin_parked).
        self.origin: Optional[str] = None
        #: Orders the threads that move this request on (the front's, the tunnel reader's).
        self.lock = threading.Lock()
        self._pending: List[Any] = []  # bytes for the client not sent yet
        self._uncredited = 0  # body bytes taken from the stream whose credit is not returned
        self._responding = False  # the response headers were handled
        #: The response is complete (in ``_pending`` until it is sent).
        self.ending = False
        #: The request is over (answered, aborted, or handed to a thread).
        self.done = False
        self._upload_left = 0  # body bytes still to read from the client
        self._body_out = b""  # body bytes read, waiting for flow-control window
        self._upload_blocked = False  # waiting for window: the client is not read meanwhile
        self._end_unsent = False  # a chunked body ended: END_STREAM is still to go (with _body_out, if any)
        self._chunks: Optional[ChunkedBody] = None  # a chunked body's decoder
        #: The request body: its length, how much arrived with the head, and whether it is streamed.
        self.body_length = 0
        self.body_buffered = 0
        self.streamed = False
        self.chunked = False
        #: When the request fails for want of progress (see :meth:`check`).
        self.deadline = 0.0
        self._progressed()

    # -- events ---------------------------------------------------------------

    def on_stream(self, stream: Stream) -> None:
        """The tunnel's reader: something arrived for the stream (a response, data, window)."""
        with self.lock:
            if self.done or self.proxied is None:
                return
            if self._upload_blocked:
                self._upload_blocked = False
                self._upload()
                if self.done:
                    return
                self.host.want_events(self)
            self._advance(stream)

    def start_upload(self, initial: bytes, remaining: int) -> None:
        """(Lock held.) Stream the request body: ``initial`` (received with the head), then ``remaining`` more.

        The caller then calls ``host.want_events(relay)``.
        """
        self._body_out = initial
        self._upload_left = remaining
        self._pending += self.sink.take()  # "100 Continue", if the client asked for it
        self._flush()
        if not self.done:
            self._upload()

    def start_chunked_upload(self, received: bytes) -> None:
        """(Lock held.) Stream a chunked request body, of which ``received`` came with the head.

        The caller then calls ``host.want_events(relay)``.
        """
        self._chunks = ChunkedBody(self.req)
        self._upload_left = _UNTIL_LAST_CHUNK
        self._pending += self.sink.take()  # "100 Continue", if the client asked for it
        self._flush()
        if not self.done and (not received or self._decode(received)):
            self._upload()

    def interest(self) -> int:
        """What the client's socket is watched for: its body (when the tunnel takes it), room to write."""
        events = 0
        if not self.done:
            if self._awaiting_body:
                events |= selectors.EVENT_READ
            if self._pending:
                events |= selectors.EVENT_WRITE
        return events

    def on_events(self, events: int) -> None:
        """The front: the client's socket has room, or more of the body."""
        with self.lock:
            if self.done:
                return
            if events & selectors.EVENT_WRITE:
                self._flush()
                proxied = self.proxied
                if not self.done and self._responding and not self.ending and proxied is not None:
                    self._advance(proxied.stream)
            if events & selectors.EVENT_READ and not self.done:
                self._upload()

    def check(self, now: float) -> None:
        """The front, now and then: give up on a request that made no progress for ``timeout`` seconds."""
        if now < self.deadline or not self.timeout:
            return
        with self.lock:
            if self.done or now < self.deadline:
                return
            proxied = self.proxied
            if proxied is None:  # it waited for a stream all this time
                if self.host.unpark(self):
                    if self.streamed:  # its body was never read: the connection cannot be reused
                        self.environ[CLOSE_CONNECTION] = True
                        self.resp.force_close()
                    self.answer(self.host.wsgi.no_stream_free(self.resp.start_response, self.req.method, self.req.uri))
            elif self._awaiting_body:
                log.info("Closing connection from %s: no progress for %gs (it stopped sending its body)",
                         self.client.peer, self.timeout)
                self.abort(broken=False)
            elif not self._responding:
                self._failed(proxied, StreamTimeout("the backend did not answer in time"))
            elif self._pending:
                log.info("Closing connection from %s: no progress for %gs (it stopped reading the response)",
                         self.client.peer, self.timeout)
                self.abort(broken=False)
            else:
                log.warning("Aborted response to %s %s: the backend sent nothing for %gs", self.req.method,
                            self.req.uri, self.timeout)
                self.abort(broken=True)

    # -- internals (lock held) ------------------------------------------------------

    @property
    def _awaiting_body(self) -> bool:
        """More of the body is to come from the client, and the tunnel would take it now."""
        return bool(self._upload_left) and not self._upload_blocked and not self._body_out

    def _progressed(self) -> None:
        self.deadline = time.monotonic() + (self.timeout or 1e9)

    def _advance(self, stream: Stream) -> None:
        proxied = self.proxied
        assert proxied is not None
        router = self.host.wsgi
        if not self._responding:
            if stream.headers is None:
                try:
                    stream.take_received()  # raises the stream's error, if any
                except Exception as exc:
                    self._failed(proxied, exc)
                return
            self._responding = True
            self._progressed()
            if not self.host.alive:  # the worker stops: the client is told not to send another request
                self.resp.force_close()
            body = router.respond(proxied, self.resp.start_response)
            if body is not None:
                self.answer(body)
                return
        while True:
            try:
                pieces, ended = stream.take_received()
            except Exception as exc:
                log.warning("Aborted response to %s %s: stream %d failed mid-response: %s", self.req.method,
                            self.req.uri, stream.id, exc)
                self._send_what_arrived()
                self.abort(broken=True)
                return
            if not pieces and not ended:
                break  # (asked again after pieces: a reset that came with them is seen now, not at --timeout)
            for piece in pieces:
                self.resp.write(piece)
                self._uncredited += len(piece)
                proxied.sent += len(piece)
            if ended:
                self.resp.close()
                self.ending = True
                self._count()
                break
        self._pending += self.sink.take()
        self._flush()

    def answer(self, body: List[bytes]) -> None:
        """(Lock held.) Send a whole response whose start_response was called (the router's own, or a 502)."""
        if self.environ.get(CLOSE_CONNECTION):  # as on a thread: the client is told the connection closes
            self.resp.force_close()
        for item in body:
            self.resp.write(item)
        self.resp.close()
        self.ending = True
        self._count()
        self._pending += self.sink.take()
        self._flush()

    def _count(self) -> None:
        """The response is whole: count it and free its stream before its last bytes go out.

        (A client that has its response may look at the metrics at once.)
        """
        if self.proxied is not None:
            self.host.wsgi.finished(self.proxied)

    def _failed(self, proxied: Proxied, exc: Exception) -> None:
        """The stream failed before the response: an error page, or the request goes to a thread."""
        body = self.host.wsgi.failed(proxied, exc, self.environ, self.resp.start_response)
        if body is None:
            self.done = True
            self._unlisten()
            self.host.retry(self)
            return
        self.answer(body)

    def _flush(self) -> None:
        """Send what is pending without blocking; finish the request once all of it is out."""
        pending = self._pending
        sock = self.client.sock
        while pending:
            try:
                sent = send_without_blocking(sock, pending)
            except _WRITE_WOULD_BLOCK:
                self.host.want_events(self)
                return
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                    log.info("Closing connection from %s: %s", self.client.peer, exc)
                self.abort(broken=False)
                return
            self._progressed()
            pending[:] = unsent(pending, sent)
        if self.ending:
            self._complete()
        elif self._uncredited and self.proxied is not None:
            credit, self._uncredited = self._uncredited, 0
            self.proxied.stream.acknowledge(credit)

    def _send_what_arrived(self) -> None:
        """Before a cut: what arrived of the response goes out if the client's socket takes it now.

        The client then sees the response begin and break off, however the
        backend's frames were batched (a reset read together with the headers
        would otherwise leave it nothing at all). Never waits.
        """
        pending = self._pending + self.sink.take()
        if pending:
            try:
                send_without_blocking(self.client.sock, pending)
            except OSError:
                pass  # no room, or the client is gone: it sees the cut alone

    def _upload(self) -> None:
        """Pass the client's body on as far as the tunnel's window allows, without blocking."""
        assert self.proxied is not None
        stream = self.proxied.stream
        body = self.proxied.prepared.body
        sock = self.client.sock
        while True:
            if self._body_out or self._end_unsent:
                try:
                    sent = stream.try_send(self._body_out, end_stream=not self._upload_left)
                except Exception:  # the backend stopped the upload (an early response) or the tunnel failed
                    self._stop_upload()
                    return
                body.sent += sent
                self._body_out = self._body_out[sent:]
                if self._body_out:
                    self._upload_blocked = True  # on_stream resumes once the window opens
                    return
                self._end_unsent = False
            if not self._upload_left:
                return
            window = stream.send_window()
            if window <= 0:
                self._upload_blocked = True
                return
            try:
                data = recv_without_blocking(sock, min(window, self._upload_left, UPLOAD_CHUNK))
            except _WOULD_BLOCK:
                return  # (a TLS socket read until it would block holds nothing back from the selector)
            except OSError:
                data = b""
            if not data:
                if self._chunks is None:
                    received = body.length - self._upload_left
                    self._body_failed(f"the client sent {received} of the {body.length} bytes of its Content-Length")
                else:
                    self._body_failed(f"the client's chunked body ended early, after {body.sent} bytes of data")
                return
            self._progressed()
            if self._chunks is None:
                self._upload_left -= len(data)
                self._body_out = data
            elif not self._decode(data):
                return

    def _decode(self, data: bytes) -> bool:
        """A chunked body's bytes arrived: its data is to go out next. False when the body failed."""
        chunks = self._chunks
        assert chunks is not None
        assert self.proxied is not None
        body = self.proxied.prepared.body
        try:
            pieces = chunks.feed(data)
        except Exception as exc:  # gunicorn's parse error: the request is bad, the tunnel is fine
            self._body_failed(body_failure(exc))
            return False
        out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if body.max_size is not None and body.sent + len(out) > body.max_size:
            log.info("%s %s: 413, a chunked body over the limit of %d bytes", self.req.method, self.req.uri,
                     body.max_size)
            body.too_large = True
            self._stop_upload()
            if self._responding:
                self.abort(broken=False)
            else:
                self.answer(self.host.wsgi.client_body_too_large(self.proxied, self.environ,
                                                                 self.resp.start_response))
            return False
        self._body_out = out
        if chunks.done:
            self._upload_left = 0
            self._end_unsent = True
            if chunks.leftover:  # the client's next request: the connection gets it back (RouterWorker.finish)
                self.parser.unreader.unread(chunks.leftover)
        return True

    def _body_failed(self, failure: str) -> None:
        """The client's body ended early or is malformed: its stream is reset, it gets a 400 if it listens."""
        proxied = self.proxied
        assert proxied is not None
        self._stop_upload()
        if self._responding:
            self.abort(broken=False)
            return
        proxied.prepared.body.failure = failure
        self.answer(self.host.wsgi.client_body_failed(proxied, self.environ, self.resp.start_response))

    def _stop_upload(self) -> None:
        """No more of the body goes to the tunnel; the connection closes after the response."""
        self._upload_left = 0
        self._body_out = b""
        self._upload_blocked = False
        self._end_unsent = False
        self.environ[CLOSE_CONNECTION] = True

    def _complete(self) -> None:
        self.done = True
        # Answered before the body was all here: the connection cannot be reused.
        if self._upload_left or self._body_out or self._end_unsent:
            self._stop_upload()
        keep = not self.resp.should_close() and not self.environ.get(CLOSE_CONNECTION)
        self._log()
        self.host.finish(self, keep)

    def abort(self, broken: bool) -> None:
        """(Lock held.) End the request early: the client's connection is cut (a response never looks complete)."""
        self.done = True
        self._pending = []
        try:
            self.client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._log(broken)
        self.host.finish(self, False)

    def _log(self, broken: bool = False) -> None:
        if self.proxied is not None:
            self._unlisten()
            self.host.wsgi.finished(self.proxied, broken)
        self.host.request_done(self)

    def _unlisten(self) -> None:
        """The request is over: its stream stops calling it.

        (The stream's listener is this relay, which holds the stream: without
        this, each request's objects would wait for the garbage collector.)
        """
        assert self.proxied is not None
        self.proxied.stream.listener = None

