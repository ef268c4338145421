"""What both tunnel roles need to know about WebSockets (RFC 6455, carried as RFC 8441 describes).

The router and the backend relay a WebSocket's bytes without interpreting
them, with two exceptions kept here: the opening handshake's key check and
accept value, and the frame boundaries of the server's side of the
conversation, so that either end can add a Close frame of its own (``1001
Going Away``) when it must end a WebSocket that is still open: at the end of
a drain, or after the idle timeout.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .stream import Stream

__all__ = [
    "CREDIT_BATCH",
    "GOING_AWAY",
    "FrameTracker",
    "accept_value",
    "close_frame",
    "credit_batch",
    "going_away_delay",
    "valid_key",
]

#: The close code of a WebSocket that an endpoint ends because it stops or gives up (RFC 6455 §7.4.1).
GOING_AWAY = 1001

#: Flow-control credit for a WebSocket's bytes goes back in batches of up to this many bytes:
#: small messages would otherwise cost a call each (see :func:`credit_batch`).
CREDIT_BATCH = 16 * 1024

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OPCODE_CLOSE = 0x8
#: Before the end of a drain, the time left to close WebSockets with a Close frame and
#: to let it reach the clients (gunicorn's arbiter stops a worker at the graceful timeout).
_CLOSE_MARGIN = 1.0


def valid_key(key: str) -> bool:
    """True for a ``Sec-WebSocket-Key``: 16 bytes, base64-encoded (RFC 6455 §4.1)."""
    try:
        return len(base64.b64decode(key.strip().encode("ascii"), validate=True)) == 16
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return False


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answering ``key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(key.strip().encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def close_frame(code: int = GOING_AWAY, reason: str = "") -> bytes:
    """An unmasked Close frame, as a server sends it."""
    payload = struct.pack(">H", code) + reason.encode("utf-8")[:123]
    return bytes([0x80 | _OPCODE_CLOSE, len(payload)]) + payload


def credit_batch(stream: Stream) -> int:
    """How much credit of ``stream`` may wait to be returned: :data:`CREDIT_BATCH`, or a quarter of its window.

    h2 announces returned credit once half the window is used; holding back
    at most a quarter more leaves the sender a quarter of it at the least.
    """
    return max(min(CREDIT_BATCH, stream.connection.settings.stream_window // 4), 1)


def going_away_delay(graceful_timeout: float) -> float:
    """After how many seconds of a drain the WebSockets still open are closed (``1001 Going Away``).

    A second before the graceful timeout (half of it, when shorter), so that
    the Close frames reach the clients before the process stops.
    """
    return max(graceful_timeout - _CLOSE_MARGIN, graceful_timeout / 2, 0.0)


class FrameTracker:
    """Follows the frames of one direction of a WebSocket byte stream, without keeping them.

    :meth:`feed` takes the bytes in order, in pieces of any size; then
    :attr:`at_boundary` tells whether a frame of our own may go next, and
    :attr:`close_sent` whether a Close frame went already (nothing may follow
    it). Large payloads are skipped over, not looked at.
    """

    __slots__ = ("_head", "_skip", "close_sent")

    def __init__(self) -> None:
        self._head = bytearray()  # the frame header read so far
        self._skip = 0  # payload bytes of the current frame still to come
        self.close_sent = False

    @property
    def at_boundary(self) -> bool:
        """True between two frames."""
        return not self._skip and not self._head

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> None:
        size = len(data)
        pos = 0
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                continue
            head = self._head
            head.append(data[pos])
            pos += 1
            need = _header_length(head)
            if len(head) < need:
                continue
            length = head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(head[2:4], "big")
            elif length == 127:
                length = int.from_bytes(head[2:10], "big")
            if head[0] & 0x0F == _OPCODE_CLOSE:
                self.close_sent = True
            self._skip = length
            self._head = bytearray()


def _header_length(head: bytearray) -> int:
    """How long the frame header beginning with ``head`` is (2 until its length byte is in)."""
    if len(head) < 2:
        return 2
    length = head[1] & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + (4 if head[1] & 0x80 else 0)
