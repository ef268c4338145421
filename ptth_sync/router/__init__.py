"""The router: a WSGI application plus the pool of tunnels it proxies through."""

from __future__ import annotations

from .app import Router
from .pool import TunnelPool

__all__ = ["Router", "TunnelPool"]
