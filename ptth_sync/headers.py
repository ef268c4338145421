"""Header mapping between WSGI and HTTP/2, for both roles.

The router turns a WSGI environ into an HTTP/2 request header block
(:func:`request_headers`) and an HTTP/2 response back into WSGI status and
headers (:func:`response_status`, :func:`response_headers`). The backend turns
the request header block into a PEP 3333 environ (:func:`build_environ`) and
checks the application's response headers before they reach h2
(:func:`encode_response_headers`): one bad header would otherwise be a
connection error that kills every stream of the tunnel.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import quote, unquote_to_bytes, urlsplit

from hpack import NeverIndexedHeaderTuple

Header = Tuple[bytes, bytes]

__all__ = [
    "HOP_BY_HOP",
    "InvalidHeader",
    "build_environ",
    "encode_response_headers",
    "header_list_size",
    "request_headers",
    "response_headers",
    "response_status",
]

#: Headers that describe one HTTP/1.1 connection and are never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "http2-settings"}
)

# RFC 9110 token characters for names; field values may not hold CR, LF or NUL.
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-zA-Z]+$")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")

_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization"})
_CLIENT_VALUES_TO_CHECK = frozenset({b":authority", b"x-forwarded-for", b"x-forwarded-host"})

_ENVIRON_HEADER_KEYS = {"CONTENT_TYPE": b"content-type", "CONTENT_LENGTH": b"content-length"}


class InvalidHeader(ValueError):
    """A header name or value that cannot be sent in HTTP/2."""


# -- router: WSGI environ -> HTTP/2 request ------------------------------------


def request_target(environ: Dict[str, Any]) -> str:
    """The request target to forward: the raw one when the server kept it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        if raw.startswith(("http://", "https://")):  # absolute-form: keep path and query
            parts = urlsplit(raw)
            raw = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return raw
    # PEP 3333: PATH_INFO holds the request's bytes decoded as latin-1.
    path = quote(
        environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/;=,:@!$&'()*+~", encoding="latin-1"
    )
    query = environ.get("QUERY_STRING")
    return (path or "/") + (f"?{query}" if query else "")


def request_headers(environ: Dict[str, Any]) -> List[Header]:
    """Build the HTTP/2 request header block for ``environ``.

    Drops hop-by-hop headers and the ones ``Connection`` names, keeps ``TE:
    trailers``, appends the client to ``X-Forwarded-For`` and sets
    ``X-Forwarded-Proto`` and ``X-Forwarded-Host``.
    """
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST")
    if not host:
        host = environ.get("SERVER_NAME", "localhost")
        port = environ.get("SERVER_PORT")
        if port and port != ("443" if scheme == "https" else "80"):
            host = f"{host}:{port}"
    block: List[Header] = [
        (b":method", environ["REQUEST_METHOD"].encode("latin-1")),
        (b":scheme", scheme.encode("latin-1")),
        (b":authority", host.encode("latin-1")),
        (b":path", request_target(environ).encode("latin-1")),
    ]
    connection_tokens = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    forwarded_for = None
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].lower().replace("_", "-")
            if name in HOP_BY_HOP or name in connection_tokens:
                if name == "te" and value.strip().lower() == "trailers":
                    block.append((b"te", b"trailers"))
                continue
            # Host travels as :authority, the router sets its own X-Forwarded-Proto
            # and -Host, and the router's server has already answered Expect.
            if name in ("host", "x-forwarded-proto", "x-forwarded-host", "expect"):
                continue
            if name == "x-forwarded-for":
                forwarded_for = value
                continue
            name_bytes = name.encode("latin-1")
        elif key in _ENVIRON_HEADER_KEYS:
            if not value:
                continue
            name_bytes = _ENVIRON_HEADER_KEYS[key]
        else:
            continue
        value_bytes = value.encode("latin-1")
        if _BAD_VALUE.search(value_bytes):
            msg = f"invalid characters in request header {name_bytes.decode('latin-1')}"
            raise InvalidHeader(msg)
        if name_bytes in _NEVER_INDEXED or (name_bytes == b"cookie" and len(value_bytes) < 20):
            block.append(NeverIndexedHeaderTuple(name_bytes, value_bytes))  # kept out of HPACK's table
        else:
            block.append((name_bytes, value_bytes))
    client = environ.get("REMOTE_ADDR")
    if client:
        forwarded_for = f"{forwarded_for}, {client}" if forwarded_for else client
    if forwarded_for:
        block.append((b"x-forwarded-for", forwarded_for.encode("latin-1")))
    block.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    block.append((b"x-forwarded-host", host.encode("latin-1")))
    # Host and X-Forwarded-For skipped the check above; any other header the
    # router adds is its own.
    for name_bytes, value_bytes in block:
        if name_bytes in _CLIENT_VALUES_TO_CHECK and _BAD_VALUE.search(value_bytes):
            msg = f"invalid characters in request header {name_bytes.decode('latin-1')}"
            raise InvalidHeader(msg)
    return block


