"""Misbehaving peers: malformed and hostile HTTP/2 against each tunnel role, over real loopback sockets.

Each test plays one side of a tunnel by hand (``tests.h2peer``, frames built
with hyperframe and hpack) against the real other side, with a good tunnel
next to the hostile one:

* role ``router``: a fake backend dials the real :class:`Router` (the HTTP/2
  client), next to a real backend serving ``tests.apps.hello``;
* role ``backend``: a real :class:`Backend` (the HTTP/2 server) dials a fake
  router, and also a real Router, through which it must keep serving.

What must hold every time: the hostile connection alone is closed, the
attacked side logs why, the good tunnel keeps serving, the backend redials,
threads return to their baseline and, for floods, memory stays bounded.
Where RFC 9113 asks for a *stream* error (DATA on a closed stream, a stream
window overflow) the attacked side resets the stream and the tunnel carries on.
"""

from __future__ import annotations

import logging
import random
import selectors
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptth_sync import Backend, Router
from ptth_sync.connection import Connection, ConnectionSettings
from tests import apps
from tests.conftest import wait_until
from tests.h2peer import PREFACE, REQUEST, RESPONSE, H2Peer, PeerClosed, raw_frame
from tests.integration.test_connection import tcp_pair
from tests.wsgi_client import wsgi_request

MIB = 1024 * 1024
MAX_WINDOW = 2**31 - 1
#: How much the process may grow while a flood is fought off.
RSS_SLACK = 48 * MIB
#: Deadline for something that should happen at once (a drop, a log line, a redial).
PROMPT = 5.0

ROLES = ["router", "backend"]



# -- helpers ---------------------------------------------------------------------


def rss() -> int:
    """The resident set size of this process, in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def assert_rss_bounded(before: int) -> None:
    growth = rss() - before
    print(f"RSS growth: {growth / MIB:.1f} MiB")
    assert growth < RSS_SLACK, f"the process grew by {growth / MIB:.0f} MiB"


def wait_threads(baseline: int, timeout: float = 10.0) -> None:
    """Poll until no more threads run than at ``baseline``; name the ones left over if they never end."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline:
        if time.monotonic() > deadline:
            names = sorted(t.name for t in threading.enumerate())
            pytest.fail(f"{threading.active_count()} threads after {timeout}s, baseline {baseline}: {names}")
        time.sleep(0.01)


def fetch(router: Router, path: str = "/foo") -> Tuple[int, bytes]:
    response = wsgi_request(router, "GET", path)
    return response.code, response.body


def assert_router_serves(router: Router, tunnels: int = 1, count: int = 6) -> None:
    """Once only good tunnels are left, every request through ``router`` succeeds."""
    wait_until(lambda: len(router.pool) == tunnels, PROMPT, what=f"{tunnels} tunnel(s) in the router's pool")
    for _ in range(count):
        assert fetch(router) == (200, b"bar")


def listen() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def accept(listener: socket.socket, timeout: float = PROMPT) -> socket.socket:
    listener.settimeout(timeout)
    sock, _ = listener.accept()
    sock.settimeout(None)
    return sock


def address_name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


