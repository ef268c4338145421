"""The blocking HTTP/2 connection engine that serves both tunnel roles.

A :class:`Connection` owns one socket and one ``h2`` state machine. The router
uses it as the HTTP/2 client, the backend as the HTTP/2 server.

Theory of operation
-------------------

Threads. Exactly one *reader* thread per connection calls ``recv``; it feeds
the bytes to h2 under the connection lock and dispatches the resulting events
to their :class:`Stream`. Any number of *user* threads (router request threads,
backend pool threads) open streams, send and read through :class:`Stream`
methods. One *writer* thread sends the bytes the reader produced (window
updates, SETTINGS and PING acknowledgements).

The lock. ``self._lock`` guards the h2 object, the stream table and every
stream's buffers, and it is never held across socket I/O. Holding one lock
over h2 calls *and* ``sendall`` deadlocks as soon as both directions carry
bulk data with flow-control windows larger than the socket buffers: each
side's sender blocks in ``sendall`` while its reader waits for the lock.

Write order. HPACK state makes wire order matter, so the bytes h2 produces are
appended to ``self._outbox`` while the lock is still held (production order).
A large DATA payload is queued as the very object the sender passed (or a
memoryview slice of it) behind its 9-byte frame header, and the outbox goes
out in vectored writes: nothing copies it on the way (``_H2Connection``).
Whoever holds ``self._write_lock`` takes the whole outbox under the lock and
sends it, and keeps doing so until the outbox is empty; one sender at a time
keeps the order. A user thread that finds another one sending leaves its bytes
to it and goes on (no hand-off, no waiting on the hot path), unless the outbox
is past its high-water mark: then it waits its turn, which bounds memory. The
reader never sends and never waits for the write lock; it wakes the writer
thread. A blocked ``sendall`` therefore never stops the reader, which keeps
draining the peer's data and window updates.

Reading. The reader asks the socket for the rest of a large DATA frame
exactly, so the payload arrives in blocks of its own that reach the stream's
consumer as they are (``_FrameBuffer``); small frames are read in large
blocks.

Flow control. A sender waits on its stream's condition until h2 reports a
positive window; the reader notifies on ``WindowUpdated`` and
``RemoteSettingsChanged``. A receiver acknowledges DATA only when its consumer
takes it from the stream's buffer, so a slow consumer slows the producer; at
stream teardown the unread remainder is acknowledged so the connection window
never leaks. The connection-level window is opened to the maximum at start:
per-stream windows bound the buffering, and one slow stream cannot starve the
others.

Death. When the connection fails, for whatever reason, every waiting thread is
woken at once with :class:`~ptth_sync.errors.ConnectionClosed`; the reader
closes the socket and calls ``on_close`` exactly once.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.stream
import h2.utilities
import hyperframe.exceptions
import hyperframe.frame
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from .errors import ConnectionClosed, StreamReset, StreamTimeout
from .sockets import IOV_MAX as _IOV_MAX
from .sockets import linger_close, peer_name, sendall_buffers, shutdown, unsent
from .stream import Header, Stream
from .waiting import WaitQueue, release

__all__ = ["Connection", "ConnectionSettings", "Header", "Stream"]

log = logging.getLogger("ptth_sync.connection")

# h2 logs every received frame with ``repr(frame)``, even when the logger is a
# no-op, and the repr of a frame that carries a payload hex-encodes all of it
# before truncating. That dominates the receive path; give those frames a
# repr that only states the payload's length.
for _frame_class in (hyperframe.frame.DataFrame, hyperframe.frame.HeadersFrame, hyperframe.frame.ContinuationFrame):
    _frame_class._body_repr = lambda self: f"<payload len={len(self.data)}>"  # type: ignore[method-assign]


class _Payload:
    """A slice of a caller's buffer passed through h2 as DATA without being copied.

    h2 only takes the ``len()`` of what it sends (and copies memoryviews);
    :class:`_H2Connection` writes the slice itself after the frame header.
    """

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)


class StreamMalformed(h2.events.Event):
    """A request or response that RFC 9113 §8.1.1 calls malformed; its stream was reset with PROTOCOL_ERROR.

    A malformed message is a *stream* error: only that stream ends, and the
    connection, with every other request on it, carries on.
    """

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason

    def __repr__(self) -> str:
        return f"<StreamMalformed stream_id:{self.stream_id}, reason:{self.reason}>"


class _Malformed(h2.exceptions.ProtocolError):
    """Raised inside h2 for a malformed message; :class:`_H2Connection` turns it into a stream reset."""

    def __init__(self, stream_id: int, reason: str) -> None:
        super().__init__(reason)
        self.stream_id = stream_id
        self.reason = reason


class _HeaderBlockFrame:
    """An outgoing HEADERS or CONTINUATION frame, without hyperframe's frame objects.

    Building a :class:`hyperframe.frame.HeadersFrame` (its flags, padding and
    priority mixins) cost more than encoding the header block itself;
    :meth:`_H2Connection._prepare_for_sending` writes this one with a single
    ``struct.pack``. ``flags`` is a plain set, as h2 only adds to it.
    """

    __slots__ = ("data", "flags", "stream_id", "type")

    def __init__(self, frame_type: int, stream_id: int, data: bytes) -> None:
        self.type = frame_type
        self.stream_id = stream_id
        self.flags: Set[str] = set()
        self.data = data

    def serialize(self) -> bytes:
        flags = self.flags
        bits = (0x1 if "END_STREAM" in flags else 0) | (0x4 if "END_HEADERS" in flags else 0)
        size = len(self.data)
        return _FRAME_HEADER.pack(size >> 8, size & 0xFF, self.type, bits, self.stream_id) + self.data


class _H2Stream(h2.stream.H2Stream):
    """h2's stream, with the checks of a received message raising :class:`_Malformed`.

    h2 treats a malformed request or response (a bad or conflicting
    ``content-length``, a body longer or shorter than it, a bad pseudo-header,
    an uppercase or connection-specific header, trailers without END_STREAM)
    as a connection error and sends GOAWAY, failing every stream of the
    tunnel. These checks run after the header block was decoded (HPACK state
    stays in step) and after the stream's state moved, so resetting the stream
    instead is safe.
    """

    def send_headers(self, headers: Any, encoder: Any, end_stream: bool = False) -> Any:
        """h2's ``send_headers`` (4.1-4.4) for a request or a final response, with a light frame.

        Our header blocks are bytes, already lower-cased and checked
        (``ptth_sync.headers``), and h2's outbound validation and normalisation
        are off; informational responses take h2's own path.
        """
        machine = self.state_machine
        config = self.config
        if (config.validate_outbound_headers or config.normalize_outbound_headers
                or (not machine.client and h2.utilities.is_informational_response(headers))):
            return super().send_headers(headers, encoder, end_stream)
        machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
        block = encoder.encode(headers)
        size = self.max_outbound_frame_size or len(block) or 1
        frames = [_HeaderBlockFrame(0x1, self.stream_id, block[:size])]
        for start in range(size, len(block), size):
            frames.append(_HeaderBlockFrame(0x9, self.stream_id, block[start : start + size]))
        frames[-1].flags.add("END_HEADERS")
        if end_stream:
            machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            frames[0].flags.add("END_STREAM")
        if machine.trailers_sent and not end_stream:
            msg = "Trailers must have END_STREAM set."
            raise h2.exceptions.ProtocolError(msg)
        if machine.client and self._authority is None:
            self._authority = h2.utilities.authority_from_headers(headers)
        self.request_method = h2.utilities.extract_method_header(headers)
        return frames

    def receive_headers(self, headers: Any, end_stream: bool, header_encoding: Any) -> Any:
        if end_stream and h2.utilities.is_informational_response(headers):
            raise _Malformed(self.stream_id, "an informational response with END_STREAM")
        if not end_stream and self.state_machine.headers_received:
            raise _Malformed(self.stream_id, "trailers without END_STREAM")
        return super().receive_headers(headers, end_stream, header_encoding)

    def _initialize_content_length(self, headers: Any) -> None:
        try:
            super()._initialize_content_length(headers)
        except h2.exceptions.ProtocolError as exc:
            raise _Malformed(self.stream_id, str(exc)) from None

    def _process_received_headers(self, headers: Any, header_validation_flags: Any, header_encoding: Any) -> Any:
        try:
            return super()._process_received_headers(headers, header_validation_flags, header_encoding)
        except h2.exceptions.ProtocolError as exc:
            raise _Malformed(self.stream_id, str(exc)) from None

    def _track_content_length(self, length: int, end_stream: bool) -> None:
        try:
            super()._track_content_length(length, end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise _Malformed(self.stream_id, f"a body of another length than its content-length ({exc})") from None


class _H2Connection(h2.connection.H2Connection):
    """h2, with DATA frames leaving as their 9-byte header plus the caller's payload object.

    Stock h2 copies a DATA payload about four times on its way out (body,
    header + body, its output buffer, the bytes handed out); here the payload
    stays where the caller put it and goes to the socket in a vectored write.
    Flow control, stream states and everything else remain h2's: only the
    serialisation of plain DATA frames changes. :meth:`take_output` returns the
    pending output as a list of buffers in wire order.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        self._segments: List[Any] = []  # output ahead of self._data_to_send, in wire order
        self._opened_since_sweep = 0  # request streams opened since h2 last dropped its closed streams

    def _prepare_for_sending(self, frames: List[hyperframe.frame.Frame]) -> None:
        for frame in frames:
            if type(frame) is _HeaderBlockFrame:
                self._data_to_send += frame.serialize()
                continue
            data = frame.data if type(frame) is hyperframe.frame.DataFrame else None
            if data is None or "PADDED" in frame.flags or (len(data) < _DIRECT_DATA and type(data) is bytes):
                if type(data) is _Payload:
                    frame.data = data.view.tobytes()
                self._data_to_send += frame.serialize()
                continue
            if self._data_to_send:
                self._segments.append(bytes(self._data_to_send))
                self._data_to_send = bytearray()
            size = len(data)
            flags = 0x1 if "END_STREAM" in frame.flags else 0
            self._segments.append(_FRAME_HEADER.pack(size >> 8, size & 0xFF, 0x0, flags, frame.stream_id))
            self._segments.append(data.view if type(data) is _Payload else data)
            frame.body_len = size

    def send_headers(self, stream_id: int, headers: Any, end_stream: bool = False, **priority: Any) -> None:
        """h2's ``send_headers`` (4.1-4.4), without its count of open streams for a new request.

        The engine opens a stream only when its own count of open streams, an
        upper bound of h2's, is under the peer's limit
        (:meth:`Connection._stream_free_locked`); h2 counts again by walking
        every stream it holds, on every request. The walk also forgets closed
        streams, so it still runs once every ``_SWEEP_EVERY`` new streams.
        """
        if priority or not self.config.client_side or stream_id in self.streams:
            super().send_headers(stream_id, headers, end_stream, **priority)
            return
        self._opened_since_sweep += 1
        if self._opened_since_sweep >= _SWEEP_EVERY:
            self._opened_since_sweep = 0
            _ = self.open_outbound_streams  # (a property that drops closed streams as it counts)
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        stream = self._begin_new_stream(stream_id, h2.connection.AllowedStreamIDs.ODD)
        self._prepare_for_sending(stream.send_headers(headers, self.encoder, end_stream))

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        if self.config.client_side and not self._stream_id_is_outbound(stream_id):
            # Push is disabled, so a server may not open streams (RFC 9113 5.1.1):
            # a connection error, which h2 leaves to header validation (off here).
            msg = f"Invalid stream ID for peer: the server opened stream {stream_id}"
            raise h2.exceptions.ProtocolError(msg)
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _H2Stream
        return stream

    def _receive_frame(self, frame: hyperframe.frame.Frame) -> List[h2.events.Event]:
        """h2's ``_receive_frame`` (4.1-4.4), without its eager ``repr(frame)`` for a trace log.

        And a malformed message (:class:`_Malformed`) resets its stream
        instead of failing the connection.
        """
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as exc:
            # Closed by RST_STREAM: a stream error; otherwise a connection error (h2's rule).
            if not self._stream_is_closed_by_reset(exc.stream_id):
                raise
            reset = hyperframe.frame.RstStreamFrame(exc.stream_id)
            reset.error_code = exc.error_code
            self._prepare_for_sending([reset])
            return exc._events
        except h2.exceptions.StreamIDTooLowError as exc:
            if self._stream_is_closed_by_reset(exc.stream_id):
                reset = hyperframe.frame.RstStreamFrame(exc.stream_id)
                reset.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                return []
            if self._stream_is_closed_by_end(exc.stream_id):
                raise h2.exceptions.StreamClosedError(exc.stream_id) from exc
            raise
        except _Malformed as exc:
            # A stream error (RFC 9113 §8.1.1): reset that stream, keep the connection.
            try:
                self.reset_stream(exc.stream_id, ErrorCodes.PROTOCOL_ERROR)
            except h2.exceptions.StreamClosedError:
                pass  # it ended both ways with this very frame: nothing left to reset
            if type(frame) is hyperframe.frame.DataFrame:  # its bytes still count against the connection window
                self.acknowledge_received_data(frame.flow_controlled_length, exc.stream_id)
            return [StreamMalformed(exc.stream_id, exc.reason)]
        self._prepare_for_sending(frames)
        return events

    def take_output(self) -> List[Any]:
        """Everything queued for the wire, as buffers in order; clears it."""
        segments, self._segments = self._segments, []
        if self._data_to_send:
            segments.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        return segments

    def data_to_send(self, amount: Optional[int] = None) -> bytes:
        if self._segments:
            self._data_to_send = bytearray(b"".join(self._segments)) + self._data_to_send
            self._segments = []
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        self._segments = []
        super().clear_outbound_data_buffer()


