"""WebSocket pieces that need no network: keys, frames, the router's checks and header mapping,
the backend's view of an extended CONNECT, and the metrics."""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Tuple

import pytest

from ptth_sync.backend.websocket import websocket_environ
from ptth_sync.backend.wsgi import is_websocket_request as is_extended_connect
from ptth_sync.router.metrics import RouterMetrics, merge, parse, render, status
from ptth_sync.router.websocket import check_websocket, connect_headers, is_websocket_request
from ptth_sync.websocket import FrameTracker, accept_value, close_frame, going_away_delay, valid_key
from ptth_sync.worker import TunnelRequest

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3


def frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One frame, with the shortest length encoding (RFC 6455 §5.2)."""
    size = len(payload)
    second = 0x80 if mask else 0
    if size < 126:
        head = bytes([0x80 | opcode, second | size])
    elif size < 65536:
        head = bytes([0x80 | opcode, second | 126]) + struct.pack(">H", size)
    else:
        head = bytes([0x80 | opcode, second | 127]) + struct.pack(">Q", size)
    return head + (b"\x01\x02\x03\x04" if mask else b"") + payload


def test_the_accept_value_is_rfc_6455s_example():
    assert accept_value(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(("key", "valid"), [
    (KEY, True), ("", False), ("not base64!!", False), ("c2hvcnQ=", False), (KEY + "AAAA", False),
])
def test_a_key_is_16_bytes_in_base64(key, valid):
    assert valid_key(key) is valid


def test_a_close_frame_carries_its_code_and_reason_unmasked():
    assert close_frame(1001, "bye") == b"\x88\x05\x03\xe9bye"


def test_a_close_frames_reason_is_cut_to_fit_a_control_frame():
    assert len(close_frame(1001, "x" * 500)) == 2 + 125


@pytest.mark.parametrize("piece", [1, 3, 7, 4096, 1 << 20])
def test_the_frame_tracker_finds_boundaries_in_pieces_of_any_size(piece):
    stream = (frame(0x1, b"hello") + frame(0x2, os.urandom(300)) + frame(0x2, os.urandom(70000), mask=True)
              + frame(0x9, b"") + frame(0x0, b"tail"))
    tracker = FrameTracker()
    for start in range(0, len(stream), piece):
        tracker.feed(memoryview(stream)[start : start + piece])
    assert tracker.at_boundary
    assert not tracker.close_sent
    tracker.feed(stream[:40])
    assert not tracker.at_boundary


def test_the_frame_tracker_notes_a_close_frame():
    tracker = FrameTracker()
    tracker.feed(frame(0x1, b"last") + close_frame(1000))
    assert tracker.at_boundary
    assert tracker.close_sent


def test_websockets_are_closed_a_second_before_the_graceful_timeout_or_half_way_when_shorter():
    assert going_away_delay(30) == 29
    assert going_away_delay(1) == 0.5
    assert going_away_delay(0) == 0


def environ(**extra: str) -> Dict[str, Any]:
    base = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_UPGRADE": "websocket",
            "HTTP_CONNECTION": "keep-alive, Upgrade", "HTTP_SEC_WEBSOCKET_KEY": KEY,
            "HTTP_SEC_WEBSOCKET_VERSION": "13"}
    base.update(extra)
    return {key: value for key, value in base.items() if value is not None}


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, True),
    ({"HTTP_UPGRADE": "WebSocket"}, True),
    ({"HTTP_UPGRADE": "h2c"}, False),
    ({"HTTP_CONNECTION": "keep-alive"}, False),
    ({"HTTP_CONNECTION": None}, False),
    ({"REQUEST_METHOD": "POST"}, False),
])
def test_a_websocket_request_is_a_get_with_upgrade_websocket_named_in_connection(changes, expected):
    assert is_websocket_request(environ(**changes)) is expected


@pytest.mark.parametrize(("changes", "code"), [
    ({}, None),
    ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, 426),
    ({"HTTP_SEC_WEBSOCKET_VERSION": None}, 426),
    ({"HTTP_SEC_WEBSOCKET_KEY": "short"}, 400),
    ({"SERVER_PROTOCOL": "HTTP/1.0"}, 400),
    ({"CONTENT_LENGTH": "5"}, 400),
    ({"HTTP_TRANSFER_ENCODING": "chunked"}, 400),
])
def test_the_router_checks_the_opening_handshake(changes, code):
    refusal = check_websocket(environ(**changes))
    assert (refusal.code if refusal else None) == code
    if code == 426:
        assert ("Sec-WebSocket-Version", "13") in refusal.headers


def test_the_extended_connect_keeps_the_request_and_names_the_protocol():
    block: List[Tuple[bytes, bytes]] = [
        (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/chat?room=1"),
        (b"sec-websocket-key", KEY.encode()), (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"chat"), (b"content-length", b"0"), (b"x-forwarded-for", b"10.0.0.1"),
    ]
    headers = connect_headers(block)
    assert headers[:2] == [(b":method", b"CONNECT"), (b":protocol", b"websocket")]
    assert (b":scheme", b"https") in headers
    assert (b":path", b"/chat?room=1") in headers
    assert (b":authority", b"example.com") in headers
    assert (b"sec-websocket-protocol", b"chat") in headers
    assert all(name != b"content-length" for name, _ in headers)
    pseudo = [name for name, _ in headers if name.startswith(b":")]
    assert headers[: len(pseudo)] == [h for h in headers if h[0].startswith(b":")]  # pseudo-headers first


def test_the_backend_knows_an_extended_connect_for_websocket():
    assert is_extended_connect([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":path", b"/")])
    assert is_extended_connect([(b":protocol", b"WebSocket"), (b":method", b"CONNECT")])
    assert not is_extended_connect([(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
    assert not is_extended_connect([(b":method", b"CONNECT"), (b":protocol", b"connect-udp")])
    assert not is_extended_connect([(b":method", b"GET"), (b":path", b"/"), (b"x-protocol", b"websocket")])


def test_the_backend_shows_the_app_a_get_with_upgrade_and_a_key_even_when_none_came():
    env = websocket_environ([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                             (b":authority", b"example.com"), (b":path", b"/ws?x=1")])
    assert env["REQUEST_METHOD"] == "GET"
    assert (env["PATH_INFO"], env["QUERY_STRING"]) == ("/ws", "x=1")
    assert (env["HTTP_UPGRADE"], env["HTTP_CONNECTION"]) == ("websocket", "Upgrade")
    assert env["HTTP_SEC_WEBSOCKET_VERSION"] == "13"
    assert valid_key(env["HTTP_SEC_WEBSOCKET_KEY"])  # RFC 8441 sends none; the libraries want one
    assert env["wsgi.url_scheme"] == "https"
    assert env["wsgi.input"].read() == b""


def test_gunicorn_hooks_see_a_websocket_as_a_get_with_upgrade():
    req = TunnelRequest([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":path", b"/ws"),
                         (b":authority", b"example.com"), (b"sec-websocket-version", b"13")])
    assert (req.method, req.path) == ("GET", "/ws")
    assert ("UPGRADE", "websocket") in req.headers
    assert ("CONNECTION", "Upgrade") in req.headers


def test_the_metrics_count_open_websockets_and_their_bytes():
    metrics = RouterMetrics()
    metrics.websocket_opened()
    metrics.websocket_opened()
    metrics.websocket_closed(10, 20)
    view = merge([{"pid": 1, "counters": metrics.counters(), "websockets": metrics.websockets_open}])
    samples = parse(render(view))
    assert samples[("ptth_router_websockets_open", ())] == 1
    assert samples[("ptth_router_websockets_total", ())] == 2
    assert samples[("ptth_router_websocket_bytes_total", (("direction", "to_backend"),))] == 10
    assert samples[("ptth_router_websocket_bytes_total", (("direction", "to_client"),))] == 20
    assert status(view)["websockets_open"] == 1