class Arena:
    """One hostile peer against one role, with a good tunnel beside it; see the module docstring."""

    def __init__(self, role: str, router: Router, caplog: pytest.LogCaptureFixture) -> None:
        self.role = role
        self.router = router
        self.caplog = caplog
        self.backend: Optional[Backend] = None
        self.listener: Optional[socket.socket] = None
        self.redials: List[H2Peer] = []
        self.lures: List[Tuple[threading.Thread, Dict[str, Any]]] = []
        self.next_stream_id = 1
        self.baseline = threading.active_count()
        if role == "router":
            self.peer = H2Peer.connect(router.tunnel_address)
            #: The name the attacked side gives the hostile connection in its log.
            self.name = self.peer.local_name
        else:
            self.listener = listen()
            self.name = address_name(self.listener)
            self.backend = Backend([self.listener.getsockname(), router.tunnel_address], apps.hello).start()
            self.peer = H2Peer(accept(self.listener))

    @property
    def is_router(self) -> bool:
        return self.role == "router"

    def handshake(self) -> None:
        if self.is_router:
            self.peer.server_handshake()
            wait_until(lambda: len(self.router.pool) == 2, PROMPT, what="the hostile tunnel in the pool")
        else:
            self.peer.client_handshake()
            assert self.backend is not None
            wait_until(lambda: len(self.router.pool) == 1, PROMPT, what="the backend's good tunnel")

    # -- streams ---------------------------------------------------------------

    def good_headers(self) -> List[Tuple[str, str]]:
        """What this peer legitimately sends in a header block: a response (fake backend) or a request."""
        return list(RESPONSE if self.is_router else REQUEST)

    def lure(self, path: str = "/lure") -> Tuple[int, Dict[str, Any]]:
        """Router role: have the router send a request through the hostile tunnel; its stream id and outcome."""
        for _ in range(6):
            result: Dict[str, Any] = {}

            def request(result: Dict[str, Any] = result) -> None:
                try:
                    result["response"] = fetch(self.router, path)
                except Exception as exc:
                    result["error"] = exc

            thread = threading.Thread(target=request, name="lured request", daemon=True)
            thread.start()
            self.lures.append((thread, result))
            deadline = time.monotonic() + PROMPT
            while time.monotonic() < deadline:
                frame = self.peer.read_frame(0.05)
                if isinstance(frame, HeadersFrame):
                    return frame.stream_id, result
                if frame is None and not thread.is_alive():
                    break  # round robin sent it to the good tunnel: try again
        pytest.fail("no request reached the hostile tunnel")

    def stream_for_headers(self) -> int:
        """A stream on which this peer may send a header block next."""
        if self.is_router:
            return self.lure()[0]
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        return stream_id

    def exchange(self) -> int:
        """One complete, valid request and response through the hostile tunnel; returns its stream id."""
        if self.is_router:
            stream_id, result = self.lure()
            self.peer.send(self.peer.headers(stream_id, RESPONSE), DataFrame(stream_id, b"ok", flags=["END_STREAM"]))
            wait_until(lambda: result, PROMPT, what="the lured request to finish")
            assert result.get("response") == (200, b"ok"), result
            return stream_id
        stream_id = self.stream_for_headers()
        self.peer.send(self.peer.headers(stream_id, REQUEST, flags=["END_HEADERS", "END_STREAM"]))
        self.peer.read_until(
            lambda f: f.stream_id == stream_id and "END_STREAM" in f.flags and isinstance(f, (DataFrame, HeadersFrame)),
            PROMPT,
        )
        assert (b":status", b"200") in self.peer.header_blocks[stream_id][0]
        return stream_id

    # -- outcome ---------------------------------------------------------------

    def reason(self, timeout: float = PROMPT) -> str:
        """The reason the attacked side logged for dropping the hostile connection."""
        if self.is_router:
            prefixes = (f"Tunnel removed: {self.name}: ", f"Tunnel from {self.name} closed before it was ready: ")
            logger = "ptth_sync.router"
        else:
            prefixes = (f"Tunnel to {self.name} lost: ",)
            logger = "ptth_sync.backend"

        def find() -> Optional[str]:
            for record in list(self.caplog.records):
                if record.name != logger:
                    continue
                message = record.getMessage()
                for prefix in prefixes:
                    if message.startswith(prefix):
                        return message[len(prefix) :].split("; reconnecting in")[0]
            return None

        return wait_until(find, timeout, what=f"{logger} to log why it dropped {self.name}")  # type: ignore[return-value]

    def assert_dropped(
        self, *fragments: str, goaway: Optional[int] = None, flood: bool = False, timeout: float = PROMPT
    ) -> str:
        """The hostile connection is closed, with a reason containing one of ``fragments`` in the log.

        ``goaway``: the error code of the GOAWAY expected before the close. After a
        ``flood`` the GOAWAY may never arrive: the attacked side closes with our
        bytes still unread, so its kernel resets the connection and drops what
        it had not yet sent; a GOAWAY that does arrive must carry ``goaway``.
        """
        assert self.peer.wait_closed(timeout), f"the hostile connection is still open after {timeout}s"
        reason = self.reason(timeout)
        assert any(fragment in reason for fragment in fragments), reason
        if goaway is not None and not (flood and self.peer.goaway is None):
            assert self.peer.goaway is not None, f"no GOAWAY before the close; got {self.peer.received[-3:]}"
            assert self.peer.goaway.error_code == goaway, self.peer.goaway
        return reason

    def assert_others_serve(self) -> None:
        """The good tunnel serves: the hostile backend is out of the pool; the backend redials the hostile router."""
        if self.is_router:
            # A hostile tunnel still open would get its share of the requests: it leaves first.
            self.peer.close()
            assert_router_serves(self.router, tunnels=1)
        else:
            assert_router_serves(self.router, tunnels=1)
            if self.peer.eof and not self.redials:
                self.accept_redial()

    def accept_redial(self) -> H2Peer:
        """Backend role: the backend dials the fake router again; serve the new connection's handshake."""
        assert self.listener is not None
        peer = H2Peer(accept(self.listener))
        self.redials.append(peer)
        peer.client_handshake()
        return peer

    def finish(self) -> None:
        """Close everything this arena made and check the threads came back to the baseline."""
        self.close()
        wait_threads(self.baseline)

    def close(self) -> None:
        self.peer.close()
        for thread, _ in self.lures:
            thread.join(15)
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        for peer in self.redials:
            peer.close()
        if self.listener is not None:
            self.listener.close()


