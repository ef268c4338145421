"""A Flask app to serve through a tunnel.

    python -m ptth_sync.backend examples.flask_app:app
"""

from flask import Flask, request

app = Flask(__name__)


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
