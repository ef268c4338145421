"""Unit tests for the backend's wsgi.input (StreamInput) over a fake stream."""

from __future__ import annotations

import pytest

from ptth_sync.backend.wsgi import ClientDisconnected, StreamInput
from ptth_sync.errors import StreamReset, StreamTimeout

CHUNKS = [b"ab", b"c\nde", b"f\n", b"g"]
BODY = b"".join(CHUNKS)


class FakeStream:
    """Hands out pre-set chunks like Stream.read: at most ``size`` bytes, then b"" forever.

    An exception instance among the chunks is raised when reached.
    """

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.calls = []

    def read(self, size=-1, timeout=None):
        self.calls.append((size, timeout))
        if not self.chunks:
            return b""
        chunk = self.chunks[0]
        if isinstance(chunk, BaseException):
            self.chunks.pop(0)
            raise chunk
        if 0 <= size < len(chunk):
            self.chunks[0] = chunk[size:]
            return chunk[:size]
        self.chunks.pop(0)
        return chunk


def make_input(chunks=CHUNKS, timeout=None):
    return StreamInput(FakeStream(chunks), timeout=timeout)


def test_read_returns_whole_body():
    assert make_input().read() == BODY


def test_read_none_returns_whole_body():
    assert make_input().read(None) == BODY


def test_read_after_end_returns_empty():
    body = make_input()
    body.read()
    assert body.read() == b""
    assert body.read(3) == b""


def test_read_of_empty_body_returns_empty():
    assert make_input([]).read() == b""


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_read_size_returns_exactly_size_until_the_end(size):
    body = make_input()
    pieces = []
    while True:
        piece = body.read(size)
        if not piece:
            break
        pieces.append(piece)
    assert b"".join(pieces) == BODY
    assert all(len(piece) == size for piece in pieces[:-1])
    assert 0 < len(pieces[-1]) <= size


def test_read_size_larger_than_body_returns_whole_body():
    assert make_input().read(100) == BODY


def test_read_zero_returns_empty_and_keeps_data():
    body = make_input()
    assert body.read(0) == b""
    assert body.read() == BODY


def test_read_zero_keeps_buffered_data():
    body = make_input()
    assert body.readline(1) == b"a"
    assert body.read(0) == b""
    assert body.read() == BODY[1:]


def test_read_after_readline_starts_with_buffered_data():
    body = make_input()
    assert body.readline() == b"abc\n"
    assert body.read(2) == b"de"
    assert body.read() == b"f\ng"


def test_readline_joins_chunks():
    assert make_input().readline() == b"abc\n"


def test_readline_returns_each_line_then_empty():
    body = make_input()
    assert [body.readline() for _ in range(5)] == [b"abc\n", b"def\n", b"g", b"", b""]


def test_readline_limit_cuts_a_long_line():
    body = make_input()
    assert body.readline(2) == b"ab"
    assert body.readline(2) == b"c\n"
    assert body.readline(2) == b"de"


def test_readline_limit_stops_at_newline_before_limit():
    body = make_input()
    assert body.readline(10) == b"abc\n"


def test_readline_limit_equal_to_line_length_includes_newline():
    body = make_input()
    assert body.readline(4) == b"abc\n"


def test_readline_limit_zero_returns_empty():
    body = make_input()
    assert body.readline(0) == b""
    assert body.read() == BODY


def test_readline_none_reads_whole_line():
    assert make_input().readline(None) == b"abc\n"


def test_readlines_returns_all_lines():
    assert make_input().readlines() == [b"abc\n", b"def\n", b"g"]


def test_readlines_hint_stops_after_enough_bytes():
    body = make_input()
    assert body.readlines(3) == [b"abc\n"]
    assert body.readlines() == [b"def\n", b"g"]


def test_iteration_yields_lines():
    assert list(make_input()) == [b"abc\n", b"def\n", b"g"]


def test_iter_returns_the_input_itself():
    body = make_input()
    assert iter(body) is body


def test_timeout_is_passed_to_stream_read():
    stream = FakeStream(CHUNKS)
    StreamInput(stream, timeout=2.5).read()
    assert stream.calls
    assert all(timeout == 2.5 for _, timeout in stream.calls)


def test_stream_is_not_read_again_after_its_end():
    stream = FakeStream([b"x"])
    body = StreamInput(stream)
    body.read()
    calls = len(stream.calls)
    body.read()
    body.readline()
    assert len(stream.calls) == calls


@pytest.mark.parametrize(
    "error",
    [StreamReset(1, 8), StreamTimeout("no data"), ConnectionResetError("gone")],
    ids=["stream-reset", "stream-timeout", "os-error"],
)
def test_stream_error_becomes_client_disconnected(error):
    body = make_input([b"ab", error])
    with pytest.raises(ClientDisconnected) as info:
        body.read()
    assert info.value.__cause__ is error


def test_client_disconnected_is_an_os_error():
    body = make_input([StreamReset(1, 8)])
    with pytest.raises(OSError, match="reset"):
        body.read()


def test_stream_error_during_readline_becomes_client_disconnected():
    body = make_input([b"ab", StreamReset(1, 8)])
    with pytest.raises(ClientDisconnected):
        body.readline()
