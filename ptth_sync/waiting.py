"""Parking threads and waking them after the lock they wait under is released."""

from __future__ import annotations

import threading
from _thread import allocate_lock
from typing import List, Optional

__all__ = ["WaitQueue", "release"]


class WaitQueue:
    """Threads parked until another thread wakes them; a Condition without its lock.

    A Condition must be notified while its lock is held, so a woken thread at
    once blocks again on that lock until the notifier lets go: two sleeps and
    two wake-ups per hand-off. Here the waker only *takes* the waiters while
    holding the connection lock and releases them after letting go of it
    (:func:`release`), so a woken thread finds the lock free.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: List[threading.Lock] = []

    def __bool__(self) -> bool:
        return bool(self._waiters)

    def wait(self, lock: threading.Lock, timeout: Optional[float]) -> None:
        """Release ``lock`` (held), sleep until woken or ``timeout``, take ``lock`` again."""
        waiter = allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        lock.release()
        try:
            waiter.acquire(True, -1 if timeout is None else max(timeout, 0.0))
        finally:
            lock.acquire()
            try:
                self._waiters.remove(waiter)  # still listed only when it timed out
            except ValueError:
                pass

    def take(self, count: Optional[int] = None) -> List[threading.Lock]:
        """Remove every waiter, or the ``count`` longest waiting (lock held); release them to wake them."""
        if count is None or count >= len(self._waiters):
            waiters, self._waiters = self._waiters, []
        else:
            waiters, self._waiters = self._waiters[:count], self._waiters[count:]
        return waiters


def release(waiters: List[threading.Lock]) -> None:
    for waiter in waiters:
        waiter.release()
