"""Unit tests for the backend's WSGI response state (_Response) and handle_request, over a fake stream."""

from __future__ import annotations

import sys

import pytest
from h2.errors import ErrorCodes

from ptth_sync.backend.wsgi import _ERROR_BLOCK, _Response, handle_request
from ptth_sync.headers import InvalidHeader


class FakeStream:
    """Records what the response sends; ``local_ended`` follows END_STREAM like a real stream."""

    def __init__(self, headers=None, body=b"", peer_max_header_list_size=None):
        self.headers = headers
        self.body = [body] if body else []
        self.calls = []
        self.local_ended = False
        self.cancelled = False
        self.peer_max_header_list_size = peer_max_header_list_size

    def read(self, size=-1, timeout=None):
        return self.body.pop(0) if self.body else b""

    def send_response(self, headers, data=b"", end_stream=False, timeout=None):
        self.calls.append(("send_response", list(headers), data, end_stream))
        self.local_ended = self.local_ended or end_stream

    def send_headers(self, headers, end_stream=False):
        self.calls.append(("send_headers", list(headers), end_stream))
        self.local_ended = self.local_ended or end_stream

    def send_data(self, data, end_stream=False, timeout=None):
        self.calls.append(("send_data", data, end_stream))
        self.local_ended = self.local_ended or end_stream

    def reset(self, error_code=ErrorCodes.CANCEL):
        self.calls.append(("reset", error_code))

    def close(self, error_code=ErrorCodes.CANCEL):
        self.calls.append(("close", error_code))

    def names(self):
        return [call[0] for call in self.calls]

    def sent_body(self):
        """The body bytes sent, whatever the calls that carried them."""
        parts = []
        for call in self.calls:
            if call[0] == "send_response":
                parts.append(call[2])
            elif call[0] == "send_data":
                parts.append(call[1])
        return b"".join(parts)


def make_response(method="GET"):
    stream = FakeStream()
    return stream, _Response(stream, method)


def raised(exc):
    try:
        raise exc
    except Exception:
        return sys.exc_info()


# -- _Response.start -----------------------------------------------------------


def test_start_returns_write():
    _, response = make_response()
    assert response.start("200 OK", []) == response.write


def test_start_encodes_status_and_headers():
    _, response = make_response()
    response.start("201 Created", [("Content-Type", "text/plain")])
    assert response.code == 201
    assert response.block == [(b":status", b"201"), (b"content-type", b"text/plain")]


def test_start_sends_nothing():
    stream, response = make_response()
    response.start("200 OK", [("Content-Length", "3")])
    assert stream.calls == []


def test_start_twice_without_exc_info_raises():
    _, response = make_response()
    response.start("200 OK", [])
    with pytest.raises(AssertionError, match="second time"):
        response.start("500 Internal Server Error", [])


def test_start_with_exc_info_before_headers_sent_replaces_status():
    stream, response = make_response()
    response.start("200 OK", [("Content-Length", "100")])
    response.start("500 Internal Server Error", [("Content-Length", "4")], raised(ValueError("boom")))
    response.write(b"oops")
    response.finish()
    assert stream.calls == [
        ("send_response", [(b":status", b"500"), (b"content-length", b"4")], b"oops", False),
        ("send_data", b"", True),
    ]


def test_start_with_exc_info_after_headers_sent_reraises():
    _, response = make_response()
    response.start("200 OK", [])
    response.write(b"partial")
    error = ValueError("boom")
    with pytest.raises(ValueError, match="boom") as info:
        response.start("500 Internal Server Error", [], raised(error))
    assert info.value is error


def test_start_rejects_invalid_header():
    _, response = make_response()
    with pytest.raises(InvalidHeader):
        response.start("200 OK", [("Bad Name", "x")])


@pytest.mark.parametrize("value", ["abc", "-1", "1_000"])
def test_start_rejects_invalid_content_length(value):
    _, response = make_response()
    with pytest.raises(InvalidHeader, match="Content-Length"):
        response.start("200 OK", [("Content-Length", value)])


# -- _Response.write -----------------------------------------------------------


def test_write_before_start_raises():
    _, response = make_response()
    with pytest.raises(AssertionError, match="before start_response"):
        response.write(b"x")


def test_write_rejects_str():
    _, response = make_response()
    response.start("200 OK", [])
    with pytest.raises(TypeError, match="bytes"):
        response.write("text")


def test_first_write_sends_headers_with_data():
    stream, response = make_response()
    response.start("200 OK", [])
    response.write(b"hello")
    assert stream.calls == [("send_response", [(b":status", b"200")], b"hello", False)]


def test_later_writes_send_data():
    stream, response = make_response()
    response.start("200 OK", [])
    response.write(b"hello")
    response.write(b" world")
    assert stream.calls[1:] == [("send_data", b" world", False)]


