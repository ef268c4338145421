"""A connection's tunables (:class:`ConnectionSettings`) and the HTTP/2 constants the engine sets."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HTTP1_PROBE", "ConnectionSettings"]

_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65535
#: The payload of ConnectionSettings.http1_probe's PING.
HTTP1_PROBE = b"\r\n\r\nptth"


@dataclass(frozen=True)
class ConnectionSettings:
    """Tunables of one connection; the defaults suit a tunnel on a LAN."""

    #: Per-stream receive window: how much one stream may buffer unread.
    stream_window: int = 1024 * 1024
    #: Largest DATA frame we accept (and the peer may send).
    max_frame_size: int = 1024 * 1024
    #: Streams the peer may open at once (meaningful for the server role).
    max_concurrent_streams: int = 100
    #: Largest decoded header block we accept (advertised); a larger one resets its stream.
    max_header_list_size: int = 64 * 1024
    #: Bytes asked of one ``recv`` call.
    recv_size: int = 256 * 1024
    #: Seconds the peer has to send its SETTINGS before we give up on it (0: no limit).
    settings_timeout: float = 10.0
    #: After this many seconds without a byte from the peer, send a PING (0: never).
    ping_interval: float = 15.0
    #: Seconds a PING may go unanswered before the connection counts as dead.
    ping_timeout: float = 10.0
    #: PING and SETTINGS frames the peer may send per second; beyond that it is
    #: flooding us and the connection is closed with GOAWAY(ENHANCE_YOUR_CALM).
    max_control_frames_per_second: int = 500
    #: RST_STREAM frames the peer may send per second (the "rapid reset" attack
    #: opens and cancels streams as fast as it can); beyond that, the same.
    max_resets_per_second: int = 2000
    #: Bytes of a header block (HEADERS + CONTINUATION) buffered before END_HEADERS, and the most it
    #: may decode to: past either, the peer is flooding us and the connection fails.
    max_header_block: int = 256 * 1024
    #: Bytes we may have queued for a peer that does not read them (PING and
    #: SETTINGS acknowledgements, window updates) before giving up on it.
    max_unsent_bytes: int = 64 * 1024 * 1024
    #: Server role: follow our SETTINGS with a PING whose payload ends an HTTP/1.1
    #: request head, so that an HTTP/1.1 server dialled by mistake answers at once
    #: (as the client preface makes it do) instead of waiting for a request.
    http1_probe: bool = False
    #: Server role: announce SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441): the peer may open
    #: WebSockets as extended CONNECT streams.
    enable_connect_protocol: bool = False
