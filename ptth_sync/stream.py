"""The former home of the HTTP/2 engine's stream, kept as an import path: see :mod:`ptth_sync.engine.stream`."""

from __future__ import annotations

from .engine.stream import Header, Stream, StreamOwner

__all__ = ["Header", "Stream", "StreamOwner"]
