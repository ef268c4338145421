"""One HTTP/2 stream of a connection (:class:`Stream`), and what it needs of that connection (:class:`StreamOwner`).

A stream keeps its own receive buffers and flags; everything that touches h2
or the socket it asks of its connection, through the few methods of
:class:`StreamOwner`, under the connection's state lock.
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import TYPE_CHECKING, Callable, Deque, List, Optional, Protocol, Sequence, Tuple

from h2.errors import ErrorCodes

from ..waiting import WaitQueue

if TYPE_CHECKING:
    from ..errors import ConnectionClosed
    from .h2compat import _H2Connection
    from .outbox import Outbox
    from .settings import ConnectionSettings

__all__ = ["Header", "Stream", "StreamOwner"]

Header = Tuple[bytes, bytes]

#: A received piece this large is handed to a ``read(-1)`` on its own, not copied into a bigger one.
_LARGE_PIECE = 64 * 1024


class StreamOwner(Protocol):
    """What a :class:`Stream` uses of its connection (a :class:`~ptth_sync.engine.connection.Connection`).

    ``_lock`` is the connection's state lock: it guards every stream's buffers
    and flags too. The methods are the connection's; each takes the lock
    itself, except ``_wait``, ``_raise_if_failed`` and ``_acknowledge``, which
    expect it held.
    """

    settings: ConnectionSettings
    _lock: threading.Lock
    _h2: _H2Connection
    _error: Optional[ConnectionClosed]
    _outbox: Outbox

    def _wait(self, stream: Stream, ready: Callable[[], bool], timeout: Optional[float], what: str) -> None: ...

    def _raise_if_failed(self, stream: Stream) -> None: ...

    def _acknowledge(self, stream_id: int, size: int) -> None: ...

    def _send(
        self,
        stream: Stream,
        headers: Optional[Sequence[Header]],
        data: bytes,
        end_stream: bool,
        timeout: Optional[float],
    ) -> None: ...

    def _try_send(self, stream: Stream, data: bytes, end_stream: bool) -> int: ...

    def _close_stream(self, stream: Stream, error_code: int, *, force_reset: bool) -> None: ...


class Stream:
    """One HTTP/2 stream of a :class:`~ptth_sync.engine.connection.Connection`.

    Every method may be called from any user thread; a stream is normally used
    by one thread at a time, except that an upload may run beside a download.
    """

    def __init__(self, connection: StreamOwner, stream_id: int) -> None:
        self.connection = connection
        self.id = stream_id
        #: Request headers (server role) or response headers (client role).
        self.headers: Optional[List[Header]] = None
        self.trailers: Optional[List[Header]] = None
        self._waiting = WaitQueue()
        self._chunks: Deque[bytes] = collections.deque()
        self._offset = 0  # bytes of _chunks[0] already read
        self._buffered = 0  # bytes in _chunks not read yet
        self._unacknowledged = 0  # bytes taken by take_received whose credit is not returned yet
        self._remote_ended = False
        self._local_ended = False
        self._error: Optional[Exception] = None
        self._closed = False
        # Offset in the connection's output where this stream's first bytes
        # were queued: nothing of the stream reached the peer while fewer
        # bytes than this have been handed to the socket.
        self._first_byte_offset: Optional[int] = None
        #: Called on the connection's reader thread, without the lock, whenever
        #: something arrives for this stream (headers, data, its end, a reset,
        #: the connection's death): for callers that collect the stream without
        #: a thread of their own (:meth:`take_received`, :meth:`acknowledge`).
        #: It must not block.
        self.listener: Optional[Callable[[Stream], None]] = None

    # -- receiving -------------------------------------------------------

    @property
    def remote_ended(self) -> bool:
        """True once the peer has ended its side of the stream."""
        return self._remote_ended

    @property
    def peer_max_header_list_size(self) -> Optional[int]:
        """The largest header block the connection's peer accepts (RFC 9113 size), if it said."""
        limit: Optional[int] = self.connection._h2.remote_settings.max_header_list_size
        return limit

    @property
    def cancelled(self) -> bool:
        """True once the stream was reset (by either side) or its connection died."""
        conn = self.connection
        if self._error is not None or conn._error is not None:
            return True
        with conn._lock:
            h2_stream = conn._h2.streams.get(self.id)
            return h2_stream is None or h2_stream.closed

    @property
    def local_ended(self) -> bool:
        """True once this side has sent END_STREAM."""
        return self._local_ended

    def wait_headers(self, timeout: Optional[float] = None) -> List[Header]:
        """Block until the peer's header block has arrived and return it."""
        conn = self.connection
        with conn._lock:
            conn._wait(self, lambda: self.headers is not None, timeout, "headers")
            return self.headers  # type: ignore[return-value]

    def read(self, size: int = -1, timeout: Optional[float] = None) -> bytes:
        """Return up to ``size`` bytes of body as soon as any are there.

        Returns ``b""`` at the end of the stream; ``size < 0`` returns what is
        buffered (at least one byte unless the stream has ended), except that
        large pieces come one per call, as they arrived, rather than copied
        together.
        """
        conn = self.connection
        with conn._lock:
            conn._wait(self, lambda: bool(self._chunks) or self._remote_ended, timeout, "data")
            if not self._chunks:
                return b""
            data = self._take(size)
            conn._acknowledge(self.id, len(data))
        conn._outbox.flush()
        return data

    def take_received(self) -> Tuple[List[bytes], bool]:
        """Without waiting: the body pieces buffered so far, and whether the peer ended the stream.

        The flow-control credit of what is taken is *not* returned: the caller
        returns it with :meth:`acknowledge` once it has passed the bytes on, so
        a slow consumer holds the peer back instead of buffering without bound.
        Raises the stream's or the connection's error once there is one.
        """
        conn = self.connection
        with conn._lock:
            chunks = self._chunks
            if not chunks:
                if not self._remote_ended:
                    conn._raise_if_failed(self)
                return [], self._remote_ended
            if self._offset:
                chunks[0] = chunks[0][self._offset :]
                self._offset = 0
            pieces = list(chunks)
            chunks.clear()
            self._unacknowledged += self._buffered
            self._buffered = 0
            return pieces, self._remote_ended

    def acknowledge(self, size: int) -> None:
        """Return ``size`` bytes of flow-control credit taken with :meth:`take_received`; never blocks."""
        conn = self.connection
        with conn._lock:
            if self._closed:
                return
            self._unacknowledged -= size
            conn._acknowledge(self.id, size)
        conn._outbox.send_without_blocking()

    def _take(self, size: int) -> bytes:
        """Remove and return up to ``size`` buffered bytes (lock held, something buffered).

        ``size < 0``: the unread part of the first piece, joined with the small
        pieces after it, if any. A piece that is returned whole is not copied;
        a piece read in parts is not copied again for what is left of it.
        """
        chunks = self._chunks
        first = chunks[0]
        offset = self._offset
        head = len(first) - offset  # unread bytes of the first piece
        if size < 0:
            size = head
            if head < _LARGE_PIECE:
                for chunk in itertools.islice(chunks, 1, None):
                    if len(chunk) >= _LARGE_PIECE:
                        break
                    size += len(chunk)
        elif size > self._buffered:
            size = self._buffered
        self._buffered -= size
        if size < head:
            self._offset = offset + size
            return first[offset : offset + size]
        chunks.popleft()
        self._offset = 0
        if size == head:
            return first if offset == 0 else first[offset:]
        parts = [first if offset == 0 else memoryview(first)[offset:]]
        need = size - head
        while need:
            chunk = chunks[0]
            if len(chunk) <= need:
                parts.append(chunks.popleft())
                need -= len(chunk)
            else:
                parts.append(memoryview(chunk)[:need])
                self._offset = need
                need = 0
        return b"".join(parts)

    # -- sending ---------------------------------------------------------

    def send_headers(self, headers: Sequence[Header], end_stream: bool = False) -> None:
        """Send a header block (a response, or trailers)."""
        self.connection._send(self, headers, b"", end_stream, None)

    def send_data(self, data: bytes, end_stream: bool = False, timeout: Optional[float] = None) -> None:
        """Send ``data``, waiting for flow-control window as needed."""
        self.connection._send(self, None, data, end_stream, timeout)

    def send_response(
        self, headers: Sequence[Header], data: bytes = b"", end_stream: bool = False, timeout: Optional[float] = None
    ) -> None:
        """Send headers and the first data in one go (one lock hold, one write when the window allows)."""
        self.connection._send(self, headers, data, end_stream, timeout)

    def send_window(self) -> int:
        """Bytes flow control lets this side send on the stream now (0 once it is closed)."""
        conn = self.connection
        with conn._lock:
            if self._error is not None or conn._error is not None or self._local_ended:
                return 0
            try:
                return conn._h2.local_flow_control_window(self.id)
            except Exception:  # h2: the stream is closed
                return 0

    def try_send(self, data: bytes, end_stream: bool = False) -> int:
        """Without waiting: send what of ``data`` the flow-control window allows; returns how many bytes.

        END_STREAM goes only with the last of ``data``. Bytes the socket does
        not take at once are left to the connection's writer thread. Raises
        the stream's or the connection's error.
        """
        return self.connection._try_send(self, data, end_stream)

    def end(self) -> None:
        """End this side of the stream (an empty DATA frame with END_STREAM)."""
        self.connection._send(self, None, b"", True, None)

    def reset(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort the stream with RST_STREAM; the connection carries on."""
        self.connection._close_stream(self, error_code, force_reset=True)

    def close(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """Release the stream: reset it unless both sides ended, return unread credit."""
        self.connection._close_stream(self, error_code, force_reset=False)

    @property
    def request_sent(self) -> bool:
        """False while provably nothing of this stream has reached the peer."""
        first = self._first_byte_offset
        return first is not None and self.connection._outbox.attempted_bytes > first
