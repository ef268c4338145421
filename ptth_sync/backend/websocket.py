"""WebSockets on the backend: an extended CONNECT stream (RFC 8441) handed to the application as a socket.

Under gunicorn's threaded worker a WebSocket library for WSGI (simple-websocket,
and so flask-sock) takes the client's socket from ``environ["gunicorn.socket"]``,
writes the ``101 Switching Protocols`` answer on it itself and then speaks the
WebSocket protocol over it. Under the tunnel the client's connection is one
HTTP/2 stream that the router opened with ``:method CONNECT`` and ``:protocol
websocket``: the application gets a :class:`TunnelSocket` in the same place,
and a request that looks as it would under gunicorn (``GET``, ``Upgrade:
websocket``, ``Connection: Upgrade``, the ``Sec-WebSocket-*`` headers).

Theory of operation
-------------------

The answer. The first bytes the application writes are an HTTP/1.1 response
head. It is read back, not sent: ``101`` becomes the stream's ``200`` (the
router turns it into the client's ``101``, with its own
``Sec-WebSocket-Accept``), with the application's other headers (a chosen
subprotocol, extensions); any other status goes to the client as an ordinary
response. Every byte after the head travels as DATA. An application may also
accept with ``start_response("101 Switching Protocols", ...)``; one that answers
``2xx`` without accepting gets the client a ``501`` instead, which no client
can take for an accepted WebSocket.

Receiving. The stream's listener (the tunnel's reader thread) moves what
arrives into the socket's buffer; :meth:`TunnelSocket.recv` hands it out and
returns its flow-control credit as the application takes it, so a slow
application holds the client back instead of filling memory. ``fileno()``
gives a pipe that is readable exactly when ``recv`` would not block, made on
first use, for libraries that wait in a selector (simple-websocket's pings).

Sending. One thread sends at a time (a library's own thread answers pings
while the application sends), and each ``send`` sends all it is given,
waiting for flow-control window as a blocking socket waits for buffer space.

The end. When the application returns (or closes the socket) the stream ends
as a TCP connection does when gunicorn closes it: END_STREAM after what was
sent, then RST_STREAM(NO_ERROR) if the client has not finished: what it sends
after that is not wanted. A client that goes away (its stream ends or is
reset) is an end of file, or a reset connection, to ``recv``.
"""

from __future__ import annotations

import base64
import collections
import errno
import io
import logging
import os
import re
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable, Collection, Deque, Dict, List, Optional, Sequence, Tuple, cast

from h2.errors import ErrorCodes

from ..engine import Connection, Stream
from ..errors import ConnectionClosed, PTTHError, StreamReset, StreamTimeout
from ..headers import InvalidHeader, build_environ, encode_response_headers
from ..websocket import GOING_AWAY, FrameTracker, close_frame, credit_batch, valid_key
from .wsgi import WSGIApp, _answer_error, _Response, _write_result, check_header_list_size, is_websocket_request

__all__ = ["TunnelSocket", "close_websockets", "handle_websocket", "is_websocket_request", "open_websockets"]

log = logging.getLogger("ptth_sync.backend")

#: How long closing waits for a send in progress on another thread before it resets the stream.
_SEND_WAIT = 1.0
#: The longest response head an application may write on the socket.
_HEAD_LIMIT = 64 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")
_QUIET_ERRORS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)
_NOT_ACCEPTED = b"501 Not Implemented: the application did not accept this WebSocket\n"

# What the socket's response is, as the application writes it.
_HEAD = "head"  # nothing answered yet: the first bytes written are the response head
_OPEN = "open"  # 101: the bytes written are the WebSocket's
_RESPONSE = "response"  # another status: the bytes written are that response's body
_DISCARD = "discard"  # 2xx without accepting, answered 501: the bytes written go nowhere


