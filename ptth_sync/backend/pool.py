"""A fixed pool of daemon threads that run requests.

Daemon threads, so that a stuck application never keeps the process alive
past a bounded drain; persistent, because starting a thread per request costs
more than the request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, List, Optional, Tuple

__all__ = ["ThreadPool"]

log = logging.getLogger("ptth_sync.backend")

Task = Optional[Tuple[Callable[..., None], tuple]]


class ThreadPool:
    """``size`` daemon threads taking tasks in arrival order."""

    def __init__(self, size: int, name: str = "ptth-request") -> None:
        if size < 1:
            msg = "a thread pool needs at least one thread"
            raise ValueError(msg)
        self.size = size
        self._name = name
        self._tasks: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.size):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, function: Callable[..., None], *args: object) -> None:
        self._tasks.put((function, args))

    def stop(self, timeout: Optional[float] = None) -> None:
        """Let queued tasks finish, then end the threads (waiting at most ``timeout`` in all)."""
        for _ in self._threads:
            self._tasks.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        self._threads = [t for t in self._threads if t.is_alive()]

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            function, args = task
            try:
                function(*args)
            except Exception:  # Defensive: handle_request catches what the app raises
                log.exception("unexpected error in a request thread")
