"""What a stream asks of its connection: sending within flow control, waiting, returning credit, closing.

Also the locked half of opening a stream (client role). Every method here
runs on a user thread (a listener's, on the reader thread) and never waits
on the socket while holding the state lock.

Flow control. A sender waits on its stream's condition until h2 reports a
positive window; the reader notifies on ``WindowUpdated`` and
``RemoteSettingsChanged``. A receiver acknowledges DATA only when its
consumer takes it from the stream's buffer, so a slow consumer slows the
producer; at stream teardown the unread remainder is acknowledged so the
connection window never leaks.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import h2.exceptions
from h2.errors import ErrorCodes

from ..errors import ConnectionClosed, StreamReset, StreamTimeout
from ..waiting import release
from .framing import _Payload
from .state import ConnectionState
from .stream import Header, Stream

__all__ = ["StreamOps"]


class StreamOps(ConnectionState):
    """The methods of :class:`~ptth_sync.engine.stream.StreamOwner`, and opening a stream under the lock."""

    # -- opening (client role) ---------------------------------------------

    def _stream_free_locked(self) -> bool:
        """Client role (lock held): whether the peer lets us open a stream now.

        Raises :class:`ConnectionClosed` (``request_sent=False``) when the
        connection is dead or draining.
        """
        if self._error is not None:
            raise ConnectionClosed(self._error.reason, request_sent=False)
        limit = self._h2.remote_settings.max_concurrent_streams
        if limit == 0:
            msg = "tunnel is draining"
            raise ConnectionClosed(msg, request_sent=False)
        # Our own count (an upper bound of h2's) first: h2's walks every stream.
        return len(self._streams) < limit or self._h2.open_outbound_streams < limit

    def _new_stream_locked(self, headers: Sequence[Header], end_stream: bool) -> Stream:
        """Client role (lock held, a stream free): open a stream with ``headers`` queued."""
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            msg = "stream IDs exhausted"
            self._retire_locked(msg)
            raise ConnectionClosed(msg, request_sent=False) from None
        stream = Stream(self, stream_id)
        stream._first_byte_offset = self._outbox.queued_bytes
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.TooManyStreamsError:
            msg = "tunnel is full"
            raise ConnectionClosed(msg, request_sent=False) from None
        stream._local_ended = end_stream
        self._streams[stream_id] = stream
        return stream

    # -- sending -------------------------------------------------------------

    def _send_data_locked(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Queue ``data`` (within the window) in frames h2 accepts (lock held)."""
        h2conn = self._h2
        total = len(data)
        if not total:
            if end_stream:
                h2conn.end_stream(stream_id)
            return
        frame = h2conn.max_outbound_frame_size
        for pos in range(0, total, frame):
            last = pos + frame >= total
            chunk = data if total <= frame else _Payload(memoryview(data)[pos : pos + frame])
            h2conn.send_data(stream_id, chunk, end_stream=end_stream and last)

    def _try_send(self, stream: Stream, data: bytes, end_stream: bool) -> int:
        """Queue what of ``data`` the send window allows, without waiting; returns how much."""
        with self._lock:
            self._raise_if_failed(stream)
            if stream._local_ended:
                raise StreamReset(stream.id, ErrorCodes.STREAM_CLOSED, remote=False)
            try:
                size = min(len(data), max(self._h2.local_flow_control_window(stream.id), 0))
                if size < len(data):
                    data, end_stream = data[:size], False
                if size or end_stream:
                    self._send_data_locked(stream.id, data, end_stream)
            except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
                error = stream._error or StreamReset(stream.id, ErrorCodes.STREAM_CLOSED, remote=True)
                stream._error = error
                raise _fresh(error) from None
            if end_stream:
                stream._local_ended = True
            self._outbox.queue_output()
        self._outbox.send_without_blocking()
        return size

    def _send(
        self,
        stream: Stream,
        headers: Optional[Sequence[Header]],
        data: bytes,
        end_stream: bool,
        timeout: Optional[float],
    ) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if type(data) is not bytes:
            data = bytes(data)  # queued as is until written: must not change meanwhile
        total = len(data)
        pos = 0
        view = memoryview(data) if total else None
        h2conn = self._h2
        sid = stream.id
        while True:
            with self._lock:
                self._raise_if_failed(stream)
                if stream._local_ended:
                    raise StreamReset(sid, ErrorCodes.STREAM_CLOSED, remote=False)
                try:
                    if headers is not None:
                        h2conn.send_headers(sid, headers, end_stream=end_stream and total == 0)
                        headers = None
                        if total == 0:
                            stream._local_ended = end_stream
                    elif total == 0 and end_stream:
                        h2conn.end_stream(sid)
                        stream._local_ended = True
                    if pos < total:
                        window = self._wait_window(stream, deadline)
                        n = min(window, h2conn.max_outbound_frame_size, total - pos)
                        last = pos + n == total
                        chunk = data if n == total else _Payload(view[pos : pos + n])  # type: ignore[index]
                        h2conn.send_data(sid, chunk, end_stream=end_stream and last)
                        pos += n
                        if last and end_stream:
                            stream._local_ended = True
                except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
                    error = stream._error or StreamReset(sid, ErrorCodes.STREAM_CLOSED, remote=True)
                    stream._error = error
                    raise _fresh(error) from None
                self._outbox.queue_output()
            self._outbox.flush(wait=self._outbox.full())
            if pos >= total:
                return

    def _wait_window(self, stream: Stream, deadline: Optional[float]) -> int:
        """Wait (lock held) for a positive send window on ``stream``."""
        while True:
            self._raise_if_failed(stream)
            window = self._h2.local_flow_control_window(stream.id)
            if window > 0:
                return window
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                msg = f"timed out waiting for flow-control window on stream {stream.id}"
                raise StreamTimeout(msg)
            stream._waiting.wait(self._lock, remaining)

    # -- waiting -------------------------------------------------------------

    def _wait(self, stream: Stream, ready: Callable[[], bool], timeout: Optional[float], what: str) -> None:
        """Wait (lock held) until ``ready()``; raise the stream's or the connection's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            self._raise_if_failed(stream)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                msg = f"timed out waiting for {what} on stream {stream.id}"
                raise StreamTimeout(msg)
            stream._waiting.wait(self._lock, remaining)

    def _raise_if_failed(self, stream: Stream) -> None:
        if stream._error is not None:
            raise _fresh(stream._error)
        if self._error is not None:
            raise ConnectionClosed(self._error.reason, request_sent=stream.request_sent)

    # -- receiving and closing -----------------------------------------------

    def _acknowledge(self, stream_id: int, size: int) -> None:
        """Return ``size`` bytes of flow-control credit (lock held)."""
        if size and self._error is None:
            self._h2.acknowledge_received_data(size, stream_id)
            self._outbox.queue_output()

    def _close_stream(self, stream: Stream, error_code: int, *, force_reset: bool) -> None:
        with self._lock:
            if stream._closed:
                return
            stream._closed = True
            self._streams.pop(stream.id, None)
            unread = stream._buffered + stream._unacknowledged
            stream._chunks.clear()
            stream._offset = stream._buffered = stream._unacknowledged = 0
            if self._error is None:
                finished = stream._local_ended and stream._remote_ended and stream._error is None
                if force_reset or (not finished and not isinstance(stream._error, StreamReset)):
                    try:
                        self._h2.reset_stream(stream.id, error_code)
                    except h2.exceptions.ProtocolError:
                        pass  # already closed in h2's view
                    if stream._error is None:
                        stream._error = StreamReset(stream.id, error_code, remote=False)
                if unread:
                    self._h2.acknowledge_received_data(unread, stream.id)
                self._outbox.queue_output()
            to_wake = stream._waiting.take() + self._capacity_waiting.take(1)
        release(to_wake)
        # Never waits on the socket: a stream is closed on the reader thread too (by a listener), and
        # a reader that blocks on a write can deadlock with a peer that does the same.
        self._outbox.send_without_blocking()


def _fresh(error: Exception) -> Exception:
    """A new exception like ``error``, the one recorded on a stream, to raise.

    Raising the record itself would give it a traceback: every frame that the
    exception passed through, with their locals (the stream among them), tied
    to the stream that holds the record, a cycle that only the garbage
    collector breaks. Each request that met the error (a response cut short by
    a client that went away, say) would keep its objects, its body included,
    until a full collection.
    """
    if isinstance(error, StreamReset):
        return StreamReset(error.stream_id, error.error_code, remote=error.remote)
    if isinstance(error, ConnectionClosed):
        return ConnectionClosed(error.reason, request_sent=error.request_sent)
    return error
