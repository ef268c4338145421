"""TLS for the tunnel, safe for one reading thread beside writing threads.

OpenSSL does not allow one ``SSL`` object to be used by two threads at once,
and :class:`ssl.SSLSocket` passes each ``recv`` and ``send`` straight to it:
the engine's reader thread and its writers would race inside OpenSSL. Here the
``SSLObject`` works on memory buffers under one lock, held only while
OpenSSL runs (never across socket I/O):

- ``recv`` (the reader) decrypts what is buffered, else reads the socket and
  feeds the bytes in;
- ``sendall`` (one writer at a time, serialised by the caller's write lock or
  our own) encrypts and sends. TLS records must leave in the order they were
  made, so records OpenSSL produces while *reading* (TLS 1.3 key-update
  answers, alerts) are queued and sent ahead of the next write.

It offers the small part of the socket interface the engine and the
handshake use.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Any, List, Optional, Sequence

__all__ = ["TLSChannel", "client_context", "server_context"]


class TLSChannel:
    """A TLS session over a connected socket, driven through memory BIOs."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: Optional[str] = None,
    ) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side, server_hostname)
        self._lock = threading.Lock()  # the SSLObject and both BIOs
        self._send_lock = threading.Lock()  # records leave in the order they were made
        self._unsent: List[bytes] = []  # records made while reading, for the next send
        self._eof = False
        self._starved = False  # what is buffered holds no complete record
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    # -- handshake ------------------------------------------------------------

    def do_handshake(self, timeout: float) -> None:
        """Complete the TLS handshake within ``timeout`` seconds (raises ssl.SSLError, OSError)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                with self._lock:
                    try:
                        self._ssl.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    out = self._outgoing.read()
                if out:
                    self._sock.sendall(out)
                if done:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    msg = "TLS handshake timed out"
                    raise TimeoutError(msg)
                self._sock.settimeout(remaining)
                data = self._sock.recv(65536)
                if not data:
                    msg = "peer closed the connection during the TLS handshake"
                    raise ConnectionResetError(msg)
                with self._lock:
                    self._incoming.write(data)
        finally:
            self._sock.settimeout(None)

    @property
    def raw_socket(self) -> socket.socket:
        """The TCP socket underneath."""
        return self._sock

    @property
    def selected_alpn_protocol(self) -> Optional[str]:
        return self._ssl.selected_alpn_protocol()

    def getpeercert(self) -> Any:
        return self._ssl.getpeercert()

    # -- the socket interface the engine uses ----------------------------------

    def recv(self, size: int) -> bytes:
        """Decrypted bytes, blocking as the socket does; ``b""`` at the end of the session."""
        return self._recv(size, wait=True)

    def recv_if_ready(self, size: int) -> bytes:
        """Like :meth:`recv`, but never waits for the network (the engine's reader, after poll).

        Raises :class:`ssl.SSLWantReadError` when what has arrived holds no
        complete record yet: the reader then polls again, with its timers,
        instead of blocking on a peer that stopped mid-record.
        """
        return self._recv(size, wait=False)

    def _recv(self, size: int, wait: bool) -> bytes:
        while True:
            with self._lock:
                try:
                    data = self._ssl.read(size)
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLZeroReturnError:
                    data = b""
                made = self._outgoing.read()
                if made:
                    self._unsent.append(made)
            if data is not None:
                return data
            if self._eof:
                return b""
            if not wait and not self._poller.poll(0):
                self._starved = True
                msg = "no complete TLS record yet"
                raise ssl.SSLWantReadError(msg)
            raw = self._sock.recv(max(size, 16384))
            self._starved = False
            if not raw:
                self._eof = True
                with self._lock:
                    self._incoming.write_eof()
                continue
            with self._lock:
                self._incoming.write(raw)

    def pending(self) -> bool:
        """True when bytes are already here to decrypt (so polling the socket would wait wrongly)."""
        with self._lock:
            return bool(self._ssl.pending() or (self._incoming.pending and not self._starved))

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._lock:
                self._ssl.write(data)
                records = [*self._unsent, self._outgoing.read()]
                self._unsent = []
            self._sock.sendall(b"".join(records))

    def sendall_buffers(self, buffers: Sequence[Any]) -> None:
        """``sendall`` of several buffers, in order, encrypted without joining them first."""
        with self._send_lock:
            with self._lock:
                for buffer in buffers:
                    if len(buffer):
                        self._ssl.write(buffer)
                records = [*self._unsent, self._outgoing.read()]
                self._unsent = []
            self._sock.sendall(b"".join(records))

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, value: Optional[float]) -> None:
        self._sock.settimeout(value)

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)


def server_context(certfile: str, keyfile: Optional[str] = None, ca_certs: Optional[str] = None) -> ssl.SSLContext:
    """The router's TLS context for tunnels: ALPN ``h2``; with ``ca_certs``, client certificates required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["h2"])
    if ca_certs:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(ca_certs)
    return context


def client_context(
    cafile: Optional[str] = None, certfile: Optional[str] = None, keyfile: Optional[str] = None
) -> ssl.SSLContext:
    """The backend's TLS context: verifies the router's certificate and name, offers ALPN ``h2``.

    ``cafile`` trusts a private CA instead of the system's; ``certfile`` (and
    ``keyfile``) present a client certificate for mutual TLS.
    """
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    return context