class TunnelSocket:
    """The client's connection, as a WebSocket library finds it in ``environ["gunicorn.socket"]``.

    A socket-like object backed by one HTTP/2 stream: ``recv``, ``recv_into``,
    ``send``, ``sendall``, ``shutdown``, ``close``, ``fileno`` (a pipe that is
    readable when ``recv`` would not block), timeouts and blocking mode, with
    the errors a TCP socket raises (``ConnectionResetError`` when the client's
    stream is reset, ``BrokenPipeError`` when sending after the end).
    """

    family = socket.AF_INET
    type = socket.SOCK_STREAM
    proto = 0

    def __init__(self, stream: Stream, peer: Tuple[str, int] = ("", 0), local: Tuple[str, int] = ("", 0)) -> None:
        self._stream = stream
        self._peer = peer
        self._local = local
        self._cond = threading.Condition()  # the receive side and the flags below
        self._chunks: Deque[bytes] = collections.deque()
        self._offset = 0  # bytes of _chunks[0] already read
        self._unacknowledged = 0  # bytes read whose credit is not returned yet (the stream's close returns it)
        self._credit_batch = credit_batch(stream)
        self._ended = False  # the client's side ended
        self._error: Optional[Exception] = None
        self._closed = False
        self._read_shut = False
        self._signal: Optional[Tuple[int, int]] = None  # the pipe behind fileno()
        self._signalled = False
        self._timeout: Optional[float] = None
        self._send_lock = threading.Lock()  # the send side, below
        self._write_shut = False
        self._head = bytearray()
        self._state = _HEAD
        #: The frames the application sent, followed for a Close frame of our own (see :meth:`going_away`).
        self.tracker = FrameTracker()
        #: The answer, as the access log reads it: status line, headers, bytes sent after the head.
        self.status: Optional[str] = None
        self.headers: List[Tuple[str, str]] = []
        self.sent = 0
        #: True once the application answered with start_response (not on the socket).
        self.answered_by_wsgi = False
        #: True once it accepted the WebSocket with start_response: what it returns is the WebSocket's bytes.
        self.accepted_by_wsgi = False
        stream.listener = self._on_stream
        self._on_stream(stream)

    @property
    def answered(self) -> bool:
        """True once the application answered the request on the socket (or accepted with start_response)."""
        return self._state != _HEAD

    @property
    def connection(self) -> Connection:
        """The tunnel that carries the WebSocket."""
        return cast("Connection", self._stream.connection)  # (a stream knows its connection as a StreamOwner)

    @property
    def accepted(self) -> bool:
        """True once the application accepted the WebSocket (``101``)."""
        return self._state == _OPEN

    # -- receiving -------------------------------------------------------------

    def _on_stream(self, stream: Stream) -> None:
        """The tunnel's reader: something arrived for the stream. Never blocks."""
        error: Optional[Exception] = None
        try:
            pieces, ended = stream.take_received()
        except Exception as exc:  # the stream's or the connection's error
            pieces, ended, error = [], False, exc
        with self._cond:
            if self._closed:
                return  # (the stream's close returns the credit of what was taken)
            self._chunks.extend(pieces)
            self._ended = self._ended or ended
            if error is not None and self._error is None:
                self._error = error
            self._cond.notify_all()
            self._update_signal()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes from the client; ``b""`` once it has finished sending."""
        data, credit = self._take(bufsize, bool(flags & socket.MSG_DONTWAIT))
        if credit:
            self._stream.acknowledge(credit)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data)

    def _take(self, size: int, dontwait: bool) -> Tuple[bytes, int]:
        """Up to ``size`` buffered bytes, and the credit to return now.

        The credit goes back in batches: a call per small message costs more than
        the message, and h2 announces it only once half the window is used anyway.
        """
        if size <= 0:
            return b"", 0
        timeout = 0.0 if dontwait else self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._chunks:
                if self._closed:
                    raise OSError(errno.EBADF, "Bad file descriptor")
                if self._read_shut or self._ended:
                    return b"", 0
                if self._error is not None:
                    raise _as_socket_error(self._error)
                if timeout == 0:
                    raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(errno.ETIMEDOUT, "timed out")
                self._cond.wait(remaining)
            first = self._chunks[0]
            start = self._offset
            if len(first) - start <= size:
                self._chunks.popleft()
                self._offset = 0
                data = first[start:] if start else first
            else:
                self._offset = start + size
                data = first[start : start + size]
            self._update_signal()
            self._unacknowledged += len(data)
            if self._unacknowledged < self._credit_batch:
                return data, 0
            credit, self._unacknowledged = self._unacknowledged, 0
            return data, credit

    # -- sending ---------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        """Send ``data``; all of it, waiting for window, unless the socket is non-blocking."""
        data = bytes(data)
        nonblocking = bool(flags & socket.MSG_DONTWAIT) or self._timeout == 0
        with self._send_lock:
            if self._state == _DISCARD:
                return len(data)
            self._check_writable()
            body = self._take_head(data) if self._state == _HEAD else data
            taken = len(data) - len(body)
            if body:
                taken += self._send_body(body, nonblocking)
        if nonblocking and not taken and data:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return taken

    def sendall(self, data: Any, flags: int = 0) -> None:
        data = bytes(data)
        while data:
            data = data[self.send(data, flags) :]

    def _check_writable(self) -> None:
        """(Send lock held.) Raise what a socket raises when it cannot send any more."""
        if self._closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if self._write_shut:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        if self.answered_by_wsgi and self._state == _HEAD:
            raise OSError(errno.EBADF, "the application answered this request with start_response")

    def _send_body(self, data: bytes, nonblocking: bool) -> int:
        """(Send lock held.) Pass bytes after the head on; returns how many went."""
        if self._state == _DISCARD:
            return len(data)
        stream = self._stream
        try:
            if nonblocking:
                sent = stream.try_send(data)
            else:
                stream.send_data(data, timeout=self._timeout)
                sent = len(data)
        except StreamTimeout:
            raise TimeoutError(errno.ETIMEDOUT, "timed out") from None
        except (StreamReset, ConnectionClosed) as exc:
            raise BrokenPipeError(errno.EPIPE, f"Broken pipe ({exc})") from None
        if self._state == _OPEN:
            self.tracker.feed(data if sent == len(data) else data[:sent])
        self.sent += sent
        return sent

    def _take_head(self, data: bytes) -> bytes:
        """(Send lock held.) Collect the response head the application writes; returns the bytes after it."""
        head = self._head
        head += data
        while self._state == _HEAD:
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > _HEAD_LIMIT:
                    self._bad_head(f"no end of the response head in {_HEAD_LIMIT} bytes")
                return b""
            block, rest = bytes(head[:end]), bytes(head[end + 4 :])
            head.clear()
            head += rest
            self._answer_head(block)
        rest = bytes(head)
        head.clear()
        return rest

    def _answer_head(self, block: bytes) -> None:
        lines = block.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            self._bad_head(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        code = int(match.group(1))  # type: ignore[union-attr]
        reason = (match.group(2) or b"").decode("latin-1")  # type: ignore[union-attr]
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[:1] in b" \t":
                self._bad_head(f"malformed header line {line[:80]!r}")
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        if code == 101:
            self._accept(headers)
        elif code >= 200:
            self._respond(f"{code} {reason}".rstrip(), headers)
        # (another 1xx, such as 100 Continue, is not passed on)

    def _bad_head(self, reason: str) -> None:
        log.error("WebSocket: the application wrote an invalid response head: %s; resetting the stream", reason)
        self._stream.reset(ErrorCodes.INTERNAL_ERROR)
        raise OSError(errno.EPROTO, f"invalid response head: {reason}")

    def _accept(self, headers: List[Tuple[str, str]]) -> None:
        """(Send lock held.) ``101``: the stream's ``200``, with the headers the client must see."""
        kept = [(name, value) for name, value in headers if name.lower() != "sec-websocket-accept"]
        try:
            _, block = encode_response_headers("200 OK", kept)
        except InvalidHeader as exc:
            self._bad_head(str(exc))
        self._send_headers(block)
        self._state = _OPEN
        self.status = "101 Switching Protocols"
        self.headers = headers

    def _respond(self, status: str, headers: List[Tuple[str, str]]) -> None:
        """(Send lock held.) A refusal written on the socket: an ordinary response, its body until the end."""
        if 200 <= int(status[:3]) < 300:
            log.warning("WebSocket: the application answered %s without accepting the WebSocket: the client gets "
                        "a 501", status)
            self._send_headers(_not_accepted_block(), _NOT_ACCEPTED)
            self._state = _DISCARD
        else:
            if any(name.lower() == "transfer-encoding" for name, _ in headers):
                self._bad_head("a transfer coding on a response written on the socket")
            kept = [(name, value) for name, value in headers if name.lower() != "content-length"]
            try:
                _, block = encode_response_headers(status, kept)
            except InvalidHeader as exc:
                self._bad_head(str(exc))
            self._send_headers(block)
            self._state = _RESPONSE
        self.status = status
        self.headers = headers

    def _send_headers(self, block: List[Tuple[bytes, bytes]], body: bytes = b"") -> None:
        try:
            check_header_list_size(self._stream, block)
        except InvalidHeader as exc:
            self._bad_head(str(exc))
        try:
            self._stream.send_response(block, body, end_stream=bool(body))
        except (StreamReset, ConnectionClosed) as exc:
            raise BrokenPipeError(errno.EPIPE, f"Broken pipe ({exc})") from None
        if body:
            self._write_shut = True

    def accept(self, headers: List[Tuple[str, str]]) -> Callable[[bytes], None]:
        """``start_response("101 ...", headers)``: accept the WebSocket; returns the ``write`` callable."""
        with self._send_lock:
            self._check_writable()
            if self._state != _HEAD:
                msg = "start_response(101) after a response was written on the socket"
                raise AssertionError(msg)
            self._accept(headers)
            self.accepted_by_wsgi = True
        return self.sendall

    # -- the end ---------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            with self._cond:
                self._read_shut = True
                self._cond.notify_all()
                self._update_signal()
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            with self._send_lock:
                self._end_stream()

    def _end_stream(self) -> None:
        """(Send lock held.) END_STREAM after what was sent, once."""
        if self._write_shut or self._state == _HEAD:
            return
        self._write_shut = True
        try:
            self._stream.try_send(b"", end_stream=True)
        except PTTHError:
            pass

    def close(self) -> None:
        """End the connection: END_STREAM, and RST_STREAM(NO_ERROR) if the client has not finished."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._update_signal()
        self._stream.listener = None
        # Another thread may be sending (a library answering a ping, or a Close): it is done
        # in a moment, unless it waits for window: then the reset wakes it with an error.
        if self._send_lock.acquire(timeout=_SEND_WAIT):
            try:
                self._end_stream()
            finally:
                self._send_lock.release()
        else:
            self._stream.reset(ErrorCodes.CANCEL)
        self._stream.close(ErrorCodes.NO_ERROR if self._stream.local_ended else ErrorCodes.INTERNAL_ERROR)

    def going_away(self) -> None:
        """Close an open WebSocket from this side: a ``1001 Going Away`` Close frame, then END_STREAM.

        The frame goes only between two of the application's frames, and only
        if the flow-control window takes it whole; the client's answer to it
        reaches the application, whose library then ends.
        """
        if not self._send_lock.acquire(blocking=False):
            self._stream.reset(ErrorCodes.CANCEL)  # a send is stuck: the reset ends it
            return
        try:
            if self._state != _OPEN or self._write_shut or self._closed:
                return
            frame = close_frame(GOING_AWAY, "server going away")
            tracker = self.tracker
            if tracker.at_boundary and not tracker.close_sent and self._stream.send_window() >= len(frame):
                self._stream.try_send(frame)
                tracker.feed(frame)
            self._end_stream()
        except PTTHError:
            pass
        finally:
            self._send_lock.release()

    def __enter__(self) -> TunnelSocket:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- the rest of a socket's interface ------------------------------------------

    def fileno(self) -> int:
        """A descriptor readable exactly when :meth:`recv` would not block (-1 once closed)."""
        with self._cond:
            if self._closed:
                return -1
            if self._signal is None:
                read_end, write_end = os.pipe()
                os.set_blocking(read_end, False)
                os.set_blocking(write_end, False)
                self._signal = (read_end, write_end)
                # Closed with the object: a library's selector may still hold it after close().
                weakref.finalize(self, _close_pipe, read_end, write_end)
                self._update_signal()
            return self._signal[0]

    def _update_signal(self) -> None:
        """(Condition held.) Keep the pipe readable exactly while recv would not block."""
        if self._signal is None:
            return
        ready = bool(self._chunks) or self._ended or self._read_shut or self._closed or self._error is not None
        if ready == self._signalled:
            return
        self._signalled = ready
        try:
            if ready:
                os.write(self._signal[1], b"x")
            else:
                os.read(self._signal[0], 1)
        except OSError:  # Defensive: one byte in an empty pipe cannot block
            pass

    def settimeout(self, timeout: Optional[float]) -> None:
        self._timeout = None if timeout is None else float(timeout)

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def getpeername(self) -> Tuple[str, int]:
        """The client's address as the router saw it (the port is not known: 0)."""
        return self._peer

    def getsockname(self) -> Tuple[str, int]:
        return self._local

    def setsockopt(self, *args: Any) -> None:
        """Accepted and ignored: the options of a TCP socket mean nothing on a stream."""

    def getsockopt(self, *args: Any) -> int:
        return 0

    def __repr__(self) -> str:
        return f"<TunnelSocket stream={self._stream.id} {self._state}{' closed' if self._closed else ''}>"