class _Parts:
    """A DATA payload that arrived in several blocks, passed through h2 without joining them."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: List[bytes], size: int) -> None:
        self.parts = parts
        self.size = size

    def __len__(self) -> int:
        return self.size


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, without copying DATA payloads.

    Received blocks are kept as they came. The reader asks for the rest of a
    large DATA frame exactly (:meth:`next_read`), so its payload arrives as
    blocks of its own, handed on as they are (a :class:`_Parts`); h2's own
    buffer copies every payload three times. Frame-length checks, header-block
    assembly and the client preface check are h2's, except that an overlong
    frame is refused as soon as its length is in rather than once all of it is.
    """

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self._blocks: Deque[bytes] = collections.deque()
        self._offset = 0  # into self._blocks[0]
        self._size = 0  # bytes buffered, from the offset on
        self._bulk = False  # the last frame was a large DATA frame: read the next header alone
        self._preface = self._preamble
        self._preface_left = len(self._preface)

    def add_data(self, data: Any) -> None:
        if self._preface_left:
            view = memoryview(data)
            used = min(self._preface_left, len(view))
            if self._preface[:used] != view[:used]:
                msg = "Invalid HTTP/2 preamble."
                raise h2.exceptions.ProtocolError(msg)
            self._preface = self._preface[used:]
            self._preface_left -= used
            data = view[used:]
        if type(data) is not bytes:
            data = bytes(data)
        if data:
            self._blocks.append(data)
            self._size += len(data)

    def next_read(self, default: int) -> int:
        """How many bytes the reader should ask for next.

        The rest of a large DATA frame exactly, so that its payload arrives in
        blocks of its own; after such a frame, the next frame header alone
        (the payload that follows is probably large too); else ``default``.
        """
        size = self._size
        if size < 9:
            return 9 - size if self._bulk else default
        header = self._peek(9)
        missing = 9 + int.from_bytes(header[:3], "big") - size
        if header[3] == 0x0 and missing >= _DIRECT_READ:
            return missing
        return default

    def _peek(self, size: int) -> bytes:
        first = self._blocks[0]
        start = self._offset
        if len(first) - start >= size:
            return first[start : start + size]
        return b"".join(self._blocks)[start : start + size]

    def _take(self, size: int) -> List[bytes]:
        """Remove the next ``size`` buffered bytes (``0 < size <= self._size``), as whole blocks where possible."""
        blocks = self._blocks
        self._size -= size
        parts = []
        while size:
            block = blocks[0]
            start = self._offset
            available = len(block) - start
            if available <= size:
                blocks.popleft()
                self._offset = 0
                parts.append(block if start == 0 else block[start:])
                size -= available
            else:
                self._offset = start + size
                parts.append(block[start : start + size])
                size = 0
        return parts

    def _skip(self, size: int) -> None:
        blocks = self._blocks
        self._size -= size
        while size:
            available = len(blocks[0]) - self._offset
            if available <= size:
                blocks.popleft()
                self._offset = 0
                size -= available
            else:
                self._offset += size
                size = 0

    def __next__(self) -> hyperframe.frame.Frame:
        while True:
            if self._size < 9:
                if self._size >= 3:
                    self._validate_frame_length(int.from_bytes(self._peek(3), "big"))
                raise StopIteration
            header = self._peek(9)
            try:
                frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(header))
            except (hyperframe.exceptions.InvalidDataError, hyperframe.exceptions.InvalidFrameError) as err:
                msg = f"Received frame with invalid header: {err!s}"
                raise h2.exceptions.ProtocolError(msg) from err
            self._validate_frame_length(length)
            if self._size < 9 + length:
                raise StopIteration
            self._skip(9)
            parts = self._take(length) if length else [b""]
            self._bulk = False
            if type(frame) is hyperframe.frame.DataFrame and "PADDED" not in frame.flags:
                frame.data = parts[0] if len(parts) == 1 else _Parts(parts, length)
                frame.body_len = length
                self._bulk = length >= _DIRECT_READ
            else:
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                try:
                    frame.parse_body(memoryview(body))
                except hyperframe.exceptions.InvalidDataError as err:
                    msg = "Received frame with non-compliant data"
                    raise h2.exceptions.ProtocolError(msg) from err
                except hyperframe.exceptions.InvalidFrameError as err:
                    msg = "Frame data missing or invalid"
                    raise h2.exceptions.FrameDataMissingError(msg) from err
            complete = self._update_header_buffer(frame)
            if complete is not None:
                return complete


