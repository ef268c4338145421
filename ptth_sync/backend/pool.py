"""A fixed pool of daemon threads that run requests.

Daemon threads, so that a stuck application never keeps the process alive
past a bounded drain; persistent, because starting a thread per request costs
more than the request.

A task goes straight to an idle thread, the one idle for the shortest time,
which sleeps on a lock of its own: a submission wakes exactly one thread. (A
``queue.SimpleQueue`` that several threads wait on wakes a second one after
each ``get``, only for it to find the queue empty: on every request that
thread takes the GIL from the one running it, several times.)
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Deque, List, Optional, Tuple

__all__ = ["ThreadPool"]

log = logging.getLogger("ptth_sync.backend")

Task = Optional[Tuple[Callable[..., object], tuple]]


class _Idle:
    """An idle thread: the lock it sleeps on and the task it is handed."""

    __slots__ = ("task", "wakeup")

    def __init__(self) -> None:
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        self.task: Task = None


class ThreadPool:
    """``size`` daemon threads taking tasks in arrival order."""

    def __init__(self, size: int, name: str = "ptth-request") -> None:
        if size < 1:
            msg = "a thread pool needs at least one thread"
            raise ValueError(msg)
        self.size = size
        self._name = name
        self._lock = threading.Lock()
        self._tasks: Deque[Task] = collections.deque()  # waiting for a thread
        self._idle: List[_Idle] = []  # threads waiting for a task, the last to go idle last
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.size):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, function: Callable[..., object], *args: object) -> None:
        self._put((function, args))

    def _put(self, task: Task) -> None:
        with self._lock:
            if not self._idle:
                self._tasks.append(task)
                return
            idle = self._idle.pop()
            idle.task = task
        idle.wakeup.release()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Let queued tasks finish, then end the threads (waiting at most ``timeout`` in all)."""
        for _ in self._threads:
            self._put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        self._threads = [t for t in self._threads if t.is_alive()]

    def _work(self) -> None:
        idle = _Idle()
        while True:
            with self._lock:
                if self._tasks:
                    task = self._tasks.popleft()
                    waiting = False
                else:
                    self._idle.append(idle)
                    waiting = True
            if waiting:
                idle.wakeup.acquire()
                task, idle.task = idle.task, None
            if task is None:
                return
            function, args = task
            try:
                function(*args)
            except Exception:  # Defensive: handle_request catches what the app raises
                log.exception("unexpected error in a request thread")
