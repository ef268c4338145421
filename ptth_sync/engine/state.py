"""The state a connection's parts share, what guards it, and how a connection dies.

A :class:`~ptth_sync.engine.connection.Connection` is built in layers, one
module each, every layer using the ones below it:

- ``state``: the shared attributes (created by ``Connection.__init__``) and
  :meth:`ConnectionState._fail`, the one way a connection dies;
- ``streamops``: what a :class:`~ptth_sync.engine.stream.Stream` asks of its
  connection (sending within flow control, waiting, returning credit, closing),
  and opening streams;
- ``events``: applying h2's events to the streams;
- ``reader``: the reader thread's loop and the peer's timers;
- ``connection``: the public API, the life cycle, and the wiring.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

from ..errors import ConnectionClosed
from ..sockets import shutdown
from ..waiting import WaitQueue, release

if TYPE_CHECKING:
    from .h2compat import _H2Connection
    from .limits import AbuseLimits
    from .outbox import Outbox
    from .settings import ConnectionSettings
    from .stream import Stream

__all__ = ["ConnectionState"]


class ConnectionState:
    """The attributes every layer of a connection uses (``Connection.__init__`` creates them).

    ``_lock``, the state lock, guards the h2 object, the stream table, every
    stream's buffers and flags, the outbox's buffers and counts, and the
    waiting queues; it is never held across socket I/O (the outbox's write
    lock orders the writers). Holding one lock over h2 calls *and*
    ``sendall`` deadlocks as soon as both directions carry bulk data with
    flow-control windows larger than the socket buffers: each side's sender
    blocks in ``sendall`` while its reader waits for the lock.
    """

    # Fixed at construction.
    sock: socket.socket
    client_side: bool
    settings: ConnectionSettings
    name: str
    _h2: _H2Connection
    _lock: threading.Lock
    _outbox: Outbox
    _limits: AbuseLimits
    _on_ready: Optional[Callable[..., None]]
    _on_request: Optional[Callable[[Stream], None]]
    _on_close: Optional[Callable[..., None]]
    _on_goaway_notice: Optional[Callable[..., None]]

    # Under the state lock.
    _streams: Dict[int, Stream]
    #: The first failure; None while the connection lives (also read without the lock, as a hint).
    _error: Optional[ConnectionClosed]
    _capacity_waiting: WaitQueue  # open_stream at the stream limit, drain
    _slots_freed: Optional[int]
    _draining: bool
    _pending_drain_ack: bool

    # The reader thread's, besides the events.
    _initial_data: bytes
    _started_at: float
    _last_received: float
    _ping_sent_at: Optional[float]
    _ready: threading.Event
    _closed: threading.Event
    was_ready: bool
    close_reason: Optional[str]
    first_bytes: bytes
    goaway_received: Optional[Tuple[int, bytes]]
    goaway_notice: Optional[bytes]

    def _fail(self, reason: str) -> None:
        """Mark the connection dead and wake every waiter (lock held). First reason wins."""
        if self._error is not None:
            return
        self._error = ConnectionClosed(reason)
        self._wake_all_streams()
        release(self._capacity_waiting.take())
        self._outbox.stop()

    def _retire_locked(self, reason: str) -> None:
        self._fail(reason)
        shutdown(self.sock)

    def _wake_all_streams(self) -> None:
        for stream in self._streams.values():
            release(stream._waiting.take())
