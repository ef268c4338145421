"""WebSocket applications the tests serve through tunnels (importable as ``tests.websocket_apps:NAME``).

``app`` is a Flask application with flask-sock routes, as one would write it
for ``gunicorn -k gthread``; what its WebSockets saw is kept in memory and
served as JSON on ``GET /events``, so that a test can ask the backend process.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, List

import simple_websocket
from flask import Flask, jsonify
from flask_sock import Sock

app = Flask(__name__)
sock = Sock(app)

_events: List[Dict[str, Any]] = []
_events_lock = threading.Lock()
_open = 0


def _record(**event: Any) -> None:
    with _events_lock:
        _events.append(event)


@app.route("/events")
def events() -> Any:
    """What the WebSockets saw: ``{"open": N, "events": [...]}``."""
    with _events_lock:
        return jsonify({"open": _open, "events": list(_events)})


@app.route("/plain")
def plain() -> str:
    return "plain"


@sock.route("/echo")
def echo(ws: simple_websocket.Server) -> None:
    """Sends back every message; ``close CODE`` closes with that code; records how it ended."""
    global _open
    with _events_lock:
        _open += 1
    name = "?"
    try:
        while True:
            message = ws.receive()
            if isinstance(message, str) and message.startswith("name "):
                name = message[5:]
                ws.send(f"hello {name}")
            elif isinstance(message, str) and message.startswith("close "):
                _record(name=name, event="server-close", code=int(message[6:]))
                ws.close(int(message[6:]), "bye from the app")
                return
            else:
                ws.send(message)
    except simple_websocket.ConnectionClosed as exc:
        _record(name=name, event="closed", code=exc.reason, message=exc.message)
    finally:
        with _events_lock:
            _open -= 1


@sock.route("/ticks")
def ticks(ws: simple_websocket.Server) -> None:
    """Sends ``tick N`` for every message it receives, ``count`` times (for a client that never answers)."""
    count = int(ws.receive())
    for n in range(count):
        ws.send(f"tick {n}")
    ws.receive()


def pinging() -> Flask:
    """``app`` with simple-websocket's server pings every 0.2 s (it waits on the socket in a selector)."""
    app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 0.2}
    return app


def raw_socket_app(environ: Dict[str, Any], start_response: Any) -> Any:
    """A bare WSGI application that takes ``gunicorn.socket`` itself, as a Django view can with simple-websocket.

    ``/echo`` echoes one message and closes; ``/refuse`` writes a 403 on the socket; ``/ignore`` answers
    ``200`` through WSGI without accepting; ``/accept`` accepts through ``start_response`` and returns frames;
    ``/accept-with-70000-bytes-of-headers`` does the same with a header past the router's limit.
    """
    path = environ["PATH_INFO"]
    if path == "/refuse":
        body = b"go away"
        environ["gunicorn.socket"].sendall(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        start_response("200 OK", [])
        return [b"ignored"]
    if path == "/ignore":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"a page, not a WebSocket"]
    if path in ("/accept", "/accept-with-70000-bytes-of-headers"):
        from ptth_sync.websocket import accept_value

        extra = [("X-Big", "a" * 70000)] if path != "/accept" else []
        start_response("101 Switching Protocols", [
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_value(environ["HTTP_SEC_WEBSOCKET_KEY"])), *extra])
        return [b"\x81\x05hello", b"\x88\x02\x03\xe8"]  # a text frame, then a Close frame (1000)
    ws = simple_websocket.Server(environ)
    try:
        ws.send(ws.receive())
        ws.close()
    except simple_websocket.ConnectionClosed:
        pass
    start_response("200 OK", [("Content-Type", "text/plain")])  # a framework's answer after the WebSocket
    return [json.dumps({"done": True}).encode()]
