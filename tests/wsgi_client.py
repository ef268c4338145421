"""Call a WSGI application (the Router) directly, as a WSGI server would."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple


@dataclass
class WSGIResponse:
    status: str
    headers: List[Tuple[str, str]]
    iterable: Iterable[bytes]
    _body: Optional[bytes] = field(default=None, repr=False)

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_values(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def body(self) -> bytes:
        if self._body is None:
            try:
                self._body = b"".join(self.iterable)
            finally:
                self.close()
        return self._body

    def close(self) -> None:
        close = getattr(self.iterable, "close", None)
        if close is not None:
            close()


def make_environ(
    method: str = "GET",
    target: str = "/",
    body: bytes = b"",
    headers: Optional[Dict[str, str]] = None,
    *,
    chunked: bool = False,
    remote_addr: str = "10.1.2.3",
    wsgi_input: Any = None,
) -> Dict[str, Any]:
    path, _, query = target.partition("?")
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "RAW_URI": target,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8888",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": remote_addr,
        "HTTP_HOST": "example.test:8888",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": wsgi_input if wsgi_input is not None else io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }
    if chunked:
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    elif body:
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
        else:
            environ["HTTP_" + key] = value
    return environ


def wsgi_request(app: Any, method: str = "GET", target: str = "/", body: bytes = b"", **kwargs: Any) -> WSGIResponse:
    """Call ``app`` and return its status, headers and (lazy) body."""
    captured: Dict[str, Any] = {}

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, headers
        return lambda data: None

    environ = make_environ(method, target, body, **kwargs)
    iterable = app(environ, start_response)
    return WSGIResponse(captured["status"], captured["headers"], iterable)
