"""The engine's framing around h2: DATA written without copies, frames parsed without copies, stream reads.

Each is checked against what stock h2 does with the same input.
"""

from __future__ import annotations

import random
import socket
import threading
from typing import Any, List

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hypothesis import given, settings
from hypothesis import strategies as st

from ptth_sync.connection import _FrameBuffer, _H2Connection, _Parts, _Payload
from ptth_sync.sockets import sendall_buffers, unsent
from ptth_sync.stream import Stream

MIB = 1024 * 1024
REQUEST = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"test")]
BODY = random.Random(7).randbytes(3 * MIB + 12345)


def configured(connection: h2.connection.H2Connection) -> h2.connection.H2Connection:
    connection.initiate_connection()
    connection.update_settings({SettingCodes.MAX_FRAME_SIZE: MIB, SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    connection.max_inbound_frame_size = MIB
    connection.increment_flow_control_window(2**31 - 1 - 65535)
    return connection


def handshaken(server_class: Any, client_class: Any = h2.connection.H2Connection):
    """A client and a server that exchanged prefaces and settings, with windows and frames opened wide."""
    client = configured(client_class(config=h2.config.H2Configuration(client_side=True, header_encoding=None)))
    server = configured(server_class(config=h2.config.H2Configuration(client_side=False, header_encoding=None)))
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    return client, server


def wire(connection: h2.connection.H2Connection) -> bytes:
    if isinstance(connection, _H2Connection):
        return b"".join(bytes(segment) for segment in connection.take_output())
    return connection.data_to_send()


def test_data_frames_are_written_exactly_as_stock_h2_writes_them():
    _, stock = handshaken(h2.connection.H2Connection)
    _, ours = handshaken(_H2Connection)
    request = _request_frames()
    stock.receive_data(request)
    ours.receive_data(request)
    assert wire(ours) == wire(stock)
    for connection in (stock, ours):
        connection.send_headers(1, [(b":status", b"200")])
    assert wire(ours) == wire(stock)
    view = memoryview(BODY)
    position = 0
    for size in (0, 1, 4095, 4096, 70_000, MIB, MIB - 9):
        piece = view[position : position + size]
        stock.send_data(1, piece.tobytes())
        ours.send_data(1, _Payload(piece) if size % 2 else piece.tobytes())
        position += size
        assert wire(ours) == wire(stock), size
    for connection in (stock, ours):
        connection.send_data(1, b"", end_stream=True)
    assert wire(ours) == wire(stock)
    assert ours.local_flow_control_window(1) == stock.local_flow_control_window(1)
    assert ours.streams[1].state_machine.state == stock.streams[1].state_machine.state


def engine_config(client_side: bool) -> h2.config.H2Configuration:
    """The engine's h2 settings: outbound checks off (its header blocks are built and checked already)."""
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None, validate_outbound_headers=False,
                                     normalize_outbound_headers=False)


def test_header_blocks_are_written_exactly_as_stock_h2_writes_them():
    stock_client = h2.connection.H2Connection(config=engine_config(True))
    our_client = _H2Connection(engine_config(True))
    stock_server = h2.connection.H2Connection(config=engine_config(False))
    our_server = _H2Connection(engine_config(False))
    pairs = [(stock_client, stock_server), (our_client, our_server)]
    for client, server in pairs:
        client.initiate_connection()  # 16 KiB frames: the large blocks below need CONTINUATION frames
        server.initiate_connection()
        for _ in range(3):
            server.receive_data(wire(client))
            client.receive_data(wire(server))
    large = [*REQUEST, (b"x-large", b"v" * 40_000), (b"cookie", b"a=1; b=2")]
    assert our_client.max_outbound_frame_size == 16384
    for client, _ in pairs:
        client.send_headers(1, REQUEST, end_stream=True)
        client.send_headers(3, large)
        client.send_headers(3, [(b"x-trailer", b"1")], end_stream=True)
    requests = [wire(client) for client, _ in pairs]
    assert requests[1] == requests[0]
    for (_, server), request in zip(pairs, requests):
        server.receive_data(request)
    assert wire(our_server) == wire(stock_server)
    for _, server in pairs:
        server.send_headers(1, [(b":status", b"100")])
        server.send_headers(1, [(b":status", b"200"), (b"x-long", b"w" * 20_000)], end_stream=True)
        server.send_headers(3, [(b":status", b"204")], end_stream=True)
    responses = [wire(server) for _, server in pairs]
    assert responses[1] == responses[0]
    for stock, ours in ((stock_client, our_client), (stock_server, our_server)):
        for stream_id in (1, 3):
            assert ours.streams[stream_id].state_machine.state == stock.streams[stream_id].state_machine.state
    events = our_client.receive_data(responses[1])
    assert [type(event).__name__ for event in events] == [
        "InformationalResponseReceived", "ResponseReceived", "StreamEnded", "ResponseReceived", "StreamEnded"]


def test_frames_on_a_stream_we_reset_are_answered_exactly_as_stock_h2_answers_them():
    """The engine's copy of h2's ``_receive_frame``: a late frame on a reset stream gets RST_STREAM, and only that."""
    answers = []
    for server_class in (h2.connection.H2Connection, _H2Connection):
        client, server = handshaken(server_class)
        for stream_id in (1, 3):
            client.send_headers(stream_id, REQUEST)
        server.receive_data(client.data_to_send())
        server.reset_stream(1, ErrorCodes.CANCEL)
        wire(server)
        client.send_data(1, b"late")
        client.send_data(3, b"in time", end_stream=True)
        events = server.receive_data(client.data_to_send())
        answers.append(([type(event).__name__ for event in events], wire(server)))
    assert answers[1] == answers[0]
    assert answers[1][0] == ["DataReceived", "StreamEnded"]  # stream 3's; stream 1's DATA only got a reset


def test_large_payloads_are_queued_as_the_callers_objects():
    _, ours = handshaken(_H2Connection)
    ours.receive_data(_request_frames())
    wire(ours)
    ours.send_headers(1, [(b":status", b"200")])
    piece = BODY[:MIB]
    ours.send_data(1, piece, end_stream=True)
    segments = ours.take_output()
    assert segments[-1] is piece
    assert segments[-2] == b"\x10\x00\x00\x00\x01\x00\x00\x00\x01"  # 1 MiB, DATA, END_STREAM, stream 1


def test_data_to_send_still_returns_everything_in_order():
    _, stock = handshaken(h2.connection.H2Connection)
    _, ours = handshaken(_H2Connection)
    for connection in (stock, ours):
        connection.receive_data(_request_frames())
        connection.send_headers(1, [(b":status", b"200")])
        connection.send_data(1, BODY[:100_000])
        connection.ping(b"12345678")
    assert ours.data_to_send(10) + ours.data_to_send() == stock.data_to_send()


def _request_frames() -> bytes:
    client, _ = handshaken(h2.connection.H2Connection)
    client.send_headers(1, REQUEST)
    return client.data_to_send()


def _events(connection: h2.connection.H2Connection, blocks: List[bytes]) -> List[tuple]:
    """The events the blocks cause, DATA joined per stream, comparable across h2 classes."""
    seen: List[tuple] = []
    for block in blocks:
        for event in connection.receive_data(block):
            if isinstance(event, h2.events.DataReceived):
                data = event.data
                data = b"".join(data.parts) if isinstance(data, _Parts) else bytes(data)
                if seen and seen[-1][0] == "data":
                    seen[-1] = ("data", seen[-1][1] + data)
                else:
                    seen.append(("data", data))
            else:
                seen.append((type(event).__name__, getattr(event, "stream_id", None), getattr(event, "headers", None)))
    return seen


def _response_wire() -> bytes:
    """A response as stock h2 writes it: headers, DATA frames of many sizes, trailers."""
    _, server = handshaken(h2.connection.H2Connection)
    server.receive_data(_request_frames())
    server.data_to_send()
    server.send_headers(1, [(b":status", b"200"), (b"x-long", b"v" * 20_000)])
    position = 0
    for size in (1, 65536, 70_000, MIB, 3, MIB - 1):
        server.send_data(1, BODY[position : position + size])
        position += size
    server.send_data(1, BODY[:300], pad_length=20)
    server.ping(b"abcdefgh")
    server.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    return server.data_to_send()


RESPONSE_WIRE = _response_wire()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(RESPONSE_WIRE) - 1), max_size=40))
def test_frames_split_anywhere_give_the_events_stock_h2_gives(cuts):
    edges = [0, *sorted(set(cuts)), len(RESPONSE_WIRE)]
    blocks = [RESPONSE_WIRE[a:b] for a, b in zip(edges, edges[1:])]
    results = []
    for h2_class in (h2.connection.H2Connection, _H2Connection):
        client, _ = handshaken(h2_class)
        client.send_headers(1, REQUEST, end_stream=True)
        client.data_to_send()
        results.append(_events(client, blocks))
    assert results[0] == results[1]
    assert ("data", BODY[: 1 + 65536 + 70_000 + MIB + 3 + MIB - 1] + BODY[:300]) in results[1]


