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
import re
import socket
import time
from email.message import Message
from typing import Optional, Tuple
from urllib.parse import quote, unquote

import h2.config
import h2.connection
from h2.errors import ErrorCodes

from .access import TunnelAccess
from .errors import PTTHError
from .origins import ANY, normalize_origin
from .sockets import linger_close

__all__ = [
    "PLAIN_WIRE_REFUSED",
    "PTTH_PREFIX",
    "TLS_REQUIRED",
    "TOKEN_REQUIRED",
    "HandshakeFailed",
    "HandshakeRefused",
    "accept_upgrade",
    "dial_upgrade",
    "encode_origin",
    "goaway_refusal",
    "looks_like_tls",
    "plaintext_answer",
    "refusal_preface",
    "upgrade_request",
    "wrong_answer_refusal",
]

PTTH_PREFIX = "/.well-known/ptth/"
#: The largest response head the backend reads before giving up.
MAX_HEAD = 16 * 1024

#: The GOAWAY error code of a plain-wire tunnel refused for want of a token or of TLS (RFC 9113 §7:
#: the peer does not meet the security this endpoint requires). A backend does not redial it.
REFUSAL_CODE = ErrorCodes.INADEQUATE_SECURITY
#: What a router tells a plain-wire backend it refuses, in that GOAWAY's debug data.
TOKEN_REQUIRED = ("this router requires a token: give the backend --token or --token-file "
                  "(PTTH_TOKEN under gunicorn)")
#: Why a router that requires the token handshake refuses a plain-wire peer (logged).
PLAIN_WIRE_REFUSED = "plain-wire tunnel refused: this router requires the token handshake (the backend has no --token)"
TLS_REQUIRED = "this router's tunnel listener requires TLS: start the backend with --tls (PTTH_TLS=1 under gunicorn)"
#: The fix for a backend that reached an HTTP server instead of a tunnel listener.
WRONG_PORT = ("an HTTP server answered, not a tunnel listener: if this is the router's HTTP port (--http), "
              "dial its --tunnels port instead")
#: Answers to the upgrade that a router (or a proxy in front of it) may give while starting, draining or
#: overloaded: the backend retries these. Every other answer but 101 means retrying cannot help.
RETRYABLE_STATUSES = frozenset({408, 425, 429})


class HandshakeFailed(PTTHError, ConnectionError):
    """The upgrade did not complete (timeout, garbage, an unexpected answer): worth retrying."""


