"""WebSockets through the router: ``Upgrade: websocket`` carried as an RFC 8441 extended CONNECT stream.

A client's ``GET`` with ``Upgrade: websocket`` becomes, on a tunnel whose
backend announced ``SETTINGS_ENABLE_CONNECT_PROTOCOL``, a stream opened with
``:method CONNECT`` and ``:protocol websocket`` (RFC 8441 §5): the request's
``:scheme``, ``:path`` and ``:authority``, its ``Sec-WebSocket-*`` headers and
the router's ``X-Forwarded-*``. A ``2xx`` answer gets the client ``101
Switching Protocols`` with the ``Sec-WebSocket-Accept`` of its key; anything
else is passed on as an ordinary response. A tunnel that did not announce
the setting (the Go seed's backend, say) gets no such stream: the client
gets ``501`` and the tunnel carries on.

Opening and relaying
--------------------

The opening is served like a request whose body streams: on a thread, for at
most ``--timeout`` (:func:`proxy_websocket`, from :meth:`Router.__call__
<ptth_sync.router.Router.__call__>`), by a server that offers to take the
connection over: its environ holds :data:`WEBSOCKET`, and the router puts the
accepted WebSocket there. Once the ``101`` is written, the server hands the
client's socket to a :class:`WebSocketRelay`, which holds no thread: the
router's worker watches the socket in its selector
(:class:`~ptth_sync.router.front.ClientFront`), the tunnel's reader thread
calls the relay as the backend's bytes arrive. A server with a thread per
connection runs the same relay on that thread (:func:`relay_on_this_thread`).

What it guards, as :mod:`~ptth_sync.router.relay` does for responses:

- both ways, bytes are buffered once at most: what the client has not taken
  holds the stream's flow-control credit (the backend waits), and the client
  is read only as far as the stream's send window allows (the client waits);
- an end on one side ends the other: the backend's END_STREAM is a FIN to the
  client once it has taken everything, the client's FIN an END_STREAM; a
  reset stream, a tunnel that dies or a client that resets its connection
  ends both at once (RST_STREAM, a closed socket);
- a WebSocket with no byte either way for ``websocket_idle_timeout`` seconds
  is closed, as one still open at the end of a drain: the client gets a
  ``1001 Going Away`` Close frame (between two of the backend's frames) and
  the end of the connection, the backend a reset stream;
- ``--max-body-size`` does not apply: the bytes of a WebSocket are no body.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

from h2.errors import ErrorCodes

from ..engine import Connection, Stream
from ..errors import ConnectionClosed, StreamReset, StreamTimeout
from ..headers import InvalidHeader, header_list_size, response_headers, response_status
from ..sockets import recv_without_blocking, send_without_blocking, unsent
from ..websocket import GOING_AWAY, FrameTracker, accept_value, close_frame, credit_batch, valid_key
from .app import _error, _ResponseBody, _retryable
from .checks import CLOSE_CONNECTION, Refusal
from .front import SocketWatcher

if TYPE_CHECKING:
    from .app import Router, StartResponse, _Prepared

__all__ = [
    "WEBSOCKET",
    "AcceptedWebSocket",
    "WebSocketRelay",
    "is_websocket_request",
    "proxy_websocket",
    "relay_on_this_thread",
]

log = logging.getLogger("ptth_sync.router")

#: The environ key by which a server offers to relay WebSockets: present (None) when it can take a
#: connection over; the router sets it to the :class:`AcceptedWebSocket` once it answered ``101``.
WEBSOCKET = "ptth_sync.websocket"

#: After the backend ended its side, how long the client has to end its own (seconds; as long as
#: gunicorn lingers on a connection it closes).
CLOSE_TIMEOUT = 2.0
#: Bytes read from a client at a time.
_READ_CHUNK = 256 * 1024
_DROP_RESPONSE_HEADERS = frozenset({"content-length", "sec-websocket-accept"})


def is_websocket_request(environ: Dict[str, Any]) -> bool:
    """True for a WebSocket opening handshake: ``GET`` with ``Upgrade: websocket`` and ``Connection: upgrade``."""
    upgrade = environ.get("HTTP_UPGRADE")
    if upgrade is None or environ.get("REQUEST_METHOD") != "GET":
        return False
    if "websocket" not in (token.strip().lower() for token in upgrade.split(",")):
        return False
    return "upgrade" in (token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(","))


def check_websocket(environ: Dict[str, Any]) -> Optional[Refusal]:
    """A refusal for an opening handshake the router must not forward (RFC 6455 §4.1, §4.4), else None."""
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return Refusal(400, "Bad Request", "a WebSocket opens with an HTTP/1.1 request", [], True)
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return Refusal(426, "Upgrade Required", "the router speaks WebSocket version 13",
                       [("Sec-WebSocket-Version", "13")], False)
    if not valid_key(environ.get("HTTP_SEC_WEBSOCKET_KEY", "")):
        return Refusal(400, "Bad Request", "missing or invalid Sec-WebSocket-Key", [], True)
    if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or "HTTP_TRANSFER_ENCODING" in environ:
        return Refusal(400, "Bad Request", "a WebSocket opening handshake has no body", [], True)
    return None


def connect_headers(block: List[Tuple[bytes, bytes]]) -> List[Tuple[bytes, bytes]]:
    """The extended CONNECT (RFC 8441 §5) for a ``GET`` header block from ``request_headers``."""
    headers = [(b":method", b"CONNECT"), (b":protocol", b"websocket")]
    for name, value in block:
        if name != b":method" and name != b"content-length":
            headers.append((name, value))
    return headers


class AcceptedWebSocket:
    """A WebSocket the backend accepted: its stream, for the server to relay once the ``101`` is written."""

    __slots__ = ("router", "started", "stream", "target", "tunnel")

    def __init__(self, router: Router, stream: Stream, tunnel: Connection, target: str, started: float) -> None:
        self.router = router
        self.stream = stream
        self.tunnel = tunnel
        self.target = target
        self.started = started


def proxy_websocket(router: Router, environ: Dict[str, Any], start_response: StartResponse,
                    prepared: _Prepared) -> Iterable[bytes]:
    """Open a WebSocket on a tunnel (see the module's docstring); the router's answer, or the backend's."""
    target = prepared.target
    refusal = check_websocket(environ)
    if refusal is None and WEBSOCKET not in environ:
        refusal = Refusal(501, "Not Implemented", "this HTTP server cannot relay WebSockets: serve the router with "
                          "python -m ptth_sync.router", [], False)
    if refusal is not None:
        log.info("GET %s: %d, %s", target, refusal.code, refusal.detail)
        return _refuse(router, environ, start_response, refusal)
    headers = connect_headers(prepared.headers)
    tried: List[Connection] = []  # failed before the answer, provably unseen by the backend
    without: List[Connection] = []  # did not announce SETTINGS_ENABLE_CONNECT_PROTOCOL
    started: Optional[float] = None
    while True:
        first = not tried and not without
        tunnel = router.pool.choose(exclude=tried + without, wait=router.tunnel_wait_now() if first else 0.0,
                                    origin=prepared.origin)
        if tunnel is None:
            if tried:
                return router._reply_error(start_response, 502, "Bad Gateway",
                                           "the tunnel failed before the response", started)
            if without:
                log.info("GET %s: 501, no backend takes WebSockets", target)
                return _refuse(router, environ, start_response, Refusal(
                    501, "Not Implemented", "the backend does not take WebSockets: its tunnel did not announce "
                    "SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441)", [], False))
            return router._reply_error(start_response, 503, "Service Unavailable", "no tunnel is connected")
        if not tunnel.peer_enables_connect_protocol:
            without.append(tunnel)
            continue
        limit = tunnel.peer_max_header_list_size
        if limit is not None and header_list_size(headers) > limit:
            return router._reply_error(start_response, 431, "Request Header Fields Too Large",
                                       f"the request's headers exceed the backend's limit of {limit} bytes")
        if started is None:
            started = time.monotonic()
        try:
            stream = tunnel.open_stream(headers, timeout=router.timeout)
        except StreamTimeout:
            return router.no_stream_free(start_response, "GET", target)
        except ConnectionClosed as exc:
            if _retryable(exc) and not tried:
                tried.append(tunnel)
                continue
            return router._reply_error(start_response, 502, "Bad Gateway", "the tunnel failed before the response",
                                       started)
        try:
            answer = stream.wait_headers(router.timeout)
        except StreamTimeout:
            stream.close()
            return router._gateway_timeout(start_response, "GET", target, tunnel, started)
        except (ConnectionClosed, StreamReset) as exc:
            stream.close()
            if _retryable(exc) and not tried:
                log.info("GET %s: retrying the WebSocket on another tunnel (%s)", target, exc)
                tried.append(tunnel)
                continue
            log.warning("GET %s: tunnel %s failed before the WebSocket's answer: %s", target, tunnel.name, exc)
            return router._reply_error(start_response, 502, "Bad Gateway", "the tunnel failed before the response",
                                       started)
        break
    try:
        code, status = response_status(answer)
        wsgi_headers = response_headers(answer)
    except InvalidHeader as exc:
        log.warning("GET %s: 502, tunnel %s sent a malformed response: %s", target, tunnel.name, exc)
        stream.close(ErrorCodes.PROTOCOL_ERROR)
        return router._reply_error(start_response, 502, "Bad Gateway", "the backend sent an invalid response", started)
    if not 200 <= code < 300:  # refused: an ordinary response
        start_response(status, wsgi_headers)
        if code in (204, 304):
            stream.close()
            router.metrics.request_done(code, started, 0, 0, tunnel)
            return []
        return _ResponseBody(stream, prepared.body, router.timeout, router.metrics, code, started, tunnel,
                             f"GET {target}")
    start_response("101 Switching Protocols", [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_value(environ["HTTP_SEC_WEBSOCKET_KEY"])),
        *((name, value) for name, value in wsgi_headers if name not in _DROP_RESPONSE_HEADERS),
    ])
    router.metrics.request_done(101, started, 0, 0, tunnel)
    environ[WEBSOCKET] = AcceptedWebSocket(router, stream, tunnel, target, started)
    return []


