"""The PTTH upgrade (draft-kazuho-ptth-ptth-01) that opens a tunnel with a token, both sides.

The backend, once connected, sends::

    GET /.well-known/ptth/{origin}/ HTTP/1.1
    Host: ROUTER_HOST:PORT
    Connection: upgrade
    Upgrade: ptth
    ALPN: h2
    Authorization: Bearer TOKEN

and the router answers ``101 Switching Protocols`` (``Connection: upgrade``,
``Upgrade: ptth``, ``ALPN: h2``) and then sends the HTTP/2 client preface; or
``401`` (bad or missing token) / ``403`` (origin not allowed) / ``400`` and
closes. Without a token the tunnel may also start with no handshake at all
(the plain wire): the router's first bytes are then the HTTP/2 preface. The
router tells the two apart by the first bytes the backend sends: ``GET``
opens an upgrade; anything else (the backend's SETTINGS) or a moment of
silence is the plain wire.

The request is parsed with gunicorn's HTTP/1.1 parser; the response's
headers with the standard library's.
"""

from __future__ import annotations

import http.client
import io
import socket
import time
from typing import Optional, Tuple
from urllib.parse import quote, unquote

from .access import TunnelAccess
from .errors import PTTHError
from .origins import ANY, normalize_origin

__all__ = [
    "PTTH_PREFIX",
    "HandshakeFailed",
    "HandshakeRefused",
    "accept_upgrade",
    "dial_upgrade",
    "encode_origin",
    "upgrade_request",
]

PTTH_PREFIX = "/.well-known/ptth/"
#: The largest response head the backend reads before giving up.
MAX_HEAD = 16 * 1024


class HandshakeFailed(PTTHError, ConnectionError):
    """The upgrade did not complete (timeout, garbage, an unexpected answer): worth retrying."""


class HandshakeRefused(PTTHError):
    """The router refused the tunnel (401: token, 403: origin): retrying will not help."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"router refused the tunnel: {status} {reason}")
        self.status = status
        self.reason = reason


def encode_origin(origin: str) -> str:
    """``https://api.example.com`` → ``https%3A%2F%2Fapi.example.com``; ``*`` stays ``*``."""
    return "*" if origin == "*" else quote(origin, safe="")


