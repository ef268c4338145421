"""A router worker's tunnels read in its front loop, not by a reader thread each.

A relayed request used to cross two threads of the worker: the front's loop
sent it, the tunnel's reader thread received the response and wrote it to the
client. Each crossing hands the GIL from one thread to the other, and when the
kernel runs the two on two CPUs, wakes the other CPU: at one connection that
was a fifth of the router's CPU per request. Here the front's loop watches
each plain tunnel's socket in its selector, as it watches clients, and takes
in what arrives itself (:meth:`Connection.read_available`): a relayed request
is then served by one thread from its head to its response.

What the reader thread guarded, and how it is kept:

- it never blocked: :meth:`Connection.read_available` never waits, sends go
  out without blocking (the tunnel's writer thread takes what the socket does
  not), and listeners must not block (they must not on a reader either);
- the peer's timers (its SETTINGS in time, PING when quiet, the PING's
  answer): :meth:`LoopReading.run_timers` runs them when due, and the loop
  wakes in time for the next (:meth:`LoopReading.timeout`);
- a tunnel's death wakes every thread waiting on it, fails its relayed
  requests (retried or aborted, as before) and is logged: the same
  ``end_reading``;
- threads serving requests (uploads, TLS clients, WebSocket openings) wait on
  the tunnel as before: the loop wakes them as the reader did;
- when the loop stops (the worker stops), each tunnel gets a reader thread
  again (:meth:`LoopReading.stop`): requests still in flight are answered,
  and the router closes its tunnels as before.

TLS tunnels keep their reader thread: a TLS record may arrive in parts.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from .front import SocketWatcher

if TYPE_CHECKING:
    from ..engine import Connection
    from .front import ClientFront

__all__ = ["LoopReading"]

#: A tunnel's timers are looked at again this long after a look at the earliest (seconds): a timer
#: that is due but has nothing to do (it is not quite time) does not make the loop spin.
TIMER_GRANULARITY = 0.25
#: When a tunnel has no timer, how soon the loop asks it again (seconds).
_NO_TIMER_RECHECK = 1.0


class _TunnelSocket(SocketWatcher):
    """One tunnel's socket in the front's selector."""

    __slots__ = ("_reading", "connection")

    def __init__(self, reading: LoopReading, connection: Connection) -> None:
        self.connection = connection
        self._reading = reading

    def interest(self) -> int:
        return selectors.EVENT_READ

    def on_events(self, events: int) -> None:
        self._reading.readable(self)


class LoopReading:
    """The tunnels a front's loop reads: adopted from any thread, read and timed in the loop."""

    def __init__(self, front: ClientFront, wake: Callable[[], None]) -> None:
        self._front = front
        self._wake = wake
        self._lock = threading.Lock()
        self._adopted: List[Connection] = []  # (under _lock) not yet watched by the loop
        self._stopped = False
        self._tunnels: Dict[int, _TunnelSocket] = {}  # (loop only) by id of the connection
        #: (Loop only.) Each tunnel once, by when its timers are due next (or earlier: data that
        #: arrived since only delays a PING), so that a look costs the timers due, not every tunnel.
        self._timers: List[Tuple[float, int, _TunnelSocket]] = []
        self._order = itertools.count()
        #: (Loop.) True while a tunnel's bytes are taken in, among the selector's events: the loop must
        #: not hand connections to threads then (it does it after the events).
        self.reading = False

    def adopt(self, connection: Connection) -> bool:
        """From any thread: the loop reads ``connection`` (started without a reader); False once it stopped."""
        with self._lock:
            if self._stopped:
                return False
            self._adopted.append(connection)
        self._wake()
        return True

    def take_adopted(self) -> None:
        """(Loop.) Watch the tunnels adopted since the last turn, and take in what they sent already."""
        if not self._adopted:
            return
        with self._lock:
            adopted, self._adopted = self._adopted, []
        for connection in adopted:
            watcher = self._tunnels[id(connection)] = _TunnelSocket(self, connection)
            self._front.watch_socket(connection.sock, watcher)
            self.readable(watcher)  # (bytes read with its opening, or since)
            self._schedule(watcher, time.monotonic())

    def readable(self, watcher: _TunnelSocket) -> None:
        """(Loop.) A tunnel's socket has bytes, or its end."""
        self.reading = True
        try:
            reason = watcher.connection.read_available()
            if reason is not None:
                self._end(watcher, reason)
        finally:
            self.reading = False

    def timeout(self, limit: float) -> float:
        """(Loop.) How long the loop may wait, at most ``limit`` seconds, before a tunnel's timer is due."""
        if not self._timers:
            return limit
        return max(0.0, min(limit, self._timers[0][0] - time.monotonic()))

    def run_timers(self) -> None:
        """(Loop.) Run the timers that are due."""
        timers = self._timers
        if not timers:
            return
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, watcher = heapq.heappop(timers)
            if self._tunnels.get(id(watcher.connection)) is not watcher:
                continue  # ended meanwhile
            reason = watcher.connection.run_timers()
            if reason is not None:
                self._end(watcher, reason)
                continue
            self._schedule(watcher, now)

    def _schedule(self, watcher: _TunnelSocket, now: float) -> None:
        if self._tunnels.get(id(watcher.connection)) is not watcher:
            return  # (it ended as it was adopted)
        due = watcher.connection.next_timer()
        if due is None:  # no timer now (one may start later: a PING once the peer's SETTINGS came)
            due = now + _NO_TIMER_RECHECK
        heapq.heappush(self._timers, (max(due, now + TIMER_GRANULARITY), next(self._order), watcher))

    def stop(self) -> None:
        """(Loop, as it stops.) Each tunnel gets a reader thread of its own again."""
        with self._lock:
            self._stopped = True
            adopted, self._adopted = self._adopted, []
        for watcher in list(self._tunnels.values()):
            self._front.unwatch_socket(watcher.connection.sock)
            adopted.append(watcher.connection)
        self._tunnels.clear()
        self._timers.clear()
        for connection in adopted:
            connection.read_in_thread()

    def __len__(self) -> int:
        return len(self._tunnels)

    def _end(self, watcher: _TunnelSocket, reason: Optional[str]) -> None:
        self._tunnels.pop(id(watcher.connection), None)
        self._front.unwatch_socket(watcher.connection.sock)
        watcher.connection.end_reading(reason or "connection closed")
