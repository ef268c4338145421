"""Slow and idle clients cost the router a socket, not a thread, and cannot exhaust its descriptors.

A real router process (gunicorn master and worker) and a real backend; the
attackers are plain sockets on loopback that open connections and trickle
request heads or stay silent. Throughout, a normal ``GET`` must be answered
within a second; the router worker's thread count must not grow with the
attackers; under a low descriptor limit the worker must not die (no tunnel
is lost) and must say it sheds connections.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import time
from typing import Iterator, List, Tuple

import pytest

from tests.conftest import Process, RouterProcess, wait_until


def worker_pid(master: int) -> int:
    """The router's one gunicorn worker process."""
    def child() -> int:
        with open(f"/proc/{master}/task/{master}/children", encoding="ascii") as file:
            pids = file.read().split()
        return int(pids[0]) if pids else 0

    return wait_until(child, 10, what="the router's worker process")  # type: ignore[return-value]


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def timed_get(url: str, path: str = "/foo") -> float:
    """Seconds a fresh connection takes to get ``path`` answered 200 with ``bar``."""
    host, port = url[len("http://") :].rsplit(":", 1)
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"bar")
    finally:
        conn.close()
    return time.monotonic() - started


def served_once(router: RouterProcess) -> None:
    """A GET answered by a router without tunnels (503): its worker is up and serving."""
    conn = http.client.HTTPConnection(router.http_host, router.http_port, timeout=10)
    try:
        conn.request("GET", "/")
        assert conn.getresponse().status == 503
    finally:
        conn.close()


@contextlib.contextmanager
def connections(host: str, port: int, count: int) -> Iterator[List[socket.socket]]:
    """``count`` connections to the router, closed on exit (some may be refused or shed meanwhile)."""
    socks: List[socket.socket] = []
    try:
        for _ in range(count):
            try:
                socks.append(socket.create_connection((host, port), timeout=5))
            except OSError:
                break
        yield socks
    finally:
        for sock in socks:
            sock.close()


def trickle(socks: List[socket.socket], piece: bytes) -> None:
    for sock in socks:
        try:
            sock.send(piece)
        except OSError:
            pass  # shed or timed out: that is the router's right


class LimitedRouter(RouterProcess):
    """A router process whose descriptor limit (soft and hard) is ``nofile``."""

    def __init__(self, nofile: int, *extra: str) -> None:
        # RouterProcess's set-up, with the command run under `ulimit -n`.
        original = Process.__init__

        def limited(self: Process, args: List[str], env=None, cwd=None) -> None:  # type: ignore[no-untyped-def]
            command = " ".join(args)
            original(self, ["sh", "-c", f"ulimit -n {nofile} && exec {command}"], env)

        Process.__init__ = limited  # type: ignore[method-assign]
        try:
            super().__init__(*extra)
        finally:
            Process.__init__ = original  # type: ignore[method-assign]


@pytest.fixture
def limited_router(processes):
    def start(nofile: int, *extra: str) -> RouterProcess:
        router = LimitedRouter(nofile, *extra)
        processes.append(router)
        return router

    return start


def test_trickled_heads_and_idle_connections_cost_no_thread(router_process, backend_process):
    router = router_process("--header-timeout", "4")
    backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(1)
    worker = worker_pid(router.pid)
    timed_get(router.url)
    threads_before = status(worker, "Threads")
    slowest = 0.0
    with connections(router.http_host, router.http_port, 500) as trickling, \
            connections(router.http_host, router.http_port, 300) as idle:
        assert len(trickling) == 500
        assert len(idle) == 300
        deadline = time.monotonic() + 3
        for index, piece in enumerate(b"GET /foo HTTP/1.1\r\nHost: x\r\n"):
            if time.monotonic() > deadline:
                break
            trickle(trickling, bytes([piece]))
            if index % 4 == 0:
                slowest = max(slowest, timed_get(router.url))
            time.sleep(0.1)  # the attackers' pace, not a synchronisation
        threads_during = status(worker, "Threads")
        # Past --header-timeout the trickling heads are closed, with a line each.
        wait_until(lambda: router.count_lines("request head not received within 4s") >= 500, 15,
                   what="the router to close the slow heads")
    print(f"threads before {threads_before}, with 800 slow or idle connections {threads_during}; "
          f"slowest GET meanwhile {slowest * 1000:.0f} ms")
    assert slowest < 1.0
    assert threads_during <= threads_before + 4
    assert router.count_lines("Tunnel removed") == 0


