"""A Flask app to serve through a tunnel, with a WebSocket (flask-sock) as under gunicorn's gthread.

    python -m ptth_sync.backend examples.flask_app:app
"""

from flask import Flask, request
from flask_sock import Sock

app = Flask(__name__)
sock = Sock(app)


@app.get("/foo")
def foo():
    return "bar"


@app.route("/echo", methods=["POST", "PUT"])
def echo():
    return request.get_data()


@app.get("/whoami")
def whoami():
    return {
        "remote_addr": request.remote_addr,
        "host": request.host,
        "scheme": request.scheme,
        "path": request.path,
        "args": request.args.to_dict(flat=False),
    }


@sock.route("/ws")
def echo_websocket(ws):
    """A WebSocket that sends every message back: ``ws://ROUTER/ws``."""
    while True:
        ws.send(ws.receive())