def upgrade_request(authority: str, token: Optional[str], origin: str = "*") -> bytes:
    """The backend's upgrade request."""
    lines = [
        f"GET {PTTH_PREFIX}{encode_origin(origin)}/ HTTP/1.1",
        f"Host: {authority}",
        "Connection: upgrade",
        "Upgrade: ptth",
        "ALPN: h2",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def dial_upgrade(sock: socket.socket, authority: str, token: Optional[str], origin: str = "*",
                 timeout: float = 10.0) -> bytes:
    """Backend side: upgrade a connected socket; returns bytes that already belong to HTTP/2.

    Raises :class:`HandshakeRefused` on 401/403, :class:`HandshakeFailed` otherwise.
    """
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.sendall(upgrade_request(authority, token, origin))
        received = b""
        while b"\r\n\r\n" not in received:
            if len(received) > MAX_HEAD:
                msg = "router's answer to the upgrade is too long"
                raise HandshakeFailed(msg)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(4096)
            if not chunk:
                msg = "router closed the connection during the upgrade"
                raise HandshakeFailed(msg)
            received += chunk
    except TimeoutError:
        msg = f"no answer to the upgrade within {timeout:g}s"
        raise HandshakeFailed(msg) from None
    finally:
        sock.settimeout(None)
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        msg = f"router did not answer in HTTP/1.1: {status_line[:80]!r}"
        raise HandshakeFailed(msg)
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
    headers = http.client.parse_headers(io.BytesIO(header_block + b"\r\n\r\n"))
    if status in (401, 403):
        raise HandshakeRefused(status, reason)
    if status != 101 or (headers.get("Upgrade") or "").strip().lower() != "ptth":
        msg = f"router answered the upgrade with {status} {reason}"
        raise HandshakeFailed(msg)
    return rest


# -- the router's side ---------------------------------------------------------


def accept_upgrade(sock: socket.socket, access: Optional[TunnelAccess] = None, timeout: float = 10.0,
                   first_bytes_wait: float = 1.0, received: bytes = b"") -> Tuple[bytes, Optional[str]]:
    """Router side: read how a new tunnel opens; answer an upgrade.

    Returns ``(leftover, origin)``: bytes already read that belong to HTTP/2,
    and the origin asked for in its normal form (None on the plain wire,
    ``"*"`` for any). ``access`` decides who may open a tunnel and for which
    origin (None: anyone, for any). Raises :class:`HandshakeRefused` (after
    answering 401 or 403) or :class:`HandshakeFailed` (after answering
    400/404 where that makes sense); the caller closes the socket.

    A backend on the plain wire sends its SETTINGS at once or waits for our
    preface; one that upgrades sends ``GET `` at once. So the first four bytes,
    or ``first_bytes_wait`` seconds of silence, tell which. ``received``: bytes
    the caller already read from the socket (a whole upgrade request, say).
    """
    from gunicorn.config import Config
    from gunicorn.http.errors import ParseException
    from gunicorn.http.parser import RequestParser

    deadline = time.monotonic() + timeout
    try:
        first = received
        try:
            sock.settimeout(min(first_bytes_wait, timeout))
            while len(first) < 4 and b"GET "[: len(first)] == first:
                chunk = sock.recv(4 - len(first))
                if not chunk:
                    break
                first += chunk
        except TimeoutError:
            pass  # silent: a plain-wire backend waiting for our preface
        if first[:4] != b"GET ":
            if access is not None and access.required:
                msg = "plain-wire tunnel refused: this router requires the token handshake"
                raise HandshakeRefused(401, msg)
            return first, None
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        parser = RequestParser(_handshake_config(Config), sock, sock.getpeername())
        parser.unreader.unread(first)
        try:
            request = next(parser)
        except (ParseException, StopIteration) as exc:
            _answer(sock, 400, "Bad Request")
            msg = f"bad upgrade request: {exc}"
            raise HandshakeFailed(msg) from None
        headers = {name.lower(): value for name, value in request.headers}
        path = request.path or ""
        if request.method != "GET" or not path.startswith(PTTH_PREFIX) or not path.endswith("/"):
            _answer(sock, 404, "Not Found")
            msg = f"upgrade to an unknown path {path[:100]!r}"
            raise HandshakeFailed(msg)
        if headers.get("upgrade", "").strip().lower() != "ptth":
            _answer(sock, 400, "Bad Request")
            msg = "upgrade request without Upgrade: ptth"
            raise HandshakeFailed(msg)
        alpn = [p.strip() for p in headers.get("alpn", "h2").split(",")]
        if "h2" not in alpn:
            _answer(sock, 400, "Bad Request")
            msg = f"backend offers no h2 in ALPN: {alpn}"
            raise HandshakeFailed(msg)
        try:
            origin = normalize_origin(unquote(path[len(PTTH_PREFIX):-1]) or ANY)
        except ValueError as exc:
            _answer(sock, 400, "Bad Request")
            msg = f"bad origin in the upgrade: {exc}"
            raise HandshakeFailed(msg) from None
        refusal = access.check(headers.get("authorization", ""), origin) if access is not None else None
        if refusal is not None:
            status, why = refusal
            if status == 401:
                _answer(sock, 401, "Unauthorized", (("WWW-Authenticate", "Bearer"),))
            else:
                _answer(sock, status, "Forbidden")
            raise HandshakeRefused(status, why)
        _answer(sock, 101, "Switching Protocols",
                (("Connection", "upgrade"), ("Upgrade", "ptth"), ("ALPN", "h2")), close=False)
        return parser.unreader.take_buffered(), origin
    except TimeoutError:
        msg = f"no complete upgrade request within {timeout:g}s"
        raise HandshakeFailed(msg) from None
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


def _answer(sock: socket.socket, status: int, reason: str, headers: Tuple = (), close: bool = True) -> None:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{name}: {value}" for name, value in headers]
    if close:
        lines += ["Connection: close", "Content-Length: 0"]
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    except OSError:
        pass


_CONFIG = None


def _handshake_config(config_class: type) -> object:
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = config_class()
    return _CONFIG
