"""A fleet behind an existing load balancer: HAProxy in front of two routers, every backend tunnelled into both."""

from __future__ import annotations

import csv
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.conftest import ROOT, Process, RouterProcess, require_tool, wait_until

# What an operator would write, with production timings in the comments: the test shortens the
# health-check interval so that a dead router is marked DOWN within about half a second.
HAPROXY_CONFIG = """\
global
    maxconn 256
    stats socket {stats_socket} mode 600 level admin
    log stderr format raw local0 notice

defaults
    mode http
    log global
    timeout connect 1s
    timeout client 30s
    timeout server 35s               # above the routers' --timeout (30 s), so a slow app gets their 504
    timeout check 1s

frontend public
    bind {bind}
    option forwardfor                # the user's address, one X-Forwarded-For hop before HAProxy's
    default_backend routers

backend routers
    balance roundrobin
    # A request that never reached a router (refused connection), or that a router died with
    # before answering, is sent again, to another router; only if it is safe to repeat.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    http-request disable-l7-retry if !METH_GET    # METH_GET is GET or HEAD
    # The router proxies every path to the application, so the check passes only while the router
    # has a live tunnel to a backend that answers. In production: a cheap path of the application
    # (here /healthz, which the test app answers 200), "inter 2s fall 3 rise 2": DOWN within about 6 s.
    option httpchk GET /healthz
    http-check expect status 200
    default-server check inter 200ms fall 2 rise 2
    http-response set-header X-Router %[srv_name]
{servers}
"""

MAX_REQUESTS = 4000  # the load stops at this many requests, or at LOAD_SECONDS, whichever comes first
LOAD_SECONDS = 40.0
PACE_SECONDS = 0.005  # each client sends at most one request per PACE_SECONDS: a steady, not saturating, load
CLIENTS = 2


class HAProxyProcess(Process):
    """``haproxy -f CONFIG -db`` in the foreground, its frontend on a listening socket it inherits."""

    def __init__(self, haproxy: str, config: Path, listener: socket.socket) -> None:
        self.args = [haproxy, "-f", str(config), "-db"]
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, pass_fds=[listener.fileno()],
        )
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def require_haproxy() -> str:
    """The haproxy binary (Debian installs it in /usr/sbin, often not on a user's PATH).

    The test is skipped without it, or fails under PTTH_REQUIRE_TOOLS as CI sets.
    """
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin")
    if found:
        return found
    if not os.environ.get("PTTH_REQUIRE_TOOLS"):
        pytest.skip("haproxy is not installed (Debian package haproxy)")
    return require_tool("haproxy")


def haproxy_servers(stats_socket: Path) -> Dict[str, Dict[str, str]]:
    """``show stat`` on the runtime API: each server of backend ``routers`` by name (status, check_status...)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    return {row["svname"]: row for row in csv.DictReader(text.splitlines())
            if row.get("pxname") == "routers" and row["svname"] not in ("FRONTEND", "BACKEND")}


def server_states(stats_socket: Path) -> Dict[str, str]:
    """Each server's status word (UP, DOWN, ...); empty while the runtime API does not answer yet."""
    try:
        servers = haproxy_servers(stats_socket)
    except OSError:
        return {}
    return {name: row["status"].split()[0] for name, row in servers.items()}