_allocator_tuned = False


def _tune_allocator() -> None:
    """Let MiB-sized body buffers come from the heap rather than fresh pages (once per process).

    glibc serves each allocation over its mmap threshold (128 KiB at first)
    with fresh pages from the kernel, zeroed and faulted in one by one, and
    gives them back when freed: for the MiB-sized buffers that bodies pass
    through (here, and in gunicorn's request-body reader on the router) that
    costs more than copying them. Freeing such a block raises the threshold
    to its size (mallopt(3), "dynamic mmap threshold"): done once, for blocks
    up to 4 MiB, when a process opens its first tunnel (a no-op with other
    allocators).
    """
    global _allocator_tuned
    if not _allocator_tuned:
        _allocator_tuned = True
        bytes(4 * 1024 * 1024)


_FRAME_HEADER = struct.Struct(">HBBBL")
# Client role: h2 drops its closed streams once per this many new streams (_H2Connection.send_headers).
_SWEEP_EVERY = 64
# DATA payloads at least this large are written without being copied.
_DIRECT_DATA = 4096
# DATA frames at least this large are read on their own (see _FrameBuffer.next_read).
_DIRECT_READ = 64 * 1024
_MAX_WINDOW = 2**31 - 1
_CONTROL_EVENTS = (h2.events.PingReceived, h2.events.RemoteSettingsChanged)
# Past this many queued bytes a DATA sender waits to write instead of queueing more.
_OUTBOX_HIGH_WATER = 1024 * 1024
_DEFAULT_WINDOW = 65535
#: The payload of ConnectionSettings.http1_probe's PING.
HTTP1_PROBE = b"\r\n\r\nptth"


