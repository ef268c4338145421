"""The HTTP/2 engine both tunnel roles share: a blocking :class:`Connection` over a socket, and its :class:`Stream`.

Modules, from the bottom up:

- ``settings``: :class:`ConnectionSettings` and HTTP/2 constants;
- ``framing``: the payload and frame objects that carry bytes through h2 uncopied;
- ``h2compat``: the engine's subclasses of h2's classes, the only code that
  relies on h2's and hyperframe's private names;
- ``allocator``: one allocation that lets body buffers come from the heap;
- ``outbox``: the ordered outbox, the write lock and the writer thread's loop;
- ``limits``: what a peer may make us do (floods, header blocks, abandoned streams);
- ``stream``: :class:`Stream`, and :class:`~ptth_sync.engine.stream.StreamOwner`,
  what it needs of its connection;
- ``state``, ``streamops``, ``events``, ``reader``, ``connection``: the layers
  of :class:`Connection` (see :mod:`ptth_sync.engine.state`).
"""

from __future__ import annotations

from .connection import Connection
from .settings import ConnectionSettings
from .stream import Header, Stream

__all__ = ["Connection", "ConnectionSettings", "Header", "Stream"]