def children(pid: int) -> List[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (no longer listed, or a zombie nobody reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


@dataclass
class Outcome:
    """One request of the load: when it ran, whether it got ``200 bar``, and who served it."""

    started: float
    ended: float
    ok: bool
    detail: str
    router: str = ""
    backend_pid: str = ""


class Load:
    """``CLIENTS`` keep-alive clients sending ``GET /foo`` through ``host:port``, bounded in count and time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.outcomes: List[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + LOAD_SECONDS
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if len(self.outcomes) >= MAX_REQUESTS:
                    return
            started = time.monotonic()
            try:
                conn.request("GET", "/foo")
                response = conn.getresponse()
                body = response.read()
                outcome = Outcome(started, time.monotonic(), response.status == 200 and body == b"bar",
                                  f"{response.status} {body[:80]!r}", response.getheader("X-Router", ""),
                                  response.getheader("X-Backend-Pid", ""))
            except (OSError, http.client.HTTPException) as exc:
                outcome = Outcome(started, time.monotonic(), False, repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            with self._lock:
                self.outcomes.append(outcome)
            self._stop.wait(max(PACE_SECONDS - (time.monotonic() - started), 0))
        conn.close()

    def snapshot(self) -> List[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


@pytest.fixture
def stats_dir(tmp_path) -> Iterator[Path]:
    """A directory for HAProxy's unix socket: ``tmp_path`` unless its path is too long for one."""
    if len(str(tmp_path / "haproxy.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="ptth-haproxy-") as short:
        yield Path(short)


@pytest.fixture
def haproxy(processes, tmp_path, stats_dir):
    """Start HAProxy in front of the given routers; returns (process, frontend address, stats socket)."""
    binary = require_haproxy()
    listeners: List[socket.socket] = []

    def start(routers: List[RouterProcess]):
        listener = socket.socket()
        listeners.append(listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        stats_socket = stats_dir / "haproxy.sock"
        servers = "\n".join(f"    server r{index} {router.http_host}:{router.http_port}"
                            for index, router in enumerate(routers, 1))
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(stats_socket=stats_socket, bind=f"fd@{listener.fileno()}",
                                                servers=servers))
        process = HAProxyProcess(binary, config, listener)
        processes.append(process)
        names = {f"r{index}" for index in range(1, len(routers) + 1)}

        def all_up() -> bool:
            if process.proc.poll() is not None:
                pytest.fail(f"haproxy exited with status {process.proc.returncode}:\n{process.output()}")
            try:
                servers = haproxy_servers(stats_socket)
            except OSError:  # not listening yet
                return False
            return set(servers) == names and all(
                row["status"] == "UP" and row["check_status"] == "L7OK" for row in servers.values())

        wait_until(all_up, 15, what="HAProxy to check every router UP")
        return process, listener.getsockname(), stats_socket

    yield start
    for listener in listeners:
        listener.close()


def test_killing_a_router_behind_haproxy_loses_no_request_once_it_is_marked_down(router_process, backend_process,
                                                                                  haproxy):
    routers = [router_process(), router_process()]
    connect = ",".join(router.tunnel_address for router in routers)
    backends = [backend_process("tests.apps:multi", connect, "--threads", "4") for _ in range(2)]
    for router in routers:
        router.wait_tunnels(2)
    proxy, (host, port), stats_socket = haproxy(routers)
    backend_pids = {str(backend.pid) for backend in backends}

    load = Load(host, port)
    try:
        wait_until(lambda: len(load.snapshot()) >= 200
                   and {o.router for o in load.snapshot()} >= {"r1", "r2"}, 20,
                   what="200 requests through HAProxy, served by both routers")
        victim = routers[0]
        workers = children(victim.pid)
        killed_at = time.monotonic()
        for pid in [victim.pid, *workers]:  # the master first, so that it cannot start a new worker
            os.kill(pid, signal.SIGKILL)
        victim.wait(10)
        wait_until(lambda: all(gone(pid) for pid in workers), 10, what="the killed router's workers to exit")
        wait_until(lambda: server_states(stats_socket).get("r1") == "DOWN", 10, what="HAProxy to mark r1 DOWN")
        down_at = time.monotonic()
        wait_until(lambda: sum(o.started >= down_at for o in load.snapshot()) >= 200, 20,
                   what="200 requests started after r1 was marked DOWN")
    finally:
        load.stop()

    outcomes = load.snapshot()
    before = [o for o in outcomes if o.ended < killed_at]
    window = [o for o in outcomes if o.ended >= killed_at and o.started < down_at]
    after = [o for o in outcomes if o.started >= down_at]
    window_failures = [o.detail for o in window if not o.ok]
    summary = (f"{len(outcomes)} requests: {len(before)} before the kill, {len(window)} in the "
               f"{down_at - killed_at:.2f} s until r1 was marked DOWN ({len(window_failures)} failed, which is "
               f"allowed: {window_failures[:3]}), {len(after)} after")
    assert all(o.ok for o in before), (summary, [o.detail for o in before if not o.ok][:5])
    assert {o.router for o in before} == {"r1", "r2"}, summary
    assert [o.detail for o in after if not o.ok] == [], summary
    assert {o.router for o in after} == {"r2"}, summary
    # The surviving router still spreads its requests over both backends' tunnels.
    assert {o.backend_pid for o in after} == backend_pids, summary
    assert server_states(stats_socket) == {"r1": "DOWN", "r2": "UP"}, proxy.output()
    assert routers[1].count_lines("Tunnel removed") == 0, routers[1].output()
    for backend in backends:
        backend.wait_for_line(rf"Tunnel to {re.escape(routers[0].tunnel_address)} lost")
