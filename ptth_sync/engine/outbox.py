"""The ordered outbox: a connection's pending output in wire order, and who sends it.

HPACK state makes wire order matter, so the bytes h2 produces are appended to
the outbox while the connection's state lock is still held (production
order). A large DATA payload is queued as the very object the sender passed
(or a memoryview slice of it) behind its 9-byte frame header, and the outbox
goes out in vectored writes: nothing copies it on the way
(:class:`~ptth_sync.engine.h2compat._H2Connection`). Whoever holds the write
lock takes the whole outbox under the state lock and sends it, and keeps
doing so until the outbox is empty; one sender at a time keeps the order. A
user thread that finds another one sending leaves its bytes to it and goes on
(no hand-off, no waiting on the hot path), unless the outbox is past its
high-water mark: then it waits its turn, which bounds memory. The reader
never waits for the write lock and sends only what the socket takes at once;
it leaves the rest to the writer thread (or, without one, to the caller's
event loop, told through ``on_unsent``). A blocked ``sendall`` therefore never
stops the reader, which keeps draining the peer's data and window updates.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, List, Optional, cast

from ..sockets import IOV_MAX as _IOV_MAX
from ..sockets import sendall_buffers, shutdown, unsent
from ..waiting import WaitQueue, release

__all__ = ["Outbox"]

# Past this many queued bytes a DATA sender waits to write instead of queueing more.
_OUTBOX_HIGH_WATER = 1024 * 1024


class Outbox:
    """A connection's queued output, its write lock and its writer thread's loop.

    ``lock`` is the connection's state lock: it guards :attr:`buffers` and the
    byte counts. ``take_output`` returns h2's pending output as buffers in
    order; ``fail(reason)`` (called with the state lock held) marks the
    connection dead when a write fails.
    """

    def __init__(
        self,
        sock: socket.socket,
        lock: threading.Lock,
        take_output: Callable[[], List[Any]],
        fail: Callable[[str], None],
    ) -> None:
        self.sock = sock
        self._lock = lock
        self._take_output = take_output
        self._fail = fail
        self._can_send_nonblocking = isinstance(sock, socket.socket)
        #: A TLS channel's own non-blocking send and its waiting records (see TLSChannel.send_available).
        self._send_available: Optional[Callable[[List[Any]], int]] = getattr(sock, "send_available", None)
        self.write_lock = threading.Lock()
        self.writer_waiting = WaitQueue()
        self.buffers: List[Any] = []  # buffers (bytes, memoryviews) in wire order
        #: Bytes ever queued, and ever handed to the socket (or being handed): a stream's
        #: first byte reached the peer once ``attempted_bytes`` passed ``queued_bytes`` of then.
        self.queued_bytes = 0
        self.attempted_bytes = 0
        #: The connection failed (set under the state lock): nothing more is sent.
        self.stopped = False
        #: Set when the caller's event loop sends instead of a writer thread: called (from any thread, no
        #: lock held) when bytes the socket did not take are left and no one is sending them; the loop
        #: then calls :meth:`send_without_blocking` once the socket is writable.
        self.on_unsent: Optional[Callable[[], None]] = None

    def queue_output(self) -> None:
        """Move h2's pending output to the outbox (lock held), keeping production order."""
        segments = self._take_output()
        if segments:
            self.buffers += segments
            self.queued_bytes += sum(map(len, segments))

    @property
    def unsent(self) -> bool:
        """Bytes wait to go out: queued here, or encrypted and waiting for room in a TLS channel."""
        return bool(self.buffers) or (self._send_available is not None and cast(Any, self.sock).backlog)

    def full(self) -> bool:
        """Past the high-water mark: a DATA sender should wait its turn to write."""
        return self.queued_bytes - self.attempted_bytes > _OUTBOX_HIGH_WATER

    def stop(self) -> None:
        """The connection failed (lock held): send nothing more, let the writer thread end."""
        self.stopped = True
        release(self.writer_waiting.take())

    def flush(self, wait: bool = False) -> None:
        """Send what is queued, unless another thread is sending already: it sends ours too.

        The thread holding the write lock keeps sending until the outbox is
        empty, and gives the lock up while holding the state lock, so bytes
        appended meanwhile are never stranded. With ``wait`` the caller waits
        its turn instead: the writer thread does, and so do DATA senders once
        the outbox is past its high-water mark, which bounds its memory.
        """
        if not self.write_lock.acquire(blocking=wait):
            return
        sock = self.sock
        while True:
            with self._lock:
                outbox = self.buffers
                if not self.unsent or self.stopped:
                    self.write_lock.release()
                    return
                self.buffers = []
                self.attempted_bytes += sum(map(len, outbox))
            try:
                sendall_buffers(sock, outbox)
            except OSError as exc:
                with self._lock:
                    self._fail(f"write failed: {exc}")
                    self.write_lock.release()
                shutdown(sock)
                return

    def send_without_blocking(self) -> None:
        """Any thread: send what is queued (acknowledgements, mostly) if that cannot block.

        Saves waking the writer thread for the few bytes a batch of frames
        asks back. Only when no one else is sending, and only what the socket
        takes at once: the rest, or all of it on a TLS channel, goes to the
        writer thread (or waits for the caller's loop: :attr:`on_unsent`), so
        the caller (the reader, a listener) never waits on a write.
        """
        send_available = self._send_available
        if not self.buffers and not (send_available is not None and self.unsent):
            return  # (bytes queued later are sent by whoever queues them, or by the sender they find)
        left = False  # bytes left that no one is sending: tell the loop (no writer thread)
        if (self._can_send_nonblocking or send_available is not None) and self.write_lock.acquire(blocking=False):
            with self._lock:
                outbox = self.buffers
                self.buffers = []
                size = sum(map(len, outbox))
                self.attempted_bytes += size
            try:
                if send_available is not None:  # a TLS channel: all or nothing, its records wait there
                    sent = send_available(outbox)
                else:
                    sent = self.sock.sendmsg(outbox[:_IOV_MAX], (), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = size  # the connection is failing; the reader will hear of it
            with self._lock:
                if sent < size:
                    self.buffers[:0] = unsent(outbox, sent)
                    self.attempted_bytes -= size - sent
                # Released under the state lock, as in flush, so nothing is stranded.
                self.write_lock.release()
                left = self.unsent and not self.stopped
                waiters = self.writer_waiting.take() if left else []
        else:  # (another thread is sending: it sends these too, or leaves them as above)
            with self._lock:
                waiters = self.writer_waiting.take()
        release(waiters)
        on_unsent = self.on_unsent
        if left and on_unsent is not None:
            on_unsent()

    def kick(self) -> None:
        """Wake the writer thread."""
        with self._lock:
            waiters = self.writer_waiting.take()
        release(waiters)

    def write_loop(self) -> None:
        """The writer thread: send whatever is queued until the connection fails."""
        while True:
            with self._lock:
                while not self.unsent and not self.stopped:
                    self.writer_waiting.wait(self._lock, None)
                if self.stopped:
                    return
            self.flush(wait=True)

    def send_final_bytes(self) -> None:
        """Best effort, bounded: send what is queued (a GOAWAY) before closing."""
        if not self.write_lock.acquire(timeout=1.0):
            return
        try:
            with self._lock:
                outbox = self.buffers
                self.buffers = []
                self.attempted_bytes += sum(map(len, outbox))
            if outbox:
                self.sock.settimeout(1.0)
                sendall_buffers(self.sock, outbox)
        except OSError:
            pass
        finally:
            self.write_lock.release()