def test_empty_first_write_sends_nothing():
    stream, response = make_response()
    response.start("200 OK", [])
    response.write(b"")
    assert stream.calls == []


@pytest.mark.parametrize("data", [bytearray(b"abc"), memoryview(b"abc")], ids=["bytearray", "memoryview"])
def test_write_accepts_bytes_like_and_sends_bytes(data):
    stream, response = make_response()
    response.start("200 OK", [])
    response.write(data)
    sent = stream.calls[0][2]
    assert type(sent) is bytes
    assert sent == b"abc"


def test_write_with_end_stream_ends_in_one_call():
    stream, response = make_response()
    response.start("200 OK", [("Content-Length", "2")])
    response.write(b"hi", end_stream=True)
    assert stream.calls == [("send_response", [(b":status", b"200"), (b"content-length", b"2")], b"hi", True)]


def test_content_length_overflow_is_cut():
    stream, response = make_response()
    response.start("200 OK", [("Content-Length", "3")])
    response.write(b"hello")
    response.write(b"more")
    response.finish()
    assert stream.sent_body() == b"hel"
    assert "reset" not in stream.names()
    assert stream.local_ended


def test_head_response_sends_no_body():
    stream, response = make_response("HEAD")
    response.start("200 OK", [("Content-Type", "text/plain")])
    response.write(b"body")
    response.finish()
    assert stream.calls == [("send_response", [(b":status", b"200"), (b"content-type", b"text/plain")], b"", True)]


def test_head_response_keeps_content_length():
    stream, response = make_response("HEAD")
    response.start("200 OK", [("Content-Length", "4")])
    response.write(b"body", end_stream=True)
    assert stream.calls == [("send_response", [(b":status", b"200"), (b"content-length", b"4")], b"", True)]


@pytest.mark.parametrize(
    ("method", "status", "block"),
    [
        ("HEAD", "200 OK", [(b":status", b"200"), (b"content-length", b"4")]),
        ("GET", "304 Not Modified", [(b":status", b"304"), (b"content-length", b"4")]),
        ("GET", "204 No Content", [(b":status", b"204")]),
    ],
    ids=["head", "304", "204"],
)
def test_bodyless_response_with_content_length_ends_cleanly(method, status, block):
    stream, response = make_response(method)
    response.start(status, [("Content-Length", "4")])
    response.write(b"body")
    response.finish()
    assert stream.calls == [("send_response", block, b"", True)]


def test_204_response_drops_content_length():
    stream, response = make_response()
    response.start("204 No Content", [("Content-Length", "0"), ("X-Id", "1")])
    response.finish()
    assert stream.calls == [("send_response", [(b":status", b"204"), (b"x-id", b"1")], b"", True)]


def test_304_response_sends_no_body():
    stream, response = make_response()
    response.start("304 Not Modified", [("ETag", '"x"')])
    response.write(b"body")
    response.finish()
    assert stream.calls == [("send_response", [(b":status", b"304"), (b"etag", b'"x"')], b"", True)]


# -- _Response.finish ----------------------------------------------------------


def test_finish_without_body_ends_with_headers():
    stream, response = make_response()
    response.start("200 OK", [])
    response.finish()
    assert stream.calls == [("send_response", [(b":status", b"200")], b"", True)]


def test_finish_after_data_ends_with_empty_data():
    stream, response = make_response()
    response.start("200 OK", [])
    response.write(b"abc")
    response.finish()
    assert stream.calls[-1] == ("send_data", b"", True)


def test_finish_with_complete_content_length_ends_cleanly():
    stream, response = make_response()
    response.start("200 OK", [("Content-Length", "3")])
    response.write(b"abc")
    response.finish()
    assert stream.names() == ["send_response", "send_data"]
    assert stream.local_ended


def test_short_body_leads_to_reset():
    stream, response = make_response()
    response.start("200 OK", [("Content-Length", "10")])
    response.write(b"abc")
    response.finish()
    assert stream.calls == [
        ("send_response", [(b":status", b"200"), (b"content-length", b"10")], b"abc", False),
        ("reset", ErrorCodes.INTERNAL_ERROR),
    ]


def test_missing_body_sends_headers_then_reset():
    stream, response = make_response()
    response.start("200 OK", [("Content-Length", "10")])
    response.finish()
    assert stream.calls == [
        ("send_headers", [(b":status", b"200"), (b"content-length", b"10")], False),
        ("reset", ErrorCodes.INTERNAL_ERROR),
    ]


# -- handle_request ------------------------------------------------------------


def request_block(method="GET", path="/"):
    return [
        (b":method", method.encode()),
        (b":scheme", b"http"),
        (b":authority", b"example.com"),
        (b":path", path.encode()),
    ]


