"""The tunnel workers of one gunicorn master: which are up, and which have a tunnel, in memory they share.

On SIGHUP gunicorn starts the new workers, then stops the old ones at once.
A plain gunicorn worker can stop taking requests at once: the new ones
accept on the same listening socket. A tunnel worker's "socket" is its
tunnels, and a new worker needs a moment to dial them (under a second,
usually): were the old ones to drain at once, the router would have no
tunnel that takes requests meanwhile, and answer ``503``. So an old worker
keeps serving until a younger one (started after it) has a tunnel, for at
most :data:`HANDOVER_WAIT` seconds, then drains as before. When the whole
master stops there is no younger worker, and nothing waits.

The table is made in the master before the first fork
(:meth:`TunnelWorker.check_config <ptth_sync.worker.TunnelWorker.check_config>`)
and lives as long as the master: reloads keep it.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

__all__ = ["HANDOVER_WAIT", "Siblings", "process_alive"]

#: How long a stopping worker keeps serving while it waits for a younger one to have a tunnel (seconds).
HANDOVER_WAIT = 5.0


class Siblings:
    """Each worker's pid, age (gunicorn's count of workers started before it) and whether it has a tunnel."""

    def __init__(self, slots: int = 256) -> None:
        self._pids = multiprocessing.RawArray("q", slots)
        self._ages = multiprocessing.RawArray("q", slots)
        self._ready = multiprocessing.RawArray("b", slots)
        self._lock = multiprocessing.Lock()
        self.slot: Optional[int] = None

    def join(self, age: int) -> None:
        """(A worker, after the fork.) Take a slot: a free one, or one of a worker that is gone."""
        with self._lock:
            for index, pid in enumerate(self._pids):
                if pid == 0 or not process_alive(pid):
                    self._pids[index] = os.getpid()
                    self._ages[index] = age
                    self._ready[index] = 0
                    self.slot = index
                    return
        # (More workers than slots: this one is simply not waited for.)

    def connected(self) -> None:
        """This worker has a tunnel up."""
        if self.slot is not None:
            self._ready[self.slot] = 1

    def younger_connected(self, age: int) -> Optional[bool]:
        """Whether a worker younger than ``age`` has a tunnel; None when no younger worker is alive.

        A sibling process not in the table yet counts as a younger worker
        without a tunnel: gunicorn forks the new workers just before it stops
        the old ones, and one may not have taken its slot by then.
        """
        registered: Dict[int, Tuple[int, int]] = {
            pid: (other_age, ready) for pid, other_age, ready in zip(self._pids, self._ages, self._ready) if pid
        }
        siblings = _sibling_pids()
        candidates = siblings if siblings is not None else {pid for pid in registered if process_alive(pid)}
        younger = False
        for pid in candidates:
            other_age, ready = registered.get(pid, (age + 1, 0))
            if other_age > age:
                if ready:
                    return True
                younger = True
        return False if younger else None


def _sibling_pids() -> Optional[Set[int]]:
    """The other children of this process's parent (Linux's /proc); None where that cannot be read."""
    parent = os.getppid()
    try:
        text = Path(f"/proc/{parent}/task/{parent}/children").read_text(encoding="ascii")
    except OSError:
        return None
    return {int(pid) for pid in text.split()} - {os.getpid()}


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (and is ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Defensive: someone else's process reuses the pid
        return False
    return True
