"""A malformed request or response is a stream error: that stream is reset, the tunnel carries on.

RFC 9113 §8.1.1: "Malformed requests or responses that are detected MUST be
treated as a stream error of type PROTOCOL_ERROR." Stock h2 makes most of them
connection errors, which would fail every request on a tunnel because of one.
The cases are those of h2spec's section 8 (the HTTP/2 conformance suite): each
is sent by a scripted peer (``tests.h2peer``) to the real other side, which
must answer with RST_STREAM(PROTOCOL_ERROR) on that stream only, log why, and
go on serving on the same connection.
"""

from __future__ import annotations

import logging
from typing import List, Tuple

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, RstStreamFrame

from tests import apps
from tests.conftest import wait_until
from tests.h2peer import REQUEST, RESPONSE
from tests.integration.test_hostile_peers import PROMPT, Arena

Headers = List[Tuple[str, str]]

POST = [(":method", "POST"), (":path", "/foo"), (":scheme", "http"), (":authority", "test")]


def _without(name: str) -> Headers:
    return [(n, v) for n, v in REQUEST if n != name]


def _twice(name: str) -> Headers:
    value = dict(REQUEST)[name]
    return [*REQUEST, (name, value)]


# h2spec 8.1.2, 8.1.2.1, 8.1.2.2 and 8.1.2.3: a bad header block, sent with END_STREAM.
BAD_REQUEST_BLOCKS = {
    "uppercase-header-name": [*REQUEST, ("X-Upper", "1")],
    "unknown-pseudo-header": [*REQUEST, (":foo", "bar")],
    "response-pseudo-header": [*REQUEST, (":status", "200")],
    "pseudo-header-after-regular": [*REQUEST[:3], ("x-a", "1"), REQUEST[3]],
    "connection-specific-header": [*REQUEST, ("connection", "keep-alive")],
    "te-not-trailers": [*REQUEST, ("te", "gzip")],
    "empty-path": [(n, "" if n == ":path" else v) for n, v in REQUEST],
    "no-method": _without(":method"),
    "no-scheme": _without(":scheme"),
    "no-path": _without(":path"),
    "method-twice": _twice(":method"),
    "scheme-twice": _twice(":scheme"),
    "path-twice": _twice(":path"),
    "bad-content-length": [*REQUEST, ("content-length", "abc")],
    # Not h2spec's: more than the 64 KiB of headers we advertise (decoded, so HPACK stays in step).
    "over-the-header-list-limit": [*REQUEST, ("x-big", "b" * 70_000)],
}


@pytest.fixture
def backend_arena(router, caplog):
    """A real Backend dialled into a scripted router, next to a real Router it also serves."""
    caplog.set_level(logging.INFO, logger="ptth_sync")
    arena = Arena("backend", router, caplog)
    try:
        arena.handshake()
        yield arena
    finally:
        arena.close()


def assert_reset_only(arena: Arena, stream_id: int) -> None:
    """``stream_id`` is reset with PROTOCOL_ERROR, nothing else closes, and the same connection serves on."""
    reset = arena.peer.read_until(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == stream_id, PROMPT)
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR, arena.peer.received
    arena.exchange()
    assert arena.peer.goaway is None
    assert not arena.peer.eof
    assert any(f"stream {stream_id} reset: malformed" in r.getMessage() for r in arena.caplog.records)
    arena.assert_others_serve()
    arena.finish()


@pytest.mark.parametrize("block", BAD_REQUEST_BLOCKS.values(), ids=BAD_REQUEST_BLOCKS.keys())
def test_a_malformed_request_header_block_resets_that_stream_only(backend_arena, block):
    stream_id = backend_arena.stream_for_headers()
    backend_arena.peer.send(backend_arena.peer.headers(stream_id, block, flags=["END_HEADERS", "END_STREAM"]))
    assert_reset_only(backend_arena, stream_id)


def test_a_second_headers_frame_without_end_stream_resets_that_stream_only(backend_arena):
    """h2spec 8.1/1: trailers must end the stream."""
    peer = backend_arena.peer
    stream_id = backend_arena.stream_for_headers()
    # In one write, so that the backend sees all of it before its app could answer.
    peer.send(peer.headers(stream_id, POST), DataFrame(stream_id, b"x"), peer.headers(stream_id, [("x-trailer", "1")]))
    assert_reset_only(backend_arena, stream_id)


def test_a_pseudo_header_in_trailers_resets_that_stream_only(backend_arena):
    """h2spec 8.1.2.1/3."""
    peer = backend_arena.peer
    stream_id = backend_arena.stream_for_headers()
    trailers = peer.headers(stream_id, [(":method", "POST")], flags=["END_HEADERS", "END_STREAM"])
    peer.send(peer.headers(stream_id, POST), DataFrame(stream_id, b"x"), trailers)
    assert_reset_only(backend_arena, stream_id)


@pytest.mark.parametrize("frames", [[b"ab"], [b"a", b"b"], [b"abcdef"]], ids=["short", "short-in-two", "long"])
def test_a_body_of_another_length_than_its_content_length_resets_that_stream_only(backend_arena, frames):
    """h2spec 8.1.2.6/1 and /2; "short" is what an aborted upload of a promised 3 bytes would send."""
    peer = backend_arena.peer
    stream_id = backend_arena.stream_for_headers()
    *middle, last = frames
    peer.send(peer.headers(stream_id, [*POST, ("content-length", "3")]),
              *(DataFrame(stream_id, data) for data in middle), DataFrame(stream_id, last, flags=["END_STREAM"]))
    assert_reset_only(backend_arena, stream_id)


# -- the router receiving malformed responses --------------------------------------------------

BAD_RESPONSE_BLOCKS = {
    "uppercase-header-name": [*RESPONSE, ("X-Upper", "1")],
    "request-pseudo-header": [*RESPONSE, (":path", "/")],
    "connection-specific-header": [*RESPONSE, ("connection", "close")],
    "no-status": [("content-length", "2")],
    "over-the-header-list-limit": [*RESPONSE, ("x-big", "b" * 70_000)],
}


@pytest.fixture
def router_arena(router, start_backend, caplog):
    """A scripted backend tunnelled into a real Router, next to a real backend."""
    caplog.set_level(logging.INFO, logger="ptth_sync")
    start_backend(apps.hello)
    arena = Arena("router", router, caplog)
    try:
        arena.handshake()
        yield arena
    finally:
        arena.close()


@pytest.mark.parametrize("end_stream", [False, True], ids=["open", "ended"])
@pytest.mark.parametrize("block", BAD_RESPONSE_BLOCKS.values(), ids=BAD_RESPONSE_BLOCKS.keys())
def test_a_malformed_response_fails_that_request_only(router_arena, block, end_stream):
    """The client gets a 502; a stream still open is reset; the tunnel serves on."""
    peer = router_arena.peer
    stream_id, result = router_arena.lure()
    flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
    peer.send(peer.headers(stream_id, block, flags=flags))
    if not end_stream:
        reset = peer.read_until(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == stream_id, PROMPT)
        assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    wait_until(lambda: result, PROMPT, what="the lured request to finish")
    assert result["response"][0] == 502
    router_arena.exchange()  # the same tunnel still serves
    assert peer.goaway is None
    assert not peer.eof
    assert not any("Tunnel removed" in r.getMessage() for r in router_arena.caplog.records)
    router_arena.assert_others_serve()
    router_arena.finish()
