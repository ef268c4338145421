"""``python -m ptth_sync.router --admin``: metrics, status and health of real router processes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from ptth_sync.router.admin import ADMIN_CONNECTIONS, ADMIN_DEADLINE
from ptth_sync.router.metrics import CONTENT_TYPE, parse
from tests.conftest import PYTHON, Process, wait_until

Samples = Dict[Tuple[str, tuple], float]


class Admin:
    """The admin listener of a router process."""

    def __init__(self, router) -> None:
        address = router.wait_for_line(r"Admin listening on http://(\S+)").group(1)
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)

    def fetch(self, path: str) -> Tuple[int, Dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def scrape(self) -> Samples:
        code, headers, body = self.fetch("/metrics")
        assert (code, headers["Content-Type"]) == (200, CONTENT_TYPE)
        return parse(body.decode())

    def status(self) -> Dict[str, Any]:
        code, _, body = self.fetch("/status")
        assert code == 200
        return json.loads(body)

    def health(self) -> int:
        return self.fetch("/healthz")[0]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((f"ptth_router_{name}", tuple(labels.items())), 0.0)


def get(router, path: str) -> Tuple[int, bytes]:
    conn = http.client.HTTPConnection(router.http_host, router.http_port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(p) for p in file.read().split()]


def scrapes(admin: Admin, count: int) -> Iterator[Samples]:
    for _ in range(count):
        yield admin.scrape()


def test_the_router_serves_metrics_status_and_health_of_its_tunnels(router_process, backend_process):
    router = router_process("--admin", "127.0.0.1:0")
    admin = Admin(router)
    assert admin.port != 0
    assert admin.health() == 503
    assert get(router, "/foo")[0] == 503
    first = backend_process("tests.apps:hello", router.tunnel_address)
    second = backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(2)
    assert admin.health() == 200
    assert [get(router, "/foo") for _ in range(6)] == [(200, b"bar")] * 6

    samples = admin.scrape()
    assert value(samples, "requests_total", code="200") == 6
    assert value(samples, "requests_total", code="503") == 1
    assert value(samples, "request_duration_seconds_count") == 6
    assert value(samples, "response_bytes_total") == 18
    assert value(samples, "tunnels", origin="*") == 2
    assert value(samples, "tunnel_connects_total", origin="*") == 2
    assert value(samples, "workers") == 1

    shown = admin.status()
    [worker] = children(router.pid)
    assert shown["live_tunnels"] == 2
    assert shown["workers"] == [worker]
    assert sorted(tunnel["requests_served"] for tunnel in shown["tunnels"]) == [3, 3]
    assert {tunnel["worker_pid"] for tunnel in shown["tunnels"]} == {worker}
    assert {tunnel["origin"] for tunnel in shown["tunnels"]} == {"*"}

    first.stop()  # SIGTERM: drains, then GOAWAY
    wait_until(lambda: value(admin.scrape(), "tunnel_drops_total", reason="goaway") == 1, what="a GOAWAY drop")
    second.proc.kill()  # gone without a word: the kernel closes its socket
    wait_until(lambda: value(admin.scrape(), "tunnels", origin="*") == 0, what="no tunnel left")
    samples = admin.scrape()
    assert value(samples, "tunnel_drops_total", reason="peer_closed") + \
        value(samples, "tunnel_drops_total", reason="network") == 1
    assert admin.health() == 503
    assert admin.fetch("/nowhere")[0] == 404


def test_two_router_processes_answer_for_both(router_process, backend_process):
    router = router_process("--workers", "2", "--admin", "127.0.0.1:0")
    admin = Admin(router)
    backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "2")
    router.wait_tunnels(2)
    workers = wait_until(lambda: len(children(router.pid)) == 2 and children(router.pid), what="two workers")
    assert [get(router, "/foo") for _ in range(20)] == [(200, b"bar")] * 20

    wait_until(lambda: value(admin.scrape(), "requests_total", code="200") == 20, what="every request counted")
    # Whichever process answers, the answer covers both.
    for samples in scrapes(admin, 10):
        assert value(samples, "requests_total", code="200") == 20
        assert value(samples, "tunnels", origin="*") == 2
        assert value(samples, "workers") == 2
    shown = admin.status()
    assert sorted(shown["workers"]) == sorted(workers)
    assert sorted(tunnel["worker_pid"] for tunnel in shown["tunnels"]) == sorted(workers)  # one each
    assert sum(tunnel["requests_served"] for tunnel in shown["tunnels"]) == 20
    assert admin.health() == 200

    # A worker that exits keeps its counts: the master folds them in as it reaps it.
    leaving = workers[0]
    os.kill(leaving, signal.SIGTERM)
    router.wait_for_line(rf"Worker exiting \(pid: {leaving}\)")
    wait_until(lambda: len(set(children(router.pid)) - {leaving}) == 2, what="a new worker")
    wait_until(lambda: leaving not in admin.status()["workers"] and len(admin.status()["workers"]) == 2,
               what="the new worker's snapshot")
    for samples in scrapes(admin, 10):
        assert value(samples, "requests_total", code="200") == 20
        assert value(samples, "tunnel_drops_total", reason="router_closed") == 1
        assert value(samples, "tunnel_connects_total", origin="*") >= 2


@pytest.mark.parametrize("address", ["127.0.0.1:0", ":0"])
def test_the_admin_listener_is_on_loopback_without_a_warning(router_process, address):
    router = router_process("--admin", address)
    admin = Admin(router)
    assert admin.host == "127.0.0.1"
    assert admin.health() == 503
    assert router.count_lines("admin listener .* is reachable beyond this host") == 0


def test_an_admin_port_in_use_is_an_error(router_process):
    router = router_process("--admin", "127.0.0.1:0")
    taken = Admin(router)
    other = Process([PYTHON, "-m", "ptth_sync.router", "--tunnels", "127.0.0.1:0", "--http", "127.0.0.1:0",
                     "--admin", f"127.0.0.1:{taken.port}"])
    try:
        assert other.wait(15) == 1
        assert "Cannot listen for the admin endpoints" in other.output()
    finally:
        other.stop()


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_slow_or_silent_admin_clients_cost_a_bounded_number_of_threads(router_process):
    """A thread per admin connection: at most ADMIN_CONNECTIONS at once, each cut after ADMIN_DEADLINE seconds."""
    router = router_process("--admin", "127.0.0.1:0")
    admin = Admin(router)
    assert admin.health() == 503  # (no tunnel): the worker serves the admin port
    [worker] = children(router.pid)
    before = thread_count(worker)
    silent = []
    try:
        for _ in range(200):  # a request line never finished
            sock = socket.create_connection((admin.host, admin.port), timeout=10)
            sock.sendall(b"GET /metr")
            silent.append(sock)
        router.wait_for_line(r"admin: \d+ connection\(s\) closed unanswered .*: 16 are served at once, each for at "
                             r"most 10s")
        assert thread_count(worker) <= before + ADMIN_CONNECTIONS
    finally:
        for sock in silent:
            sock.close()
    def answered() -> bool:  # (refused, unanswered, while the slots are not all free yet)
        try:
            return admin.health() == 503
        except (OSError, http.client.HTTPException):
            return False

    wait_until(answered, what="a scrape once the silent clients left")
    # (At most: the thread that answered the first health check may still have been ending at `before`.)
    wait_until(lambda: thread_count(worker) <= before, what="the admin threads to end")
    # One client that never finishes its request is cut at the deadline, not kept.
    with socket.create_connection((admin.host, admin.port), timeout=ADMIN_DEADLINE * 3) as sock:
        sock.sendall(b"GET /metr")
        try:
            assert sock.recv(100) == b""  # closed by the router (a timeout would raise TimeoutError here)
        except ConnectionResetError:
            pass  # closed too: what the client sent was still unread there, so the close was a reset