class HandshakeRefused(PTTHError):
    """The tunnel cannot open as configured, so dialling again will not help: the backend stops.

    The router refused it (``status`` 401: token, 403: origin, 426: TLS
    required; None when it said so otherwise: a GOAWAY, a TLS alert), or the
    peer is no tunnel listener, or only one side speaks TLS. ``reason`` says
    what happened, ``fix`` (when known) what to change; :attr:`router` is set
    by the backend to the router's name.
    """

    def __init__(self, status: Optional[int], reason: str, fix: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.fix = fix
        self.router: Optional[str] = None

    @property
    def detail(self) -> str:
        """The status, the reason and the fix, on one line."""
        text = f"{self.status} {self.reason}" if self.status is not None else self.reason
        return f"{text}; {self.fix}" if self.fix else text

    def __str__(self) -> str:
        who = f"Router at {self.router}" if self.router else "router"
        return f"{who} refused the tunnel: {self.detail}"


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

    Raises :class:`HandshakeRefused` when dialling again cannot help (401,
    403, TLS required, an answer that no tunnel listener gives), and
    :class:`HandshakeFailed` otherwise (no answer in time, a 5xx).
    """
    deadline = time.monotonic() + timeout
    received = b""
    try:
        sock.settimeout(timeout)
        sock.sendall(upgrade_request(authority, token, origin))
        while b"\r\n\r\n" not in received:
            if len(received) > MAX_HEAD:
                msg = "router's answer to the upgrade is too long"
                raise HandshakeFailed(msg)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(4096)
            received += chunk
            if looks_like_tls(received):
                raise HandshakeRefused(None, "it answered in TLS", _TLS_FIX)
            if not chunk:
                msg = "router closed the connection during the upgrade"
                raise HandshakeFailed(msg)
    except TimeoutError:
        msg = f"no answer to the upgrade within {timeout:g}s"
        raise HandshakeFailed(msg) from None
    finally:
        sock.settimeout(None)
    end = received.index(b"\r\n\r\n") + 4
    head, rest = received[:end], received[end:]
    parsed = _response_head(head)
    if parsed is None:
        status_line = head.partition(b"\r\n")[0]
        msg = f"router did not answer in HTTP/1.1: {status_line[:80]!r}"
        raise HandshakeFailed(msg)
    status, reason, headers = parsed
    if status == 101 and (headers.get("Upgrade") or "").strip().lower() == "ptth":
        return rest
    raise _upgrade_refusal(status, reason, headers, origin)


def _upgrade_refusal(status: int, reason: str, headers: Message, origin: str) -> Exception:
    """What an answer other than ``101 Switching Protocols`` to the upgrade means for the backend."""
    if status == 401:
        return HandshakeRefused(401, reason, "the token is wrong or missing: give the backend the router's token "
                                             "(--token or --token-file; PTTH_TOKEN under gunicorn)")
    if status == 403:
        what = "join the default pool (a backend without --origin)" if origin == ANY else f"register {origin}"
        return HandshakeRefused(403, reason, f"this token may not {what}: see the router's --tokens-file")
    if status == 426 and "tls" in (headers.get("Upgrade") or "").lower():
        return HandshakeRefused(426, reason, TLS_REQUIRED)
    if status >= 500 or status in RETRYABLE_STATUSES:
        return HandshakeFailed(f"router answered the upgrade with {status} {reason} "
                               f"(if this is the router's HTTP port, dial its --tunnels port)")
    return HandshakeRefused(status, reason, WRONG_PORT)


#: The fix for a plain backend that reached a TLS listener.
_TLS_FIX = "start the backend with --tls (PTTH_TLS=1 under gunicorn)"


def looks_like_tls(data: bytes) -> bool:
    """Whether ``data`` begins with a TLS record (a handshake or an alert, TLS 1.0 to 1.3).

    Never the start of an HTTP/2 frame we accept: read as a frame header, those
    bytes announce a frame of over a megabyte.
    """
    return len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 0x03


def wrong_answer_refusal(first: bytes, tls: bool = False) -> Optional[HandshakeRefused]:
    """Why a plain-wire tunnel whose peer sent ``first`` cannot work, or None if nothing says so.

    An HTTP/1.1 answer (to the backend's SETTINGS and its probe PING) comes from
    an HTTP server, not a tunnel listener; a TLS record on a plain connection
    from a listener that requires TLS. A 5xx answer is retried, as from a proxy
    whose router is down.
    """
    if first.startswith(b"HTTP/"):
        parsed = _response_head(first)
        if parsed is None:
            return HandshakeRefused(None, "it answered in HTTP/1.1", WRONG_PORT)
        status, reason, _headers = parsed
        if status >= 500 or status in RETRYABLE_STATUSES:
            return None
        return HandshakeRefused(status, reason, WRONG_PORT)
    if not tls and looks_like_tls(first):
        return HandshakeRefused(None, "it answered in TLS", _TLS_FIX)
    return None


def goaway_refusal(error_code: int, debug_data: bytes) -> Optional[HandshakeRefused]:
    """The refusal a router's GOAWAY carries (``INADEQUATE_SECURITY``: a token or TLS required), or None."""
    if error_code != REFUSAL_CODE:
        return None
    text = "".join(c if c.isprintable() else "?" for c in debug_data[:300].decode("utf-8", "replace")).strip()
    return HandshakeRefused(None, text or "GOAWAY (INADEQUATE_SECURITY)")


def refusal_preface(reason: str, error_code: int = REFUSAL_CODE) -> bytes:
    """What a router sends a plain-wire peer it refuses: the HTTP/2 client preface, then a GOAWAY saying why."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    connection.close_connection(error_code=error_code, additional_data=reason.encode("utf-8"))
    return connection.data_to_send()


def plaintext_answer(first: bytes) -> Tuple[bytes, str]:
    """A TLS listener's answer to a peer whose first bytes are not TLS, and the reason to log.

    An HTTP/1.1 request (a backend's upgrade, or an HTTP client) gets ``426
    Upgrade Required`` with ``Upgrade: TLS/1.2`` (RFC 9110 §15.5.22); anything
    else (a plain-wire backend's SETTINGS) the HTTP/2 preface and a GOAWAY.
    """
    if re.match(rb"[A-Z]+ ", first):
        body = b"This port takes TLS tunnels: dial it with TLS (ptth_sync.backend --tls).\n"
        head = ("HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.2, HTTP/1.1\r\nConnection: Upgrade, close\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode("latin-1") + body, ("it sent a plain HTTP/1.1 request, and this listener requires TLS: "
                                               "start the backend with --tls")
    return refusal_preface(TLS_REQUIRED), ("it dialled without TLS, and this listener requires TLS: "
                                           "start the backend with --tls")


class _Received:
    """Bytes already read, offered to :class:`http.client.HTTPResponse` as the socket to parse."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, *_args: object, **_kwargs: object) -> io.BytesIO:
        return io.BytesIO(self._data)


def _response_head(data: bytes) -> Optional[Tuple[int, str, Message]]:
    """The status, reason and headers of the HTTP/1.x response head ``data`` begins with; None if it is none."""
    response = http.client.HTTPResponse(_Received(data))  # type: ignore[arg-type]
    try:
        response.begin()
    except (http.client.HTTPException, ValueError):
        return None
    return response.status, response.reason, response.headers


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
                _refuse_plain_wire(sock)
                raise HandshakeRefused(401, PLAIN_WIRE_REFUSED)
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
            if "upgrade" not in headers:  # a browser or curl on the wrong port, most likely
                _answer(sock, 404, "Not Found", body=_NOT_A_TUNNEL)
                msg = (f"an HTTP request for {path[:100]!r}, not a tunnel's upgrade: HTTP clients belong on the "
                       "router's HTTP port (--http)")
                raise HandshakeFailed(msg)
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


def _refuse_plain_wire(sock: socket.socket) -> None:
    """Tell a plain-wire backend why it is refused (a GOAWAY), then close once it has read it."""
    try:
        sock.sendall(refusal_preface(TOKEN_REQUIRED))
    except OSError:
        pass
    linger_close(sock)


#: What an HTTP client that reached the tunnel port reads.
_NOT_A_TUNNEL = ("404 Not Found: this is a ptth_sync router's tunnel port, where backends dial in; send HTTP "
                 "requests to the router's HTTP port (--http)\n")


def _answer(
    sock: socket.socket, status: int, reason: str, headers: Tuple[Tuple[str, str], ...] = (), close: bool = True,
    body: str = "",
) -> None:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append("Content-Type: text/plain; charset=utf-8")
    if close:
        lines += ["Connection: close", f"Content-Length: {len(body.encode())}"]
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n" + body).encode("latin-1"))
    except OSError:
        pass


_CONFIG = None


def _handshake_config(config_class: type) -> object:
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = config_class()
    return _CONFIG
