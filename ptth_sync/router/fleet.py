"""The router's worker processes: who holds how many tunnels, in memory they share.

Tunnels live in the process that accepted them, and every worker process
inherits the same tunnel and HTTP listeners. So that each process has tunnels
to proxy through, a worker takes a new tunnel only when it holds no more than
any other (the others leave it a moment to, with ``--workers`` above 1), and a
worker with no tunnel takes no public connection while another worker has one.
The counts sit in shared memory made before gunicorn forks its workers.

A worker that stops (a reload, SIGTERM to it) hands its tunnels over: it
leaves the counts at once, and the workers that stay, or the fresh ones,
expect the backends' tunnels within :data:`HANDOVER_WAIT` seconds; a request
that finds no tunnel meanwhile waits for one instead of getting a ``503`` (the
tunnels are live all along, in the worker that is stopping).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Optional

from ..siblings import process_alive

__all__ = ["HANDOVER_WAIT", "WorkerFleet"]

#: How long, after a worker let its tunnels go, a request with no tunnel waits for them to come back (seconds):
#: backends dial again at once when asked, 0.1 s after a tunnel broke.
HANDOVER_WAIT = 5.0


class WorkerFleet:
    """Per-worker tunnel counts shared by the router's processes.

    ``spread``: there are several workers at a time (``--workers`` above 1),
    and new tunnels go to the one holding the fewest.
    """

    def __init__(self, slots: int, spread: bool = True) -> None:
        self._pids = multiprocessing.RawArray("q", slots)
        self._counts = multiprocessing.RawArray("i", slots)
        self._leaving = multiprocessing.RawArray("b", slots)  # the worker handed its tunnels over
        self._handover_until = multiprocessing.RawValue("d", 0.0)  # time.monotonic(): one clock for all
        self._lock = multiprocessing.Lock()
        self.spread = spread
        self.slot: Optional[int] = None

    def join(self) -> None:
        """Claim a slot for this (worker) process: a free one, or one of a worker that died."""
        with self._lock:
            for index, pid in enumerate(self._pids):
                if pid == 0 or not process_alive(pid):
                    self._pids[index] = os.getpid()
                    self._counts[index] = 0
                    self._leaving[index] = 0
                    self.slot = index
                    return
        msg = "no free worker slot"
        raise RuntimeError(msg)

    def leave(self, handing_over: bool) -> None:
        """This worker stops: its tunnels no longer count for the others; ``handing_over``: it had some, and
        their backends were asked to dial again (the other workers expect them)."""
        with self._lock:
            if self.slot is not None:
                self._leaving[self.slot] = 1
            if handing_over:
                self._handover_until.value = max(self._handover_until.value, time.monotonic() + HANDOVER_WAIT)

    def retire(self, pid: int) -> None:
        """(The master.) Worker ``pid`` exited: free its slot.

        (One that died holding tunnels took them with it: until their backends
        dial again there is no live tunnel, and ``--tunnel-wait`` applies.)
        """
        with self._lock:
            for index, slot_pid in enumerate(self._pids):
                if slot_pid == pid:
                    self._pids[index] = 0
                    self._counts[index] = 0
                    self._leaving[index] = 0

    def handover_left(self) -> float:
        """Seconds a request with no tunnel should still wait for handed-over tunnels (0: none are expected)."""
        return max(self._handover_until.value - time.monotonic(), 0.0)

    def tunnel_added(self) -> None:
        self._change(1)

    def tunnel_removed(self) -> None:
        self._change(-1)

    def _change(self, delta: int) -> None:
        if self.slot is not None:
            with self._lock:
                self._counts[self.slot] += delta

    def _live_counts(self) -> list:
        return [count for pid, count, leaving in zip(self._pids, self._counts, self._leaving)
                if pid and not leaving and process_alive(pid)]

    def total(self) -> int:
        """Tunnels held by all live workers."""
        return sum(self._live_counts())

    def least_loaded(self) -> bool:
        """True when this worker holds no more tunnels than any other live worker."""
        if self.slot is None:
            return True
        mine = self._counts[self.slot]
        return all(mine <= count for count in self._live_counts())