def test_handle_request_sends_list_body_in_one_call():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"hi"]

    stream = FakeStream(request_block())
    handle_request(stream, app)
    assert stream.calls == [
        ("send_response", [(b":status", b"200"), (b"content-length", b"2")], b"hi", True),
        ("close", ErrorCodes.NO_ERROR),
    ]


def test_handle_request_gives_app_the_request_body():
    seen = {}

    def app(environ, start_response):
        seen["body"] = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return []

    handle_request(FakeStream(request_block("POST"), body=b"payload"), app)
    assert seen["body"] == b"payload"


def test_handle_request_head_with_generator_body_ends_cleanly():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "4")])
        yield b"bo"
        yield b"dy"

    stream = FakeStream(request_block("HEAD"))
    handle_request(stream, app)
    assert stream.calls == [
        ("send_response", [(b":status", b"200"), (b"content-length", b"4")], b"", True),
        ("close", ErrorCodes.NO_ERROR),
    ]


def test_handle_request_answers_500_when_app_fails_before_headers():
    def app(environ, start_response):
        raise RuntimeError("broken")

    stream = FakeStream(request_block())
    handle_request(stream, app)
    assert stream.calls[0][0] == "send_response"
    assert stream.calls[0][1][0] == (b":status", b"500")
    assert stream.calls[0][3] is True
    assert stream.calls[-1] == ("close", ErrorCodes.NO_ERROR)


def test_handle_request_resets_when_app_fails_after_headers():
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"part"
        raise RuntimeError("broken")

    stream = FakeStream(request_block())
    handle_request(stream, app)
    assert stream.calls[-2:] == [("reset", ErrorCodes.INTERNAL_ERROR), ("close", ErrorCodes.INTERNAL_ERROR)]


def test_handle_request_answers_500_when_app_never_calls_start_response():
    def app(environ, start_response):
        return []

    stream = FakeStream(request_block())
    handle_request(stream, app)
    assert stream.calls[0][1][0] == (b":status", b"500")


def test_handle_request_closes_the_app_iterable():
    class Body:
        closed = False

        def __iter__(self):
            return iter([b"x"])

        def close(self):
            Body.closed = True

    def app(environ, start_response):
        start_response("200 OK", [])
        return Body()

    handle_request(FakeStream(request_block()), app)
    assert Body.closed


def test_handle_request_skips_the_app_for_a_stream_cancelled_while_it_waited():
    calls = []

    def app(environ, start_response):
        calls.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"never sent"]

    stream = FakeStream([(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"http"), (b":authority", b"a")])
    stream.cancelled = True
    handle_request(stream, app)
    assert calls == []
    assert not any(call[0].startswith("send") for call in stream.calls)


def test_response_headers_over_the_peers_limit_are_refused_before_anything_is_sent():
    # RFC 9113 size: each field's name and value plus 32. ":status" "200" = 42, "x-big" + N + 32.
    limit = 42 + (5 + 100 + 32)
    at_limit, over = _Response(FakeStream(peer_max_header_list_size=limit), "GET"), FakeStream(
        peer_max_header_list_size=limit)
    at_limit.start("200 OK", [("X-Big", "b" * 100)])  # exactly the limit: accepted
    response = _Response(over, "GET")
    with pytest.raises(InvalidHeader, match=rf"response headers of {limit + 1} bytes exceed the router's limit of "
                                            rf"{limit} bytes"):
        response.start("200 OK", [("X-Big", "b" * 101)])
    assert over.calls == []  # nothing sent: the 500 can still go out
    assert response.block is None


_ERROR_HEADERS = _ERROR_BLOCK[1:]


def test_response_headers_over_the_peers_limit_are_answered_500():
    stream = FakeStream(headers=[(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                 (b":authority", b"x")], peer_max_header_list_size=1000)

    def app(environ, start_response):
        start_response("200 OK", [("X-Big", "b" * 2000)])
        return [b"never"]

    handle_request(stream, app)
    assert stream.calls[0][:2] == ("send_response", [(b":status", b"500"), *_ERROR_HEADERS])


def test_two_different_content_lengths_are_an_application_error():
    response = _Response(FakeStream(), "GET")
    with pytest.raises(InvalidHeader, match="two different Content-Length values, 2 and 3"):
        response.start("200 OK", [("Content-Length", "2"), ("Content-Length", "3")])


def test_the_same_content_length_twice_is_sent_once():
    response = _Response(FakeStream(), "GET")
    response.start("200 OK", [("Content-Length", "2"), ("X-A", "1"), ("Content-Length", "2")])
    assert response.block == [(b":status", b"200"), (b"content-length", b"2"), (b"x-a", b"1")]
    assert response.remaining == 2
