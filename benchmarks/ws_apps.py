"""The WebSocket application the benchmark serves (importable as ``benchmarks.ws_apps:app``).

A flask-sock echo, as one would write it for ``gunicorn -k gthread``: the same
app runs under plain gunicorn (the direct path) and behind a ``ptth_sync``
backend (the tunnelled path).
"""

from __future__ import annotations

from flask import Flask
from flask_sock import Sock
from simple_websocket import Server

app = Flask(__name__)
sock = Sock(app)


@app.route("/")
def index() -> str:
    return "ready"


@sock.route("/echo")
def echo(ws: Server) -> None:
    while True:
        ws.send(ws.receive())
