"""Origins: what a tunnel registers for, and what a request asks for.

An origin is ``scheme://host[:port]`` (RFC 6454) with the scheme ``http`` or
``https``. Both sides compare origins in one normal form: scheme and host in
lower case, the scheme's default port left out, IPv6 hosts in brackets. So
``HTTPS://API.example.com:443`` and ``https://api.example.com`` are the same
origin. ``*`` stands for "any host": the router's default pool.
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import urlsplit

__all__ = ["ANY", "DEFAULT_PORTS", "normalize_origin", "request_origin"]

ANY = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}
#: A host name as RFC 3986 spells a reg-name, or an IPv6 address (without its brackets).
_HOSTNAME = re.compile(r"[a-z0-9._~!$&'()*+,;=%-]+|[0-9a-f:.]+")


def normalize_origin(text: str) -> str:
    """The normal form of ``text``; raises ValueError with a one-line reason when it is no origin."""
    text = text.strip()
    if text == ANY:
        return ANY
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        msg = f"{text!r} is not an origin: {exc}"
        raise ValueError(msg) from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or not _HOSTNAME.fullmatch(parts.hostname):
        msg = f"{text!r} is not an origin: write it as http://HOST[:PORT] or https://HOST[:PORT]"
        raise ValueError(msg)
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        msg = f"{text!r} is not an origin: only a scheme, a host and a port, no user, path or query"
        raise ValueError(msg)
    return _join(scheme, parts.hostname, port)


def request_origin(scheme: str, host: str) -> Optional[str]:
    """The origin a request asks for, from its scheme and ``Host``; None when ``Host`` is malformed."""
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS or not host:
        return None
    try:
        parts = urlsplit("//" + host.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    if not _HOSTNAME.fullmatch(parts.hostname):
        return None
    return _join(scheme, parts.hostname, port)


def _join(scheme: str, hostname: str, port: Optional[int]) -> str:
    host = f"[{hostname}]" if ":" in hostname else hostname
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"
