"""Limits on what a peer may make us do: floods of control frames or resets, huge header blocks, abandoned streams."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import h2.events

from .settings import ConnectionSettings

if TYPE_CHECKING:
    from .h2compat import _FrameBuffer
    from .stream import Stream

__all__ = ["AbuseLimits", "abandoned_streams"]

_CONTROL_EVENTS = (h2.events.PingReceived, h2.events.RemoteSettingsChanged)


class AbuseLimits:
    """Counts a peer's control frames and resets per second, and watches its header blocks."""

    def __init__(self, settings: ConnectionSettings, now: float) -> None:
        self.settings = settings
        self._control_window_start = now
        self._control_frames = self._resets = 0

    def check(self, events: List[h2.events.Event], incoming: _FrameBuffer) -> Optional[str]:
        """A reason to drop a peer that floods us with control frames or headers (lock held)."""
        now = time.monotonic()
        if now - self._control_window_start >= 1.0:
            self._control_window_start = now
            self._control_frames = self._resets = 0
        for event in events:
            if isinstance(event, _CONTROL_EVENTS):
                self._control_frames += 1
            elif isinstance(event, h2.events.StreamReset):
                self._resets += 1
        s = self.settings
        if self._control_frames > s.max_control_frames_per_second:
            return f"peer sent over {s.max_control_frames_per_second} PING/SETTINGS frames in a second"
        if self._resets > s.max_resets_per_second:
            return f"peer reset over {s.max_resets_per_second} streams in a second"
        # h2 buffers HEADERS and up to 64 CONTINUATION frames of up to
        # max_frame_size each before it decodes a block: bound that here.
        if incoming.header_block_size() > s.max_header_block:
            return f"peer sent a header block over {s.max_header_block} bytes"
        # (A frame announced longer than we accept is refused as soon as its
        # header is in, by _FrameBuffer: it never holds memory or the connection.)
        return None


def abandoned_streams(streams: Dict[int, Stream], h2_streams: Mapping[int, Any]) -> int:
    """Streams reset before we answered them that a thread has yet to release (lock held).

    h2 stops counting a stream once it is reset, but until a thread has dealt
    with it, it still costs us: past as many as the streams we allow, the
    connection refuses new ones.
    """
    count = 0
    for stream in streams.values():
        if not stream._local_ended:
            h2_stream = h2_streams.get(stream.id)
            if stream._error is not None or h2_stream is None or h2_stream.closed:
                count += 1
    return count
