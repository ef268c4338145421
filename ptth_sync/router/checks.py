"""What the router answers itself, before any tunnel is touched.

A request that HTTP/2 would call malformed must never reach a tunnel: the
backend's HTTP/2 stack would reset it at best, and a peer that treats it as a
connection error fails every other request on the tunnel. So the router
refuses, with the status RFC 9110/9112 name, what it cannot forward faithfully:

* ``CONNECT`` (a tunnel to somewhere else, not a request for a backend): 405;
* an HTTP/1.1 request without ``Host``, or with a ``Host`` that is not one
  authority (RFC 9112 §3.2): 400;
* a transfer coding other than ``chunked`` (RFC 9112 §6.1): 501, since the
  backend would receive coded bytes it cannot tell from the body.

An absolute-form request target names the authority (RFC 9112 §3.2.2): it
takes the place of ``Host``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

__all__ = ["ALLOWED_METHODS", "CLOSE_CONNECTION", "Refusal", "check_request"]

#: The methods the router forwards, for the ``Allow`` header of a 405.
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"

#: An environ key the router sets when the client connection must close after its answer
#: (the rest of the client's request cannot be trusted); the router's worker honours it.
CLOSE_CONNECTION = "ptth_sync.close_connection"

# RFC 3986 authority: reg-name or IP literal, then an optional port (no user info, no spaces, no commas).
_AUTHORITY = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]*)(?::[0-9]*)?$")


class Refusal(NamedTuple):
    """The router's own answer to a request it will not forward."""

    code: int
    phrase: str
    detail: str
    headers: List[Tuple[str, str]]
    close: bool


def check_request(environ: Dict[str, Any]) -> Optional[Refusal]:
    """A refusal for a request the router must not forward, else None.

    May rewrite ``HTTP_HOST`` from an absolute-form target, which names the
    authority to use.
    """
    method = environ.get("REQUEST_METHOD", "")
    if method == "CONNECT":
        return Refusal(405, "Method Not Allowed", "the router does not tunnel CONNECT requests",
                       [("Allow", ALLOWED_METHODS)], True)  # (its client may send tunnel bytes next)
    raw = environ.get("RAW_URI") or ""
    if raw[:7].lower() == "http://" or raw[:8].lower() == "https://":
        authority = urlsplit(raw).netloc
        if not authority or not _AUTHORITY.match(authority):
            return Refusal(400, "Bad Request", "the request target has no valid authority", [], True)
        environ["HTTP_HOST"] = authority
    host = environ.get("HTTP_HOST")
    if host is None:
        if environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
            return Refusal(400, "Bad Request", "an HTTP/1.1 request needs a Host header", [], True)
    elif not _AUTHORITY.match(host):  # (empty is valid: a target without an authority)
        return Refusal(400, "Bad Request", f"invalid Host header {host!r}", [], True)
    if "ptth" in environ.get("HTTP_UPGRADE", "").lower():  # a backend's tunnel upgrade, on the wrong port
        return Refusal(400, "Bad Request", "this is the router's HTTP port: a backend dials its --tunnels port",
                       [], True)
    coding = environ.get("HTTP_TRANSFER_ENCODING")
    if coding is not None and coding.strip().lower() != "chunked":
        return Refusal(501, "Not Implemented", f"transfer coding {coding.strip()!r} is not supported; "
                       "send the body chunked or with a Content-Length", [], True)
    return None