def _close_pipe(read_end: int, write_end: int) -> None:
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def _as_socket_error(exc: Exception) -> OSError:
    """The error a TCP socket would raise for the stream's end."""
    if isinstance(exc, (StreamReset, ConnectionClosed)):
        return ConnectionResetError(errno.ECONNRESET, f"Connection reset by peer ({exc})")
    return OSError(errno.EIO, str(exc))


def _not_accepted_block() -> List[Tuple[bytes, bytes]]:
    return [(b":status", b"501"), (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(_NOT_ACCEPTED)).encode())]


# -- the open WebSockets of this process, for a drain -------------------------------

_open: Dict[int, TunnelSocket] = {}
_open_lock = threading.Lock()


def open_websockets() -> int:
    """How many WebSockets this process serves now."""
    with _open_lock:
        return sum(1 for sock in _open.values() if sock.accepted)


def close_websockets(connections: Collection[Connection]) -> int:
    """End the open WebSockets on ``connections`` with ``1001 Going Away``; returns how many."""
    with _open_lock:
        sockets = [sock for sock in _open.values() if sock.connection in connections and sock.accepted]
    for sock in sockets:
        sock.going_away()
    return len(sockets)


# -- one WebSocket request, on a pool thread ------------------------------------------


def websocket_environ(headers: Sequence[Tuple[bytes, bytes]], peer: Optional[Tuple[str, int]] = None
                      ) -> Dict[str, Any]:
    """The environ of a WebSocket request as gunicorn's threaded worker builds it, but ``gunicorn.socket``."""
    environ = build_environ(headers, wsgi_input=io.BytesIO(), errors=sys.stderr, peer=peer)
    environ.pop("CONTENT_LENGTH", None)
    environ["REQUEST_METHOD"] = "GET"
    environ["HTTP_CONNECTION"] = "Upgrade"
    environ["HTTP_UPGRADE"] = "websocket"
    environ.setdefault("HTTP_SEC_WEBSOCKET_VERSION", "13")
    if not valid_key(environ.get("HTTP_SEC_WEBSOCKET_KEY", "")):
        # RFC 8441 §5 leaves the key out; the libraries want one to answer.
        environ["HTTP_SEC_WEBSOCKET_KEY"] = base64.b64encode(os.urandom(16)).decode("ascii")
    return environ


