"""The WSGI bridge of the backend: one HTTP/2 stream in, one WSGI call out."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from h2.errors import ErrorCodes

from ..engine import Stream
from ..errors import ConnectionClosed, PTTHError, StreamReset
from ..headers import InvalidHeader, build_environ, encode_response_headers, header_list_size

__all__ = ["StreamInput", "check_header_list_size", "handle_request", "is_websocket_request"]

log = logging.getLogger("ptth_sync.backend")

WSGIApp = Callable[..., Iterable[bytes]]

_ERROR_BODY = b"Internal Server Error\n"
_ERROR_BLOCK = [
    (b":status", b"500"),
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(_ERROR_BODY)).encode()),
]


class ClientDisconnected(OSError):
    """The request stream ended abnormally while the application read its body."""


class StreamInput:
    """``wsgi.input``: the request body, read from the stream as it arrives."""

    def __init__(self, stream: Stream, timeout: Optional[float] = None) -> None:
        self._stream = stream
        self._timeout = timeout
        self._buffer = b""
        self._eof = False

    def _more(self, size: int = -1) -> bytes:
        if self._eof:
            return b""
        try:
            data = self._stream.read(size, self._timeout)
        except (PTTHError, OSError) as exc:
            raise ClientDisconnected(str(exc)) from exc
        if not data:
            self._eof = True
        return data

    def read(self, size: Optional[int] = -1) -> bytes:
        """Read ``size`` bytes (fewer only at the end); all of the body when ``size`` is negative."""
        parts = [self._buffer] if self._buffer else []
        have = len(self._buffer)
        self._buffer = b""
        if size is None or size < 0:
            while True:
                data = self._more()
                if not data:
                    return b"".join(parts)
                parts.append(data)
        while have < size:
            data = self._more(size - have)
            if not data:
                break
            parts.append(data)
            have += len(data)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) > size:
            data, self._buffer = data[:size], data[size:]
        return data

    def readline(self, size: Optional[int] = -1) -> bytes:
        """Read one line, up to ``size`` bytes, the newline included."""
        limit = -1 if size is None else size
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0 and (limit < 0 or end < limit):
                line, self._buffer = self._buffer[: end + 1], self._buffer[end + 1 :]
                return line
            if 0 <= limit <= len(self._buffer):
                line, self._buffer = self._buffer[:limit], self._buffer[limit:]
                return line
            data = self._more()
            if not data:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += data

    def readlines(self, hint: int = -1) -> List[bytes]:
        """Read lines until the end, or until about ``hint`` bytes were read."""
        lines: List[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    def __iter__(self) -> StreamInput:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class _Response:
    """State of one WSGI response: what ``start_response`` set and what was sent.

    ``status``, ``headers`` and ``sent`` (body bytes sent) carry the names
    gunicorn's access log and ``post_request`` hooks read on a response.
    """

    __slots__ = ("block", "code", "headers", "headers_sent", "no_body", "remaining", "sent", "status", "stream")

    def __init__(self, stream: Stream, method: str) -> None:
        self.stream = stream
        self.block: Optional[List[Tuple[bytes, bytes]]] = None
        self.code = 0
        self.status: Optional[str] = None
        self.headers: List[Tuple[str, str]] = []
        self.sent = 0
        self.headers_sent = False
        self.no_body = method == "HEAD"
        self.remaining: Optional[int] = None  # declared Content-Length still to send

    def start(self, status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.block is not None:
            msg = "start_response called a second time without exc_info"
            raise AssertionError(msg)
        code, block = encode_response_headers(status, headers)
        check_header_list_size(self.stream, block)
        self.code, self.block = code, block
        self.status, self.headers = status, list(headers)
        self.no_body = self.no_body or code in (204, 304)
        self.remaining = None
        repeated = False
        for name, value in block:
            if name == b"content-length":
                if not value.isdigit():
                    msg = f"invalid Content-Length {value!r}"
                    raise InvalidHeader(msg)
                if self.remaining is not None:
                    if int(value) != self.remaining:
                        msg = f"two different Content-Length values, {self.remaining} and {int(value)}"
                        raise InvalidHeader(msg)
                    repeated = True
                self.remaining = int(value)
        if repeated:  # the same length twice: said once (RFC 9110 §8.6)
            first = next(index for index, (name, _) in enumerate(block) if name == b"content-length")
            block[:] = [field for index, field in enumerate(block) if index == first or field[0] != b"content-length"]
        if self.no_body:
            # HEAD and 304 may announce the length of the body they do not carry.
            self.remaining = None
            if code == 204:
                block[:] = [(n, v) for n, v in block if n != b"content-length"]
        return self.write

    def write(self, data: bytes, end_stream: bool = False) -> None:
        if self.block is None:
            msg = "write() before start_response()"
            raise AssertionError(msg)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            msg = f"the application must produce bytes, not {type(data).__name__}"
            raise TypeError(msg)
        if self.no_body:
            data = b""
        elif self.remaining is not None:
            if len(data) > self.remaining:
                log.warning("application sent more than its Content-Length; the excess is dropped")
                data = data[: self.remaining]
            self.remaining -= len(data)
        if not self.headers_sent:
            if not data and not end_stream:
                return
            self.headers_sent = True
            self.stream.send_response(self.block, bytes(data), end_stream=end_stream)
        elif data or end_stream:
            self.stream.send_data(bytes(data), end_stream=end_stream)
        self.sent += len(data)

    def finish(self) -> None:
        if self.remaining:
            # Ending cleanly would present a truncated body as complete (and
            # h2 would see a Content-Length mismatch): reset instead.
            log.error("application sent %d bytes less than its Content-Length; resetting the stream", self.remaining)
            if not self.headers_sent:
                self.headers_sent = True
                self.stream.send_headers(self.block)  # type: ignore[arg-type]
            self.stream.reset(ErrorCodes.INTERNAL_ERROR)
            return
        self.write(b"", end_stream=True)


def check_header_list_size(stream: Stream, block: List[Tuple[bytes, bytes]]) -> None:
    """:class:`InvalidHeader` for response headers larger than the router accepts.

    The router would have to drop them, and with them its tunnel: refused
    here, before anything is sent, the request fails alone.
    """
    limit = stream.peer_max_header_list_size
    if limit is not None and header_list_size(block) > limit:
        msg = (f"response headers of {header_list_size(block)} bytes exceed the router's limit of {limit} "
               "bytes (SETTINGS_MAX_HEADER_LIST_SIZE): send less in headers, in the body instead")
        raise InvalidHeader(msg)


def handle_request(stream: Stream, app: WSGIApp, peer: Optional[Tuple[str, int]] = None) -> _Response:
    """Run ``app`` for the request on ``stream`` and send its response.

    Never raises for what the application or the peer did. Returns the
    response state (``status``, ``headers``, ``sent``) for an access log.
    """
    headers = stream.headers or []
    if is_websocket_request(headers):
        from .websocket import handle_websocket  # (that module builds on this one)

        return handle_websocket(stream, app, peer)
    environ = build_environ(headers, wsgi_input=StreamInput(stream), errors=sys.stderr, peer=peer)
    response = _Response(stream, environ["REQUEST_METHOD"])
    if stream.cancelled:  # reset while it waited for a thread: nobody wants the answer
        log.debug("%s %s: cancelled before it started", environ["REQUEST_METHOD"], environ["RAW_URI"])
        stream.close()
        return response
    try:
        _run_app(app, environ, response)
    except (StreamReset, ConnectionClosed, ClientDisconnected) as exc:
        log.info("%s %s: the router went away: %s", environ["REQUEST_METHOD"], environ["RAW_URI"], exc)
    except Exception:
        log.exception("Error handling request %s %s", environ["REQUEST_METHOD"], environ["RAW_URI"])
        _answer_error(response)
    finally:
        # A complete response with an unread request body: RST_STREAM(NO_ERROR)
        # tells the router to stop uploading (RFC 9113 §8.1); anything else
        # unfinished is an internal error.
        stream.close(ErrorCodes.NO_ERROR if stream.local_ended else ErrorCodes.INTERNAL_ERROR)
    return response


def is_websocket_request(headers: Sequence[Tuple[bytes, bytes]]) -> bool:
    """True for an extended CONNECT for the WebSocket protocol (RFC 8441 §4), served by
    :mod:`ptth_sync.backend.websocket`."""
    method = protocol = None
    for name, value in headers:
        if name[:1] != b":":
            break
        if name == b":method":
            method = value
        elif name == b":protocol":
            protocol = value
    return protocol is not None and method == b"CONNECT" and protocol.lower() == b"websocket"


def _run_app(app: WSGIApp, environ: Dict[str, Any], response: _Response) -> None:
    result = app(environ, response.start)
    try:
        _write_result(result, response)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def _write_result(result: Iterable[bytes], response: _Response) -> None:
    """Send the application's response body (``start_response`` was called, or is called meanwhile)."""
    if isinstance(result, (list, tuple)) and response.block is not None:
        last = len(result) - 1
        for index, chunk in enumerate(result):
            response.write(chunk, end_stream=index == last and response.remaining in (None, len(chunk)))
    else:
        for chunk in result:
            response.write(chunk)
    if response.block is None:
        msg = "the application returned without calling start_response()"
        raise AssertionError(msg)
    if not response.stream.local_ended:
        response.finish()


def _answer_error(response: _Response) -> None:
    stream = response.stream
    try:
        if response.headers_sent:
            stream.reset(ErrorCodes.INTERNAL_ERROR)
        else:
            response.headers_sent = True
            response.code, response.status = 500, "500 Internal Server Error"
            response.headers = [(name.decode(), value.decode()) for name, value in _ERROR_BLOCK[1:]]
            response.sent = len(_ERROR_BODY)
            stream.send_response(_ERROR_BLOCK, _ERROR_BODY, end_stream=True)
    except (PTTHError, OSError):
        pass