def test_connections_beyond_the_descriptor_limit_are_shed_and_the_worker_lives(limited_router, backend_process):
    router = limited_router(256)
    backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(1)
    worker = worker_pid(router.pid)
    slowest = 0.0
    with connections(router.http_host, router.http_port, 600) as idle:
        assert len(idle) == 600  # the kernel's backlog takes them; the router sheds what it cannot hold
        router.wait_for_line("Shedding client connections")
        for _ in range(20):
            slowest = max(slowest, timed_get(router.url))
        assert worker_pid(router.pid) == worker  # the same worker: it never died
        open_files = len(list(os.listdir(f"/proc/{worker}/fd")))
    print(f"worker descriptors at most 256, in use with 600 idle clients: {open_files}; slowest GET {slowest:.3f} s")
    assert slowest < 1.0
    assert router.count_lines("Too many open files") == 0
    assert router.count_lines("Tunnel removed") == 0
    assert router.count_lines("Booting worker") == 1
    # Back to normal once they have gone.
    wait_until(lambda: len(os.listdir(f"/proc/{worker}/fd")) < 64, 15,
               what="the worker's descriptors back to baseline")
    timed_get(router.url)


def test_the_limited_router_runs_under_its_limit(limited_router):
    """What the test above relies on: `ulimit -n` reaches the router's worker."""
    router = limited_router(256)
    worker = worker_pid(router.pid)
    with open(f"/proc/{worker}/limits", encoding="ascii") as file:
        line = next(line for line in file if line.startswith("Max open files"))
    assert line.split()[3:5] == ["256", "256"]


def test_a_flood_of_silent_and_slow_tunnel_connections_does_not_keep_a_backend_out(
    limited_router, backend_process
):
    """2,000 silent or slowly upgrading connections on the tunnel port, under ulimit -n 1024.

    They cost the router no thread (its thread count stays put), it never
    dies of EMFILE, it sheds the oldest when too many are opening at once,
    and a real backend that dials meanwhile has its tunnel within a second.
    """
    router = limited_router(1024)
    worker = worker_pid(router.pid)
    served_once(router)
    threads_before = status(worker, "Threads")
    with connections(router.tunnel_host, router.tunnel_port, 1000) as silent, \
            connections(router.tunnel_host, router.tunnel_port, 1000) as slow:
        trickle(slow, b"GET /.well-known/ptth/")
        threads_during = status(worker, "Threads")
        started = time.monotonic()
        backend = backend_process("tests.apps:hello", router.tunnel_address)
        router.wait_tunnels(1, timeout=10)
        joined = time.monotonic() - started
        assert timed_get(router.url) < 1.0
        print(f"threads before {threads_before}, with 2,000 opening connections {threads_during}; "
              f"a backend joined in {joined:.2f} s (process start included); {len(silent) + len(slow)} connected")
    assert threads_during <= threads_before + 2, router.output()[-4000:]
    assert joined < 3.0  # a fresh Python process takes most of it; the router itself adds well under a second
    assert router.wait_for_line("Shedding tunnel connections still opening")
    assert worker_pid(router.pid) == worker
    assert router.count_lines("Too many open files") == 0
    assert backend.count_lines("lost") == 0


def test_a_silent_tunnel_connection_that_answers_the_greeting_with_garbage_gets_no_thread(router_process):
    """After a second of silence the router greets a connection as a plain-wire backend; an answer that is
    not HTTP/2 (here a late upgrade request) closes it with a reason, without starting its threads."""
    router = router_process()
    worker = worker_pid(router.pid)
    served_once(router)  # (the worker's threads are all started once it answers)
    threads = status(worker, "Threads")
    socks = [socket.create_connection((router.tunnel_host, router.tunnel_port), timeout=10) for _ in range(20)]
    try:
        for sock in socks:
            assert sock.recv(24) == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the greeting (after a second)
        for sock in socks:
            sock.sendall(b"GET /.well-known/ptth/ HTTP/1.1\r\nHost: x\r\nUpgrade: ptth\r\n\r\n")
        wait_until(lambda: router.count_lines("sent an upgrade request only after") == 20, 10,
                   what=lambda: f"20 late upgrades refused:\n{router.output()[-2000:]}")
        assert status(worker, "Threads") == threads
    finally:
        for sock in socks:
            sock.close()
    assert router.count_lines("Traceback") == 0


#: Clients that stop reading (each costs the router a socket and at most a stream window, the backend a thread).
STALLED_READERS = 200
#: The lines of a stalled download closed after ``--timeout 3``.
CLOSED_STALLED = (r"no progress for 3s \(it stopped reading the response"
                  r"|Aborted response to GET /download\?mib=64: the backend sent nothing for 3s")
#: What one stalled download may cost the router in memory: the tunnel's stream window (1 MiB), and change.
STALLED_READER_BYTES = 3 * 1024 * 1024 // 2


def slow_clients_router(router_process, backend_process, *options: str) -> Tuple[RouterProcess, int, int, int]:
    """A router with one backend, and its worker's pid, thread count and RSS (bytes) once it served a GET.

    The backend has threads enough for hundreds of slow uploads and stalled downloads (each holds
    one there: its app waits for the body, or flow control stops it).
    """
    router = router_process(*options)
    backend_process("tests.apps:multi", router.tunnel_address, "--threads", "512")
    router.wait_tunnels(1)
    worker = worker_pid(router.pid)
    timed_get(router.url)
    return router, worker, status(worker, "Threads"), status(worker, "VmRSS") * 1024


