"""What both of our gunicorn workers need beyond ``gunicorn.workers.base.Worker``."""

from __future__ import annotations

import os
from typing import Any

from gunicorn.workers import base

__all__ = ["SettingsSnapshot", "ThreadedWorker"]


class SettingsSnapshot:
    """A worker's gunicorn settings, each read from its ``Config`` once and kept.

    ``Config`` finds a setting by name at every read, and gunicorn's request
    parser, WSGI environ and response writer read about twenty of them per
    request. A worker's settings never change (a reload starts new workers),
    so a worker may hand this to them in place of its ``Config``.
    """

    def __init__(self, config: Any) -> None:
        self.__dict__["_config"] = config

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._config, name)  # (an unknown name raises AttributeError, as Config does)
        self.__dict__[name] = value
        return value


class ThreadedWorker(base.Worker):
    """A worker whose main loop waits on ``self.PIPE`` while threads do the work.

    gunicorn's base class writes to the pipe on every signal; threads write to
    it to wake the loop (:meth:`wake`).
    """

    def is_parent_alive(self) -> bool:
        """False once the arbiter is gone (the built-in workers check this every loop)."""
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            return False
        return True

    def wake(self) -> None:
        """Make the main loop's next wait return at once."""
        try:
            os.write(self.PIPE[1], b".")
        except OSError:  # the pipe is full: the loop wakes anyway
            pass

    def drain_pipe(self) -> None:
        try:
            while len(os.read(self.PIPE[0], 4096)) == 4096:  # (less: the pipe is empty now)
                pass
        except OSError:  # the non-blocking pipe is empty
            return