@dataclass(frozen=True)
class ConnectionSettings:
    """Tunables of one connection; the defaults suit a tunnel on a LAN."""

    #: Per-stream receive window: how much one stream may buffer unread.
    stream_window: int = 1024 * 1024
    #: Largest DATA frame we accept (and the peer may send).
    max_frame_size: int = 1024 * 1024
    #: Streams the peer may open at once (meaningful for the server role).
    max_concurrent_streams: int = 100
    #: Largest decoded header block we accept.
    max_header_list_size: int = 64 * 1024
    #: Bytes asked of one ``recv`` call.
    recv_size: int = 256 * 1024
    #: Seconds the peer has to send its SETTINGS before we give up on it (0: no limit).
    settings_timeout: float = 10.0
    #: After this many seconds without a byte from the peer, send a PING (0: never).
    ping_interval: float = 15.0
    #: Seconds a PING may go unanswered before the connection counts as dead.
    ping_timeout: float = 10.0
    #: PING and SETTINGS frames the peer may send per second; beyond that it is
    #: flooding us and the connection is closed with GOAWAY(ENHANCE_YOUR_CALM).
    max_control_frames_per_second: int = 500
    #: RST_STREAM frames the peer may send per second (the "rapid reset" attack
    #: opens and cancels streams as fast as it can); beyond that, the same.
    max_resets_per_second: int = 2000
    #: Bytes of a header block (HEADERS + CONTINUATION) buffered before END_HEADERS.
    max_header_block: int = 256 * 1024
    #: Bytes we may have queued for a peer that does not read them (PING and
    #: SETTINGS acknowledgements, window updates) before giving up on it.
    max_unsent_bytes: int = 64 * 1024 * 1024
    #: Server role: follow our SETTINGS with a PING whose payload ends an HTTP/1.1
    #: request head, so that an HTTP/1.1 server dialled by mistake answers at once
    #: (as the client preface makes it do) instead of waiting for a request.
    http1_probe: bool = False
    #: Server role: announce SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441): the peer may open
    #: WebSockets as extended CONNECT streams.
    enable_connect_protocol: bool = False


