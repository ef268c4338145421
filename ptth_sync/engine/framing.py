"""The objects that carry body bytes and header blocks through h2 in place of hyperframe's, uncopied.

h2 only takes the ``len()`` of a DATA payload and the ``serialize()`` of a
frame on their way through it; the engine's h2 classes (``h2compat``) write
and read these objects themselves.
"""

from __future__ import annotations

import struct
from typing import List, Set

#: A frame header: length (24 bits, as 16 + 8), type, flags, stream id.
_FRAME_HEADER = struct.Struct(">HBBBL")


class _Payload:
    """A slice of a caller's buffer passed through h2 as DATA without being copied.

    h2 only takes the ``len()`` of what it sends (and copies memoryviews);
    :class:`~ptth_sync.engine.h2compat._H2Connection` writes the slice itself
    after the frame header.
    """

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)


class _Parts:
    """A DATA payload that arrived in several blocks, passed through h2 without joining them."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: List[bytes], size: int) -> None:
        self.parts = parts
        self.size = size

    def __len__(self) -> int:
        return self.size


class _HeaderBlockFrame:
    """An outgoing HEADERS or CONTINUATION frame, without hyperframe's frame objects.

    Building a :class:`hyperframe.frame.HeadersFrame` (its flags, padding and
    priority mixins) cost more than encoding the header block itself;
    :meth:`~ptth_sync.engine.h2compat._H2Connection._prepare_for_sending`
    writes this one with a single ``struct.pack``. ``flags`` is a plain set,
    as h2 only adds to it.
    """

    __slots__ = ("data", "flags", "stream_id", "type")

    def __init__(self, frame_type: int, stream_id: int, data: bytes) -> None:
        self.type = frame_type
        self.stream_id = stream_id
        self.flags: Set[str] = set()
        self.data = data

    def serialize(self) -> bytes:
        flags = self.flags
        bits = (0x1 if "END_STREAM" in flags else 0) | (0x4 if "END_HEADERS" in flags else 0)
        size = len(self.data)
        return _FRAME_HEADER.pack(size >> 8, size & 0xFF, self.type, bits, self.stream_id) + self.data