@pytest.fixture(params=ROLES)
def arena(request, router, start_backend, caplog):
    """A hostile peer, handshake done, against the role named by the parameter, next to a good tunnel."""
    caplog.set_level(logging.INFO, logger="ptth_sync")
    if request.param == "router":
        start_backend(apps.hello)
    arena = Arena(request.param, router, caplog)
    try:
        arena.handshake()
        yield arena
    finally:
        arena.close()


@pytest.fixture
def fresh_arena(request, router, start_backend, caplog):
    """Like ``arena`` but before the handshake: the test speaks first."""
    caplog.set_level(logging.INFO, logger="ptth_sync")
    if request.param == "router":
        start_backend(apps.hello)
    arena = Arena(request.param, router, caplog)
    try:
        yield arena
    finally:
        arena.close()


# -- bytes that are not HTTP/2 ------------------------------------------------------------


HTTP1_REQUEST = b"GET / HTTP/1.1\r\nHost: tunnel.example\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
RANDOM_GARBAGE = random.Random(20240403).randbytes(16 * 1024)


@pytest.mark.parametrize("garbage", [HTTP1_REQUEST, RANDOM_GARBAGE], ids=["http1-request", "random-bytes"])
def test_garbage_after_the_handshake_is_refused_at_once(arena, garbage):
    # Read as a frame header, the garbage announces megabytes ("GET" is 4.6 MB):
    # FRAME_SIZE_ERROR is due as soon as those 9 bytes are in.
    arena.peer.send_raw(garbage)
    arena.assert_dropped("overlong frame", "frame size", timeout=PROMPT)
    arena.assert_others_serve()
    arena.finish()


def test_router_drops_a_backend_that_speaks_http1_instead_of_http2(router, start_backend, caplog):
    """An HTTP/1.1 request where the backend's SETTINGS belong: refused before it becomes a tunnel."""
    caplog.set_level(logging.INFO, logger="ptth_sync")
    start_backend(apps.hello)
    baseline = threading.active_count()
    peer = H2Peer.connect(router.tunnel_address)
    try:
        name = peer.local_name
        peer.send_raw(HTTP1_REQUEST)
        assert peer.wait_closed(PROMPT), "the router kept a peer that is not HTTP/2"
        messages = wait_until(
            lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"Tunnel from {name} ")],
            PROMPT,
            what="the router to log why it refused the peer",
        )
        # "GET " opens a PTTH upgrade, which this one is not: an HTTP client on the wrong port, most likely.
        assert "failed to open: an HTTP request for '/', not a tunnel's upgrade" in messages[0]
        assert not any(r.getMessage().startswith(f"Tunnel added: {name}") for r in caplog.records)
    finally:
        peer.close()
    assert_router_serves(router)
    wait_threads(baseline)


def test_backend_logs_and_redials_at_once_when_the_router_is_not_http2(router, caplog):
    caplog.set_level(logging.INFO, logger="ptth_sync")
    baseline = threading.active_count()
    listener = listen()
    name = address_name(listener)
    backend = Backend([listener.getsockname(), router.tunnel_address], apps.hello).start()
    peers: List[H2Peer] = []
    try:
        wait_until(lambda: len(router.pool) == 1, PROMPT, what="the good tunnel")
        peers.append(H2Peer(accept(listener)))
        peers[0].send_raw(HTTP1_REQUEST)  # instead of the client preface
        assert peers[0].wait_closed(PROMPT), "the backend kept a peer that is not HTTP/2"
        assert_router_serves(router)
        message = wait_until(
            lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"Tunnel to {name} lost: ")],
            PROMPT,
        )
        assert "Invalid HTTP/2 preamble" in message[0]
        peers.append(H2Peer(accept(listener, PROMPT)))
        peers[1].client_handshake()
    finally:
        backend.close()
        for peer in peers:
            peer.close()
        listener.close()
    wait_threads(baseline)


# -- bad frame lengths -----------------------------------------------------------------


def test_a_frame_header_announcing_more_than_max_frame_size_is_refused_at_once(arena):
    arena.peer.send_raw(raw_frame(0x0, 0, 1, b"x" * 1024, length=2**24 - 1))
    arena.assert_dropped("overlong frame", timeout=PROMPT)
    arena.assert_others_serve()
    arena.finish()


def test_a_frame_longer_than_max_frame_size_is_refused(arena):
    before = rss()
    payload = b"x" * (MIB + 1)  # both roles advertise (and accept) 1 MiB frames
    arena.peer.try_send(raw_frame(0x0, 0, 1, payload))
    reason = arena.assert_dropped("Received overlong frame: length 1048577", goaway=ErrorCodes.FRAME_SIZE_ERROR)
    assert reason.startswith("protocol error from peer")
    arena.assert_others_serve()
    arena.finish()
    assert_rss_bounded(before)


