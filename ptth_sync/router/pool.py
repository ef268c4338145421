"""The router's pool of live tunnels, chosen round-robin."""

from __future__ import annotations

import collections
import threading
import time
from typing import Collection, Deque, List, Optional

from ..connection import Connection

__all__ = ["TunnelPool"]


class TunnelPool:
    """Live tunnels in the order they arrived; :meth:`choose` walks them round-robin.

    A tunnel is added once its backend's SETTINGS arrived (so its stream limit
    is known) and removed the moment its connection dies.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tunnels: List[Connection] = []
        self._next = 0
        self._waiting: Deque[object] = collections.deque()  # requests waiting for a tunnel, in order

    def add(self, tunnel: Connection) -> None:
        with self._cond:
            self._tunnels.append(tunnel)
            self._cond.notify_all()

    def remove(self, tunnel: Connection) -> bool:
        """Forget ``tunnel``; False when it was not in the pool."""
        with self._cond:
            try:
                index = self._tunnels.index(tunnel)
            except ValueError:
                return False
            del self._tunnels[index]
            if index < self._next:
                self._next -= 1
            return True

    def __len__(self) -> int:
        return len(self._tunnels)

    def tunnels(self) -> List[Connection]:
        """A snapshot of the tunnels in the pool."""
        with self._cond:
            return list(self._tunnels)

    def choose(self, exclude: Collection[Connection] = (), wait: float = 0.0) -> Optional[Connection]:
        """The next tunnel that accepts streams, skipping ``exclude``.

        Waits up to ``wait`` seconds for one to appear; None when none did.
        Requests that wait are given tunnels in the order they arrived, and a
        newcomer does not overtake them.
        """
        deadline = time.monotonic() + wait
        with self._cond:
            if wait <= 0 or not self._waiting:
                tunnel = self._pick(exclude)
                if tunnel is not None or wait <= 0:
                    return tunnel
            ticket = object()
            self._waiting.append(ticket)
            try:
                while True:
                    if self._waiting[0] is ticket:
                        tunnel = self._pick(exclude)
                        if tunnel is not None:
                            return tunnel
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may go

    def _pick(self, exclude: Collection[Connection]) -> Optional[Connection]:
        """Round-robin over the tunnels that accept streams (lock held)."""
        tunnels = self._tunnels
        count = len(tunnels)
        for step in range(count):
            index = (self._next + step) % count
            tunnel = tunnels[index]
            if tunnel.accepting_streams and tunnel not in exclude:
                self._next = index + 1
                return tunnel
        return None

    def notify(self) -> None:
        """Wake :meth:`choose` callers: a tunnel may accept streams again."""
        with self._cond:
            self._cond.notify_all()
