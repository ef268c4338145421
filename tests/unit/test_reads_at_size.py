"""Reads copied out at the size that came, through a few spare buffers shared by every thread."""

from __future__ import annotations

import socket

from ptth_sync import sockets
from ptth_sync.sockets import recv_at_size


def test_a_read_returns_bytes_of_exactly_what_came():
    left, right = socket.socketpair()
    try:
        left.sendall(b"frames")
        data = recv_at_size(right, 256 * 1024)
        assert data == b"frames"
        assert type(data) is bytes
        left.sendall(b"x" * 100_000)
        got = b""
        while len(got) < 100_000:
            got += recv_at_size(right, 256 * 1024)
        assert got == b"x" * 100_000
    finally:
        left.close()
        right.close()


class _NestedReads:
    """A socket whose every read first reads ``depth`` more: each level holds a buffer meanwhile."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def recv_into(self, buffer: bytearray, size: int, flags: int = 0) -> int:
        if self.depth:
            self.depth -= 1
            recv_at_size(self, size)  # type: ignore[arg-type]
        buffer[:2] = b"ok"
        return 2


def test_threads_reading_at_once_leave_a_few_spare_buffers_not_one_each():
    # (A router gives each of its tunnels a reader thread as it stops: one 256 KiB buffer kept per
    # thread would cost 256 MiB for 1,000 tunnels.)
    assert recv_at_size(_NestedReads(20), 256 * 1024) == b"ok"  # type: ignore[arg-type]
    assert 1 <= len(sockets._spare_buffers) <= sockets._SPARE_BUFFERS
