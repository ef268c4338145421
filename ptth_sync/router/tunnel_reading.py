"""A router worker's tunnels read and written by its front loop, with no thread of their own.

A relayed request used to cross two threads of the worker: the front's loop
sent it, the tunnel's reader thread received the response and wrote it to the
client. Each crossing hands the GIL from one thread to the other, and when the
kernel runs the two on two CPUs, wakes the other CPU: at one connection that
was a fifth of the router's CPU per request. Here the front's loop watches
each plain tunnel's socket in its selector, as it watches clients, and takes
in what arrives itself (:meth:`Connection.read_available`): a relayed request
is then served by one thread from its head to its response. The same loop
sends what the socket had no room for when it was queued (the socket is then
watched for writing too), so a tunnel costs no thread at all.

What the reader and writer threads guarded, and how it is kept:

- the reader never blocked: :meth:`Connection.read_available` never waits,
  sends go out without blocking, and listeners must not block (they must not
  on a reader either);
- the writer sent what the socket did not take at once, whoever queued it:
  the connection tells the loop (``on_unsent``, from any thread), which
  watches the socket for room and sends the rest then; a thread with bytes of
  its own to send (an upload past the outbox's high-water mark) still waits
  for its turn and sends them itself, as before;
- the peer's timers (its SETTINGS in time, PING when quiet, the PING's
  answer): :meth:`LoopReading.run_timers` runs them when due, and the loop
  wakes in time for the next (:meth:`LoopReading.timeout`);
- a tunnel's death wakes every thread waiting on it, fails its relayed
  requests (retried or aborted, as before) and is logged: the same
  ``end_reading``;
- threads serving requests (WebSocket openings, retries, waits for a tunnel) wait on
  the tunnel as before: the loop wakes them as the reader did;
- when the loop stops (the worker stops), each tunnel gets its reader and
  writer threads again (:meth:`LoopReading.stop`): requests still in flight
  are answered, and the router closes its tunnels as before.

TLS tunnels are read and written here too, through their
:class:`~ptth_sync.tls.TLSChannel` (OpenSSL on memory buffers, under its own
lock): a record that arrives in parts waits in the channel until it is
whole; bytes the channel decrypted already, which the selector cannot see,
are read again at the loop's next turn; encrypted output the socket had no
room for waits in the channel, one batch at most (the outbox keeps the rest,
and its bounds), and goes out as the socket takes it.
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
    """One tunnel's socket in the front's selector: read always, written when bytes wait for room."""

    __slots__ = ("_reading", "connection", "pending", "scheduled")

    def __init__(self, reading: LoopReading, connection: Connection) -> None:
        self.connection = connection
        #: A TLS channel's test for bytes it holds already (the selector cannot see them); None: a socket.
        self.pending: Optional[Callable[[], bool]] = getattr(connection.sock, "pending", None)
        self._reading = reading
        #: When its entry in the loop's timer heap is due (older entries of it are stale).
        self.scheduled = float("inf")

    def interest(self) -> int:
        if not self._reading.has(self):
            return 0  # (ended: its socket is closed or about to be)
        if self.connection.unsent:
            return selectors.EVENT_READ | selectors.EVENT_WRITE
        return selectors.EVENT_READ

    def on_events(self, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self.connection.send_queued()
        if events & selectors.EVENT_READ:
            self._reading.readable(self)

    def unsent(self) -> None:
        """(Any thread.) Bytes wait for room in the socket: watch it for writing too."""
        self._reading.want_write(self)


class LoopReading:
    """The tunnels a front's loop reads: adopted from any thread, read and timed in the loop."""

    def __init__(self, front: ClientFront, wake: Callable[[], None]) -> None:
        self._front = front
        self._wake = wake
        self._lock = threading.Lock()
        self._adopted: List[_TunnelSocket] = []  # (under _lock) started, not yet watched by the loop
        #: (Loop only.) TLS tunnels left with decrypted bytes or whole records (their read budget spent):
        #: the selector cannot see those, so the loop reads them again at its next turn.
        self._again: List[_TunnelSocket] = []
        self._stopped = False
        self._tunnels: Dict[int, _TunnelSocket] = {}  # (loop only) by id of the connection
        #: (Loop only.) The tunnels by when their timers are due next (or earlier: data that arrived
        #: since only delays a PING), so that a look costs the timers due, not every tunnel; an entry
        #: whose time is not its tunnel's ``scheduled`` is stale (the timer was brought forward).
        self._timers: List[Tuple[float, int, _TunnelSocket]] = []
        self._order = itertools.count()
        #: (Loop.) True while a tunnel's bytes are taken in, among the selector's events: the loop must
        #: not hand connections to threads then (it does it after the events).
        self.reading = False

    def adopt(self, connection: Connection, initial_data: bytes = b"") -> bool:
        """From any thread: start ``connection`` with no thread of its own, for the loop to read and write;
        False once the loop stopped (the caller starts it with its threads)."""
        watcher = _TunnelSocket(self, connection)
        with self._lock:  # (held while it starts, so that stop() finds it, started, in _adopted)
            if self._stopped:
                return False
            connection.start(initial_data, read_in_thread=False, on_unsent=watcher.unsent)
            self._adopted.append(watcher)
        self._wake()
        return True

    def has(self, watcher: _TunnelSocket) -> bool:
        """(Loop.) The loop still reads this tunnel."""
        return self._tunnels.get(id(watcher.connection)) is watcher

    def want_write(self, watcher: _TunnelSocket) -> None:
        """(Any thread.) A tunnel has bytes for which its socket had no room."""
        self._front.want_events(watcher.connection.sock, watcher)

    def take_adopted(self) -> None:
        """(Loop.) Watch the tunnels adopted since the last turn, and take in what they sent already;
        read again the TLS tunnels that hold bytes the selector cannot see."""
        if self._again:
            again, self._again = self._again, []
            for watcher in again:
                if self.has(watcher):
                    self.readable(watcher)
        if not self._adopted:
            return
        with self._lock:
            adopted, self._adopted = self._adopted, []
        for watcher in adopted:
            self._tunnels[id(watcher.connection)] = watcher
            self._front.watch_socket(watcher.connection.sock, watcher)
            self.readable(watcher)  # (bytes read with its opening, or since)
            self._schedule(watcher, time.monotonic())

    def readable(self, watcher: _TunnelSocket) -> None:
        """(Loop.) A tunnel's socket has bytes, or its end."""
        self.reading = True
        try:
            connection = watcher.connection
            reason = connection.read_available()
            if reason is not None:
                self._end(watcher, reason)
                return
            pending = watcher.pending
            if pending is not None and pending() and watcher not in self._again:
                self._again.append(watcher)
                self._wake()
            # What arrived may bring a timer forward (the peer's SETTINGS start the PINGs): most often it
            # only delays the next PING, which the entry in the heap finds out when it is due.
            due = connection.next_timer()
            if due is not None and due < watcher.scheduled - TIMER_GRANULARITY:
                self._schedule(watcher, time.monotonic())
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
            when, _, watcher = heapq.heappop(timers)
            if when != watcher.scheduled or not self.has(watcher):
                continue  # a stale entry (it was brought forward), or it ended meanwhile
            reason = watcher.connection.run_timers()
            if reason is not None:
                self._end(watcher, reason)
                continue
            self._schedule(watcher, now)

    def _schedule(self, watcher: _TunnelSocket, now: float) -> None:
        if not self.has(watcher):
            return  # (it ended as it was adopted)
        due = watcher.connection.next_timer()
        if due is None:  # no timer now (one may start later: a PING once the peer's SETTINGS came)
            due = now + _NO_TIMER_RECHECK
        watcher.scheduled = when = max(due, now + TIMER_GRANULARITY)
        heapq.heappush(self._timers, (when, next(self._order), watcher))

    def stop(self) -> None:
        """(Loop, as it stops.) Each tunnel gets its reader and writer threads again."""
        with self._lock:
            self._stopped = True
            adopted, self._adopted = self._adopted, []
        for watcher in list(self._tunnels.values()):
            self._front.unwatch_socket(watcher.connection.sock)
            adopted.append(watcher)
        self._tunnels.clear()
        self._timers.clear()
        for watcher in adopted:
            watcher.connection.read_in_thread()

    def _end(self, watcher: _TunnelSocket, reason: Optional[str]) -> None:
        self._tunnels.pop(id(watcher.connection), None)
        self._front.unwatch_socket(watcher.connection.sock)
        watcher.connection.end_reading(reason or "connection closed")
