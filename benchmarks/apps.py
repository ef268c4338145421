"""WSGI applications the benchmark serves (importable as ``benchmarks.apps:NAME``).

The same callables run under plain gunicorn (the direct path) and behind a
``ptth_sync`` backend (the tunnelled path), so any difference in the numbers
comes from the serving path, not from the application.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Tuple
from urllib.parse import parse_qs

MIB = 1024 * 1024
#: Largest download the ``download`` app agrees to produce, in MiB.
MAX_DOWNLOAD_MIB = 4096

#: One preallocated MiB, sent again and again by ``download``: no per-request allocation.
_CHUNK = b"\xa5" * MIB
_HELLO = b"hello world\n"

StartResponse = Callable[..., object]
Environ = dict


def _plain(start_response: StartResponse, status: str, body: bytes) -> List[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """``200 OK``, ``text/plain``, ``hello world\\n`` with its ``Content-Length``, whatever the path."""
    return _plain(start_response, "200 OK", _HELLO)


def _requested_mib(environ: Environ) -> int:
    """N from ``?mib=N`` or a bare ``?N``; raises ValueError when absent or out of range."""
    query = environ.get("QUERY_STRING", "")
    values = parse_qs(query).get("mib")
    text = values[0] if values else query
    mib = int(text)
    if not 0 <= mib <= MAX_DOWNLOAD_MIB:
        raise ValueError(f"mib must be within 0..{MAX_DOWNLOAD_MIB}")
    return mib


def download(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Streams N MiB (``?mib=N``) of a preallocated 1 MiB buffer, with ``Content-Length``."""
    try:
        mib = _requested_mib(environ)
    except ValueError as exc:
        return _plain(start_response, "400 Bad Request", f"{exc}\n".encode())
    headers: List[Tuple[str, str]] = [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", str(mib * MIB)),
    ]
    start_response("200 OK", headers)
    return [_CHUNK] * mib


def upload(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Reads ``wsgi.input`` in 1 MiB pieces and answers the number of bytes received."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    remaining = int(length) if length else None  # None: no Content-Length, read to the end
    received = 0
    while remaining is None or remaining > 0:
        piece = stream.read(MIB if remaining is None else min(MIB, remaining))
        if not piece:
            break
        received += len(piece)
        if remaining is not None:
            remaining -= len(piece)
    return _plain(start_response, "200 OK", f"{received}\n".encode())


def bodies(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """``/download`` and ``/upload`` on one server (the body phase needs both); 404 elsewhere."""
    app = {"/download": download, "/upload": upload}.get(environ.get("PATH_INFO", ""))
    if app is None:
        return _plain(start_response, "404 Not Found", b"try /download?mib=N or /upload\n")
    return app(environ, start_response)
