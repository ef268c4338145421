"""Shared fixtures: real router and backend processes, in-process tunnels, and process hygiene."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Union

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.01,
    what: Union[str, Callable[[], str]] = "",
) -> object:
    """Poll ``predicate`` until it returns something true; fail the test after ``timeout``.

    ``what`` names what was awaited; a callable is called only on failure, so that a
    process's output in the message is what it printed by then, not when the wait began.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout}s waiting for {described or predicate}")
        time.sleep(interval)


def require_tool(name: str) -> str:
    """The path of an external program; skipped when missing unless CI requires it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("PTTH_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is required here (PTTH_REQUIRE_TOOLS is set) but not installed")
        pytest.skip(f"{name} is not installed (Debian packages nghttp2-client nghttp2-server socat)")
    return path


class Process:
    """A child process whose stderr is collected line by line."""

    def __init__(self, args: List[str], env: Optional[dict] = None, cwd: Path = ROOT) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.setdefault("PYTHONPATH", str(ROOT))
        if env:
            full_env.update(env)
        self.args = args
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match:
        """The first output line (from index ``start``) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    if match:
                        return match
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(remaining, 0.1))
        pytest.fail(f"no line matching {pattern!r} within {timeout}s; output:\n" + self.output())

    def count_lines(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Terminate (then kill) the process and its group; always safe to call."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


class RouterProcess(Process):
    """``python -m ptth_sync.router`` on ephemeral ports."""

    def __init__(
        self, *extra: str, tunnels: str = "127.0.0.1:0", http: str = "127.0.0.1:0", module: str = "ptth_sync.router",
        env: Optional[dict] = None,
    ) -> None:
        super().__init__([PYTHON, "-m", module, "--tunnels", tunnels, "--http", http, *extra], env=env)
        self.tunnel_address = self.wait_for_line(r"Listening for reverse tunnels on t(?:cp|ls)://(\S+)").group(1)
        scheme, http_address = self.wait_for_line(r"Listening for HTTP traffic on (https?)://(\S+)").groups()
        self.url = f"{scheme}://{http_address}"
        host, _, port = self.tunnel_address.rpartition(":")
        self.tunnel_host, self.tunnel_port = host, int(port)
        http_host, _, http_port = http_address.rpartition(":")
        self.http_host, self.http_port = http_host, int(http_port)

    def wait_tunnels(self, count: int, timeout: float = 15.0) -> None:
        """Wait until ``count`` more tunnels were added than removed."""
        wait_until(
            lambda: self.count_lines("Tunnel added") - self.count_lines("Tunnel removed") >= count,
            timeout, what=lambda: f"{count} tunnels on the router:\n{self.output()}",
        )


class BackendProcess(Process):
    """``python -m ptth_sync.backend APP`` dialling ``connect``."""

    def __init__(self, app: str, connect: str, *extra: str) -> None:
        super().__init__([PYTHON, "-m", "ptth_sync.backend", "--connect", connect, *extra, app])


@pytest.fixture
def processes():
    """Start processes through this list; every one is stopped at teardown."""
    started: List[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


@pytest.fixture
def router_process(processes):
    """A factory for router processes that are cleaned up after the test."""

    def start(*extra: str, **kwargs: str) -> RouterProcess:
        process = RouterProcess(*extra, **kwargs)
        processes.append(process)
        return process

    return start


@pytest.fixture
def backend_process(processes):
    """A factory for backend processes that are cleaned up after the test."""

    def start(app: str, connect: str, *extra: str) -> BackendProcess:
        process = BackendProcess(app, connect, *extra)
        processes.append(process)
        return process

    return start