def _refuse(router: Router, environ: Dict[str, Any], start_response: StartResponse, refusal: Refusal) -> List[bytes]:
    if refusal.close:
        environ[CLOSE_CONNECTION] = True
    router.metrics.request_done(refusal.code, None, 0)
    return _error(start_response, refusal.code, refusal.phrase, refusal.detail, refusal.headers)


class WebSocketRelay(SocketWatcher):
    """An open WebSocket: the client's socket and the backend's stream, relayed both ways without a thread.

    The host watches the socket for :meth:`interest` and calls
    :meth:`on_events`; it provides ``want_events(relay)`` (the interest
    changed, from any thread) and ``websocket_closed(relay)`` (the relay is
    over: the host closes the socket). :meth:`check` now and then applies the
    idle timeout. One lock orders the host's thread and the tunnel's reader.
    """

    def __init__(self, accepted: AcceptedWebSocket, sock: Any, early: bytes, host: Any, client: Any = None) -> None:
        self.accepted = accepted
        self.stream = accepted.stream
        self.sock = sock
        self.host = host
        #: The host's record of the connection (the router worker's WaitingClient).
        self.client = client
        self.lock = threading.Lock()
        self.done = False
        self.idle_timeout = accepted.router.websocket_idle_timeout
        self._tls = isinstance(sock, ssl.SSLSocket)
        self.peer = _peer(sock)
        self._down: List[Any] = []  # the backend's bytes, for the client
        self._uncredited = 0  # of those, taken from the stream, credit not yet returned
        self._credit_batch = credit_batch(self.stream)
        self._up = early  # the client's bytes, for the backend
        self._up_blocked = False  # waiting for the stream's send window
        self._discarding = False  # the backend takes nothing more: the client's bytes are dropped
        self._client_ended = False
        self._backend_ended = False
        self._fin_sent = False  # the backend's end passed on to the client
        self._tracker = FrameTracker()  # the backend's frames, for a Close frame of our own
        self._wanted = 0  # the interest the host last heard of
        self._reported = False  # the host heard of the end
        self.to_backend = 0
        self.to_client = 0
        self.deadline = 0.0
        self._progressed()

    # -- events -----------------------------------------------------------------

    def start(self) -> None:
        """Begin relaying (the ``101`` is out): the stream's news reaches the relay from now on."""
        self.accepted.router.metrics.websocket_opened()
        with self.lock:
            self.stream.listener = self.on_stream
            self._from_backend()
            if not self.done:
                self._to_backend()
            self._settle()
            news = self._news()
        self._tell(news)

    def on_stream(self, stream: Stream) -> None:
        """The tunnel's reader: the backend sent bytes, ended, or gave window; or the stream failed."""
        with self.lock:
            if self.done:
                return
            self._from_backend()
            if not self.done and (self._up_blocked or (self._discarding and self._up)):
                self._up_blocked = False
                self._to_backend()
            self._settle()
            news = self._news()
        self._tell(news)

    def interest(self) -> int:
        events = 0
        if not self.done:
            if self._down:
                events |= selectors.EVENT_WRITE
            if not self._client_ended and not self._up and not self._up_blocked:
                events |= selectors.EVENT_READ
        return events

    def on_events(self, events: int) -> None:
        """The host: the client's socket has room, or bytes."""
        with self.lock:
            if self.done:
                return
            if events & selectors.EVENT_WRITE:
                self._flush()
            if events & selectors.EVENT_READ and not self.done:
                self._to_backend()
            self._settle()
            self._wanted = self.interest()  # (the host follows it after this call)
            news = self._news() if self.done else None
        self._tell(news)

    def check(self, now: float) -> None:
        """The host, now and then: close a WebSocket idle for ``idle_timeout`` seconds."""
        if now < self.deadline:
            return
        with self.lock:
            if self.done or now < self.deadline:
                return
            if self._fin_sent:
                log.info("Closing WebSocket %s from %s: it did not close within %gs of the backend's end",
                         self.accepted.target, self.peer, CLOSE_TIMEOUT)
                self._abort(ErrorCodes.CANCEL)
            else:
                log.info("Closing WebSocket %s from %s: nothing sent either way for %gs", self.accepted.target,
                         self.peer, self.idle_timeout)
                self._going_away("idle timeout")
            news = self._news()
        self._tell(news)

    def going_away(self, reason: str = "server going away") -> None:
        """Close the WebSocket from the router (a drain): ``1001 Going Away`` to the client, a reset to the backend."""
        with self.lock:
            if self.done:
                return
            self._going_away(reason)
            news = self._news()
        self._tell(news)

    # -- internals (lock held) --------------------------------------------------------

    def _from_backend(self) -> None:
        stream = self.stream
        try:
            pieces, ended = stream.take_received()
        except Exception as exc:  # the stream was reset, or its tunnel failed
            log.info("WebSocket %s from %s cut: %s", self.accepted.target, self.peer, exc)
            self._abort(None)
            return
        for piece in pieces:
            self._down.append(piece)
            self._uncredited += len(piece)
            self._tracker.feed(piece)
            self.to_client += len(piece)
        if ended and not self._backend_ended:
            self._backend_ended = True
        if self._backend_ended and not self._discarding and stream.cancelled:
            self._discarding = True  # ended, then reset: what the client still sends goes nowhere
        if pieces or ended:
            self._flush()

    def _flush(self) -> None:
        """Send the client what the backend sent, without blocking; its credit goes back once it is out."""
        down = self._down
        sock = self.sock
        while down:
            try:
                sent = send_without_blocking(sock, down)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except OSError as exc:
                self._client_failed(exc)
                return
            self._progressed()
            down[:] = unsent(down, sent)
        if self._uncredited >= self._credit_batch or (self._uncredited and self._backend_ended):
            credit, self._uncredited = self._uncredited, 0
            self.stream.acknowledge(credit)
        if self._backend_ended and not self._fin_sent:
            self._fin_sent = True
            self.deadline = min(self.deadline, time.monotonic() + CLOSE_TIMEOUT)
            if self._tls:  # (a TLS socket cannot half-close: the end is the end)
                self._client_ended = True
            else:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self._client_ended = True

    def _to_backend(self) -> None:
        """Pass the client's bytes on as far as the stream's send window allows, without blocking."""
        stream = self.stream
        while True:
            if self._up:
                if self._discarding:
                    self._up = b""
                else:
                    try:
                        sent = stream.try_send(self._up)
                    except Exception:
                        if not self._backend_ended:
                            self._abort(None)  # (the stream failed: its listener says why)
                            return
                        self._discarding = True
                        continue
                    self.to_backend += sent
                    self._up = self._up[sent:]
                    if self._up:
                        self._up_blocked = True  # on_stream resumes once the window opens
                        return
            if self._client_ended:
                return
            window = _READ_CHUNK if self._discarding else stream.send_window()
            if window <= 0:
                self._up_blocked = True
                return
            data = self._recv(min(window, _READ_CHUNK))
            if data is None:
                return
            if not data:
                self._client_ended = True
                if not self._discarding and not stream.local_ended:
                    try:
                        stream.try_send(b"", end_stream=True)
                    except Exception:
                        pass
                return
            self._progressed()
            self._up = data

    def _recv(self, size: int) -> Optional[bytes]:
        """Bytes from the client; b"" at its end; None when none are there now."""
        try:
            data = recv_without_blocking(self.sock, size)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except OSError as exc:
            self._client_failed(exc)
            return None
        return data

    def _client_failed(self, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
            log.info("WebSocket %s from %s: %s", self.accepted.target, self.peer, exc)
        self._abort(ErrorCodes.CANCEL)

    def _going_away(self, reason: str) -> None:
        tracker = self._tracker
        if not self._fin_sent and tracker.at_boundary and not tracker.close_sent:
            frame = close_frame(GOING_AWAY, reason)
            self._down.append(frame)
            tracker.feed(frame)
        self._backend_ended = self._discarding = True
        self._up = b""
        self._up_blocked = False
        self.stream.reset(ErrorCodes.CANCEL)
        self._flush()
        self._settle()

    def _settle(self) -> None:
        """The relay is over once both sides ended and the client has everything."""
        if not self.done and self._client_ended and self._backend_ended and not self._down:
            self._finish()

    def _progressed(self) -> None:
        if not self._fin_sent:
            self.deadline = time.monotonic() + (self.idle_timeout or 1e9)

    def _finish(self) -> None:
        self.done = True
        self.stream.listener = None
        self.stream.close()  # both ended: nothing to reset, unless the backend's side is still open
        self._closed()

    def _abort(self, error_code: Optional[int]) -> None:
        """End both sides at once: the stream is reset (``error_code``, unless it failed), the socket shut."""
        self.done = True
        self._down = []
        self.stream.listener = None
        self.stream.close(ErrorCodes.CANCEL if error_code is None else error_code)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._closed()

    def _closed(self) -> None:
        self.accepted.router.metrics.websocket_closed(self.to_backend, self.to_client)
        log.debug("WebSocket %s from %s closed: %d bytes in, %d out", self.accepted.target, self.peer,
                  self.to_backend, self.to_client)

    def _news(self) -> Optional[str]:
        """(Lock held.) What the host must hear of now: the end, a changed interest, or nothing."""
        if self.done:
            if self._reported:
                return None
            self._reported = True
            return "closed"
        wanted = self.interest()
        if wanted == self._wanted:
            return None
        self._wanted = wanted
        return "interest"

    def _tell(self, news: Optional[str]) -> None:
        """(No lock held.) Pass :meth:`_news` on to the host."""
        if news == "closed":
            self.host.websocket_closed(self)
        elif news == "interest":
            self.host.want_events(self)



def _peer(sock: Any) -> str:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return "?"


def relay_on_this_thread(accepted: AcceptedWebSocket, sock: Any, early: bytes = b"") -> None:
    """Relay an accepted WebSocket on the calling thread until it ends (a server with a thread per connection).

    The socket is left to the caller to close.
    """
    host = _ThisThread()
    try:
        host.run(WebSocketRelay(accepted, sock, early, host), sock)
    finally:
        host.close()


class _ThisThread:
    """The host of one :class:`WebSocketRelay` on the calling thread: a poll loop and a wake-up pipe."""

    def __init__(self) -> None:
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def want_events(self, relay: WebSocketRelay) -> None:
        try:
            os.write(self._wake_write, b"x")
        except OSError:  # the pipe is full: the loop wakes anyway
            pass

    websocket_closed = want_events

    def run(self, relay: WebSocketRelay, sock: Any) -> None:
        sock.setblocking(False)
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        relay.start()
        while not relay.done:
            events = relay.interest()
            mask = (select.POLLIN if events & selectors.EVENT_READ else 0) | (
                select.POLLOUT if events & selectors.EVENT_WRITE else 0)
            if mask:
                poller.register(sock, mask)  # (registering again modifies)
            else:
                try:
                    poller.unregister(sock)
                except KeyError:
                    pass
            timeout = min(max(relay.deadline - time.monotonic(), 0.0), 1.0)
            for fd, event in poller.poll(timeout * 1000):
                if fd == self._wake_read:
                    try:
                        while os.read(self._wake_read, 4096):
                            pass
                    except OSError:
                        pass
                    continue
                ready = 0  # a hang-up or an error is both, as for a selector
                if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    ready |= selectors.EVENT_READ
                if event & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                    ready |= selectors.EVENT_WRITE
                relay.on_events(ready & events)
            relay.check(time.monotonic())

    def close(self) -> None:
        os.close(self._wake_read)
        os.close(self._wake_write)
