"""A backend that answers ``GET /foo`` with ``bar``, as the Go original's example.

    python examples/backend.py [ROUTER_HOST:PORT]
"""

import logging
import sys

from ptth_sync import HandshakeRefused, serve_wsgi


def app(environ, start_response):
    if environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] == "/foo":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"bar"]
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [b"not found\n"]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        serve_wsgi(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8887", app)
    except HandshakeRefused:
        sys.exit(1)  # the router refused, or is no tunnel listener: logged already, with the fix
