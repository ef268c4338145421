"""The private parts of h2 and hyperframe that ``ptth_sync/engine/h2compat.py`` relies on are still there.

Each check names the hook and the installed versions when it fails: a new h2
or hyperframe that renames, drops or changes one of them must fail here, loudly,
rather than somewhere deep in a tunnel. Checked against h2 4.1.0 through 4.4.1
and hyperframe 6.0.0 through 6.1.0.
"""

from __future__ import annotations

import inspect
from typing import Any, List

import h2
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import h2.utilities
import hyperframe
import hyperframe.frame
import pytest

from ptth_sync.engine.h2compat import StreamMalformed, _FrameBuffer, _H2Configuration, _H2Connection, _H2Stream

VERSIONS = f"h2 {h2.__version__}, hyperframe {hyperframe.__version__}"
REQUEST = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"test")]


def broken(hook: str, what: str) -> str:
    return (f"ptth_sync/engine/h2compat.py, {hook}: {what} under {VERSIONS} "
            "(the hook was checked against h2 4.1.0-4.4.1 and hyperframe 6.0.0-6.1.0)")


# -- the private (and undocumented) methods the hooks override or call, with their parameters --------

RELIED_ON_METHODS = [
    # (hook, class or module, name, parameter names)
    ("_H2Connection._prepare_for_sending", h2.connection.H2Connection, "_prepare_for_sending", ["self", "frames"]),
    ("_H2Connection._begin_new_stream", h2.connection.H2Connection, "_begin_new_stream",
     ["self", "stream_id", "allowed_ids"]),
    ("_H2Connection._begin_new_stream", h2.connection.H2Connection, "_stream_id_is_outbound", ["self", "stream_id"]),
    ("_H2Connection._receive_frame", h2.connection.H2Connection, "_receive_frame", ["self", "frame"]),
    ("_H2Connection._receive_frame", h2.connection.H2Connection, "_stream_is_closed_by_reset", ["self", "stream_id"]),
    ("_H2Connection._receive_frame", h2.connection.H2Connection, "_stream_is_closed_by_end", ["self", "stream_id"]),
    ("_H2Connection.send_headers", h2.connection.H2Connection, "send_headers",
     ["self", "stream_id", "headers", "end_stream", "priority_weight", "priority_depends_on", "priority_exclusive"]),
    ("_H2Connection.data_to_send", h2.connection.H2Connection, "data_to_send", ["self", "amount"]),
    ("_H2Connection._local_settings_acked", h2.connection.H2Connection, "_local_settings_acked", ["self"]),
    ("_H2Connection.clear_outbound_data_buffer", h2.connection.H2Connection, "clear_outbound_data_buffer", ["self"]),
    ("_H2Stream.send_headers", h2.stream.H2Stream, "send_headers", ["self", "headers", "encoder", "end_stream"]),
    ("_H2Stream.receive_headers", h2.stream.H2Stream, "receive_headers",
     ["self", "headers", "end_stream", "header_encoding"]),
    ("_H2Stream._initialize_content_length", h2.stream.H2Stream, "_initialize_content_length", ["self", "headers"]),
    ("_H2Stream._process_received_headers", h2.stream.H2Stream, "_process_received_headers",
     ["self", "headers", "header_validation_flags", "header_encoding"]),
    ("_H2Stream._track_content_length", h2.stream.H2Stream, "_track_content_length",
     ["self", "length", "end_stream"]),
    ("_H2Stream.send_headers", h2.utilities, "is_informational_response", ["headers"]),
    ("_H2Stream.send_headers", h2.utilities, "authority_from_headers", ["headers"]),
    ("_H2Stream.send_headers", h2.utilities, "extract_method_header", ["headers"]),
    ("_FrameBuffer", h2.frame_buffer.FrameBuffer, "__init__", ["self", "server"]),
    ("_FrameBuffer", h2.frame_buffer.FrameBuffer, "_validate_frame_length", ["self", "length"]),
    ("_FrameBuffer", h2.frame_buffer.FrameBuffer, "_update_header_buffer", ["self", "f"]),
    ("_FrameBuffer", h2.frame_buffer.FrameBuffer, "add_data", ["self", "data"]),
    ("the frames' repr", hyperframe.frame.Frame, "_body_repr", ["self"]),
    ("_FrameBuffer.__next__", hyperframe.frame.Frame, "parse_frame_header", ["header", "strict"]),
]


@pytest.mark.parametrize(("hook", "owner", "name", "parameters"), RELIED_ON_METHODS,
                         ids=[f"{row[0]}:{row[2]}" for row in RELIED_ON_METHODS])