@pytest.mark.parametrize("when", ["instead-of-settings", "after-settings"])
@pytest.mark.parametrize("fresh_arena", ROLES, indirect=True)
def test_a_settings_frame_whose_length_is_not_a_multiple_of_6_is_refused(fresh_arena, when):
    arena = fresh_arena
    bad = raw_frame(0x4, 0, 0, b"\x00\x04\x00\x01\x00")  # 5 bytes
    if when == "after-settings":
        arena.handshake()
        arena.peer.send_raw(bad)
    elif arena.is_router:
        arena.peer.send_raw(bad)  # the first bytes a backend sends
        arena.peer.read_exactly(len(PREFACE), PROMPT, expect=PREFACE)
    else:
        arena.peer.send_raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bad)
    arena.assert_dropped("Frame data missing or invalid", goaway=ErrorCodes.FRAME_SIZE_ERROR)
    arena.assert_others_serve()
    arena.finish()


# -- invalid HPACK and oversized header blocks -------------------------------------------------------


def test_an_hpack_index_out_of_range_is_refused(arena):
    stream_id = arena.stream_for_headers()
    # Indexed field 70: the static table has 61 entries and the dynamic one is empty.
    arena.peer.send(HeadersFrame(stream_id, data=bytes([0x80 | 70]), flags=["END_HEADERS", "END_STREAM"]))
    arena.assert_dropped("Invalid table index 70")
    if arena.is_router:
        result = arena.lures[-1][1]
        wait_until(lambda: result, PROMPT, what="the lured request to fail")
        assert result["response"][0] == 502
    arena.assert_others_serve()
    arena.finish()


def _one_mib_block(peer: H2Peer, base: List[Tuple[str, str]]) -> bytes:
    return peer.header_block(base + [(f"x-filler-{i}", "v" * 1000) for i in range(1040)])


