"""Parsing of ``host:port`` addresses as the command lines and API take them."""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union
from urllib.parse import urlsplit

Address = Tuple[str, int]
AddressLike = Union[str, Tuple[str, int], Sequence[Union[str, Tuple[str, int]]]]

__all__ = ["Address", "AddressLike", "format_address", "parse_address", "parse_addresses"]


def parse_address(value: Union[str, Tuple[str, int]], default_host: str = "127.0.0.1") -> Address:
    """Turn ``"host:port"``, ``"[::1]:port"``, ``":port"`` or ``(host, port)`` into a tuple."""
    if isinstance(value, tuple):
        host, port = value
        return (str(host), int(port))
    text = value.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    elif "://" in text:
        raise ValueError(_url_error(text))
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        msg = f"not a HOST:PORT address: {value!r}"
        if not sep and text.isdigit():
            msg += f": for port {text} on {default_host}, give :{text}"
        raise ValueError(msg)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        msg = f"port out of range in {value!r}"
        raise ValueError(msg)
    return (host or default_host, port)


def _url_error(text: str) -> str:
    """Why a URL is no ``HOST:PORT``, and the address to give instead."""
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    address = format_address((parts.hostname, port)) if parts.hostname and port else "HOST:PORT"
    hint = f"give {address}"
    if parts.scheme.lower() == "tls":
        hint += ", with --tls on the backend (--certfile on the router)"
    return f"{text!r} is a URL, not a HOST:PORT address: {hint}"


def parse_addresses(value: AddressLike) -> List[Address]:
    """Accept one address, a comma-separated string of them, or a list of either."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return [parse_address(value)]
    if isinstance(value, str):
        items: Sequence[Union[str, Tuple[str, int]]] = [p for p in value.split(",") if p.strip()]
    else:
        items = list(value)
    addresses = [parse_address(item) for item in items]
    if not addresses:
        msg = "no address given"
        raise ValueError(msg)
    return addresses


def format_address(address: Address) -> str:
    """``("::1", 80)`` → ``"[::1]:80"``; ``("127.0.0.1", 80)`` → ``"127.0.0.1:80"``."""
    host, port = address[0], address[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
