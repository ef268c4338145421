"""The former home of the HTTP/2 engine's connection, kept as an import path: see :mod:`ptth_sync.engine`."""

from __future__ import annotations

from .engine.allocator import _tune_allocator as _tune_allocator
from .engine.connection import Connection
from .engine.framing import _HeaderBlockFrame as _HeaderBlockFrame
from .engine.framing import _Parts as _Parts
from .engine.framing import _Payload as _Payload
from .engine.h2compat import StreamMalformed as StreamMalformed
from .engine.h2compat import _FrameBuffer as _FrameBuffer
from .engine.h2compat import _H2Connection as _H2Connection
from .engine.h2compat import _H2Stream as _H2Stream
from .engine.h2compat import _Malformed as _Malformed
from .engine.settings import _DEFAULT_WINDOW as _DEFAULT_WINDOW
from .engine.settings import _MAX_WINDOW as _MAX_WINDOW
from .engine.settings import HTTP1_PROBE as HTTP1_PROBE
from .engine.settings import ConnectionSettings
from .engine.stream import Header, Stream

__all__ = ["Connection", "ConnectionSettings", "Header", "Stream"]