@pytest.mark.parametrize("shape", ["one-headers-frame", "continuation-frames", "hpack-bomb"])
def test_a_one_mib_header_block_is_refused(arena, shape):
    before = rss()
    stream_id = arena.stream_for_headers()
    peer = arena.peer
    if shape == "one-headers-frame":
        block = _one_mib_block(peer, arena.good_headers())[:MIB]
        peer.try_send(HeadersFrame(stream_id, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    elif shape == "continuation-frames":
        block = _one_mib_block(peer, arena.good_headers())
        pieces = [block[i : i + 16384] for i in range(0, len(block), 16384)]
        frames = [HeadersFrame(stream_id, data=pieces[0], flags=["END_STREAM"])]
        frames += [ContinuationFrame(stream_id, data=piece) for piece in pieces[1:-1]]
        frames.append(ContinuationFrame(stream_id, data=pieces[-1], flags=["END_HEADERS"]))
        peer.try_send(b"".join(frame.serialize() for frame in frames))
    else:
        # A 4 KiB value entered in the dynamic table, then referenced 256 Ki times by a one-byte index:
        # a 256 KiB block that decodes to 1 GiB.
        bomb = peer.header_block([*arena.good_headers(), ("x-bomb", "b" * 4000)])
        bomb += bytes([0x80 | 62]) * (256 * 1024 - len(bomb))
        peer.try_send(HeadersFrame(stream_id, data=bomb, flags=["END_HEADERS", "END_STREAM"]).serialize())
    arena.assert_dropped("Oversized header block", "header block over 262144 bytes")
    arena.assert_others_serve()
    arena.finish()
    assert_rss_bounded(before)


@pytest.mark.parametrize("piece", [0, 16384], ids=["empty", "16KiB"])
def test_endless_continuation_frames_are_cut_short(arena, piece):
    """The 2024 CONTINUATION flood: HEADERS without END_HEADERS, then CONTINUATION frames forever."""
    before = rss()
    stream_id = arena.stream_for_headers()
    peer = arena.peer
    peer.send(HeadersFrame(stream_id, data=peer.header_block(arena.good_headers())))
    batch = ContinuationFrame(stream_id, data=b"\0" * piece).serialize() * (100 if piece == 0 else 4)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and peer.try_send(batch):  # until the peer hangs up
        sent += 1
    assert time.monotonic() < deadline, "still accepting CONTINUATION frames after 10 s"
    reason = arena.assert_dropped("Too many continuation frames", "header block over 262144 bytes")
    calm = "header block over" in reason
    arena.assert_dropped(reason, goaway=ErrorCodes.ENHANCE_YOUR_CALM if calm else ErrorCodes.PROTOCOL_ERROR, flood=True)
    arena.assert_others_serve()
    arena.finish()
    assert_rss_bounded(before)


# -- streams in the wrong state ---------------------------------------------------------------------


def test_data_on_a_closed_stream_is_a_stream_error_and_the_tunnel_carries_on(arena):
    """RFC 9113 §6.1: DATA on a stream that is not open is a stream error of type STREAM_CLOSED."""
    stream_id = arena.exchange()
    arena.peer.send(DataFrame(stream_id, b"late"))
    reset = arena.peer.read_until(lambda f: isinstance(f, RstStreamFrame), PROMPT)
    assert (reset.stream_id, reset.error_code) == (stream_id, ErrorCodes.STREAM_CLOSED)
    arena.exchange()  # the same tunnel still serves
    assert not arena.peer.eof
    arena.assert_others_serve()
    arena.finish()


def _data_on_a_stream_never_opened(arena: Arena) -> str:
    """DATA on an idle stream (RFC 9113 §5.1: a connection error); returns the reason logged."""
    if arena.is_router:
        stream_id, result = arena.lure()
        arena.peer.send(DataFrame(stream_id + 2, b"unasked"))
        reason = arena.assert_dropped("protocol error from peer", goaway=ErrorCodes.PROTOCOL_ERROR)
        wait_until(lambda: result, PROMPT, what="the lured request to fail")
        assert result["response"][0] == 502
    else:
        arena.exchange()
        arena.peer.send(DataFrame(7, b"unasked"))
        reason = arena.assert_dropped("protocol error from peer", goaway=ErrorCodes.PROTOCOL_ERROR)
    arena.assert_others_serve()
    arena.finish()
    return reason


def test_data_on_a_stream_never_opened_is_refused(arena):
    _data_on_a_stream_never_opened(arena)


def test_the_reason_for_a_frame_on_a_stream_never_opened_says_what_happened(arena):
    reason = _data_on_a_stream_never_opened(arena)
    assert not reason[len("protocol error from peer: ") :].isdigit(), f"the whole reason logged: {reason!r}"


@pytest.mark.parametrize("how", ["push-promise", "even-stream-headers"])
def test_a_backend_cannot_open_streams_on_the_router(router, start_backend, caplog, how):
    """Only the router opens streams: PUSH_PROMISE (push is disabled) or server-side HEADERS end the tunnel."""
    caplog.set_level(logging.INFO, logger="ptth_sync")
    start_backend(apps.hello)
    arena = Arena("router", router, caplog)
    try:
        arena.handshake()
        stream_id, result = arena.lure()
        peer = arena.peer
        if how == "push-promise":
            block = peer.header_block(REQUEST)
            peer.send(PushPromiseFrame(stream_id, promised_stream_id=2, data=block, flags=["END_HEADERS"]))
            arena.assert_dropped("Received pushed stream", goaway=ErrorCodes.PROTOCOL_ERROR)
        else:
            peer.send(peer.headers(2, RESPONSE, flags=["END_HEADERS", "END_STREAM"]))
            arena.assert_dropped("protocol error from peer", goaway=ErrorCodes.PROTOCOL_ERROR)
        wait_until(lambda: result, PROMPT, what="the lured request to fail")
        assert result["response"][0] == 502
        arena.assert_others_serve()
        arena.finish()
    finally:
        arena.close()


@pytest.mark.parametrize("how", ["even-stream-id", "over-max-concurrent-streams"])
def test_a_router_that_opens_streams_wrongly_is_refused(router, caplog, how):
    caplog.set_level(logging.INFO, logger="ptth_sync")
    arena = Arena("backend", router, caplog)
    try:
        arena.handshake()
        peer = arena.peer
        if how == "even-stream-id":
            peer.send(peer.headers(2, REQUEST, flags=["END_HEADERS", "END_STREAM"]))
            arena.assert_dropped("Invalid stream ID for peer", goaway=ErrorCodes.PROTOCOL_ERROR)
        else:
            # On the plain wire the backend advertises MAX_CONCURRENT_STREAMS = 250; open 300 at once, none ended.
            frames = [peer.headers(2 * i + 1, REQUEST) for i in range(300)]
            peer.try_send(b"".join(frame.serialize() for frame in frames))
            # (h2 4.1 words it "Max outbound streams", 4.2 on "Max inbound streams".)
            arena.assert_dropped("inbound streams is 250", "outbound streams is 250",
                                 goaway=ErrorCodes.PROTOCOL_ERROR, flood=True)
        arena.assert_others_serve()
        arena.finish()
    finally:
        arena.close()


# -- flow-control windows --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["window-update", "initial-window-size"])
def test_a_connection_window_pushed_past_2_31_is_refused(arena, how):
    if how == "window-update":
        arena.peer.send(WindowUpdateFrame(0, window_increment=MAX_WINDOW))
        fragment = "May not increment flow control window past 2147483647"
    else:
        arena.peer.send(SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW + 1}))
        fragment = "Setting 4 has invalid value 2147483648"
    arena.assert_dropped(fragment, goaway=ErrorCodes.FLOW_CONTROL_ERROR)
    arena.assert_others_serve()
    arena.finish()


