"""gunicorn's HTTP/1.1 request and response objects for the router, with what every request repeats done once.

The router parses each client request with gunicorn's parser and writes each
response with gunicorn's response writer. Two things they redo for every
request cost as much as the rest of a small request's head: whether the peer
may set forwarding headers (``forwarded_allow_ips``: an address parse and a
network match) and the Date header (a date formatted from the clock). Here
the first is remembered per peer address and the second per second of the
clock; what goes on the wire is the same.
"""

from __future__ import annotations

import functools
import time
from email.utils import formatdate
from typing import Any, Dict, List, Optional, Tuple

from gunicorn.config import Config
from gunicorn.http import get_parser
from gunicorn.http.errors import ParseException
from gunicorn.http.message import Request
from gunicorn.http.parser import RequestParser
from gunicorn.http.wsgi import Response

__all__ = ["RouterRequest", "RouterResponse", "http_date", "refuses_bare_line_feeds", "refuses_request_line",
           "request_parser"]

#: Peer addresses remembered at most (then forgotten all at once: a flood of addresses costs a parse each).
_TRUST_LIMIT = 4096
_trust: Dict[Tuple[str, Tuple[str, ...]], bool] = {}

_date: Tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value for now; formatted once per second (as gunicorn's ``util.http_date`` would)."""
    global _date
    now = int(time.time())
    cached = _date
    if cached[0] != now:
        cached = _date = (now, formatdate(now, localtime=False, usegmt=True))
    return cached[1]


class RouterRequest(Request):  # type: ignore[misc]
    """gunicorn's request; whether its peer is a trusted proxy is decided once per address."""

    def _peer_is_trusted_proxy(self) -> bool:
        # (gunicorn 26.2-27: called by the header policy as each request's headers are parsed.)
        peer = self.peer_addr
        if not isinstance(peer, tuple):
            return bool(super()._peer_is_trusted_proxy())
        key = (peer[0], tuple(self.cfg.forwarded_allow_ips))
        trusted = _trust.get(key)
        if trusted is None:
            trusted = bool(super()._peer_is_trusted_proxy())
            if len(_trust) >= _TRUST_LIMIT:
                _trust.clear()
            _trust[key] = trusted
        return trusted


class _RouterRequestParser(RequestParser):  # type: ignore[misc]
    mesg_class = RouterRequest


class _NoMoreBytes:
    @staticmethod
    def recv(size: int) -> bytes:
        return b""


@functools.cache
def refuses_bare_line_feeds() -> bool:
    """Whether gunicorn's parser refuses a head that ends in bare line feeds at once.

    gunicorn 27 does (400); 26.2 waits for CRLF CRLF, as it does reading a
    socket itself. The router's selector hands such a head on only when the
    parser answers it at once: else it waits there, costing no thread.
    """
    return _parse_now(RequestParser(Config(), _NoMoreBytes, ("127.0.0.1", 0)), b"GET / HTTP/1.1\nHost: x\n\n") is True


def refuses_request_line(cfg: Any, head: bytes, peer: Any) -> bool:
    """Whether gunicorn's parser refuses ``head`` (a request head begun) on its first line already.

    Such a request is answered 400 at once, as gunicorn reading the socket
    itself does, rather than after the whole head (that cannot mend it) or
    ``--header-timeout``. (A whole head, parsed, goes on at once too.)
    """
    return _parse_now(request_parser(cfg, _NoMoreBytes, peer), head) is not False


def _parse_now(parser: Any, head: bytes) -> Optional[bool]:
    """Feed ``head``, and nothing more, to ``parser``: True when it refuses it, False when it wants more
    bytes (NoMoreData), None when it parsed a request."""
    parser.unreader.unread(head)
    try:
        next(parser)
    except ParseException:
        return True
    except Exception:  # NoMoreData
        return False
    return None


def request_parser(cfg: Any, source: Any, peer: Any) -> Any:
    """gunicorn's parser of HTTP/1.x requests from ``source`` (what ``gunicorn.http.get_parser`` returns)."""
    if getattr(cfg, "protocol", "http") != "http":
        return get_parser(cfg, source, peer)
    return _RouterRequestParser(cfg, source, peer)


class RouterResponse(Response):  # type: ignore[misc]
    """gunicorn's response writer, with the Date header formatted once per second."""

    def default_headers(self) -> List[str]:
        # gunicorn's own (26.2-27), but for the date; tests/unit/test_http1.py compares the two.
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        version = self.req.version
        headers = [
            f"HTTP/{version[0]}.{version[1]} {self.status}\r\n",
            f"Server: {self.version}\r\n",
            f"Date: {http_date()}\r\n",
            f"Connection: {connection}\r\n",
        ]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers
