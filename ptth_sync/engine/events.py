"""Applying h2's events to the streams: data, headers, ends, resets, window updates, settings, GOAWAY.

Runs on the reader with the state lock held; the streams to wake are
collected and woken once per batch, after the lock is released.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Set

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from ..errors import ConnectionClosed, StreamReset
from .framing import _Parts
from .h2compat import StreamMalformed
from .limits import abandoned_streams
from .stream import Stream
from .streamops import StreamOps

__all__ = ["EventDispatch"]

log = logging.getLogger("ptth_sync.connection")


class EventDispatch(StreamOps):
    """Turns each h2 event into the state of a :class:`~ptth_sync.engine.stream.Stream` or of the connection."""

    def _dispatch(self, event: h2.events.Event, new_requests: List[Stream], wake: Set[Stream]) -> Optional[str]:
        """Apply one h2 event (lock held), collecting the streams to wake in ``wake``.

        Returns a reason when the connection ends.
        """
        streams = self._streams
        if isinstance(event, h2.events.DataReceived):
            stream = streams.get(event.stream_id)
            flow = event.flow_controlled_length
            if stream is None:
                self._h2.acknowledge_received_data(flow, event.stream_id)
                return None
            data = event.data
            if flow > len(data):  # padding is credited at once
                self._h2.acknowledge_received_data(flow - len(data), event.stream_id)
            if data:
                if type(data) is _Parts:
                    stream._chunks.extend(data.parts)
                else:
                    stream._chunks.append(data)
                stream._buffered += len(data)
                wake.add(stream)
        elif isinstance(event, (h2.events.RequestReceived, h2.events.ResponseReceived)):
            stream = streams.get(event.stream_id)
            if stream is None:
                if not isinstance(event, h2.events.RequestReceived):
                    return None
                if abandoned_streams(streams, self._h2.streams) >= self.settings.max_concurrent_streams:
                    # h2 stops counting a stream once it is reset, but until a
                    # thread has dealt with it, it still costs us: past as many
                    # as the streams we allow, refuse more (safe to retry), or
                    # "rapid reset" would queue unbounded work.
                    try:
                        self._h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                    except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
                        pass  # the peer reset it itself, in the same batch: nothing left to refuse
                    return None
                stream = Stream(self, event.stream_id)
                streams[event.stream_id] = stream
                new_requests.append(stream)
            stream.headers = event.headers
            wake.add(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream._remote_ended = True
                wake.add(stream)
            self._free_slot()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                wake.update(streams.values())
            else:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    wake.add(stream)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            wake.update(streams.values())
            self._slots_freed = None
        elif isinstance(event, h2.events.StreamReset):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream._error = StreamReset(event.stream_id, event.error_code, remote=True)
                wake.add(stream)
            self._free_slot()
        elif isinstance(event, StreamMalformed):
            what = "response" if self.client_side else "request"
            log.info("tunnel %s: stream %d reset: malformed %s from peer: %s", self.name, event.stream_id, what,
                     event.reason)
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream._error = StreamReset(event.stream_id, ErrorCodes.PROTOCOL_ERROR, remote=False)
                wake.add(stream)
            self._free_slot()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = event.headers
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_sent_at = None
        elif isinstance(event, h2.events.SettingsAcknowledged):
            if self._pending_drain_ack:
                self._pending_drain_ack = False
                self._slots_freed = None
        elif isinstance(event, h2.events.ConnectionTerminated):
            last = event.last_stream_id if event.last_stream_id is not None else 0
            self.goaway_received = (event.error_code, event.additional_data or b"")
            reason = f"peer sent GOAWAY ({_error_name(event.error_code)})"
            if event.additional_data:
                reason += f": {event.additional_data[:200].decode('latin-1')!r}"
            for sid, stream in streams.items():
                if stream._error is None:
                    stream._error = ConnectionClosed(reason, request_sent=sid <= last)
            return reason
        return None

    def _free_slot(self) -> None:
        if self._slots_freed is not None:
            self._slots_freed += 1



def _error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"