def test_a_stream_window_pushed_past_2_31_resets_that_stream_only(arena):
    """RFC 9113 §6.9.1: a stream window overflow is a stream error (RST_STREAM FLOW_CONTROL_ERROR)."""
    peer = arena.peer
    if arena.is_router:
        stream_id, result = arena.lure()
        peer.send(WindowUpdateFrame(stream_id, window_increment=MAX_WINDOW))
    else:
        stream_id = arena.stream_for_headers()
        peer.send(peer.headers(stream_id, REQUEST), WindowUpdateFrame(stream_id, window_increment=MAX_WINDOW))
    reset = peer.read_until(lambda f: isinstance(f, RstStreamFrame), PROMPT)
    assert (reset.stream_id, reset.error_code) == (stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
    if arena.is_router:
        wait_until(lambda: result, PROMPT, what="the lured request to fail")
        assert result["response"][0] == 502
    arena.exchange()
    assert not peer.eof
    arena.assert_others_serve()
    arena.finish()


# -- floods ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["SETTINGS", "PING"])
def test_a_control_frame_flood_is_cut_off(arena, kind):
    before = rss()
    if kind == "SETTINGS":
        frames = [SettingsFrame(0, settings={SettingCodes.HEADER_TABLE_SIZE: 4096 - i % 2}) for i in range(10_000)]
    else:
        frames = [PingFrame(0, i.to_bytes(8, "big")) for i in range(10_000)]
    arena.peer.try_send(b"".join(frame.serialize() for frame in frames))
    arena.assert_dropped(
        "peer sent over 500 PING/SETTINGS frames in a second", goaway=ErrorCodes.ENHANCE_YOUR_CALM, flood=True
    )
    arena.assert_others_serve()
    arena.finish()
    assert_rss_bounded(before)


def _rapid_resets(peer: H2Peer, count: int, first: int = 1, path: str = "/foo") -> bytes:
    request = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "test")]
    frames: List[Frame] = []
    for stream_id in range(first, first + 2 * count, 2):
        frames.append(peer.headers(stream_id, request, flags=["END_HEADERS", "END_STREAM"]))
        frames.append(RstStreamFrame(stream_id, ErrorCodes.CANCEL))
    return b"".join(frame.serialize() for frame in frames)


def test_rapid_reset_is_cut_off(router, caplog):
    """CVE-2023-44487 against the backend (the HTTP/2 server): HEADERS then RST_STREAM at once, 5,000 times."""
    caplog.set_level(logging.INFO, logger="ptth_sync")
    arena = Arena("backend", router, caplog)
    try:
        arena.handshake()
        before = rss()
        arena.peer.try_send(_rapid_resets(arena.peer, 5000))
        arena.assert_dropped(
            "peer reset over 2000 streams in a second", goaway=ErrorCodes.ENHANCE_YOUR_CALM, flood=True
        )
        arena.assert_others_serve()
        arena.finish()
        assert_rss_bounded(before)
    finally:
        arena.close()


def test_a_request_reset_in_the_same_batch_past_the_abandoned_limit_is_refused_quietly():
    """Past as many abandoned streams as it allows, the server refuses new requests; one the peer
    resets itself in the same read (HEADERS then RST_STREAM in one segment) is already closed in h2:
    nothing to refuse, and the connection carries on (it died of an internal error before)."""
    ours, theirs = tcp_pair()
    reasons: List[str] = []
    connection = Connection(
        theirs,
        client_side=False,
        settings=ConnectionSettings(max_concurrent_streams=4),
        on_request=lambda stream: None,  # no thread ever deals with them: each reset one stays abandoned
        on_close=lambda conn, reason: reasons.append(reason),
        name="under test",
    )
    connection.start()
    peer = H2Peer(ours)
    try:
        peer.client_handshake(timeout=2)
        assert connection.wait_ready(2)
        peer.try_send(_rapid_resets(peer, 4))  # four abandoned streams: the limit
        peer.try_send(_rapid_resets(peer, 1, first=9) + PingFrame(0, b"probe!!!").serialize())
        peer.read_until(lambda f: isinstance(f, PingFrame) and f.opaque_data == b"probe!!!" and "ACK" in f.flags, 2)
        assert connection.alive, reasons
    finally:
        peer.close()
        connection.close()
        assert connection.wait_closed(2)