def test_the_methods_the_hooks_rely_on_keep_their_parameters(hook: str, owner: Any, name: str, parameters: List[str]):
    where = getattr(owner, "__qualname__", getattr(owner, "__name__", owner))
    assert hasattr(owner, name), broken(hook, f"{where}.{name} is gone")
    found = list(inspect.signature(getattr(owner, name)).parameters)
    assert found == parameters, broken(hook, f"{where}.{name} takes {found}, not {parameters}")


def test_the_state_machines_inputs_the_hooks_feed_are_there():
    for name in ("SEND_HEADERS", "SEND_END_STREAM"):
        assert hasattr(h2.stream.StreamInputs, name), broken("_H2Stream.send_headers", f"StreamInputs.{name} is gone")
    assert hasattr(h2.connection.ConnectionInputs, "SEND_HEADERS"), broken(
        "_H2Connection.send_headers", "ConnectionInputs.SEND_HEADERS is gone")
    assert hasattr(h2.connection.AllowedStreamIDs, "ODD"), broken(
        "_H2Connection.send_headers", "AllowedStreamIDs.ODD is gone")
    assert isinstance(h2.connection.H2Connection.open_outbound_streams, property), broken(
        "_H2Connection.send_headers", "open_outbound_streams is no longer a property")


# -- the private attributes, on fresh objects ------------------------------------------------------


def test_a_fresh_h2_connection_has_the_attributes_the_hooks_use():
    connection = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    assert type(getattr(connection, "_data_to_send", None)) is bytearray, broken(
        "_H2Connection._prepare_for_sending", "H2Connection._data_to_send is not a bytearray")
    table = getattr(connection, "_frame_dispatch_table", None)
    assert isinstance(table, dict), broken("_H2Connection._receive_frame", "H2Connection._frame_dispatch_table is gone")
    assert table.get(hyperframe.frame.DataFrame) is not None, broken(
        "_H2Connection._receive_frame", "H2Connection._frame_dispatch_table does not map frame classes")
    assert isinstance(getattr(connection, "incoming_buffer", None), h2.frame_buffer.FrameBuffer), broken(
        "_H2Connection.__init__", "H2Connection.incoming_buffer is not a FrameBuffer")
    assert isinstance(getattr(connection, "max_inbound_frame_size", None), int), broken(
        "_H2Connection.accept_frames_up_to", "H2Connection.max_inbound_frame_size is gone")
    assert hasattr(connection, "encoder"), broken("_H2Connection.send_headers", "H2Connection.encoder is gone")


def test_h2_keeps_its_record_of_closed_streams_where_the_hook_replaces_it():
    hook = "_H2Connection.__init__ (_ClosedStreams)"
    connection = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    assert isinstance(getattr(h2.connection.H2Connection, "MAX_CLOSED_STREAMS", None), int), broken(
        hook, "H2Connection.MAX_CLOSED_STREAMS is gone")
    assert hasattr(connection, "_closed_streams"), broken(hook, "H2Connection._closed_streams is gone")
    # h2 may only store a record, test for one and read it: what _ClosedStreams provides.
    uses = [line.strip() for line in inspect.getsource(h2.connection).splitlines() if "_closed_streams" in line]
    allowed = ("self._closed_streams: dict[int, StreamClosedBy | None] = SizeLimitDict(",
               "self._closed_streams = SizeLimitDict(",
               "self._closed_streams[stream_id] = stream.closed_by",
               "if stream_id in self._closed_streams:",
               "return self._closed_streams[stream_id]")
    unknown = [line for line in uses if line not in allowed]
    assert not unknown, broken(hook, f"h2 uses its closed streams' record in a new way: {unknown}")
    connection.initiate_connection()
    connection.send_headers(1, REQUEST, end_stream=True)
    connection.reset_stream(1)
    _ = connection.open_outbound_streams  # drops the closed stream into the record
    assert 1 not in connection.streams
    assert connection._stream_is_closed_by_reset(1), broken(
        hook, "a reset stream is not found in the record of closed streams")


def test_a_fresh_h2_stream_has_the_attributes_the_hooks_use():
    connection = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    connection.send_headers(1, REQUEST)
    stream = connection.streams[1]
    for name in ("_authority", "request_method", "max_outbound_frame_size", "config", "state_machine"):
        assert hasattr(stream, name), broken("_H2Stream.send_headers", f"H2Stream.{name} is gone")
    for name in ("client", "trailers_sent", "headers_received"):
        assert hasattr(stream.state_machine, name), broken(
            "_H2Stream.send_headers/receive_headers", f"H2StreamStateMachine.{name} is gone")
    assert stream._authority == b"test", broken("_H2Stream.send_headers", "H2Stream._authority is not the :authority")


