"""Exceptions raised by ptth_sync.

One root, :class:`PTTHError`, with families that also subclass the built-in
exception a caller would naturally catch.
"""

from __future__ import annotations

__all__ = [
    "ConnectionClosed",
    "PTTHError",
    "StreamReset",
    "StreamTimeout",
]


class PTTHError(Exception):
    """Base class of every ptth_sync error."""


class ConnectionClosed(PTTHError, ConnectionError):
    """The tunnel's connection is gone.

    ``request_sent`` tells whether any byte of the stream that observed the
    failure may have reached the peer; when it is false the request provably
    never reached an application and may be retried elsewhere.
    """

    def __init__(self, reason: str, *, request_sent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_sent = request_sent


class StreamReset(PTTHError):
    """The peer (or this side) reset one stream; the connection lives on."""

    def __init__(self, stream_id: int, error_code: int, *, remote: bool = True) -> None:
        who = "peer" if remote else "local side"
        super().__init__(f"stream {stream_id} reset by {who} (error code {error_code})")
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


class StreamTimeout(PTTHError, TimeoutError):
    """Waiting on a stream (for headers, data or window) took too long."""
