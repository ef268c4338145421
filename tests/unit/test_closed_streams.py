"""h2's record of closed streams, kept compact (``_ClosedStreams``): same answers, a fraction of the memory.

h2 remembers how each of the last 65,536 closed streams ended, so that a late
frame on a stream it reset is a stream error and one on a stream that ended is
a connection error. Its ordered dict costs about 170 bytes a stream, some 11
MiB for every tunnel that has carried that many requests, on either side.
"""

from __future__ import annotations

import tracemalloc
from typing import Any, Type

import h2.config
import h2.connection
import h2.exceptions
import h2.utilities
import hpack
import hyperframe.frame
import pytest
from h2.errors import ErrorCodes
from h2.stream import StreamClosedBy

from ptth_sync.engine.h2compat import _ClosedStreams, _H2Connection

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"test")]
RESPONSE = [(b":status", b"200")]


def traced_size(make: Any) -> int:
    """Bytes still allocated by what ``make()`` builds and returns."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make()
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del kept
    return size


def filled(record: Any, streams: int) -> Any:
    for number in range(streams):
        record[2 * number + 1] = StreamClosedBy.SEND_END_STREAM
    return record


def test_a_full_record_costs_about_five_bytes_a_stream_where_h2s_costs_over_a_hundred():
    limit = h2.connection.H2Connection.MAX_CLOSED_STREAMS
    ours = traced_size(lambda: filled(_ClosedStreams(limit), 100_000))
    stock = traced_size(lambda: filled(h2.utilities.SizeLimitDict(size_limit=limit), 100_000))
    assert ours < 6 * limit, ours
    assert stock > 100 * limit, stock


def test_the_record_answers_for_the_last_streams_and_forgets_older_ones():
    record = _ClosedStreams(1000)
    for number in range(3000):
        record[2 * number + 1] = list(StreamClosedBy)[number % 4] if number % 5 else None
    assert len(record) == 1000
    for number in range(2000, 3000):  # the last thousand: each as it was recorded
        stream_id = 2 * number + 1
        assert stream_id in record
        assert record[stream_id] == (list(StreamClosedBy)[number % 4] if number % 5 else None)
    for stream_id in (1, 3, 3999, 6001, 0, -1, 2):  # forgotten, never seen, or not a stream
        assert stream_id not in record
        with pytest.raises(KeyError):
            record[stream_id]
    assert "1" not in record


def test_streams_far_apart_are_kept_until_they_share_a_slot_at_the_bound():
    record = _ClosedStreams(65536)
    numbers = [1, 129, 257, 3, 2**31 - 1, 65537, 98305]  # sharing slots of the smaller arrays, not of the largest
    for stream_id in numbers:
        record[stream_id] = StreamClosedBy.RECV_RST_STREAM
    assert all(record[stream_id] is StreamClosedBy.RECV_RST_STREAM for stream_id in numbers)
    assert len(record) == len(numbers)
    record[131073] = StreamClosedBy.SEND_END_STREAM  # 65,536 streams after stream 1: it takes stream 1's slot
    assert 1 not in record
    assert record[131073] is StreamClosedBy.SEND_END_STREAM


# -- through h2: the same answers as h2's own record, with the same bound ------------------------------


class _SmallStock(h2.connection.H2Connection):
    MAX_CLOSED_STREAMS = 128


class _SmallOurs(_H2Connection):
    MAX_CLOSED_STREAMS = 128


def client_after_streams(client_class: Type[h2.connection.H2Connection], streams: int, reset_every: int) -> Any:
    """A client that opened ``streams`` streams: every ``reset_every``-th it reset, the others ended both ways."""
    config = dict(header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False)
    client = client_class(config=h2.config.H2Configuration(client_side=True, **config))
    server = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False, **config))
    client.initiate_connection()
    server.initiate_connection()
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    for number in range(streams):
        stream_id = 2 * number + 1
        client.send_headers(stream_id, REQUEST, end_stream=True)
        if number % reset_every == 0:
            client.reset_stream(stream_id, ErrorCodes.CANCEL)
            server.receive_data(client.data_to_send())
        else:
            server.receive_data(client.data_to_send())
            server.send_headers(stream_id, RESPONSE, end_stream=True)
            client.receive_data(server.data_to_send())
        _ = server.open_inbound_streams  # (drops the server's closed streams)
    _ = client.open_outbound_streams  # every closed stream into the record
    client.data_to_send()
    return client


def late_headers(client: Any, stream_id: int) -> str:
    """What the client makes of a HEADERS frame (trailers) on a stream closed long ago."""
    frame = hyperframe.frame.HeadersFrame(stream_id, data=hpack.Encoder().encode([(b"x-late", b"1")]))
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    try:
        client.receive_data(frame.serialize())
    except h2.exceptions.StreamClosedError:
        return "connection error: stream closed"
    except h2.exceptions.ProtocolError:
        return "connection error: protocol"
    sent = client.data_to_send()
    resets = [frame for frame in _frames(sent) if isinstance(frame, hyperframe.frame.RstStreamFrame)]
    return f"reset {resets[0].stream_id}" if resets else "ignored"


def _frames(data: bytes) -> list:
    frames, offset = [], 0
    while offset < len(data):
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[offset:offset + 9]))
        frame.parse_body(memoryview(data[offset + 9:offset + 9 + length]))
        frames.append(frame)
        offset += 9 + length
    return frames


@pytest.mark.parametrize(("number", "expected"), [
    (290, "reset 581"),  # reset lately: a stream error (RST_STREAM), the connection goes on
    (291, "connection error: stream closed"),  # ended lately: h2's connection error
    (10, "connection error: protocol"),  # reset, but too long ago to be remembered: as h2 does too
])
def test_a_late_frame_on_a_closed_stream_gets_the_answer_stock_h2_gives(number: int, expected: str):
    stock = late_headers(client_after_streams(_SmallStock, 300, 10), 2 * number + 1)
    ours = late_headers(client_after_streams(_SmallOurs, 300, 10), 2 * number + 1)
    assert stock == expected
    assert ours == expected
    assert isinstance(client_after_streams(_SmallOurs, 1, 10)._closed_streams, _ClosedStreams)