class Connection:
    """A blocking HTTP/2 connection over a socket, for the client or the server role.

    ``on_ready(conn)`` runs (on the reader thread) once the peer's first
    SETTINGS arrived; ``on_request(stream)`` (server role) for each new
    request; ``on_close(conn, reason)`` exactly once when the connection is
    gone. Callbacks must not block.
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
        name: str = "",
        initial_data: bytes = b"",
    ) -> None:
        self.sock = sock
        self._initial_data = initial_data
        self._can_send_nonblocking = isinstance(sock, socket.socket)
        self.client_side = client_side
        self.settings = settings
        self.name = name or peer_name(sock)
        self._on_ready = on_ready
        self._on_request = on_request
        self._on_close = on_close
        # Outbound checks are ours: both roles send header blocks they built
        # themselves, lower-cased and without connection-specific headers
        # (ptth_sync.headers), which saves h2 a second pass per request.
        # Inbound checks stay on for the server role: a request may come from
        # anything. The client role (the router) checks each response once
        # itself as it turns it into HTTP/1.1 (headers.response_status and
        # response_headers), and h2's pass over it would be a second one.
        config = h2.config.H2Configuration(
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
        self._write_lock = threading.Lock()
        self._writer_waiting = WaitQueue()
        self._capacity_waiting = WaitQueue()  # open_stream at the stream limit, drain
        # Stream slots freed by the last batch: wake that many waiters, not all
        # of them (hundreds of threads may wait for a tunnel's few slots);
        # None wakes every one (the limit itself changed).
        self._slots_freed: Optional[int] = 0
        self._streams: Dict[int, Stream] = {}
        self._outbox: List[Any] = []  # buffers (bytes, memoryviews) in wire order
        self._queued_bytes = 0
        self._attempted_bytes = 0
        self._error: Optional[ConnectionClosed] = None
        self._ready = threading.Event()
        #: The connection became ready at some point: the peer's SETTINGS arrived and did not come with
        #: its end (it stays True once the connection is dead, unlike :attr:`ready`).
        self.was_ready = False
        self._closed = threading.Event()
        self._draining = False
        self._drain_acked = False
        self._pending_drain_ack = False
        self._started_at = time.monotonic()
        self._last_received = self._started_at
        self._ping_sent_at: Optional[float] = None
        self._control_window_start = self._started_at
        self._control_frames = self._resets = 0
        self.close_reason: Optional[str] = None
        #: The peer's first bytes (at most 256) and its GOAWAY's (error code, debug data), once received.
        self.first_bytes = b""
        self.goaway_received: Optional[Tuple[int, bytes]] = None
        self._reader: Optional[threading.Thread] = None
        self._writer: Optional[threading.Thread] = None
        self._prepared = False

    # -- life cycle --------------------------------------------------------

    def start(self, initial_data: bytes = b"") -> None:
        """Send our preface and settings and start the reader and writer threads.

        ``initial_data``: more bytes already read from the socket (after :meth:`prepare`).
        """
        self._initial_data += initial_data
        self.prepare()
        self._reader = threading.Thread(target=self._read_loop, name=f"ptth-reader {self.name}", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"ptth-writer {self.name}", daemon=True)
        self._writer.start()
        self._reader.start()
        self._writer_kick()

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
            # h2 raises its inbound frame limit when the peer ACKs these settings,
            # but sizes its frame buffer once per receive_data call: when the ACK
            # and the peer's first large frame arrive in one read, that frame
            # fails with FRAME_SIZE_ERROR and takes the connection down. Accept
            # what we advertise from the start instead.
            self._h2.max_inbound_frame_size = s.max_frame_size
            self._h2.increment_flow_control_window(_MAX_WINDOW - _DEFAULT_WINDOW)
            self._queue_output()

    def send_prepared(self) -> None:
        """Before :meth:`start`: send what is queued as far as the socket takes it without blocking."""
        self._send_without_blocking()

    @property
    def started(self) -> bool:
        """True once :meth:`start` ran (its threads exist)."""
        return self._reader is not None

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
                self._queue_output()
            except h2.exceptions.ProtocolError:
                pass
            self._fail(reason)
        self._send_final_bytes()
        shutdown(self.sock)

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
                self._queue_output()
        self._flush()
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
            self._queue_output()
        self._flush()
        return stream

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
        stream._first_byte_offset = self._queued_bytes
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.TooManyStreamsError:
            msg = "tunnel is full"
            raise ConnectionClosed(msg, request_sent=False) from None
        stream._local_ended = end_stream
        self._streams[stream_id] = stream
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
            self._queue_output()
        if send:
            self._send_without_blocking()
        return stream

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
                raise error from None
            if end_stream:
                stream._local_ended = True
            self._queue_output()
        self._send_without_blocking()
        return size

    def send_queued(self) -> None:
        """Send what is queued, without blocking: the socket takes what it can, the writer thread the rest."""
        self._send_without_blocking()

    # -- internals: waiting ------------------------------------------------

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
            raise stream._error
        if self._error is not None:
            raise ConnectionClosed(self._error.reason, request_sent=stream.request_sent)

    # -- internals: sending ------------------------------------------------

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
                    raise error from None
                self._queue_output()
            self._flush(wait=self._outbox_full())
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

    def _queue_output(self) -> None:
        """Move h2's pending output to the outbox (lock held), keeping production order."""
        segments = self._h2.take_output()
        if segments:
            self._outbox += segments
            self._queued_bytes += sum(map(len, segments))

    def _flush(self, wait: bool = False) -> None:
        """Send what is queued, unless another thread is sending already: it sends ours too.

        The thread holding the write lock keeps sending until the outbox is
        empty, and gives the lock up while holding the state lock, so bytes
        appended meanwhile are never stranded. With ``wait`` the caller waits
        its turn instead: the writer thread does, and so do DATA senders once
        the outbox is past its high-water mark, which bounds its memory.
        """
        if not self._write_lock.acquire(blocking=wait):
            return
        sock = self.sock
        while True:
            with self._lock:
                outbox = self._outbox
                if not outbox or self._error is not None:
                    self._write_lock.release()
                    return
                self._outbox = []
                self._attempted_bytes += sum(map(len, outbox))
            try:
                sendall_buffers(sock, outbox)
            except OSError as exc:
                with self._lock:
                    self._fail(f"write failed: {exc}")
                    self._write_lock.release()
                shutdown(sock)
                return

    def _send_without_blocking(self) -> None:
        """Any thread: send what is queued (acknowledgements, mostly) if that cannot block.

        Saves waking the writer thread for the few bytes a batch of frames
        asks back. Only when no one else is sending, and only what the socket
        takes at once: the rest, or all of it on a TLS channel, goes to the
        writer thread, so the caller (the reader, a listener) never waits on a write.
        """
        if not self._outbox:
            return  # (bytes queued later are sent by whoever queues them, or by the sender they find)
        if self._can_send_nonblocking and self._write_lock.acquire(blocking=False):
            with self._lock:
                outbox = self._outbox
                self._outbox = []
                size = sum(map(len, outbox))
                self._attempted_bytes += size
            try:
                sent = self.sock.sendmsg(outbox[:_IOV_MAX], (), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = size  # the connection is failing; the reader will hear of it
            with self._lock:
                if sent < size:
                    self._outbox[:0] = unsent(outbox, sent)
                    self._attempted_bytes -= size - sent
                # Released under the state lock, as in _flush, so nothing is stranded.
                self._write_lock.release()
                waiters = self._writer_waiting.take() if self._outbox else []
        else:
            with self._lock:
                waiters = self._writer_waiting.take()
        release(waiters)

    def _outbox_full(self) -> bool:
        return self._queued_bytes - self._attempted_bytes > _OUTBOX_HIGH_WATER

    def _writer_kick(self) -> None:
        with self._lock:
            waiters = self._writer_waiting.take()
        release(waiters)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._outbox and self._error is None:
                    self._writer_waiting.wait(self._lock, None)
                if self._error is not None:
                    return
            self._flush(wait=True)

    def _send_final_bytes(self) -> None:
        """Best effort, bounded: send what is queued (a GOAWAY) before closing."""
        if not self._write_lock.acquire(timeout=1.0):
            return
        try:
            with self._lock:
                outbox = self._outbox
                self._outbox = []
                self._attempted_bytes += sum(map(len, outbox))
            if outbox:
                self.sock.settimeout(1.0)
                sendall_buffers(self.sock, outbox)
        except OSError:
            pass
        finally:
            self._write_lock.release()

    # -- internals: receiving ----------------------------------------------

    def _acknowledge(self, stream_id: int, size: int) -> None:
        """Return ``size`` bytes of flow-control credit (lock held)."""
        if size and self._error is None:
            self._h2.acknowledge_received_data(size, stream_id)
            self._queue_output()

    def _read_loop(self) -> None:
        reason = "connection closed"
        try:
            reason = self._receive_until_closed()
        except Exception as exc:  # Defensive: a bug must not leave the tunnel half alive
            log.exception("tunnel %s: unexpected error in the reader", self.name)
            reason = f"internal error: {exc!r}"
        finally:
            with self._lock:
                self._fail(reason)
                reason = self._error.reason if self._error is not None else reason
                listening = [stream for stream in self._streams.values() if stream.listener is not None]
            for stream in listening:
                self._notify(stream)
            self._send_final_bytes()
            linger_close(self.sock)
            self.close_reason = reason
            self._closed.set()
            self._ready.set()  # wakes wait_ready(); `ready` stays False once dead
            if self._on_close is not None:
                try:
                    self._on_close(self, reason)
                except Exception:  # Defensive: a callback bug must not kill the reader silently
                    log.exception("tunnel %s: on_close callback failed", self.name)

    def _receive_until_closed(self) -> str:
        sock = self.sock
        recv_size = self.settings.recv_size
        next_read = self._h2.incoming_buffer.next_read
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes already
        receive = getattr(sock, "recv_if_ready", sock.recv)  # TLS: never block mid-record
        self._last_received = time.monotonic()
        early, self._initial_data = self._initial_data, b""  # read before we started (a handshake)
        while True:
            data, early = early, b""
            if not data:
                if not (pending is not None and pending()):
                    while not poller.poll(self._poll_timeout_ms()):
                        reason = self._on_quiet()
                        if reason is not None:
                            return reason
                try:
                    data = receive(next_read(recv_size))
                except ssl.SSLWantReadError:
                    continue  # a partial TLS record: poll again
                except OSError as exc:
                    if self._error is not None:
                        return self._error.reason
                    return f"read failed: {exc}"
            if not data:
                if self._error is not None:
                    return self._error.reason
                return "peer closed the connection"
            if not self.first_bytes:
                self.first_bytes = bytes(data[:256])
            self._last_received = time.monotonic()
            new_requests: List[Stream] = []
            became_ready = False
            with self._lock:
                if self._error is not None:
                    return self._error.reason
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._queue_output()  # the GOAWAY h2 prepared
                    return f"protocol error from peer: {_describe(exc)}"
                abuse = self._check_abuse(events)
                if abuse is not None:
                    code = ErrorCodes.FRAME_SIZE_ERROR if "overlong frame" in abuse else ErrorCodes.ENHANCE_YOUR_CALM
                    self._goaway_locked(code, abuse)
                    return abuse
                ended = None
                wake: Set[Stream] = set()
                for event in events:
                    ended = self._dispatch(event, new_requests, wake)
                    if isinstance(event, h2.events.RemoteSettingsChanged) and not self._ready.is_set():
                        became_ready = True
                    if ended is not None:
                        break
                # Wake each stream once per batch, after the lock is released.
                to_wake: List[threading.Lock] = []
                listening: List[Stream] = []
                for stream in wake:
                    if stream._waiting:
                        to_wake += stream._waiting.take()
                    if stream.listener is not None:
                        listening.append(stream)
                if self._slots_freed != 0 and self._capacity_waiting:
                    to_wake += self._capacity_waiting.take(self._slots_freed)
                self._slots_freed = 0
                self._queue_output()
                if self._outbox and self._queued_bytes - self._attempted_bytes > self.settings.max_unsent_bytes:
                    ended = ended or "peer does not read what we send"
            release(to_wake)
            for stream in listening:
                self._notify(stream)
            if self._outbox:
                self._send_without_blocking()
            if ended is not None:
                return ended
            if became_ready:
                self.was_ready = True
                self._ready.set()
                if self._on_ready is not None:
                    self._on_ready(self)
            if self._on_request is not None:
                for stream in new_requests:
                    self._on_request(stream)

    def _notify(self, stream: Stream) -> None:
        """Call a stream's listener (reader thread, no lock held); its failure ends that stream only."""
        try:
            stream.listener(stream)  # type: ignore[misc]
        except Exception:  # Defensive: a listener bug must not take the tunnel down
            log.exception("tunnel %s: stream %d: listener failed", self.name, stream.id)
            stream.listener = None
            self._close_stream(stream, ErrorCodes.INTERNAL_ERROR, force_reset=False)

    def _poll_timeout_ms(self) -> int:
        """How long the reader may wait for bytes before a timer is due."""
        s = self.settings
        if not self._ready.is_set():
            if s.settings_timeout <= 0:
                return -1
            due = self._started_at + s.settings_timeout
        elif self._ping_sent_at is not None:
            due = self._ping_sent_at + s.ping_timeout
        elif s.ping_interval > 0:
            due = self._last_received + s.ping_interval
        else:
            return -1
        return max(int((due - time.monotonic()) * 1000) + 1, 0)

    def _on_quiet(self) -> Optional[str]:
        """The peer said nothing for a while: PING it, or give up on it."""
        s = self.settings
        now = time.monotonic()
        if not self._ready.is_set():
            if 0 < s.settings_timeout <= now - self._started_at:
                return f"peer sent no HTTP/2 SETTINGS within {s.settings_timeout:g}s"
            return None
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= s.ping_timeout:
                return f"no answer to PING within {s.ping_timeout:g}s"
            return None
        if s.ping_interval > 0 and now - self._last_received >= s.ping_interval:
            with self._lock:
                if self._error is not None:
                    return self._error.reason
                self._ping_sent_at = now
                self._h2.ping(b"ptthping")
                self._queue_output()
                waiters = self._writer_waiting.take()
            release(waiters)
        return None

    def _check_abuse(self, events: List[h2.events.Event]) -> Optional[str]:
        """A reason to drop a peer that floods us with control frames or headers (lock held)."""
        now = time.monotonic()
        if now - self._control_window_start >= 1.0:
            self._control_window_start = now
            self._control_frames = self._resets = 0
        for event in events:
            if isinstance(event, _CONTROL_EVENTS):
                self._control_frames += 1
            elif isinstance(event, h2.events.StreamReset):
                self._resets += 1
        s = self.settings
        if self._control_frames > s.max_control_frames_per_second:
            return f"peer sent over {s.max_control_frames_per_second} PING/SETTINGS frames in a second"
        if self._resets > s.max_resets_per_second:
            return f"peer reset over {s.max_resets_per_second} streams in a second"
        # h2 buffers HEADERS and up to 64 CONTINUATION frames of up to
        # max_frame_size each before it decodes a block: bound that here.
        buffered = getattr(self._h2.incoming_buffer, "_headers_buffer", ())
        if buffered and sum(len(frame.data) for frame in buffered) > s.max_header_block:
            return f"peer sent a header block over {s.max_header_block} bytes"
        # (A frame announced longer than we accept is refused as soon as its
        # header is in, by _FrameBuffer: it never holds memory or the connection.)
        return None

    def _goaway_locked(self, error_code: int, reason: str) -> None:
        try:
            self._h2.close_connection(error_code=error_code, additional_data=reason.encode()[:200])
        except h2.exceptions.ProtocolError:
            return
        self._queue_output()

    def _dispatch(self, event: h2.events.Event, new_requests: List[Stream], wake: Set[Stream]) -> Optional[str]:
        """Apply one h2 event (lock held), collecting the streams to wake in ``wake``.

        Returns a reason when the connection ends.
        """
        streams = self._streams
        if isinstance(event, h2.events.DataReceived):
            stream = streams.get(event.stream_id)
            flow = event.flow_controlled_length
            if stream is None:
                self._h2.acknowledge_received_data(flow, event.stream_id)
                return None
            data = event.data
            if flow > len(data):  # padding is credited at once
                self._h2.acknowledge_received_data(flow - len(data), event.stream_id)
            if data:
                if type(data) is _Parts:
                    stream._chunks.extend(data.parts)
                else:
                    stream._chunks.append(data)
                stream._buffered += len(data)
                wake.add(stream)
        elif isinstance(event, (h2.events.RequestReceived, h2.events.ResponseReceived)):
            stream = streams.get(event.stream_id)
            if stream is None:
                if not isinstance(event, h2.events.RequestReceived):
                    return None
                if self._abandoned_streams() >= self.settings.max_concurrent_streams:
                    # h2 stops counting a stream once it is reset, but until a
                    # thread has dealt with it, it still costs us: past as many
                    # as the streams we allow, refuse more (safe to retry), or
                    # "rapid reset" would queue unbounded work.
                    self._h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                    return None
                stream = Stream(self, event.stream_id)
                streams[event.stream_id] = stream
                new_requests.append(stream)
            stream.headers = event.headers
            wake.add(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream._remote_ended = True
                wake.add(stream)
            self._free_slot()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                wake.update(streams.values())
            else:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    wake.add(stream)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            wake.update(streams.values())
            self._slots_freed = None
        elif isinstance(event, h2.events.StreamReset):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream._error = StreamReset(event.stream_id, event.error_code, remote=True)
                wake.add(stream)
            self._free_slot()
        elif isinstance(event, StreamMalformed):
            what = "response" if self.client_side else "request"
            log.info("tunnel %s: stream %d reset: malformed %s from peer: %s", self.name, event.stream_id, what,
                     event.reason)
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream._error = StreamReset(event.stream_id, ErrorCodes.PROTOCOL_ERROR, remote=False)
                wake.add(stream)
            self._free_slot()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = event.headers
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_sent_at = None
        elif isinstance(event, h2.events.SettingsAcknowledged):
            if self._pending_drain_ack:
                self._pending_drain_ack = False
                self._slots_freed = None
        elif isinstance(event, h2.events.ConnectionTerminated):
            last = event.last_stream_id if event.last_stream_id is not None else 0
            self.goaway_received = (event.error_code, event.additional_data or b"")
            reason = f"peer sent GOAWAY ({_error_name(event.error_code)})"
            if event.additional_data:
                reason += f": {event.additional_data[:200].decode('latin-1')!r}"
            for sid, stream in streams.items():
                if stream._error is None:
                    stream._error = ConnectionClosed(reason, request_sent=sid <= last)
            return reason
        return None

    def _abandoned_streams(self) -> int:
        """Streams reset before we answered them that a thread has yet to release (lock held)."""
        h2_streams = self._h2.streams
        count = 0
        for stream in self._streams.values():
            if not stream._local_ended:
                h2_stream = h2_streams.get(stream.id)
                if stream._error is not None or h2_stream is None or h2_stream.closed:
                    count += 1
        return count

    def _free_slot(self) -> None:
        if self._slots_freed is not None:
            self._slots_freed += 1

    def _wake_all_streams(self) -> None:
        for stream in self._streams.values():
            release(stream._waiting.take())

    # -- internals: teardown -----------------------------------------------

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
                self._queue_output()
            to_wake = stream._waiting.take() + self._capacity_waiting.take(1)
        release(to_wake)
        # Never waits on the socket: a stream is closed on the reader thread too (by a listener), and
        # a reader that blocks on a write can deadlock with a peer that does the same.
        self._send_without_blocking()

    def _fail(self, reason: str) -> None:
        """Mark the connection dead and wake every waiter (lock held). First reason wins."""
        if self._error is not None:
            return
        self._error = ConnectionClosed(reason)
        self._wake_all_streams()
        release(self._capacity_waiting.take())
        release(self._writer_waiting.take())

    def _retire_locked(self, reason: str) -> None:
        self._fail(reason)
        shutdown(self.sock)

    def __repr__(self) -> str:
        role = "client" if self.client_side else "server"
        state = "alive" if self.alive else f"closed: {self._error.reason if self._error else ''}"
        return f"<Connection {role} {self.name} {state} streams={len(self._streams)}>"


def _describe(exc: Exception) -> str:
    """A protocol error as a sentence: h2's stream errors print as a bare stream id."""
    if isinstance(exc, h2.exceptions.StreamClosedError):
        return f"frame on stream {exc.stream_id}, which is closed"
    if isinstance(exc, h2.exceptions.NoSuchStreamError):
        return f"frame on stream {exc.stream_id}, which was never opened"
    return str(exc) or type(exc).__name__


def _error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"
