"""A chunked request body decoded as its bytes arrive, without blocking, for the relay.

gunicorn's :class:`~gunicorn.http.body.ChunkedReader` reads its socket until a
chunk is whole, which needs a thread per slow upload. :class:`ChunkedBody`
takes bytes as the selector receives them instead, and asks gunicorn's own
reader to parse what needs parsing: each chunk-size line (hex size,
extensions, their limits) and the trailer section. What remains here is the
framing between them: so many bytes of data, then CRLF.
"""

from __future__ import annotations

from typing import Any, List, Optional

from gunicorn.http.body import ChunkedReader
from gunicorn.http.errors import ChunkMissingTerminator, InvalidChunkSize, LimitRequestHeaders

__all__ = ["ChunkedBody"]

#: Longest chunk-size line and trailer section taken when gunicorn's reader sets no limit of its own (26.x).
_MAX_SIZE_LINE = 8190
_MAX_TRAILERS = 8190 * 32

_SIZE, _DATA, _CRLF, _DONE = range(4)


class _NeedMore(Exception):
    """gunicorn's parser asked for bytes that have not arrived yet: try again with more."""


class _Buffered:
    """The unreader gunicorn's parsers read from: nothing beyond what was given; keeps what they hand back."""

    def __init__(self) -> None:
        self.returned = b""

    def read(self, size: Any = None, read_ahead: Any = None) -> bytes:
        raise _NeedMore

    def unread(self, data: bytes) -> None:
        self.returned = data + self.returned


class ChunkedBody:
    """Decodes one request's ``Transfer-Encoding: chunked`` body from the bytes fed to it.

    :meth:`feed` returns the data decoded so far and raises gunicorn's
    parse errors (``InvalidChunkSize``, ``ChunkMissingTerminator``,
    ``InvalidHeader``, ``LimitRequestHeaders``) for a malformed body. Once
    :attr:`done`, :attr:`leftover` holds what followed the body (the next
    request of a pipelining client). Trailers are parsed and checked, and
    dropped, as they are when a thread reads the body.
    """

    def __init__(self, req: Any) -> None:
        self._reader = ChunkedReader(req, None)
        self._limit_line = getattr(self._reader, "limit_chunk_size_line", _MAX_SIZE_LINE)
        self._limit_trailers = getattr(self._reader, "limit_trailer_section", _MAX_TRAILERS)
        self._state = _SIZE
        self._left = 0  # data bytes of the current chunk still to come
        self._buf = b""  # received bytes not decoded yet (a partial size line, CRLF or trailers)
        self._unreader = _Buffered()
        #: The last chunk and the trailers arrived.
        self.done = False
        #: Bytes after the body's end.
        self.leftover = b""

    def feed(self, data: bytes) -> List[bytes]:
        """The body's data in ``data`` (and in what came before it that could not be decoded yet)."""
        if self.done:
            self.leftover += data
            return []
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        out: List[bytes] = []
        while pos < end:
            if self._state == _DATA:
                stop = min(end, pos + self._left)
                out.append(buf[pos:stop])  # (all of ``data`` when it is all data: no copy)
                self._left -= stop - pos
                pos = stop
                if not self._left:
                    self._state = _CRLF
            elif self._state == _CRLF:
                if end - pos < 2:
                    break
                if not buf.startswith(b"\r\n", pos):
                    raise ChunkMissingTerminator(buf[pos:pos + 2])
                pos += 2
                self._state = _SIZE
            else:
                line_end = buf.find(b"\r\n", pos)
                if (end if line_end < 0 else line_end) - pos > self._limit_line:  # (however it arrived)
                    raise InvalidChunkSize(b"line over %d bytes" % self._limit_line)
                if line_end < 0:
                    break
                try:
                    size = self._size(buf[pos:line_end + 2])
                except _NeedMore:  # the last chunk: gunicorn's parser reads its trailer section next
                    size = 0
                if size:
                    pos = line_end + 2
                    self._left = size
                    self._state = _DATA
                    continue
                after = self._last_chunk(buf[pos:])
                if after is None:
                    break
                self.done = True
                self._state = _DONE
                self.leftover = after
                pos = end
        self._buf = buf[pos:] if pos < end else b""
        return out

    def _size(self, line: bytes) -> int:
        """The size a chunk-size line (with its CRLF) gives, checked by gunicorn's parser.

        Raises _NeedMore for the last chunk (size 0): the parser would go on to its trailers.
        """
        self._unreader.returned = b""
        size, _ = self._reader.parse_chunk_size(self._unreader, data=line)
        return int(size)

    def _last_chunk(self, data: bytes) -> Optional[bytes]:
        """Parse the last chunk and the trailer section after it: what follows them, or None if not whole yet."""
        self._unreader.returned = b""
        try:
            self._reader.parse_chunk_size(self._unreader, data=data)
        except _NeedMore:
            if len(data) > self._limit_trailers:
                msg = "limit request trailer section size"
                raise LimitRequestHeaders(msg) from None
            return None
        return self._unreader.returned