def header_list_size(headers: Sequence[Header]) -> int:
    """A header block's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2)."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


# -- router: HTTP/2 response -> WSGI -------------------------------------------


def response_status(headers: Sequence[Header]) -> Tuple[int, str]:
    """``(200, "200 OK")`` from a response header block; :class:`InvalidHeader` for a malformed one.

    The router's HTTP/2 stack leaves inbound header checks to this module
    (they would be done twice): the block must open with exactly one
    ``:status`` of three digits, and hold no other pseudo-header.
    """
    if not headers or headers[0][0] != b":status":
        msg = "response does not start with :status"
        raise InvalidHeader(msg)
    value = headers[0][1]
    if len(value) != 3 or not value.isdigit():
        msg = f"invalid :status {value[:20]!r}"
        raise InvalidHeader(msg)
    code = int(value)
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Unknown"
    return code, f"{code} {phrase}"


# Response header names already checked (lower-case tokens that are not
# connection-specific), with their text: names repeat from one response to the
# next, so each is checked once. Bounded, so that a hostile peer cannot grow it.
_CHECKED_NAMES: Dict[bytes, str] = {}
_CHECKED_NAMES_MAX = 2048
_LOWER_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")


def _response_header_name(name: bytes) -> str:
    text = _CHECKED_NAMES.get(name)
    if text is not None:
        return text
    if name[:1] == b":":
        msg = f"unexpected pseudo-header {name[:40]!r} in a response"
        raise InvalidHeader(msg)
    if not _LOWER_TOKEN.match(name):
        msg = f"invalid response header name {name[:40]!r}"
        raise InvalidHeader(msg)
    text = name.decode("latin-1")
    if text in HOP_BY_HOP:
        msg = f"connection-specific header {text!r} in an HTTP/2 response"
        raise InvalidHeader(msg)
    if len(_CHECKED_NAMES) < _CHECKED_NAMES_MAX:
        _CHECKED_NAMES[name] = text
    return text


def response_headers(headers: Sequence[Header]) -> List[Tuple[str, str]]:
    """WSGI response headers from an HTTP/2 block (after :func:`response_status`), repeats kept.

    Raises :class:`InvalidHeader` for what RFC 9113 calls malformed (an
    uppercase or invalid name, a connection-specific header, a pseudo-header
    after ``:status``) and for a value with CR, LF or NUL, which would split
    the HTTP/1.1 response the router writes.
    """
    result = []
    for name, value in headers[1:]:
        text = _response_header_name(name)
        if _BAD_VALUE.search(value):
            msg = f"response header {text} has a value with CR, LF or NUL"
            raise InvalidHeader(msg)
        result.append((text, value.decode("latin-1")))
    return result


# -- backend: HTTP/2 request -> WSGI environ -----------------------------------


def build_environ(
    headers: Sequence[Header],
    *,
    wsgi_input: Any,
    errors: Any,
    peer: Optional[Tuple[str, int]] = None,
) -> Dict[str, Any]:
    """A complete PEP 3333 environ for one tunnelled request.

    ``PATH_INFO`` is the percent-decoded path as latin-1, ``QUERY_STRING`` is
    kept as sent, ``SERVER_NAME``/``SERVER_PORT`` come from ``:authority``,
    ``wsgi.url_scheme`` from ``X-Forwarded-Proto`` and ``REMOTE_ADDR`` from
    the last hop of ``X-Forwarded-For`` (the one the router added).
    """
    method = path = scheme = authority = b""
    environ: Dict[str, Any] = {}
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":scheme":
                scheme = value
            elif name == b":authority":
                authority = value
            continue
        text_value = value.decode("latin-1")
        if name == b"content-type":
            environ["CONTENT_TYPE"] = text_value
            continue
        if name == b"content-length":
            environ["CONTENT_LENGTH"] = text_value
            continue
        if b"_" in name:  # would collide with its "-" twin in the environ
            continue
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        previous = environ.get(key)
        if previous is None:
            environ[key] = text_value
        else:
            environ[key] = previous + ("; " if key == "HTTP_COOKIE" else ",") + text_value
    raw_uri = path.decode("latin-1")
    path_part, _, query = raw_uri.partition("?")
    host_text = authority.decode("latin-1") or environ.get("HTTP_HOST", "")
    if "HTTP_HOST" not in environ and host_text:
        environ["HTTP_HOST"] = host_text
    proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[-1].strip().lower()
    url_scheme = proto if proto in ("http", "https") else (scheme.decode("latin-1") or "http")
    server_name, server_port = _split_host(host_text, url_scheme)
    forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
    remote = forwarded.split(",")[-1].strip() if forwarded else ""
    if not remote and peer is not None:
        remote = peer[0]
    environ.update(
        {
            "REQUEST_METHOD": method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path_part).decode("latin-1"),
            "QUERY_STRING": query,
            "RAW_URI": raw_uri,
            "REQUEST_URI": raw_uri,
            "SERVER_NAME": server_name,
            "SERVER_PORT": server_port,
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": remote,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": url_scheme,
            "wsgi.input": wsgi_input,
            "wsgi.errors": errors,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
    )
    return environ


def _split_host(host: str, scheme: str) -> Tuple[str, str]:
    default_port = "443" if scheme == "https" else "80"
    if not host:
        return "localhost", default_port
    if host.startswith("["):  # [::1]:8080
        end = host.find("]")
        name, rest = host[1:end], host[end + 1 :]
        return name, rest[1:] if rest.startswith(":") and rest[1:].isdigit() else default_port
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, port
    return host, default_port


# -- backend: WSGI response -> HTTP/2 ------------------------------------------


def encode_response_headers(status: str, headers: Iterable[Tuple[str, str]]) -> Tuple[int, List[Header]]:
    """Check and encode a WSGI status line and headers for h2.

    Returns the status code and the header block (``:status`` first); raises
    :class:`InvalidHeader` for anything h2 would refuse or the peer would
    treat as a connection error. Hop-by-hop headers are dropped.
    """
    code_text = status.split(" ", 1)[0]
    if len(code_text) != 3 or not (code_text.isascii() and code_text.isdigit()):
        msg = f"invalid status line {status!r}"
        raise InvalidHeader(msg)
    code = int(code_text)
    if code < 200:
        msg = f"informational status {code} cannot be a final response"
        raise InvalidHeader(msg)
    block: List[Header] = [(b":status", code_text.encode("ascii"))]
    for name, value in headers:
        if not isinstance(name, str) or not isinstance(value, str):
            msg = f"header names and values must be str: {name!r}: {value!r}"
            raise InvalidHeader(msg)
        try:
            name_bytes = name.lower().encode("latin-1")
        except UnicodeEncodeError:
            name_bytes = b""
        if not _TOKEN.match(name_bytes):
            msg = f"invalid header name {name!r}"
            raise InvalidHeader(msg)
        if name_bytes.decode("latin-1") in HOP_BY_HOP:
            continue
        try:
            value_bytes = value.strip().encode("latin-1")
        except UnicodeEncodeError:
            msg = f"header {name} has a value that is not latin-1"
            raise InvalidHeader(msg) from None
        if _BAD_VALUE.search(value_bytes):
            msg = f"header {name} has a value with CR, LF or NUL"
            raise InvalidHeader(msg)
        block.append((name_bytes, value_bytes))
    return code, block