def handle_websocket(stream: Stream, app: WSGIApp, peer: Optional[Tuple[str, int]] = None) -> _Response:
    """Run ``app`` for the WebSocket request on ``stream`` (see the module's docstring).

    Never raises for what the application or the peer did. Returns the
    answer's state (``status``, ``headers``, ``sent``) for an access log.
    """
    response = _Response(stream, "GET")
    if stream.cancelled:  # reset while it waited for a thread
        stream.close()
        return response
    environ = websocket_environ(stream.headers or [], peer)
    port = environ["SERVER_PORT"]
    local = (environ["SERVER_NAME"], int(port) if port.isdigit() else 0)
    sock = TunnelSocket(stream, (environ["REMOTE_ADDR"], 0), local)
    environ["gunicorn.socket"] = sock
    target = environ["RAW_URI"]
    with _open_lock:
        _open[id(sock)] = sock
    try:
        _run_app(app, environ, response, sock)
    except (StreamReset, ConnectionClosed) as exc:
        log.info("WebSocket %s: the router went away: %s", target, exc)
    except OSError as exc:
        if exc.errno in _QUIET_ERRORS or isinstance(exc, TimeoutError):
            log.info("WebSocket %s: %s", target, exc)
        else:
            log.exception("Error handling WebSocket %s", target)
            _fail(response, sock)
    except Exception:
        log.exception("Error handling WebSocket %s", target)
        _fail(response, sock)
    finally:
        with _open_lock:
            _open.pop(id(sock), None)
        if sock.answered:
            response.status, response.headers, response.sent = sock.status, sock.headers, sock.sent
        sock.close()
    return response