@pytest.mark.parametrize("how", ["rst-stream", "made-you-reset"])
def test_cancelled_requests_below_the_reset_limit_do_not_starve_other_tunnels(router, caplog, how):
    """400 requests opened and cancelled at once, well under the 2000/s limit, to a backend with 4 threads.

    ``rst-stream``: the router resets each stream itself. ``made-you-reset`` (the
    2025 variant): it sends DATA after END_STREAM, so the backend resets them.
    The app takes 0.1 s; the router next door must still be served at once.
    """
    caplog.set_level(logging.INFO, logger="ptth_sync")
    gate = threading.Event()
    slow_calls: List[int] = []

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            slow_calls.append(1)
            gate.wait(0.1)
        return apps.hello(environ, start_response)

    baseline = threading.active_count()
    listener = listen()
    backend = Backend([listener.getsockname(), router.tunnel_address], app, threads=4).start()
    peer = H2Peer(accept(listener))
    result: Dict[str, Any] = {}

    def good_request() -> None:
        try:
            result["response"] = fetch(router)
        except Exception as exc:
            result["error"] = exc

    good = threading.Thread(target=good_request, daemon=True)
    try:
        peer.client_handshake()
        wait_until(lambda: len(router.pool) == 1, PROMPT, what="the good tunnel")
        request = [(":method", "GET"), (":path", "/slow"), (":scheme", "http"), (":authority", "test")]
        frames: List[Frame] = []
        for stream_id in range(1, 801, 2):
            frames.append(peer.headers(stream_id, request, flags=["END_HEADERS", "END_STREAM"]))
            if how == "rst-stream":
                frames.append(RstStreamFrame(stream_id, ErrorCodes.CANCEL))
            else:
                frames.append(DataFrame(stream_id, b"x"))
        peer.send_raw(b"".join(frame.serialize() for frame in frames))
        good.start()
        good.join(PROMPT)
        waited = f"the good router waited behind {len(slow_calls)} cancelled requests"
        assert result.get("response") == (200, b"bar"), waited
        assert len(slow_calls) <= 4  # at most the streams admitted at once reached the app
        assert not peer.eof
    finally:
        gate.set()
        if good.is_alive():
            good.join(15)
        backend.close()
        peer.close()
        listener.close()
    wait_threads(baseline)


# -- the fuzz ---------------------------------------------------------------------------------------------


STREAM_IDS = st.sampled_from([1, 1, 1, 3, 2, 5, 2**31 - 1])
ERROR_CODES = st.integers(0, 0xF) | st.integers(0, 2**32 - 1)
SMALL = st.binary(max_size=48)


def _flags(*names: str):
    return st.sets(st.sampled_from(names)) if names else st.just(set())


def _headers_frame(stream_id: int, block: bytes, flags) -> HeadersFrame:
    return HeadersFrame(stream_id, data=block, flags=flags)


def _settings_frame(values: Dict[int, int], ack: bool) -> SettingsFrame:
    return SettingsFrame(0, flags=["ACK"]) if ack else SettingsFrame(0, settings=values)


_hpack_blocks = st.sampled_from(
    [
        bytes.fromhex("828684418aa0e41d139d09b8f01e07"),  # a request: GET / http www.example.com
        bytes.fromhex("8840"),  # :status 200, then a truncated literal
        bytes([0x88]),  # :status 200
        bytes([0x80 | 70]),  # index out of range
        bytes([0x3F, 0xE1, 0xFF, 0x03]),  # a table size update over the limit
        b"",
    ]
) | SMALL

FRAMES = st.one_of(
    st.builds(lambda s, d, f: DataFrame(s, d, flags=f), STREAM_IDS, SMALL, _flags("END_STREAM")),
    st.builds(_headers_frame, STREAM_IDS, _hpack_blocks, _flags("END_STREAM", "END_HEADERS", "PRIORITY")),
    st.builds(
        lambda s, d, w, e: PriorityFrame(s, depends_on=d, stream_weight=w, exclusive=e),
        STREAM_IDS, STREAM_IDS | st.just(0), st.integers(0, 255), st.booleans(),
    ),
    st.builds(RstStreamFrame, STREAM_IDS, ERROR_CODES),
    st.builds(
        _settings_frame,
        st.dictionaries(st.integers(1, 8), st.integers(0, 2**32 - 1), max_size=3),
        st.booleans(),
    ),
    st.builds(
        lambda s, p, d, f: PushPromiseFrame(s, promised_stream_id=p, data=d, flags=f),
        STREAM_IDS, STREAM_IDS, _hpack_blocks, _flags("END_HEADERS"),
    ),
    st.builds(lambda d, f: PingFrame(0, d, flags=f), st.binary(min_size=8, max_size=8), _flags("ACK")),
    st.builds(
        lambda last, code, data: GoAwayFrame(0, last_stream_id=last, error_code=code, additional_data=data),
        STREAM_IDS | st.just(0), ERROR_CODES, SMALL,
    ),
    st.builds(
        lambda s, i: WindowUpdateFrame(s, window_increment=i), STREAM_IDS | st.just(0), st.integers(1, MAX_WINDOW)
    ),
    st.builds(lambda s, d, f: ContinuationFrame(s, data=d, flags=f), STREAM_IDS, _hpack_blocks, _flags("END_HEADERS")),
    # Frames assembled by hand, of any type (extensions too), flags and stream id: wrong payload sizes,
    # stream 0, padding longer than the payload, the reserved bit set... (hyperframe's ExtensionFrame
    # announces no length for its body: it cannot be used here.)
    st.builds(
        raw_frame, st.integers(0, 0x0A) | st.integers(0, 255), st.integers(0, 255),
        STREAM_IDS | st.integers(0, 2**32 - 1), SMALL,
    ),
)


