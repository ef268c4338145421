"""The engine's subclasses of h2's classes: the one module that relies on h2's and hyperframe's private names.

Each hook below names the private attributes or methods it relies on. All
were checked against h2 4.1.0 through 4.4.1 and hyperframe 6.0.0 through
6.1.0 (``setup.py`` pins ``h2>=4.1,<4.5`` and ``hyperframe>=6,<7``);
``tests/unit/test_h2compat.py`` fails, naming the hook, if an installed
version drops or renames one of them, and ``tests/unit/test_framing.py``
compares what these classes write and parse with stock h2.

- :class:`_H2Connection`: DATA frames leave as their 9-byte header plus the
  caller's payload object; a new request does not make h2 walk every stream;
  a malformed message, or one with more headers than we advertised
  (:class:`_H2Configuration`), resets its stream instead of failing the
  connection.
- :class:`_ClosedStreams`: h2's record of how its last closed streams ended,
  kept in 5 bytes a stream.
- :class:`_H2Stream`: a request's or final response's header block is
  written without hyperframe's frame objects; the checks of a received
  message raise :class:`_Malformed`.
- :class:`_FrameBuffer`: received DATA payloads are handed on as the blocks
  they arrived in, never copied; DATA and HEADERS frames are made from a
  template per flag byte (:func:`_parse_frame_header`).
"""

from __future__ import annotations

import array
import collections
from typing import Any, Deque, Dict, List, Optional, Tuple, Type

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.stream
import h2.utilities
import hyperframe.exceptions
import hyperframe.flags
import hyperframe.frame
from h2.errors import ErrorCodes

from .framing import _FRAME_HEADER, _HeaderBlockFrame, _Parts, _Payload

_GOAWAY = hyperframe.frame.GoAwayFrame

__all__ = ["StreamMalformed"]

# Client role: h2 drops its closed streams once per this many new streams (_H2Connection.send_headers).
_SWEEP_EVERY = 64
# DATA payloads at least this large are written without being copied.
_DIRECT_DATA = 4096
# DATA frames at least this large are read on their own (see _FrameBuffer.next_read).
_DIRECT_READ = 64 * 1024

# h2 logs every received frame with ``repr(frame)``, even when the logger is a
# no-op, and the repr of a frame that carries a payload hex-encodes all of it
# before truncating. That dominates the receive path; give those frames a
# repr that only states the payload's length.
# Relies on: hyperframe's Frame.__repr__ calling self._body_repr() (hyperframe 6.0.0-6.1.0).
for _frame_class in (hyperframe.frame.DataFrame, hyperframe.frame.HeadersFrame, hyperframe.frame.ContinuationFrame):
    _frame_class._body_repr = lambda self: f"<payload len={len(self.data)}>"  # type: ignore[method-assign]


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


