"""A scripted HTTP/2 peer for hostile tests: raw frames over a loopback socket, built with hyperframe and hpack.

It plays either role of a tunnel: a fake *backend* (the HTTP/2 server) that
dials a real router, or a fake *router* (the HTTP/2 client) that a real
backend dials. It validates nothing it sends, so it can send anything; every
read and write has a deadline.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import hpack
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(":method", "GET"), (":path", "/foo"), (":scheme", "http"), (":authority", "test")]
RESPONSE = [(":status", "200"), ("content-length", "2")]

Headers = Sequence[Tuple[str, str]]


class PeerClosed(Exception):
    """The other side closed the connection."""


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes, length: Optional[int] = None) -> bytes:
    """A frame assembled by hand: the header may announce any ``length``, whatever the payload."""
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes([frame_type, flags]) + stream_id.to_bytes(4, "big") + payload


class H2Peer:
    """One end of an HTTP/2 connection, driven frame by frame."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        """``initial``: bytes of the other side read already (after an upgrade, say)."""
        self.sock = sock
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        #: Every frame read so far, in order.
        self.received: List[Frame] = []
        #: The decoded header blocks of the HEADERS frames read, by stream.
        self.header_blocks: Dict[int, List[List[Tuple[bytes, bytes]]]] = {}
        self.goaway: Optional[GoAwayFrame] = None
        self.eof = False
        self._buffer = bytearray(initial)

    # -- set-up ----------------------------------------------------------------

    @classmethod
    def connect(cls, address: Tuple[str, int], timeout: float = 5.0) -> H2Peer:
        return cls(socket.create_connection(address, timeout=timeout))

    @property
    def local_name(self) -> str:
        """``host:port`` of our end: the name the other side gives this connection."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def server_handshake(self, settings: Optional[Dict[int, int]] = None, timeout: float = 5.0) -> SettingsFrame:
        """As a fake backend on the plain wire: send our SETTINGS at once, read the client preface and
        SETTINGS, acknowledge them.

        Speaking first tells the router at once that this is not a PTTH upgrade
        (a silent backend costs it a second of waiting). Returns once the other
        side acknowledged our SETTINGS: it counts us as ready from then on.
        """
        self.send(SettingsFrame(0, settings=settings or {}))
        self.read_exactly(len(PREFACE), timeout, expect=PREFACE)
        theirs = self.read_until(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags, timeout)
        self.send(SettingsFrame(0, flags=["ACK"]))
        self._wait_ack(timeout)
        return theirs  # type: ignore[return-value]

    def client_handshake(self, settings: Optional[Dict[int, int]] = None, timeout: float = 5.0) -> SettingsFrame:
        """As a fake router: send the preface and SETTINGS, read theirs and acknowledge it, wait for our ACK."""
        self.send_raw(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())
        theirs = self.read_until(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags, timeout)
        self.send(SettingsFrame(0, flags=["ACK"]))
        self._wait_ack(timeout)
        return theirs  # type: ignore[return-value]

    def _wait_ack(self, timeout: float) -> None:
        if not any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in self.received):
            self.read_until(lambda f: isinstance(f, SettingsFrame) and "ACK" in f.flags, timeout)

    # -- sending ---------------------------------------------------------------

    def send(self, *frames: Frame) -> None:
        self.send_raw(b"".join(frame.serialize() for frame in frames))

    def send_raw(self, data: bytes, timeout: float = 5.0) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)

    def try_send(self, data: bytes, timeout: float = 5.0) -> bool:
        """Send ``data``; False when the other side closed the connection (or stopped reading for ``timeout``)."""
        try:
            self.send_raw(data, timeout)
        except OSError:
            return False
        return True

    def header_block(self, headers: Headers) -> bytes:
        return self.encoder.encode(headers, huffman=False)

    def headers(self, stream_id: int, headers: Headers, flags: Iterable[str] = ("END_HEADERS",)) -> HeadersFrame:
        return HeadersFrame(stream_id, data=self.header_block(headers), flags=flags)

    # -- receiving -------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False on timeout. Raises PeerClosed at EOF."""
        if self.eof:
            raise PeerClosed("connection closed")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(256 * 1024)
        except TimeoutError:
            return False
        except OSError:  # reset: the other side closed with our bytes unread
            data = b""
        if not data:
            self.eof = True
            raise PeerClosed("connection closed")
        self._buffer += data
        return True

    def read_exactly(self, size: int, timeout: float, expect: Optional[bytes] = None) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self._buffer) < size:
            if not self._fill(deadline):
                raise TimeoutError(f"no {size} bytes within {timeout}s")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        if expect is not None and data != expect:
            raise AssertionError(f"expected {expect!r}, got {data!r}")
        return data

    def _parse_one(self) -> Optional[Frame]:
        if len(self._buffer) < 9:
            return None
        frame, length = Frame.parse_frame_header(memoryview(bytes(self._buffer[:9])))
        if len(self._buffer) < 9 + length:
            return None
        frame.parse_body(memoryview(bytes(self._buffer[9 : 9 + length])))
        del self._buffer[: 9 + length]
        self.received.append(frame)
        if isinstance(frame, GoAwayFrame):
            self.goaway = frame
        elif isinstance(frame, HeadersFrame) and "END_HEADERS" in frame.flags:
            # Every block must go through the decoder, in order, to keep its table in step.
            self.header_blocks.setdefault(frame.stream_id, []).append(self.decoder.decode(frame.data, raw=True))
        return frame

    def read_frame(self, timeout: float) -> Optional[Frame]:
        """The next frame, or None when none arrived within ``timeout``. Raises PeerClosed at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse_one()
            if frame is not None:
                return frame
            if not self._fill(deadline):
                return None

    def read_until(self, predicate: Callable[[Frame], bool], timeout: float) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            frame = self.read_frame(max(deadline - time.monotonic(), 0.0))
            if frame is None:
                raise TimeoutError(f"no matching frame within {timeout}s; last frames: {self.received[-5:]}")
            if predicate(frame):
                return frame

    def wait_closed(self, timeout: float) -> bool:
        """Read (and keep) frames until the other side closes; False if it is still open after ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                frame = self.read_frame(max(deadline - time.monotonic(), 0.0))
                if frame is None and time.monotonic() >= deadline:
                    return False
        except PeerClosed:
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