def test_a_data_payload_read_on_its_own_is_handed_on_without_a_copy():
    buffer = _FrameBuffer()
    buffer.max_frame_size = MIB
    payload = BODY[:MIB]
    buffer.add_data(b"\x10\x00\x00\x00\x00\x00\x00\x00\x01")  # the header of a 1 MiB DATA frame on stream 1
    assert buffer.next_read(256 * 1024) == MIB
    assert list(buffer) == []
    buffer.add_data(payload[:1000])
    assert buffer.next_read(256 * 1024) == MIB - 1000  # the rest of it, exactly
    buffer.add_data(payload[1000:])
    (frame,) = list(buffer)
    assert isinstance(frame.data, _Parts)
    assert len(frame.data) == MIB
    assert b"".join(frame.data.parts) == payload
    assert buffer.next_read(256 * 1024) == 9  # after a large DATA frame, the next header on its own
    buffer.add_data(b"\x10\x00\x00\x00\x01\x00\x00\x00\x01")
    list(buffer)
    buffer.add_data(payload)
    (frame,) = list(buffer)
    assert frame.data is payload
    assert "END_STREAM" in frame.flags


def test_small_frames_are_read_in_large_blocks():
    buffer = _FrameBuffer()
    buffer.max_frame_size = MIB
    assert buffer.next_read(256 * 1024) == 256 * 1024
    buffer.add_data(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00abc")  # part of a PING
    assert buffer.next_read(256 * 1024) == 256 * 1024


def test_an_overlong_frame_is_refused_as_soon_as_its_length_is_in():
    buffer = _FrameBuffer()
    buffer.max_frame_size = MIB
    buffer.add_data(b"\x10\x00")
    assert list(buffer) == []
    buffer.add_data(b"\x01")
    with pytest.raises(h2.exceptions.FrameTooLargeError, match="length 1048577"):
        list(buffer)


def test_the_client_preface_is_checked_across_blocks():
    buffer = _FrameBuffer(server=True)
    buffer.max_frame_size = MIB
    buffer.add_data(b"PRI * HTTP/2.0\r\n")
    buffer.add_data(b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x01\x00\x00\x00\x00")
    (frame,) = list(buffer)
    assert "ACK" in frame.flags
    bad = _FrameBuffer(server=True)
    with pytest.raises(h2.exceptions.ProtocolError, match="preamble"):
        bad.add_data(b"GET / HTTP/1.1\r\n")


# -- writing buffers --------------------------------------------------------------


def test_unsent_drops_what_was_sent_without_copying_the_rest():
    buffers = [b"abc", b"defgh", b"ij"]
    assert unsent(buffers, 0) == buffers
    assert [bytes(b) for b in unsent(buffers, 4)] == [b"efgh", b"ij"]
    assert [bytes(b) for b in unsent(buffers, 8)] == [b"ij"]
    assert unsent(buffers, 10) == []


def test_sendall_buffers_writes_every_byte_in_order_through_small_socket_buffers():
    sender, receiver = socket.socketpair()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pieces = [BODY[i : i + size] for i, size in zip(range(0, 3 * MIB, MIB), (7, 200_000, MIB))]
    pieces += [memoryview(BODY)[5:70_000]] + [b"x"] * 1500  # more buffers than one writev takes
    received = bytearray()

    def read() -> None:
        while True:
            data = receiver.recv(65536)
            if not data:
                return
            received.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    sendall_buffers(sender, pieces)
    sender.close()
    reader.join(10)
    receiver.close()
    assert bytes(received) == b"".join(bytes(p) for p in pieces)


def test_sendall_buffers_uses_what_a_socket_like_object_offers():
    class Joined:
        def __init__(self) -> None:
            self.sent: List[bytes] = []

        def sendall(self, data: bytes) -> None:
            self.sent.append(bytes(data))

    class Vectored(Joined):
        def sendall_buffers(self, buffers) -> None:
            self.sent.append(b"|".join(bytes(b) for b in buffers))

    joined, vectored = Joined(), Vectored()
    sendall_buffers(joined, [b"ab", memoryview(b"cd")])
    sendall_buffers(vectored, [b"ab", memoryview(b"cd")])
    sendall_buffers(vectored, [b"one"])
    assert joined.sent == [b"abcd"]
    assert vectored.sent == [b"ab|cd", b"one"]


# -- reading a stream's buffered pieces ----------------------------------------------


def stream_with(pieces: List[bytes]) -> Stream:
    stream = Stream(None, 1)  # type: ignore[arg-type]  # _take does not touch the connection
    stream._chunks.extend(pieces)
    stream._buffered = sum(map(len, pieces))
    return stream


def read_all(stream: Stream, size: int) -> List[bytes]:
    out = []
    while stream._chunks:
        out.append(stream._take(size))
    assert stream._buffered == 0
    return out


LARGE = b"L" * (64 * 1024)


def test_read_all_hands_large_pieces_over_one_by_one_and_joins_small_ones():
    small = [b"a", b"bc", b"d"]
    stream = stream_with([*small, LARGE, LARGE, *small])
    out = read_all(stream, -1)
    assert out == [b"abcd", LARGE, LARGE, b"abcd"]
    stream = stream_with([LARGE])
    assert stream._take(-1) is LARGE


def test_sized_reads_return_the_bytes_in_order_whatever_the_pieces():
    rng = random.Random(3)
    data = BODY[:300_000]
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 12)))
        edges = [0, *cuts, len(data)]
        stream = stream_with([data[a:b] for a, b in zip(edges, edges[1:])])
        size = rng.choice([1, 7, 4096, 65536, 100_000, 300_000, 10**6, -1])
        out = read_all(stream, size)
        assert b"".join(out) == data
        if size > 0:
            assert all(len(piece) == size for piece in out[:-1])


def test_a_piece_read_in_small_parts_is_not_copied_again_for_its_rest():
    piece = BODY[:MIB]
    stream = stream_with([piece, b"tail"])
    parts = [stream._take(1000) for _ in range(3)]
    assert stream._chunks[0] is piece
    assert stream._offset == 3000
    assert b"".join(parts) == piece[:3000]
    assert stream._take(-1) == piece[3000:]
    assert stream._take(-1) == b"tail"