class _H2Stream(h2.stream.H2Stream):
    """h2's stream, with the checks of a received message raising :class:`_Malformed`.

    h2 treats a malformed request or response (a bad or conflicting
    ``content-length``, a body longer or shorter than it, a bad pseudo-header,
    an uppercase or connection-specific header, trailers without END_STREAM)
    as a connection error and sends GOAWAY, failing every stream of the
    tunnel. These checks run after the header block was decoded (HPACK state
    stays in step) and after the stream's state moved, so resetting the stream
    instead is safe.

    :meth:`_H2Connection._begin_new_stream` gives every stream h2 creates this class.
    """

    def send_headers(self, headers: Any, encoder: Any, end_stream: bool = False) -> Any:
        """h2's ``send_headers`` (4.1-4.4) for a request or a final response, with a light frame.

        Our header blocks are bytes, already lower-cased and checked
        (``ptth_sync.headers``), and h2's outbound validation and normalisation
        are off; informational responses take h2's own path.
        """
        # Relies on (h2 4.1.0-4.4.1): the private self._authority; state_machine's inputs and its
        # client/trailers_sent flags; h2.utilities' is_informational_response, authority_from_headers
        # and extract_method_header; h2's _prepare_for_sending taking the returned frames (_H2Connection's
        # takes _HeaderBlockFrame).
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

    # Relies on (h2 4.1.0-4.4.1): receive_headers(headers, end_stream, header_encoding), called by
    # H2Connection for every received header block, and state_machine.headers_received.
    def receive_headers(self, headers: Any, end_stream: bool, header_encoding: Any) -> Any:
        if end_stream and h2.utilities.is_informational_response(headers):
            raise _Malformed(self.stream_id, "an informational response with END_STREAM")
        if not end_stream and self.state_machine.headers_received:
            raise _Malformed(self.stream_id, "trailers without END_STREAM")
        received = super().receive_headers(headers, end_stream, header_encoding)
        # Over the size we advertised (but decoded: HPACK stays in step): this message only.
        limit = getattr(self.config, "header_list_limit", None)
        if limit is not None:
            size = 32 * len(headers) + sum([len(name) + len(value) for name, value in headers])
            if size > limit:
                raise _Malformed(self.stream_id, f"a header block of {size} bytes, over the {limit} it may have")
        return received

    # Relies on (h2 4.1.0-4.4.1): the private _initialize_content_length(headers), which raises
    # ProtocolError for a bad or conflicting content-length.
    def _initialize_content_length(self, headers: Any) -> None:
        try:
            super()._initialize_content_length(headers)
        except h2.exceptions.ProtocolError as exc:
            raise _Malformed(self.stream_id, str(exc)) from None

    # Relies on (h2 4.1.0-4.4.1): the private _process_received_headers(headers,
    # header_validation_flags, header_encoding), which runs h2's inbound header checks.
    def _process_received_headers(self, headers: Any, header_validation_flags: Any, header_encoding: Any) -> Any:
        try:
            return super()._process_received_headers(headers, header_validation_flags, header_encoding)
        except h2.exceptions.ProtocolError as exc:
            raise _Malformed(self.stream_id, str(exc)) from None

    # Relies on (h2 4.1.0-4.4.1): the private _track_content_length(length, end_stream), which
    # raises ProtocolError for a body longer or shorter than its content-length.
    def _track_content_length(self, length: int, end_stream: bool) -> None:
        try:
            super()._track_content_length(length, end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise _Malformed(self.stream_id, f"a body of another length than its content-length ({exc})") from None


class _H2Configuration(h2.config.H2Configuration):
    """h2's configuration, with the engine's two bounds on a received header list.

    ``header_list_limit`` is what we advertise (SETTINGS_MAX_HEADER_LIST_SIZE):
    a larger list is a malformed message (its stream is reset). h2 gives
    HPACK that limit, and HPACK stops decoding past it, which leaves its state
    out of step with the peer's: a connection error. So HPACK decodes up to
    ``decoded_header_list_bound`` instead; past that (an HPACK bomb), the
    connection fails.
    """

    def __init__(self, *, header_list_limit: int, decoded_header_list_bound: int, **options: Any) -> None:
        super().__init__(**options)
        self.header_list_limit = header_list_limit
        self.decoded_header_list_bound = max(decoded_header_list_bound, header_list_limit)


# How a closed stream ended, as h2 records it (a StreamClosedBy, or None: closed implicitly), as a byte.
_CLOSED_BY: Tuple[Optional[h2.stream.StreamClosedBy], ...] = (None, *h2.stream.StreamClosedBy)
_CLOSED_BY_CODE = {closed_by: code for code, closed_by in enumerate(_CLOSED_BY)}
_FIRST_SLOTS = 64


class _ClosedStreams:
    """h2's record of how its last closed streams ended, in 5 bytes a stream instead of about 170.

    h2 remembers the last ``H2Connection.MAX_CLOSED_STREAMS`` (65,536) closed
    streams in an ordered dict, to tell a late frame on a stream it reset (a
    stream error) from one on a stream that had ended (a connection error):
    about 11 MiB for each connection that has served that many streams, a
    tunnel on either side. Here a record sits in the slot of its stream's
    number (one side's stream IDs follow one another, odd or even) in two
    arrays, which double as records would collide, up to the same bound; past
    it, a stream's record makes way for the one whose number shares its slot.
    """

    __slots__ = ("_codes", "_ids", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = max(limit, 1)
        size = min(_FIRST_SLOTS, self._limit)
        self._ids = array.array("I", bytes(4 * size))  # 0: an empty slot (stream 0 is the connection)
        self._codes = bytearray(size)

    def __setitem__(self, stream_id: int, closed_by: Optional[h2.stream.StreamClosedBy]) -> None:
        slot = (stream_id >> 1) % len(self._codes)
        held = self._ids[slot]
        while held and held != stream_id and len(self._codes) < self._limit:
            self._grow()
            slot = (stream_id >> 1) % len(self._codes)
            held = self._ids[slot]
        self._ids[slot] = stream_id
        self._codes[slot] = _CLOSED_BY_CODE[closed_by]

    def __contains__(self, stream_id: object) -> bool:
        if type(stream_id) is not int or stream_id <= 0:
            return False
        return self._ids[(stream_id >> 1) % len(self._codes)] == stream_id

    def __getitem__(self, stream_id: int) -> Optional[h2.stream.StreamClosedBy]:
        if stream_id not in self:
            raise KeyError(stream_id)
        return _CLOSED_BY[self._codes[(stream_id >> 1) % len(self._codes)]]

    def __len__(self) -> int:
        return len(self._codes) - self._ids.count(0)

    def _grow(self) -> None:
        ids, codes = self._ids, self._codes
        size = min(2 * len(codes), self._limit)
        self._ids = array.array("I", bytes(4 * size))
        self._codes = bytearray(size)
        for stream_id, code in zip(ids, codes):
            if stream_id:  # (records in distinct slots stay in distinct slots)
                slot = (stream_id >> 1) % size
                self._ids[slot] = stream_id
                self._codes[slot] = code


class _H2Connection(h2.connection.H2Connection):
    """h2, with DATA frames leaving as their 9-byte header plus the caller's payload object.

    Stock h2 copies a DATA payload about four times on its way out (body,
    header + body, its output buffer, the bytes handed out); here the payload
    stays where the caller put it and goes to the socket in a vectored write.
    Flow control, stream states and everything else remain h2's: only the
    serialisation of plain DATA frames changes. :meth:`take_output` returns the
    pending output as a list of buffers in wire order.
    """

    incoming_buffer: _FrameBuffer

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        # Relies on (h2 4.1.0-4.4.1): receive_data() feeding the public incoming_buffer (add_data,
        # then max_frame_size = max_inbound_frame_size, then iterating it for frames).
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        # Relies on (h2 4.1.0-4.4.1): the private _closed_streams, a stream ID -> StreamClosedBy (or None)
        # mapping that h2 only writes (_open_streams), tests and reads (_stream_closed_by), bounded by
        # the public MAX_CLOSED_STREAMS.
        self._closed_streams = _ClosedStreams(self.MAX_CLOSED_STREAMS)
        self._segments: List[Any] = []  # output ahead of self._data_to_send, in wire order
        self._opened_since_sweep = 0  # request streams opened since h2 last dropped its closed streams
        #: Server role: the debug data of a GOAWAY(NO_ERROR) the client sent, kept here instead of closing
        #: h2's state (see :meth:`_receive_frame`).
        self.goaway_notice: Optional[bytes] = None
        self._bound_decoding()

    # Relies on (h2 4.1.0-4.4.1): the private _local_settings_acked(), which sets the public
    # decoder.max_header_list_size to our acknowledged SETTINGS_MAX_HEADER_LIST_SIZE.
    def _local_settings_acked(self) -> Any:
        changes = super()._local_settings_acked()
        self._bound_decoding()
        return changes

    def _bound_decoding(self) -> None:
        """HPACK decodes header lists up to the configuration's bound (see :class:`_H2Configuration`)."""
        bound = getattr(self.config, "decoded_header_list_bound", None)
        if bound is not None:
            self.decoder.max_header_list_size = bound

    def accept_frames_up_to(self, size: int) -> None:
        """Accept frames up to ``size`` bytes from now on, before the peer acknowledged our SETTINGS saying so.

        h2 raises its inbound frame limit when the peer ACKs these settings,
        but sizes its frame buffer once per receive_data call: when the ACK
        and the peer's first large frame arrive in one read, that frame
        fails with FRAME_SIZE_ERROR and takes the connection down. Accept
        what we advertise from the start instead.
        """
        # Relies on (h2 4.1.0-4.4.1): receive_data() copying max_inbound_frame_size to the frame buffer.
        self.max_inbound_frame_size = size

    # Relies on (h2 4.1.0-4.4.1): every outgoing frame passing through the private
    # _prepare_for_sending(frames), which appends frame.serialize() to the private bytearray
    # self._data_to_send (read by data_to_send() and clear_outbound_data_buffer()).
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
        (``Connection._stream_free_locked``); h2 counts again by walking
        every stream it holds, on every request. The walk also forgets closed
        streams, so it still runs once every ``_SWEEP_EVERY`` new streams.
        """
        # Relies on (h2 4.1.0-4.4.1): state_machine.process_input(ConnectionInputs.SEND_HEADERS), the
        # private _begin_new_stream(stream_id, allowed_ids), the open_outbound_streams property
        # dropping closed streams as it counts, and self.encoder.
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

    # Relies on (h2 4.1.0-4.4.1): every stream being created by the private
    # _begin_new_stream(stream_id, allowed_ids), which returns it, and the private
    # _stream_id_is_outbound(stream_id). The stream's class is swapped for _H2Stream (no new state).
    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        if self.config.client_side and not self._stream_id_is_outbound(stream_id):
            # Push is disabled, so a server may not open streams (RFC 9113 5.1.1):
            # a connection error, which h2 leaves to header validation (off here).
            msg = f"Invalid stream ID for peer: the server opened stream {stream_id}"
            raise h2.exceptions.ProtocolError(msg)
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _H2Stream
        return stream

    # Relies on (h2 4.1.0-4.4.1): receive_data() calling the private _receive_frame(frame) per
    # frame, whose body this repeats: the private _frame_dispatch_table, _stream_is_closed_by_reset,
    # _stream_is_closed_by_end, and StreamClosedError's private _events.
    def _receive_frame(self, frame: hyperframe.frame.Frame) -> List[h2.events.Event]:
        """h2's ``_receive_frame`` (4.1-4.4), without its eager ``repr(frame)`` for a trace log.

        And a malformed message (:class:`_Malformed`) resets its stream
        instead of failing the connection; and, in the server role, a client's
        GOAWAY with NO_ERROR is a notice (:attr:`goaway_notice`): the client
        opens no more streams, and those in flight go on (RFC 9113 §6.8),
        where stock h2 would close its state at once and refuse their responses.
        """
        if frame.__class__ is _GOAWAY and frame.error_code == 0 and not self.config.client_side:
            if self.goaway_notice is None:
                self.goaway_notice = bytes(frame.additional_data or b"")
            return []
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

    # Relies on (h2 4.1.0-4.4.1): the private bytearray self._data_to_send holding h2's pending output.
    def take_output(self) -> List[Any]:
        """Everything queued for the wire, as buffers in order; clears it."""
        segments, self._segments = self._segments, []
        if self._data_to_send:
            segments.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        return segments

    # Relies on (h2 4.1.0-4.4.1): data_to_send() and clear_outbound_data_buffer() working on the
    # private bytearray self._data_to_send.
    def data_to_send(self, amount: Optional[int] = None) -> bytes:
        if self._segments:
            self._data_to_send = bytearray(b"".join(self._segments)) + self._data_to_send
            self._segments = []
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        self._segments = []
        super().clear_outbound_data_buffer()


_READ_ONLY = "the flags of a received frame are read-only"


class _ReceivedFlags(hyperframe.flags.Flags):
    """The flags of received frames made from one template: shared by them, so they cannot change."""

    def add(self, value: str) -> None:
        raise TypeError(_READ_ONLY)

    def discard(self, value: str) -> None:
        raise TypeError(_READ_ONLY)


#: Per (frame type, flag byte): the class, the attributes its constructor sets but the stream, and its flags.
_Template = Tuple[Type[hyperframe.frame.Frame], Dict[str, Any], _ReceivedFlags]
_TEMPLATES: Dict[Tuple[int, int], _Template] = {}
_DATA = hyperframe.frame.DataFrame.type
_HEADERS = hyperframe.frame.HeadersFrame.type
_END_HEADERS = 0x4


def _template(kind: int, flag_byte: int) -> _Template:
    frame, _ = hyperframe.frame.Frame.parse_frame_header(memoryview(bytes((0, 0, 0, kind, flag_byte, 0, 0, 0, 1))))
    flags = _ReceivedFlags(frame.defined_flags)
    flags._flags = set(frame.flags)
    attributes = dict(vars(frame))
    del attributes["stream_id"], attributes["flags"]
    return type(frame), attributes, flags


# Relies on (hyperframe 6.0.0-6.1.0): a frame's state being its instance attributes, all set by its
# constructor (and by parse_flags for the flags), and Flags keeping the flags set in the private _flags.
def _parse_frame_header(header: bytes) -> Tuple[hyperframe.frame.Frame, int]:
    """hyperframe's ``Frame.parse_frame_header``, without its constructors for DATA and whole HEADERS frames.

    Those are most of what a tunnel receives; each is a copy of a frame made
    once per flag byte by hyperframe itself, with read-only flags shared by
    the copies. Any other frame, and one that hyperframe would refuse, is
    hyperframe's to parse.
    """
    high, low, kind, flag_byte, stream_id = _FRAME_HEADER.unpack(header)
    stream_id &= 0x7FFFFFFF
    if not stream_id or not (kind == _DATA or (kind == _HEADERS and flag_byte & _END_HEADERS)):
        # (A HEADERS frame that CONTINUATION frames complete gets END_HEADERS added by h2: flags of its own.)
        return hyperframe.frame.Frame.parse_frame_header(memoryview(header))
    template = _TEMPLATES.get((kind, flag_byte))
    if template is None:
        template = _TEMPLATES[(kind, flag_byte)] = _template(kind, flag_byte)
    cls, attributes, flags = template
    frame = cls.__new__(cls)
    frame.__dict__.update(attributes)
    frame.stream_id = stream_id
    frame.flags = flags
    return frame, (high << 8) + low


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, without copying DATA payloads.

    Received blocks are kept as they came. The reader asks for the rest of a
    large DATA frame exactly (:meth:`next_read`), so its payload arrives as
    blocks of its own, handed on as they are (a :class:`~ptth_sync.engine.framing._Parts`);
    h2's own buffer copies every payload three times. Frame-length checks,
    header-block assembly and the client preface check are h2's, except that
    an overlong frame is refused as soon as its length is in rather than once
    all of it is.

    Relies on (h2 4.1.0-4.4.1): the private ``_preamble`` (the client preface
    still expected, set by ``__init__``), ``_validate_frame_length(length)``,
    ``_update_header_buffer(frame)`` and ``_headers_buffer`` (the frames of a
    header block not complete yet); the public ``max_frame_size`` set by h2.
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

    def header_block_size(self) -> int:
        """Bytes of a header block (HEADERS + CONTINUATION) buffered until its END_HEADERS arrives."""
        buffered = getattr(self, "_headers_buffer", ())
        return sum(len(frame.data) for frame in buffered) if buffered else 0

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
                frame, length = _parse_frame_header(header)
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
