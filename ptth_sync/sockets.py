"""Closing sockets politely, and naming their peers."""

from __future__ import annotations

import select
import socket
import time

__all__ = ["linger_close", "peer_name", "shutdown"]


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
