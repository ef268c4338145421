"""The reader: receive, feed h2 under the state lock, dispatch, wake; and the peer's timers.

Exactly one reader per connection calls ``recv``: a thread of its own
(:meth:`ReaderLoop._read_loop`), or the caller's event loop, which calls
:meth:`ReaderLoop._receive_available` when the socket is readable and the
timers when due. It never sends on a socket that could block and never waits
for the write lock: what a batch of frames asks back goes out only if the
socket takes it at once, else the writer thread sends it
(:mod:`~ptth_sync.engine.outbox`). Streams' listeners run on the reader,
after the state lock is released.

Reading. The reader asks the socket for the rest of a large DATA frame
exactly, so the payload arrives in blocks of its own that reach the stream's
consumer as they are (``_FrameBuffer``); small frames are read in large
blocks.

Death. When the connection fails, for whatever reason, every waiting thread
is woken at once with :class:`~ptth_sync.errors.ConnectionClosed`; the reader
closes the socket and calls ``on_close`` exactly once.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from typing import List, Optional, Set

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from ..sockets import linger_close, recv_at_size
from ..waiting import release
from .events import EventDispatch
from .stream import Stream

__all__ = ["ReaderLoop"]

log = logging.getLogger("ptth_sync.connection")

#: Bytes one driven read takes in at most before the caller's other sockets get their turn.
_DRIVEN_BUDGET = 1 << 20


class ReaderLoop(EventDispatch):
    """The reader thread's loop (:meth:`_read_loop`), the settings and PING timers, and the listeners' calls."""

    def _read_loop(self) -> None:
        reason = "connection closed"
        try:
            reason = self._receive_until_closed()
        except Exception as exc:  # Defensive: a bug must not leave the tunnel half alive
            log.exception("tunnel %s: unexpected error in the reader", self.name)
            reason = f"internal error: {exc!r}"
        finally:
            self._end_reading(reason)

    def _end_reading(self, reason: str, final_send_may_block: bool = True) -> None:
        """The reading is over: fail what is left, close the socket, call ``on_close`` (once)."""
        with self._lock:
            self._fail(reason)
            reason = self._error.reason if self._error is not None else reason
            listening = [stream for stream in self._streams.values() if stream.listener is not None]
        for stream in listening:
            self._notify(stream)
        if final_send_may_block:
            self._outbox.send_final_bytes()
        else:
            self._outbox.send_without_blocking()
        linger_close(self.sock)
        self.close_reason = reason
        self._closed.set()
        self._ready.set()  # wakes wait_ready(); `ready` stays False once dead
        if self._on_close is not None:
            try:
                self._on_close(self, reason)
            except Exception:  # Defensive: a callback bug must not kill the reader silently
                log.exception("tunnel %s: on_close callback failed", self.name)

    def _receive_until_closed(self) -> str:
        sock = self.sock
        recv_size = self.settings.recv_size
        next_read = self._h2.incoming_buffer.next_read
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes already
        self._last_received = time.monotonic()
        early, self._initial_data = self._initial_data, b""  # read before we started (a handshake)
        while True:
            data, early = early, b""
            if not data:
                if not (pending is not None and pending()):
                    while not poller.poll(self._poll_timeout_ms()):
                        reason = self._on_quiet()
                        if reason is not None:
                            return reason
                try:
                    data = self._receive(next_read(recv_size))
                except ssl.SSLWantReadError:
                    continue  # a partial TLS record: poll again
                except OSError as exc:
                    return self._read_failure(exc)
            reason = self._take_in(data)
            if reason is not None:
                return reason

    def _receive(self, wanted: int, flags: int = 0) -> bytes:
        """Read up to ``wanted`` bytes: a TLS channel's next record (it never blocks mid-record); the rest
        of a large DATA frame, or the header after one, as it comes; else what is there, kept at its size."""
        if self._tls_receive is not None:
            return self._tls_receive(wanted)
        if wanted == self.settings.recv_size:
            return recv_at_size(self.sock, wanted, flags)
        return self.sock.recv(wanted, flags)  # type: ignore[no-any-return]

    def _receive_available(self) -> Optional[str]:
        """Driven reading: take in what the socket holds now, without blocking; the reason it ended, if it did.

        Stops once a ``recv`` returns less than it asked for (the socket is
        most likely empty: the caller's selector says when more comes), or
        after ``_DRIVEN_BUDGET`` bytes, to leave the caller's other sockets their turn.
        """
        try:
            early, self._initial_data = self._initial_data, b""
            if early:
                reason = self._take_in(early)
                if reason is not None:
                    return reason
            recv_size = self.settings.recv_size
            next_read = self._h2.incoming_buffer.next_read
            # A TLS channel: decrypts a record at a time, and raises SSLWantReadError when no whole one
            # is here; it is read until then, since what it holds already the selector does not see.
            tls_receive = self._tls_receive
            budget = _DRIVEN_BUDGET
            while budget > 0:
                wanted = next_read(recv_size)
                try:
                    data = self._receive(wanted, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                    return None
                except OSError as exc:
                    return self._read_failure(exc)
                reason = self._take_in(data)
                if reason is not None:
                    return reason
                if len(data) < wanted and tls_receive is None:
                    return None
                budget -= len(data)
            return None
        except Exception as exc:  # Defensive: a bug must not leave the tunnel half alive
            log.exception("tunnel %s: unexpected error in the reader", self.name)
            return f"internal error: {exc!r}"

    def _read_failure(self, exc: OSError) -> str:
        """Why the connection ends when ``recv`` failed: its own failure first (a close shuts the socket down)."""
        return self._error.reason if self._error is not None else f"read failed: {exc}"

    def _take_in(self, data: bytes) -> Optional[str]:
        """Feed received bytes to h2 and act on the events; the reason the connection ends, if it does."""
        if not data:
            if self._error is not None:
                return self._error.reason
            return "peer closed the connection"
        if not self.first_bytes:
            self.first_bytes = bytes(data[:256])
        self._last_received = time.monotonic()
        outbox = self._outbox
        new_requests: List[Stream] = []
        became_ready = False
        with self._lock:
            if self._error is not None:
                return self._error.reason
            try:
                events = self._h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                outbox.queue_output()  # the GOAWAY h2 prepared
                return f"protocol error from peer: {_describe(exc)}"
            abuse = self._limits.check(events, self._h2.incoming_buffer)
            if abuse is not None:
                code = ErrorCodes.FRAME_SIZE_ERROR if "overlong frame" in abuse else ErrorCodes.ENHANCE_YOUR_CALM
                self._goaway_locked(code, abuse)
                return abuse
            ended = None
            wake: Set[Stream] = set()
            for event in events:
                ended = self._dispatch(event, new_requests, wake)
                if isinstance(event, h2.events.RemoteSettingsChanged) and not self._ready.is_set():
                    became_ready = True
                if ended is not None:
                    break
            # Wake each stream once per batch, after the lock is released.
            to_wake: List[threading.Lock] = []
            listening: List[Stream] = []
            for stream in wake:
                if stream._waiting:
                    to_wake += stream._waiting.take()
                if stream.listener is not None:
                    listening.append(stream)
            if self._slots_freed != 0 and self._capacity_waiting:
                to_wake += self._capacity_waiting.take(self._slots_freed)
            self._slots_freed = 0
            outbox.queue_output()
            if outbox.buffers and outbox.queued_bytes - outbox.attempted_bytes > self.settings.max_unsent_bytes:
                ended = ended or "peer does not read what we send"
        release(to_wake)
        for stream in listening:
            self._notify(stream)
        if outbox.buffers:
            outbox.send_without_blocking()
        if ended is not None:
            return ended
        if self._h2.goaway_notice is not None and self.goaway_notice is None:
            self.goaway_notice = self._h2.goaway_notice
            if self._on_goaway_notice is not None:
                self._on_goaway_notice(self)
        if became_ready:
            self.was_ready = True
            self._ready.set()
            if self._on_ready is not None:
                self._on_ready(self)
        if self._on_request is not None:
            for stream in new_requests:
                self._on_request(stream)
        return None

    def _notify(self, stream: Stream) -> None:
        """Call a stream's listener (reader thread, no lock held); its failure ends that stream only."""
        listener = stream.listener  # (once: its owner may drop it meanwhile, from another thread)
        if listener is None:
            return
        try:
            listener(stream)
        except Exception:  # Defensive: a listener bug must not take the tunnel down
            log.exception("tunnel %s: stream %d: listener failed", self.name, stream.id)
            stream.listener = None
            self._close_stream(stream, ErrorCodes.INTERNAL_ERROR, force_reset=False)

    def _poll_timeout_ms(self) -> int:
        """How long the reader may wait for bytes before a timer is due."""
        due = self._timer_due()
        if due is None:
            return -1
        return max(int((due - time.monotonic()) * 1000) + 1, 0)

    def _timer_due(self) -> Optional[float]:
        """When the next timer (SETTINGS deadline, PING, PING deadline) is due; None: no timer."""
        s = self.settings
        if not self._ready.is_set():
            if s.settings_timeout <= 0:
                return None
            return self._started_at + s.settings_timeout
        if self._ping_sent_at is not None:
            return self._ping_sent_at + s.ping_timeout
        if s.ping_interval > 0:
            return self._last_received + s.ping_interval
        return None

    def _on_quiet(self) -> Optional[str]:
        """The peer said nothing for a while: PING it, or give up on it."""
        s = self.settings
        now = time.monotonic()
        if not self._ready.is_set():
            if 0 < s.settings_timeout <= now - self._started_at:
                return f"peer sent no HTTP/2 SETTINGS within {s.settings_timeout:g}s"
            return None
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= s.ping_timeout:
                return f"no answer to PING within {s.ping_timeout:g}s"
            return None
        if s.ping_interval > 0 and now - self._last_received >= s.ping_interval:
            with self._lock:
                if self._error is not None:
                    return self._error.reason
                self._ping_sent_at = now
                self._h2.ping(b"ptthping")
                self._outbox.queue_output()
            self._outbox.send_without_blocking()  # (what the socket does not take: the writer, or the loop)
        return None

    def _goaway_locked(self, error_code: int, reason: str) -> None:
        try:
            self._h2.close_connection(error_code=error_code, additional_data=reason.encode()[:200])
        except h2.exceptions.ProtocolError:
            return
        self._outbox.queue_output()


def _describe(exc: Exception) -> str:
    """A protocol error as a sentence: h2's stream errors print as a bare stream id."""
    if isinstance(exc, h2.exceptions.StreamClosedError):
        return f"frame on stream {exc.stream_id}, which is closed"
    if isinstance(exc, h2.exceptions.NoSuchStreamError):
        return f"frame on stream {exc.stream_id}, which was never opened"
    return str(exc) or type(exc).__name__