def _serialize(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else frame.serialize()


class _LoopReader:
    """A loop that reads and writes one connection from its selector, as a router worker's front loop
    does with its tunnels (no reader or writer thread)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        connection.start(read_in_thread=False, on_unsent=lambda: None)  # (the loop looks at every turn)
        self.thread = threading.Thread(target=self._run, name="ptth-loop under test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        connection = self.connection
        with selectors.DefaultSelector() as selector:
            selector.register(connection.sock, selectors.EVENT_READ)
            reason = connection.read_available()
            while reason is None:
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.unsent else 0)
                selector.modify(connection.sock, want)
                due = connection.next_timer()
                timeout = 0.05 if due is None else min(0.05, max(0.0, due - time.monotonic()))
                for _, events in selector.select(timeout):
                    if events & selectors.EVENT_WRITE:
                        connection.send_queued()
                    if events & selectors.EVENT_READ:
                        reason = connection.read_available()
                if reason is None:
                    reason = connection.run_timers()
            selector.unregister(connection.sock)
        connection.end_reading(reason)


def _fuzz_one(role: str, frames: List[Any]) -> str:
    """Feed ``frames`` to a fresh connection in ``role``; it must survive (and answer a PING) or close with a reason.

    Role ``router-loop``: the router's connection read and written from a loop's selector (no threads).
    """
    ours, theirs = tcp_pair()
    reasons: List[str] = []
    connection = Connection(
        theirs,
        client_side=role.startswith("router"),
        on_request=lambda stream: None,
        on_close=lambda conn, reason: reasons.append(reason),
        name="under test",
    )
    if role == "router-loop":
        _LoopReader(connection)
    else:
        connection.start()
    peer = H2Peer(ours)
    try:
        if role.startswith("router"):
            peer.server_handshake(timeout=2)
            assert connection.wait_ready(2)
            connection.open_stream([(k.encode(), v.encode()) for k, v in REQUEST], end_stream=False, timeout=2)
            peer.read_until(lambda f: isinstance(f, HeadersFrame), 2)
        else:
            peer.client_handshake(timeout=2)
            assert connection.wait_ready(2)
        peer.try_send(b"".join(_serialize(frame) for frame in frames) + PingFrame(0, b"probe!!!").serialize(), 2)
        try:
            peer.read_until(lambda f: isinstance(f, PingFrame) and f.opaque_data == b"probe!!!" and "ACK" in f.flags, 2)
        except PeerClosed:
            pass
        if peer.eof:
            assert connection.wait_closed(2), "the socket closed but the connection did not finish"
            assert reasons, "closed without a reason"
            assert reasons[0], "closed with an empty reason"
            assert not reasons[0].startswith("internal error"), reasons[0]
            return reasons[0]
        assert connection.alive, "the connection answered a PING after it died"
        return "survived"
    finally:
        peer.close()
        connection.close()
        assert connection.wait_closed(2), "the connection did not close"


@pytest.mark.parametrize("role", [*ROLES, "router-loop"])
def test_fuzzed_frame_sequences_never_hang_or_crash_the_connection(role):
    baseline = threading.active_count()
    outcomes: List[str] = []

    @settings(
        max_examples=80,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frames=st.lists(FRAMES, min_size=1, max_size=10))
    def check(frames):
        outcomes.append(_fuzz_one(role, frames))

    check()
    assert outcomes
    wait_threads(baseline)


# -- a router that asks for new tunnels again and again ---------------------------------------------------


def test_a_router_that_asks_for_a_new_tunnel_again_and_again_gets_them_with_backoff(caplog):
    """GOAWAY(NO_ERROR) from the router asks the backend for a new tunnel (the router's worker stops). A
    router that asks on every tunnel at once does not make the backend dial in a loop: a request that comes
    within a second of the dial is followed with backoff, and every thread ends."""
    caplog.set_level(logging.INFO, logger="ptth_sync")
    baseline = threading.active_count()
    listener = listen()
    backend = Backend([listener.getsockname()], apps.hello).start()
    peers: List[H2Peer] = []
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and len(peers) < 500:
            try:
                sock = accept(listener, max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                break
            peer = H2Peer(sock)
            peers.append(peer)
            peer.client_handshake()
            goaway = GoAwayFrame(0)
            goaway.error_code = ErrorCodes.NO_ERROR
            goaway.additional_data = b"router worker stopping: connect again"
            peer.send(goaway)
        # Without backoff: hundreds of tunnels in 3 s; with it (0.1 s doubling, jittered): a handful.
        assert 3 <= len(peers) <= 15, len(peers)
        assert any("asked for a new tunnel" in record.getMessage() and "connecting again in" in record.getMessage()
                   for record in caplog.records)
    finally:
        backend.close()
        for peer in peers:
            peer.close()
        listener.close()
    wait_threads(baseline)