def status_lines(socks: List[socket.socket], timeout: float) -> List[bytes]:
    """Each socket's response status line, read a byte at a time (nothing past it), within ``timeout``."""
    deadline = time.monotonic() + timeout
    lines = []
    for sock in socks:
        line = b""
        while not line.endswith(b"\r\n") and len(line) < 100:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                byte = sock.recv(1)
            except OSError:
                byte = b""
            if not byte:
                break
            line += byte
        lines.append(line)
    return lines


def test_clients_that_stop_reading_cost_a_socket_and_a_window_and_are_closed_after_the_timeout(
    router_process, backend_process
):
    """200 clients ask for 64 MiB each, read the status line, and then nothing more.

    The router's thread count stays put, its memory grows by at most a stream
    window per stalled client (the backend is held back by flow control, not
    buffered), a normal GET is answered within a second throughout, and after
    --timeout each stalled client is closed with a line; then the memory is
    reused by a second wave instead of growing.
    """
    router, worker, threads_before, rss_before = slow_clients_router(router_process, backend_process,
                                                                     "--timeout", "3")
    peaks = []
    for wave in (1, 2):
        with connections(router.http_host, router.http_port, STALLED_READERS) as readers:
            assert len(readers) == STALLED_READERS
            for sock in readers:
                sock.send(b"GET /download?mib=64 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert timed_get(router.url) < 1.0
            # Each response began (the backend answered them all): from now on they only stop reading.
            answered = status_lines(readers, 30)
            assert answered == [b"HTTP/1.1 200 OK\r\n"] * STALLED_READERS, f"{answered}\n{router.output()[-3000:]}"
            threads_during = status(worker, "Threads")
            # Closed after --timeout, each with a line: it stopped reading what the router holds for it, or
            # (on a loaded machine) the backend had sent nothing more in that time either.
            wait_until(lambda: router.count_lines(CLOSED_STALLED) >= wave * STALLED_READERS, 60,  # noqa: B023
                       what=lambda: f"the router to close the clients that stopped reading:\n{router.output()[-3000:]}")
            peaks.append(status(worker, "VmHWM") * 1024)
        assert timed_get(router.url) < 1.0
        assert threads_during <= threads_before
    per_reader = (peaks[0] - rss_before) / STALLED_READERS
    print(f"threads {threads_before} before and with {STALLED_READERS} stalled readers; router memory "
          f"{per_reader / 1024:.0f} KiB per stalled reader; peak after a second wave "
          f"{(peaks[1] - peaks[0]) / 2**20:+.1f} MiB")
    assert per_reader <= STALLED_READER_BYTES
    assert peaks[1] - peaks[0] <= STALLED_READERS * STALLED_READER_BYTES // 4
    assert status(worker, "Threads") <= threads_before
    assert router.count_lines("Tunnel removed") == 0
    assert router.count_lines("no progress for 3s") > 0


def test_slow_heads_uploads_and_readers_all_at_once_cost_no_thread(router_process, backend_process):
    """The issue's mix, with default settings: 2,000 trickling heads, 200 uploads of a 10 MB body at
    1 KiB/s, 200 clients that read nothing of a large response, all at once.

    A normal GET is answered within a second throughout; the router's thread
    count stays put; its memory per slow connection is reported and bounded;
    when they leave, the threads are what they were and a GET is fast.
    """
    router, worker, threads_before, rss_before = slow_clients_router(router_process, backend_process)
    slowest = 0.0
    host, port = router.http_host, router.http_port
    with connections(host, port, 2000) as heads, connections(host, port, 200) as uploads, \
            connections(host, port, 200) as readers:
        assert (len(heads), len(uploads), len(readers)) == (2000, 200, 200)
        trickle(uploads, b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        trickle(readers, b"GET /download?mib=64 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b"GET /foo HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 64
        for second in range(6):  # bounded: six rounds at the attackers' pace of a second
            trickle(heads, head[second : second + 1])
            trickle(uploads, b"x" * 1024)
            slowest = max(slowest, timed_get(router.url))
            time.sleep(1)  # the attackers' pace, not a synchronisation
        threads_during = status(worker, "Threads")
        rss_during = status(worker, "VmRSS") * 1024
    per_connection = (rss_during - rss_before) / 2400
    print(f"threads {threads_before} before, {threads_during} with 2,400 slow connections; slowest GET "
          f"{slowest * 1000:.0f} ms; router memory {per_connection / 1024:.0f} KiB per slow connection")
    assert slowest < 1.0
    assert threads_during <= threads_before
    assert per_connection <= 256 * 1024  # (a stalled reader's stream window, spread over all of them)
    wait_until(lambda: timed_get(router.url) < 1.0, 10, what="a fast GET after the slow clients left")
    assert status(worker, "Threads") <= threads_before
    assert router.count_lines("Tunnel removed") == 0
