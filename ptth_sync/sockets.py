"""Writing buffers without joining them, closing sockets politely, and naming their peers."""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import Any, Callable, List, Sequence

__all__ = ["IOV_MAX", "linger_close", "peer_name", "read_record", "recv_at_size", "recv_without_blocking",
           "send_without_blocking", "sendall_buffers", "shutdown", "unsent"]

#: Buffers handed to one vectored write (Linux and the BSDs take up to 1024).
IOV_MAX = 1024
#: Bytes joined for one TLS write at most (an ssl.SSLSocket has no ``sendmsg``).
_TLS_WRITE = 256 * 1024


# The most plaintext one TLS record carries (RFC 8446 §5.1), so the most one read of a TLS socket or
# SSLObject returns: asking for more makes it allocate all that was asked, then shrink it to the record,
# a MiB-sized block per record that leaves the heap in pieces (a backend reading its TLS tunnel so grew
# from 31 to over 150 MiB under a steady load of small POSTs).
TLS_RECORD = 16384
# Buffers that reads land in before they are copied out at the size that came (read_record,
# recv_at_size): taken for one read and given back, so that a few serve every thread; a thread
# that finds none makes one, and one given back when enough are spare is dropped.
_spare_buffers: List[bytearray] = []
_SPARE_BUFFERS = 4


def _read_at_size(read_into: Callable[[bytearray], int], size: int) -> bytes:
    """What ``read_into(buffer)`` puts in a spare buffer of ``size`` bytes or more, copied out at its size."""
    try:
        buffer = _spare_buffers.pop()  # (pop and append are atomic: no lock)
    except IndexError:
        buffer = bytearray(size)
    if len(buffer) < size:
        buffer = bytearray(size)
    try:
        count = read_into(buffer)
        with memoryview(buffer) as view:
            return bytes(view[:count])
    finally:
        if len(_spare_buffers) < _SPARE_BUFFERS:
            _spare_buffers.append(buffer)


def read_record(tls: Any, size: int) -> bytes:
    """At most one TLS record's plaintext (and at most ``size`` bytes) from an SSLObject or SSLSocket.

    The record lands first in a spare buffer, then is copied out at its
    exact size: ``read(n)`` allocates ``n`` bytes and shrinks them to what
    came, and even 16 KiB so allocated and shrunk, record after record, left
    a thread's malloc arena in pieces (a backend taking small uploads over a
    TLS tunnel: 11 -> 16 MB in two minutes, most of it free; read so, it
    stays at about 2 MB). Raises what ``read`` raises.
    """
    size = min(size, TLS_RECORD)
    if isinstance(tls, ssl.SSLSocket):
        return _read_at_size(lambda buffer: tls.recv_into(buffer, size), size)
    return _read_at_size(lambda buffer: tls.read(size, buffer), size)


def recv_at_size(sock: socket.socket, size: int, flags: int = 0) -> bytes:
    """``sock.recv(size, flags)``, but the bytes returned are allocated at the size that came.

    ``recv(size)`` allocates ``size`` bytes and shrinks them to what came; a
    tunnel's reader asking for 256 KiB and getting a few frames, read after
    read, left its thread's malloc arena in pieces the same way (see
    :func:`read_record`). For a socket that has something to read (a
    buffer is held for the call). Raises what ``recv`` raises.
    """
    return _read_at_size(lambda buffer: sock.recv_into(buffer, size, flags), size)


def send_without_blocking(sock: Any, pending: Sequence[Any]) -> int:
    """Send from the front of ``pending`` what a non-blocking client socket takes now: the count sent.

    Raises what would block (for an :class:`ssl.SSLSocket`, SSLWantWriteError
    or SSLWantReadError). A TLS socket gets the first buffers joined, up to
    256 KiB. OpenSSL asks that a write it could not finish be tried again
    with the same bytes: callers keep ``pending`` as it was, only growing at
    its end, until something is sent, so the next try starts with them again.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return sock.sendmsg(pending[:IOV_MAX], (), socket.MSG_DONTWAIT)  # type: ignore[no-any-return]
    size = 0
    count = 0
    for piece in pending:
        size += len(piece)
        count += 1
        if size >= _TLS_WRITE:
            break
    data = pending[0] if count == 1 else b"".join(pending[:count])
    return sock.send(data)  # (non-blocking: the callers' sockets are)


def recv_without_blocking(sock: Any, size: int) -> bytes:
    """Up to ``size`` bytes from a non-blocking client socket now; b"" at its end; raises what would block."""
    if isinstance(sock, ssl.SSLSocket):
        return read_record(sock, size)
    return sock.recv(size, socket.MSG_DONTWAIT)  # type: ignore[no-any-return]


def sendall_buffers(sock: Any, buffers: Sequence[Any]) -> None:
    """``sendall`` of several buffers in order, without joining them first.

    A plain socket gets vectored writes (``sendmsg``); anything else (a
    :class:`~ptth_sync.tls.TLSChannel`) its own ``sendall_buffers`` if it has
    one, else ``sendall`` of the joined bytes.
    """
    if len(buffers) == 1:
        sock.sendall(buffers[0])
        return
    if not isinstance(sock, socket.socket):
        send_many = getattr(sock, "sendall_buffers", None)
        if send_many is not None:
            send_many(buffers)
        else:
            sock.sendall(b"".join(buffers))
        return
    pending = list(buffers)
    while pending:
        sent = sock.sendmsg(pending[:IOV_MAX])
        pending = unsent(pending, sent)


def unsent(buffers: Sequence[Any], sent: int) -> List[Any]:
    """What remains of ``buffers`` once their first ``sent`` bytes are gone (no copying)."""
    for index, buffer in enumerate(buffers):
        size = len(buffer)
        if sent < size:
            rest = list(buffers[index:])
            if sent:
                rest[0] = memoryview(buffer)[sent:]
            return rest
        sent -= size
    return []


def linger_close(sock: socket.socket, seconds: float = 0.25, limit: int = 1024 * 1024) -> None:
    """Close after the peer has had a moment to read our last bytes (a GOAWAY).

    Closing with unread input makes the kernel reset the connection and drop
    what we sent but the peer has not read yet; so stop writing, read and
    discard for a moment, then close.
    """
    sock = getattr(sock, "raw_socket", sock)  # under TLS, discard raw bytes: decrypting could block
    try:
        sock.shutdown(socket.SHUT_WR)
        poller = select.poll()  # not select(): a router with many tunnels has descriptors past 1024
        poller.register(sock, select.POLLIN)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(int(remaining * 1000) + 1):
                break
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except (OSError, ValueError):
        pass
    shutdown(sock)
    try:
        sock.close()
    except OSError:  # Defensive
        pass


def shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer) or "?"