def _run_app(app: WSGIApp, environ: Dict[str, Any], response: _Response, sock: TunnelSocket) -> None:
    refused = False

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        nonlocal refused
        if sock.answered:
            # The application answered on the socket, and now its framework answers the
            # request too (a Django view that served a WebSocket): that answer goes nowhere.
            return _ignore
        if status[:3] == "101" and not exc_info:
            return sock.accept(headers)
        sock.answered_by_wsgi = True
        if status[:1] == "2":
            log.warning("WebSocket %s: the application answered %s without accepting the WebSocket: the client gets "
                        "a 501", environ["RAW_URI"], status)
            refused = True
            return response.start("501 Not Implemented",
                                  [("Content-Type", "text/plain; charset=utf-8"),
                                   ("Content-Length", str(len(_NOT_ACCEPTED)))], exc_info)
        return response.start(status, headers, exc_info)

    try:
        result = app(environ, start_response)
    except StopIteration:
        if sock.answered:  # flask-sock under gunicorn ends a WebSocket so: the connection is closed
            return
        raise
    try:
        if sock.answered:
            if sock.accepted_by_wsgi:  # what the application returns is the WebSocket's bytes
                for chunk in result:
                    sock.sendall(chunk)
            return
        if refused:
            response.write(_NOT_ACCEPTED, end_stream=True)
            return
        _write_result(result, response)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def _ignore(data: bytes) -> None:
    """The ``write`` of an answer that goes nowhere."""


def _fail(response: _Response, sock: TunnelSocket) -> None:
    """The application failed: a 500 if nothing was answered yet, else the stream is reset."""
    if sock.answered:
        sock._stream.reset(ErrorCodes.INTERNAL_ERROR)
    else:
        _answer_error(response)
