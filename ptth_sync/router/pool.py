"""The router's live tunnels, grouped by the origin they serve, chosen round-robin within it."""

from __future__ import annotations

import collections
import threading
import time
from typing import Collection, Deque, Dict, List, Optional

from ..engine import Connection
from ..origins import ANY

__all__ = ["TunnelPool"]


class _Group:
    """The tunnels of one origin, in the order they arrived, and the requests waiting for one."""

    __slots__ = ("next", "tunnels", "waiting")

    def __init__(self) -> None:
        self.tunnels: List[Connection] = []
        self.next = 0
        self.waiting: Deque[object] = collections.deque()


class TunnelPool:
    """Live tunnels by origin; :meth:`choose` walks an origin's tunnels round-robin.

    Tunnels registered for no origin (``*``, or the plain wire) form the
    default pool, which serves every host no origin claims. A tunnel is added
    once its backend's SETTINGS arrived (so its stream limit is known) and
    removed the moment its connection dies. An origin, once seen, stays known
    while the router runs, with or without tunnels.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._groups: Dict[str, _Group] = {ANY: _Group()}
        self._origin_of: Dict[int, str] = {}

    def add(self, tunnel: Connection, origin: str = ANY) -> None:
        with self._cond:
            group = self._groups.get(origin)
            if group is None:
                group = self._groups[origin] = _Group()
            group.tunnels.append(tunnel)
            self._origin_of[id(tunnel)] = origin
            self._cond.notify_all()

    def remove(self, tunnel: Connection) -> bool:
        """Forget ``tunnel``; False when it was not in the pool."""
        with self._cond:
            origin = self._origin_of.pop(id(tunnel), None)
            if origin is None:
                return False
            group = self._groups[origin]
            index = group.tunnels.index(tunnel)
            del group.tunnels[index]
            if index < group.next:
                group.next -= 1
            return True

    def __len__(self) -> int:
        return len(self._origin_of)

    def tunnels(self, origin: Optional[str] = None) -> List[Connection]:
        """A snapshot of the tunnels of ``origin``, or of all of them."""
        with self._cond:
            if origin is not None:
                group = self._groups.get(origin)
                return list(group.tunnels) if group is not None else []
            return [tunnel for group in self._groups.values() for tunnel in group.tunnels]

    def origin_of(self, tunnel: Connection) -> Optional[str]:
        """The origin ``tunnel`` serves (``*`` for the default pool); None when not in the pool."""
        return self._origin_of.get(id(tunnel))

    def origins(self) -> Dict[str, int]:
        """Every origin seen (``*`` included) and how many tunnels serve it now."""
        with self._cond:
            return {origin: len(group.tunnels) for origin, group in self._groups.items()}

    @property
    def has_origins(self) -> bool:
        """True once a tunnel registered for a named origin: requests must then be routed by host."""
        return len(self._groups) > 1

    def waiting(self, origin: str = ANY) -> int:
        """How many requests wait for a tunnel of ``origin``."""
        group = self._groups.get(origin)
        return len(group.waiting) if group is not None else 0

    def knows(self, origin: str) -> bool:
        """True when tunnels have registered for ``origin`` (they may all be gone now)."""
        return origin in self._groups

    def choose(
        self, exclude: Collection[Connection] = (), wait: float = 0.0, origin: str = ANY
    ) -> Optional[Connection]:
        """The next tunnel of ``origin`` that accepts streams, skipping ``exclude``.

        Waits up to ``wait`` seconds for one to appear; None when none did.
        Requests that wait are given tunnels in the order they arrived, and a
        newcomer does not overtake them.
        """
        deadline = time.monotonic() + wait
        with self._cond:
            group = self._groups.get(origin)
            if group is None:
                group = self._groups[ANY]
            if wait <= 0 or not group.waiting:
                tunnel = self._pick(group, exclude)
                if tunnel is not None or wait <= 0:
                    return tunnel
            ticket = object()
            group.waiting.append(ticket)
            try:
                while True:
                    if group.waiting[0] is ticket:
                        tunnel = self._pick(group, exclude)
                        if tunnel is not None:
                            return tunnel
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
            finally:
                group.waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may go

    @staticmethod
    def _pick(group: _Group, exclude: Collection[Connection]) -> Optional[Connection]:
        """Round-robin over the group's tunnels that accept streams (lock held)."""
        tunnels = group.tunnels
        count = len(tunnels)
        for step in range(count):
            index = (group.next + step) % count
            tunnel = tunnels[index]
            if tunnel.accepting_streams and tunnel not in exclude:
                group.next = index + 1
                return tunnel
        return None

    def notify(self) -> None:
        """Wake :meth:`choose` callers: a tunnel may accept streams again."""
        with self._cond:
            self._cond.notify_all()
