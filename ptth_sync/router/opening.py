"""Tunnel connections before their opening is complete, held in the accept loop without threads.

A new connection on the tunnel port is a socket and a few bytes until it has
said how it opens: ``GET `` and a whole PTTH upgrade request, or anything else
(the backend's HTTP/2 SETTINGS: the plain wire). Only then does it get the
threads of a :class:`~ptth_sync.engine.Connection`. A peer silent for
``first_bytes_wait`` seconds is greeted with the HTTP/2 client preface (a
plain-wire backend may wait for it) and still holds no thread until it
answers. Every opening has a deadline (``handshake_timeout``).

A peer refused here (the plain wire where a token is required, or a TLS
ClientHello on this plain listener) is told why in HTTP/2 (the client
preface and a GOAWAY whose debug data names the fix), and stays a moment
longer, read and discarded, so that closing does not reset the connection
before it has read that.

At most ``max_pending`` connections wait at once: past that, the one that has
waited longest is closed, with a log line at most once a second. A real
backend says what it is within milliseconds, so a flood of silent or slow
connections cannot keep it out, nor take the descriptors or threads of the
established tunnels.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from typing import TYPE_CHECKING, Dict, Optional

from h2.errors import ErrorCodes

from ..engine import Connection
from ..handshake import (
    MAX_HEAD,
    PLAIN_WIRE_REFUSED,
    TOKEN_REQUIRED,
    HandshakeFailed,
    HandshakeRefused,
    accept_upgrade,
    looks_like_tls,
    refusal_preface,
)
from ..origins import ANY

if TYPE_CHECKING:
    from .app import Router

__all__ = ["PendingTunnels"]

log = logging.getLogger("ptth_sync.router")

#: Seconds of silence after which a peer is taken for a plain-wire backend waiting for our preface.
FIRST_BYTES_WAIT = 1.0
#: Seconds a refused peer has to read why before its connection is closed.
REFUSAL_LINGER = 1.0

#: Why a TLS client is refused by this plain listener (logged, and sent in the GOAWAY).
TLS_ON_PLAIN = ("it began a TLS handshake, and this tunnel listener is plain: start the backend without --tls, "
                "or give the router --certfile and --keyfile")


class _Pending:
    __slots__ = ("accepted_at", "closing_until", "connection", "peer", "received", "sock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.accepted_at = time.monotonic()
        self.received = b""
        #: Set once a silent peer was sent our preface: the connection waiting for its SETTINGS.
        self.connection: Optional[Connection] = None
        #: Set once the peer was refused and told why: when its connection is closed at the latest.
        self.closing_until: Optional[float] = None


class PendingTunnels:
    """The openings in progress on one accept loop's poller (used by that loop's thread only)."""

    def __init__(self, router: Router, poller: select.poll, max_pending: int) -> None:
        self._router = router
        self._poller = poller
        self.max_pending = max_pending
        self._pending: Dict[int, _Pending] = {}  # by descriptor, oldest first
        self._shed = 0
        self._shed_logged_at = 0.0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, fd: int) -> bool:
        return fd in self._pending

    def add(self, sock: socket.socket, peer: str) -> None:
        """A connection just accepted (non-blocking)."""
        if len(self._pending) >= self.max_pending:
            self.shed_oldest()
        pending = _Pending(sock, peer)
        self._pending[sock.fileno()] = pending
        self._poller.register(sock, select.POLLIN)

    def shed_oldest(self) -> None:
        """Close the opening that has waited longest (to free a descriptor)."""
        if self._pending:
            self._fail(next(iter(self._pending.values())), None)
            self._note_shed()

    def timeout_ms(self) -> int:
        """How long the poller may wait before a deadline is due (-1: no opening in progress)."""
        if not self._pending:
            return -1
        now = time.monotonic()
        due = min(self._due(p) for p in self._pending.values())
        return max(int((due - now) * 1000) + 1, 0)

    def _due(self, pending: _Pending) -> float:
        if pending.closing_until is not None:
            return pending.closing_until
        timeout = self._router.handshake_timeout
        if pending.connection is None and not pending.received:
            return pending.accepted_at + min(FIRST_BYTES_WAIT, timeout)
        if pending.connection is not None:  # greeted after its silence: a moment to answer, at least
            return pending.accepted_at + max(timeout, FIRST_BYTES_WAIT + 1.0)
        return pending.accepted_at + timeout

    def readable(self, fd: int) -> None:
        pending = self._pending[fd]
        try:
            data = pending.sock.recv(MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(pending, None if pending.closing_until is not None else f"read failed: {exc}", "network")
            return
        if pending.closing_until is not None:  # refused: discard what it sends until it closes
            if not data:
                self._fail(pending, None)
            return
        if not data:
            self._fail(pending, "peer closed the connection before its opening", "network")
            return
        if pending.connection is not None:  # the answer to our preface: HTTP/2 from here on
            if data[:1] != b"\x00":  # not the SETTINGS frame a plain-wire backend opens with: no threads for it
                late_upgrade = data[:4] == b"GET "
                self._fail(pending, "sent an upgrade request only after the router had waited "
                           f"{FIRST_BYTES_WAIT:g}s and greeted it as a plain-wire backend (a backend sends its "
                           "upgrade at once)" if late_upgrade else
                           f"answered the router's HTTP/2 preface with bytes that are not HTTP/2 ({data[:16]!r})",
                           "bad_request")
                return
            self._forget(pending)
            pending.sock.setblocking(True)
            self._router.start_connection(pending.connection, data)
            return
        pending.received += data
        received = pending.received
        if received == b"\x16":
            return  # perhaps a TLS record: its next byte tells
        if looks_like_tls(received):
            self._refuse(pending, TLS_ON_PLAIN, refusal_preface(TLS_ON_PLAIN, ErrorCodes.PROTOCOL_ERROR), "tls")
        elif received[: min(len(received), 4)] != b"GET "[: min(len(received), 4)]:
            self._plain_wire(pending)  # the backend's SETTINGS: the plain wire
        elif b"\r\n\r\n" in received or len(received) > MAX_HEAD:
            self._upgrade(pending)

    def expire(self) -> None:
        """Act on the deadlines that are due: greet silent peers, drop late ones."""
        now = time.monotonic()
        for pending in list(self._pending.values()):
            if self._due(pending) > now:
                continue
            if pending.closing_until is not None:
                self._fail(pending, None)
            elif pending.connection is None and not pending.received:
                self._greet(pending)
            elif pending.connection is not None:
                waited = self._due(pending) - pending.accepted_at
                self._fail(pending, f"peer sent no HTTP/2 SETTINGS within {waited:g}s", "timeout")
            else:
                self._fail(pending, f"no complete upgrade request within {self._router.handshake_timeout:g}s",
                           "timeout")

    def close_all(self) -> None:
        for pending in list(self._pending.values()):
            self._fail(pending, None)

    # -- outcomes ---------------------------------------------------------------------

    def _plain_wire(self, pending: _Pending) -> None:
        router = self._router
        if router.access.required:
            self._refuse(pending, PLAIN_WIRE_REFUSED, refusal_preface(TOKEN_REQUIRED), "unauthorized")
            return
        self._forget(pending)
        pending.sock.setblocking(True)
        router.start_tunnel(pending.sock, pending.received, ANY)

    def _upgrade(self, pending: _Pending) -> None:
        """A whole upgrade request is in: answer it (the socket takes a short answer at once)."""
        router = self._router
        self._forget(pending)
        sock = pending.sock
        sock.settimeout(1.0)  # everything is read; only the answer is written
        try:
            initial_data, origin = accept_upgrade(sock, router.access, router.handshake_timeout,
                                                  received=pending.received)
        except HandshakeRefused as exc:
            log.warning("Tunnel from %s refused: %s", pending.peer, exc.reason)
            router.metrics.opening_failed("unauthorized" if exc.status == 401 else "forbidden")
            self._close(pending)
            return
        except (HandshakeFailed, OSError) as exc:
            log.warning("Tunnel from %s failed to open: %s", pending.peer, exc)
            router.metrics.opening_failed("bad_request" if isinstance(exc, HandshakeFailed) else "network")
            self._close(pending)
            return
        sock.settimeout(None)
        router.start_tunnel(sock, initial_data, origin or ANY)

    def _greet(self, pending: _Pending) -> None:
        """A silent peer: send our preface, and keep waiting (without threads) for its SETTINGS."""
        if self._router.access.required:
            self._refuse(pending, PLAIN_WIRE_REFUSED, refusal_preface(TOKEN_REQUIRED), "unauthorized")
            return
        connection = self._router.start_tunnel(pending.sock, b"", ANY, start=False)
        if connection is None:
            self._forget(pending)
            return
        pending.connection = connection
        connection.prepare()
        connection.send_prepared()

    def _refuse(self, pending: _Pending, reason: str, answer: bytes, category: str) -> None:
        """Log why, tell the peer (``answer``), and close once it has read that or :data:`REFUSAL_LINGER` passed."""
        log.warning("Tunnel from %s refused: %s", pending.peer, reason)
        self._router.metrics.opening_failed(category)
        try:
            pending.sock.send(answer)  # a few hundred bytes: an empty send buffer takes them at once
            pending.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._fail(pending, None)
            return
        pending.closing_until = time.monotonic() + REFUSAL_LINGER

    def _fail(self, pending: _Pending, reason: Optional[str], category: str = "timeout") -> None:
        """Drop an opening; ``reason`` None: shed (logged in bulk) or the router closed."""
        self._forget(pending)
        if reason is not None:
            log.warning("Tunnel from %s failed to open: %s", pending.peer, reason)
            self._router.metrics.opening_failed(category)
        if pending.connection is not None:
            self._router.discard_unstarted(pending.connection)
        self._close(pending)

    def _note_shed(self) -> None:
        self._shed += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= 1.0:
            log.warning("Shedding tunnel connections still opening (limit %d): %d closed to make room",
                        self.max_pending, self._shed)
            self._shed_logged_at = now
            self._shed = 0

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        try:
            self._poller.unregister(pending.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _close(self, pending: _Pending) -> None:
        if self._router.fleet is not None:
            self._router.fleet.tunnel_removed()
        try:
            pending.sock.close()
        except OSError:
            pass
