"""Several router worker processes: who holds how many tunnels, in memory they share.

Tunnels live in the process that accepted them, and every worker process
inherits the same tunnel and HTTP listeners. So that each process has tunnels
to proxy through, a worker takes a new tunnel only when it holds no more than
any other (the others leave it a moment to), and a worker with no tunnel takes
no public connection while another worker has one. The counts sit in shared
memory made before gunicorn forks its workers.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Optional

__all__ = ["WorkerFleet"]


class WorkerFleet:
    """Per-worker tunnel counts shared by the router's processes."""

    def __init__(self, slots: int) -> None:
        self._pids = multiprocessing.RawArray("q", slots)
        self._counts = multiprocessing.RawArray("i", slots)
        self._lock = multiprocessing.Lock()
        self.slot: Optional[int] = None

    def join(self) -> None:
        """Claim a slot for this (worker) process: a free one, or one of a worker that died."""
        with self._lock:
            for index, pid in enumerate(self._pids):
                if pid == 0 or not _alive(pid):
                    self._pids[index] = os.getpid()
                    self._counts[index] = 0
                    self.slot = index
                    return
        msg = "no free worker slot"
        raise RuntimeError(msg)

    def tunnel_added(self) -> None:
        self._change(1)

    def tunnel_removed(self) -> None:
        self._change(-1)

    def _change(self, delta: int) -> None:
        if self.slot is not None:
            with self._lock:
                self._counts[self.slot] += delta

    def _live_counts(self) -> list:
        return [count for pid, count in zip(self._pids, self._counts) if pid and _alive(pid)]

    def total(self) -> int:
        """Tunnels held by all live workers."""
        return sum(self._live_counts())

    def least_loaded(self) -> bool:
        """True when this worker holds no more tunnels than any other live worker."""
        if self.slot is None:
            return True
        mine = self._counts[self.slot]
        return all(mine <= count for count in self._live_counts())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Defensive: someone else's process reuses the pid
        return False
    return True