def test_a_fresh_frame_buffer_has_the_attributes_the_hooks_use():
    server = h2.frame_buffer.FrameBuffer(server=True)
    assert getattr(server, "_preamble", None) == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", broken(
        "_FrameBuffer.__init__", "FrameBuffer._preamble is not the client preface")
    assert getattr(h2.frame_buffer.FrameBuffer(), "_preamble", None) == b"", broken(
        "_FrameBuffer.__init__", "FrameBuffer._preamble of a client is not empty")
    assert getattr(server, "_headers_buffer", None) == [], broken(
        "_FrameBuffer.header_block_size", "FrameBuffer._headers_buffer is not a list")
    assert hasattr(server, "max_frame_size"), broken("_FrameBuffer", "FrameBuffer.max_frame_size is gone")


def test_our_own_attributes_do_not_shadow_h2s():
    ours = {
        "_H2Connection": (h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True)),
                          ("_segments", "_opened_since_sweep", "take_output", "accept_frames_up_to")),
        "_FrameBuffer": (h2.frame_buffer.FrameBuffer(server=True),
                         ("_blocks", "_offset", "_size", "_bulk", "_preface", "_preface_left", "_peek", "_take",
                          "_skip", "next_read", "header_block_size")),
    }
    for hook, (stock, names) in ours.items():
        for name in names:
            assert not hasattr(stock, name), broken(hook, f"h2 now has an attribute of its own named {name}")


def test_a_stream_closed_error_carries_its_events():
    assert getattr(h2.exceptions.StreamClosedError(1), "_events", None) == [], broken(
        "_H2Connection._receive_frame", "StreamClosedError._events is gone")


# -- behaviour: the hooks are reached, and do what the engine expects -------------------------------


def handshaken(client_class: Any = h2.connection.H2Connection, server_class: Any = _H2Connection):
    # Outbound checks off, as the engine has them: the client may send what a server must refuse.
    client = client_class(config=h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    server = server_class(config=h2.config.H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    return client, server


def test_every_outgoing_frame_goes_through_prepare_for_sending():
    _, server = handshaken()
    seen = []
    original = server._prepare_for_sending
    server._prepare_for_sending = lambda frames: (seen.extend(type(f).__name__ for f in frames), original(frames))
    server.ping(b"12345678")
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 5})
    assert seen == ["PingFrame", "SettingsFrame"], broken(
        "_H2Connection._prepare_for_sending", f"h2 sent {seen} without passing them through it")


def test_receive_data_reads_through_our_frame_buffer_with_the_limit_we_set():
    client, server = handshaken()
    assert isinstance(server.incoming_buffer, _FrameBuffer)
    server.accept_frames_up_to(1024 * 1024)
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    assert server.incoming_buffer.max_frame_size == 1024 * 1024, broken(
        "_H2Connection.accept_frames_up_to", "receive_data does not copy max_inbound_frame_size to the buffer")


def test_every_stream_h2_opens_becomes_ours():
    client, server = handshaken()
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    assert type(server.streams[1]) is _H2Stream, broken(
        "_H2Connection._begin_new_stream", "h2 created a stream without calling it")
    ours, _ = handshaken(client_class=_H2Connection, server_class=h2.connection.H2Connection)
    ours.send_headers(1, REQUEST)
    assert type(ours.streams[1]) is _H2Stream, broken(
        "_H2Connection.send_headers", "a request's stream was not created by _begin_new_stream")


def test_a_header_block_awaiting_continuation_is_measured():
    client, server = handshaken()
    block = client.encoder.encode(REQUEST)
    frame = hyperframe.frame.HeadersFrame(1, data=block)  # no END_HEADERS: CONTINUATION frames should follow
    server.receive_data(frame.serialize())
    assert server.incoming_buffer.header_block_size() == len(block), broken(
        "_FrameBuffer.header_block_size", "FrameBuffer._headers_buffer does not hold the incomplete block")


def test_a_malformed_request_resets_its_stream_only():
    client, server = handshaken()
    client.send_headers(1, [*REQUEST, (b"content-length", b"5")])
    client.send_data(1, b"abc", end_stream=True)
    events = server.receive_data(client.data_to_send())
    malformed = [event for event in events if isinstance(event, StreamMalformed)]
    assert [event.stream_id for event in malformed] == [1], broken(
        "_H2Stream._track_content_length", f"a short body gave {events}, not StreamMalformed")
    assert server.state_machine.state != h2.connection.ConnectionState.CLOSED
    client.send_headers(3, [*REQUEST, (b"content-length", b"x")], end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(event, StreamMalformed) for event in events), broken(
        "_H2Stream._initialize_content_length", f"a bad content-length gave {events}, not StreamMalformed")
    client.send_headers(5, [*REQUEST, (b"connection", b"close")], end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(event, StreamMalformed) for event in events), broken(
        "_H2Stream._process_received_headers", f"a connection-specific header gave {events}, not StreamMalformed")


