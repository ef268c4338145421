"""The command lines as real processes: bounded memory, failures, restarts and signals."""

from __future__ import annotations

import http.client
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Dict, List
from urllib.parse import urlsplit

import pytest

from tests.conftest import wait_until

MIB = 1024 * 1024


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def children(pid: int) -> List[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def connect(url: str, timeout: float = 30) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def get(url: str, path: str, timeout: float = 30) -> http.client.HTTPResponse:
    conn = connect(url, timeout)
    conn.request("GET", path)
    return conn.getresponse()


def read_to_end(response: http.client.HTTPResponse) -> int:
    total = 0
    while True:
        chunk = response.read(MIB)
        if not chunk:
            return total
        total += len(chunk)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_64_mib_each_way_keeps_router_and_backend_memory_bounded(router_process, backend_process):
    router = router_process()
    backend = backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    worker = wait_until(lambda: children(router.pid), what="the router's worker process")[0]
    # Warm both processes up with a small exchange of each kind first.
    assert get(router.url, "/download?mib=1").read() == bytes(range(256)) * 4096
    conn = connect(router.url)
    conn.request("POST", "/count", body=b"w" * MIB)
    assert conn.getresponse().read() == str(MIB).encode()
    baseline: Dict[int, int] = {pid: rss_kib(pid) for pid in (worker, backend.pid)}

    piece = b"u" * MIB
    conn.request("POST", "/count", body=(piece for _ in range(64)), headers={"Content-Length": str(64 * MIB)})
    assert conn.getresponse().read() == str(64 * MIB).encode()

    assert read_to_end(get(router.url, "/download?mib=64")) == 64 * MIB

    for pid, before in baseline.items():
        growth_mib = (rss_kib(pid, "VmHWM") - before) / 1024
        print(f"process {pid}: peak RSS grew {growth_mib:.1f} MiB for 64 MiB bodies")
        assert growth_mib < 24, f"process {pid} grew {growth_mib:.1f} MiB for 64 MiB bodies"


def test_backend_killed_mid_response_while_a_second_keeps_serving(router_process, backend_process):
    router = router_process()
    first = backend_process("tests.apps:multi", router.tunnel_address)
    second = backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(2)
    response = get(router.url, "/endless")
    assert response.status == 200
    victim = int(response.getheader("X-Backend-Pid"))
    survivor = ({first.pid, second.pid} - {victim}).pop()
    assert response.read(65536)
    next(p for p in (first, second) if p.pid == victim).proc.kill()
    # The client sees an aborted response, never a clean end.
    with pytest.raises((http.client.IncompleteRead, ConnectionError, http.client.HTTPException)):
        read_to_end(response)
    router.wait_for_line("Tunnel removed")
    pids = {get(router.url, "/pid").read() for _ in range(20)}
    assert pids == {str(survivor).encode()}


def test_backend_reconnects_after_the_router_restarts(router_process, backend_process):
    tunnels, http_port = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    router = router_process(tunnels=tunnels, http=http_port)
    backend = backend_process("tests.apps:multi", tunnels)
    router.wait_tunnels(1)
    assert get(router.url, "/foo").read() == b"bar"
    router.signal(signal.SIGTERM)
    assert router.wait(15) == 0
    backend.wait_for_line("Tunnel to .* lost")
    backend.wait_for_line(r"Connecting to .* failed: .*; retrying in \d+\.\ds \(attempt \d+\)")
    restarted = router_process(tunnels=tunnels, http=http_port)
    restarted.wait_tunnels(1, timeout=30)
    assert get(restarted.url, "/foo").read() == b"bar"


def sigterm_during_a_slow_request(router, backend, target) -> List[object]:
    """SIGTERM ``target`` while a 1-second request is in the backend's app; the request's outcome."""
    results: List[object] = []

    def slow_request() -> None:
        response = get(router.url, "/sleep?s=1")
        results.append((response.status, response.read()))

    client = threading.Thread(target=slow_request)
    client.start()
    backend.wait_for_line("sleeping in")
    target.signal(signal.SIGTERM)
    client.join(15)
    return results


def test_sigterm_lets_the_request_in_flight_finish_and_the_backend_exits_0(router_process, backend_process):
    router = router_process()
    backend = backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    assert sigterm_during_a_slow_request(router, backend, backend) == [(200, b"done")]
    assert backend.wait(15) == 0
    router.wait_for_line("Tunnel removed")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_router_and_backend_exit_0_on_signal(router_process, backend_process, signum):
    router = router_process()
    backend = backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(1)
    backend.signal(signum)
    assert backend.wait(15) == 0
    router.signal(signum)
    assert router.wait(15) == 0


def test_router_writes_gunicorn_access_log_when_asked(router_process, backend_process):
    router = router_process("--access-logfile", "-")
    backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(1)
    assert get(router.url, "/foo?x=1").read() == b"bar"
    router.wait_for_line(r'"GET /foo\?x=1 HTTP/1.1" 200 3')


def test_router_keeps_client_connections_alive_across_requests(router_process, backend_process):
    router = router_process()
    backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(1)
    conn = connect(router.url)
    for _ in range(5):
        conn.request("GET", "/foo")
        response = conn.getresponse()
        assert response.read() == b"bar"
        assert response.getheader("Connection", "keep-alive").lower() == "keep-alive"
    port = conn.sock.getsockname()[1]
    conn.request("GET", "/foo")
    conn.getresponse().read()
    assert conn.sock.getsockname()[1] == port  # still the same connection


def test_sigterm_lets_the_router_finish_requests_in_flight_and_exit_0(router_process, backend_process):
    router = router_process()
    backend = backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    assert sigterm_during_a_slow_request(router, backend, router) == [(200, b"done")]
    assert router.wait(15) == 0


def test_a_frozen_backend_is_dropped_after_an_unanswered_ping(router_process, backend_process):
    router = router_process("--ping-interval", "0.5", "--ping-timeout", "1")
    frozen = backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    healthy = backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(2)
    frozen.signal(signal.SIGSTOP)
    try:
        router.wait_for_line(r"Tunnel removed: .*no answer to PING within 1s", timeout=10)
        pids = {get(router.url, "/pid", timeout=10).read() for _ in range(10)}
        assert pids == {str(healthy.pid).encode()}
    finally:
        frozen.signal(signal.SIGCONT)


def test_a_client_trickling_its_request_head_is_disconnected(router_process, backend_process):
    router = router_process("--header-timeout", "1")
    backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(1)
    with socket.create_connection((router.http_host, router.http_port), timeout=10) as slow:
        slow.sendall(b"GET /foo HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        for _ in range(20):  # a header line every 0.3 s: the head is never complete
            readable, _, _ = select.select([slow], [], [], 0.3)
            if readable:
                closed = slow.recv(1024) == b""
                break
            slow.sendall(b"X-Slow: 1\r\n")
        assert closed
        assert time.monotonic() - started < 4
    router.wait_for_line(r"Closing connection from 127\.0\.0\.1: request head not received within 1s")
    assert get(router.url, "/foo").read() == b"bar"


def test_a_backend_whose_router_froze_redials_after_an_unanswered_ping(router_process, backend_process):
    router = router_process()
    backend = backend_process("tests.apps:hello", router.tunnel_address, "--ping-interval", "0.5",
                              "--ping-timeout", "1")
    router.wait_tunnels(1)
    worker = wait_until(lambda: children(router.pid), what="the router's worker process")[0]
    os.kill(worker, signal.SIGSTOP)
    try:
        backend.wait_for_line(r"Tunnel to .* lost: no answer to PING within 1s", timeout=10)
    finally:
        os.kill(worker, signal.SIGCONT)
    backend.wait_for_line(r"Tunnel to .* established", start=2)
    router.wait_tunnels(1)
    assert get(router.url, "/foo").read() == b"bar"
