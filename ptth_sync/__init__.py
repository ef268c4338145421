"""ptth_sync: reverse HTTP/2 tunnels for WSGI applications, synchronous and threaded.

A backend dials out to a router and serves HTTP/2 on that connection; the
router accepts public HTTP traffic and proxies it round-robin over the live
tunnels.
"""

from __future__ import annotations

from .backend import Backend, serve_wsgi
from .errors import ConnectionClosed, PTTHError, StreamReset, StreamTimeout
from .handshake import HandshakeFailed, HandshakeRefused
from .router import Router

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ConnectionClosed",
    "HandshakeFailed",
    "HandshakeRefused",
    "PTTHError",
    "Router",
    "StreamReset",
    "StreamTimeout",
    "__version__",
    "serve_wsgi",
]