def test_a_header_list_over_the_advertised_limit_resets_its_stream_and_hpack_stays_in_step():
    def bounded(client_side: bool) -> _H2Configuration:
        return _H2Configuration(header_list_limit=1000, decoded_header_list_bound=4000, client_side=client_side,
                                header_encoding=None, validate_outbound_headers=False,
                                normalize_outbound_headers=False)

    client = h2.connection.H2Connection(config=h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    server = _H2Connection(config=bounded(False))
    client.initiate_connection()
    server.initiate_connection()
    server.update_settings({h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1000})
    for _ in range(3):  # the SETTINGS and their ACKs: h2 sets HPACK's limit to ours as ours is acknowledged
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    assert server.local_settings.max_header_list_size == 1000
    assert server.decoder.max_header_list_size == 4000, broken(
        "_H2Connection._local_settings_acked", "h2 no longer sets HPACK's limit there: it was not raised again")
    client.send_headers(1, [*REQUEST, (b"x-big", b"b" * 2000)], end_stream=True)  # indexed: HPACK's table changes
    events = server.receive_data(client.data_to_send())
    assert [type(event) for event in events] == [StreamMalformed], broken(
        "_H2Stream.receive_headers", f"2 KB of headers over a 1,000-byte limit gave {events}, not StreamMalformed")
    assert "a header block of 2" in events[0].reason
    client.send_headers(3, [*REQUEST, (b"x-big", b"b" * 2000)], end_stream=True)  # now from the table: 1 byte
    assert isinstance(server.receive_data(client.data_to_send())[0], StreamMalformed)
    client.send_headers(5, REQUEST, end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert isinstance(events[0], h2.events.RequestReceived)
    assert events[0].headers == REQUEST  # decoded in step with the client's HPACK state
    client.send_headers(7, [*REQUEST, (b"x-huge", b"h" * 5000)], end_stream=True)  # past the bound: the connection
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        server.receive_data(client.data_to_send())


def test_a_frames_repr_states_only_its_payloads_length():
    assert repr(hyperframe.frame.DataFrame(1, data=b"x" * 100)).endswith("<payload len=100>"), broken(
        "the frames' repr", "Frame.__repr__ no longer calls _body_repr")


@pytest.mark.parametrize("kind", [0x0, 0x1, 0x4, 0x8, 0x9, 0xEE])
def test_a_frame_made_from_a_template_is_the_frame_hyperframe_makes(kind: int):
    """_parse_frame_header: for every flag byte and stream, the same frame (class, attributes, flags) or error."""
    from ptth_sync.engine.h2compat import _parse_frame_header

    for flag_byte in range(256):
        for stream_id in (0, 3, 0x80000003):
            header = bytes((0, 1, 4, kind, flag_byte)) + stream_id.to_bytes(4, "big")
            try:
                theirs = hyperframe.frame.Frame.parse_frame_header(memoryview(header))
            except Exception as exc:  # hyperframe refuses it: so must we
                with pytest.raises(type(exc)):
                    _parse_frame_header(header)
                continue
            ours = _parse_frame_header(header)
            what = f"frame type {kind:#x}, flags {flag_byte:#04x}, stream {stream_id:#x}"
            assert ours[1] == theirs[1] == 260, broken("_parse_frame_header", f"another length for {what}")
            assert type(ours[0]) is type(theirs[0]), broken("_parse_frame_header", f"another class for {what}")
            mine, stock = vars(ours[0]), vars(theirs[0])
            assert mine.keys() == stock.keys(), broken("_parse_frame_header", f"other attributes for {what}")
            for name, value in stock.items():
                if name == "flags":
                    assert set(mine[name]) == set(value), broken("_parse_frame_header", f"other flags for {what}")
                else:
                    assert mine[name] == value, broken("_parse_frame_header", f"another {name} for {what}")


def test_a_templated_frames_flags_are_read_only():
    from ptth_sync.engine.h2compat import _parse_frame_header

    frame, _ = _parse_frame_header(bytes((0, 0, 0, 0x0, 0x1, 0, 0, 0, 1)))
    assert "END_STREAM" in frame.flags
    with pytest.raises(TypeError):
        frame.flags.add("PADDED")
