"""Several router processes (--workers N) sharing the listeners, each with tunnels of its own."""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time
from typing import Dict, List, Set
from urllib.parse import urlsplit

import pytest

from tests.conftest import wait_until
from tests.system.test_admin import Admin


def tunnel_owners(router) -> Dict[int, int]:
    """Router worker pid -> tunnels it holds, from the log lines' pid prefix."""
    owners: Dict[int, int] = {}
    for line in router.lines:
        match = re.search(r"\[(\d+)\] \[INFO\] Tunnel (added|removed)", line)
        if match:
            pid = int(match.group(1))
            owners[pid] = owners.get(pid, 0) + (1 if match.group(2) == "added" else -1)
    return owners


def hammer(url: str, clients: int, each: int) -> List[object]:
    """``clients`` keep-alive connections sending ``each`` requests; the outcomes."""
    parts = urlsplit(url)
    outcomes: List[object] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        for _ in range(each):
            try:
                conn.request("GET", "/foo")
                response = conn.getresponse()
                outcome: object = (response.status, response.read())
            except (OSError, http.client.HTTPException) as exc:
                outcome = repr(exc)
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_tunnels_are_spread_over_the_router_processes(router_process, backend_process):
    router = router_process("--workers", "2")
    backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "4")
    router.wait_tunnels(4)
    owners = tunnel_owners(router)
    assert sorted(owners.values()) == [2, 2], owners
    assert hammer(router.url, clients=8, each=25) == [(200, b"bar")] * 200


def test_a_router_process_without_a_tunnel_leaves_clients_to_the_others(router_process, backend_process):
    router = router_process("--workers", "3")
    backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "1")
    router.wait_tunnels(1)
    # 12 connections, 5 requests each: every one lands on the one process that has the tunnel.
    assert hammer(router.url, clients=12, each=5) == [(200, b"bar")] * 60


def test_tunnels_rebalance_onto_processes_as_backends_come_and_go(router_process, backend_process):
    router = router_process("--workers", "2")
    first = backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "2")
    router.wait_tunnels(2)
    first.stop()
    wait_until(lambda: sum(tunnel_owners(router).values()) == 0, what="the tunnels to go")
    backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "2")
    router.wait_tunnels(2)
    pids: Set[int] = {pid for pid, count in tunnel_owners(router).items() if count > 0}
    assert len(pids) == 2
    assert hammer(router.url, clients=4, each=10) == [(200, b"bar")] * 40


def test_a_router_worker_that_exits_leaves_the_shared_tunnel_listener_to_the_others(router_process, backend_process):
    router = router_process("--workers", "2")
    backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "2")
    router.wait_tunnels(2)
    (victim, _survivor) = sorted(pid for pid, count in tunnel_owners(router).items() if count > 0)
    os.kill(victim, signal.SIGTERM)
    # gunicorn replaces the worker; the backend redials the tunnel it lost, into either process.
    wait_until(lambda: router.count_lines(r"Booting worker") >= 3, 30, what=lambda: f"a new worker:\n{router.output()}")
    wait_until(lambda: sum(tunnel_owners(router).values()) == 2, 30,
               what=lambda: f"the tunnel back:\n{router.output()}")
    backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "2")
    wait_until(lambda: sum(tunnel_owners(router).values()) == 4, 30,
               what=lambda: f"two new tunnels:\n{router.output()}")
    assert "accepting a tunnel failed" not in router.output()
    assert hammer(router.url, clients=4, each=10) == [(200, b"bar")] * 40


def test_sighup_replaces_the_router_worker_and_backends_redial_into_the_new_one(router_process, backend_process):
    router = router_process()
    backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(1)
    router.signal(signal.SIGHUP)
    wait_until(lambda: router.count_lines("Tunnel added") >= 2 and sum(tunnel_owners(router).values()) == 1, 30,
               what=lambda: f"the tunnel in the new worker:\n{router.output()}")
    assert "accepting a tunnel failed" not in router.output()
    assert hammer(router.url, clients=2, each=5) == [(200, b"bar")] * 10


def test_cpu_affinity_auto_binds_each_worker_and_its_threads_to_a_cpu_of_its_own(router_process, backend_process):
    cpus = sorted(os.sched_getaffinity(0))
    router = router_process("--workers", "2", "--cpu-affinity", "auto")
    backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "4")
    router.wait_tunnels(4)
    assert hammer(router.url, clients=4, each=10) == [(200, b"bar")] * 40
    bound: Dict[int, int] = {}
    for line in router.lines:
        match = re.search(r"Worker (\d+) bound to CPU (\d+)", line)
        if match:
            bound[int(match.group(1))] = int(match.group(2))
    assert len(bound) == 2, router.output()
    assert sorted(bound.values()) == sorted(cpus[index % len(cpus)] for index in range(2))
    for pid, cpu in bound.items():
        for thread in os.listdir(f"/proc/{pid}/task"):  # the reader, writer and pool threads too
            assert os.sched_getaffinity(int(thread)) == {cpu}


def test_workers_are_not_bound_to_a_cpu_by_default(router_process):
    router = router_process("--workers", "2")

    def workers() -> List[int]:
        with open(f"/proc/{router.pid}/task/{router.pid}/children", encoding="ascii") as file:
            return [int(pid) for pid in file.read().split()]

    pids = wait_until(lambda: len(workers()) == 2 and workers(), 10, what="the router's two workers")
    for pid in pids:
        assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
    assert router.count_lines("bound to CPU") == 0


# -- reloads and dead workers: the tunnels are handed over, no request is lost ---------------------------


class Load(threading.Thread):
    """Keep-alive clients sending ``GET /foo`` until stopped (at most ``limit`` requests each, 60 s).

    As urllib3 and browsers do, a request that finds its kept-alive connection closed before any byte of
    an answer (the server closed it as it stopped) is sent again once on a new connection; those are
    counted in ``resent``. Anything else that is not ``(200, b"bar")`` is an ``outcome`` that fails.
    """

    def __init__(self, url: str, clients: int, limit: int = 5000) -> None:
        super().__init__(daemon=True)
        self.url, self.clients, self.limit = url, clients, limit
        self.stopping = threading.Event()
        self.outcomes: List[object] = []
        self.resent = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)

    def _client(self) -> None:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
        deadline = threading.Event()
        timer = threading.Timer(60, deadline.set)
        timer.start()
        try:
            for _ in range(self.limit):
                if self.stopping.is_set() or deadline.is_set():
                    return
                reused = conn.sock is not None
                try:
                    outcome = self._get(conn)
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                    conn.close()
                    if not reused:
                        outcome = repr(exc)
                    else:
                        with self._lock:
                            self.resent += 1
                        try:
                            outcome = self._get(conn)
                        except (OSError, http.client.HTTPException) as again:
                            outcome = repr(again)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    outcome = repr(exc)
                with self._lock:
                    self.outcomes.append(outcome)
        finally:
            timer.cancel()
            conn.close()

    @staticmethod
    def _get(conn: http.client.HTTPConnection) -> object:
        conn.request("GET", "/foo")
        response = conn.getresponse()
        return (response.status, response.read())

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def failures(self) -> List[object]:
        with self._lock:
            return [outcome for outcome in self.outcomes if outcome != (200, b"bar")]


class HealthChecks(threading.Thread):
    """``GET /healthz`` on the admin listener in a loop until stopped (at most 60 s): the codes seen, and the
    failures (a connection closed unanswered, say) by their repr."""

    def __init__(self, admin: Admin) -> None:
        super().__init__(daemon=True)
        self.admin = admin
        self.stopping = threading.Event()
        self.codes: Dict[object, int] = {}

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                outcome: object = self.admin.fetch("/healthz")[0]
            except (OSError, http.client.HTTPException) as exc:
                outcome = repr(exc)
            self.codes[outcome] = self.codes.get(outcome, 0) + 1


def slow_request(url: str, results: List[object]) -> threading.Thread:
    """``GET /sleep?s=3`` on a thread of its own; its outcome goes to ``results``."""
    parts = urlsplit(url)

    def run() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("GET", "/sleep?s=3")
            response = conn.getresponse()
            results.append((response.status, response.read()))
        except (OSError, http.client.HTTPException) as exc:
            results.append(repr(exc))
        finally:
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("workers", "tls"), [(1, False), (2, False), (1, True)])
def test_a_reload_under_load_with_a_long_request_in_flight_loses_no_request(router_process, backend_process, workers,
                                                                            tls, tmp_path):
    """``kill -HUP`` twice under 8-way load, a 3-second request in flight: every request is answered 200.

    The old workers ask the backends to move their tunnels (GOAWAY, NO_ERROR) and finish what is in flight
    on them; the new workers wait for those tunnels instead of answering 503, and take clients at once.
    TLS tunnels (read and written by threads of their own, not the worker's loop) are handed over alike.
    """
    tls_router: List[str] = []
    tls_backend: List[str] = []
    if tls:
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "router.pem"))
        tls_router = ["--certfile", str(tmp_path / "router.pem")]
        tls_backend = ["--cafile", str(tmp_path / "ca.pem")]
    router = router_process("--workers", str(workers), "--admin", "127.0.0.1:0", *tls_router)
    backend = backend_process("tests.apps:multi", router.tunnel_address, "--tunnels", str(workers), *tls_backend)
    router.wait_tunnels(workers)
    load = Load(router.url, clients=8)
    load.start()
    health = HealthChecks(Admin(router))  # as a load balancer would: the router stays healthy throughout
    health.start()
    slow: List[object] = []
    try:
        for reload in (1, 2):
            before = load.count()
            waiting = slow_request(router.url, slow)
            wait_until(lambda r=reload: backend.count_lines("sleeping in") >= r, 10, what="the slow request to start")
            router.signal(signal.SIGHUP)
            wait_until(lambda r=reload: router.count_lines("Booting worker") >= workers * (r + 1), 15,
                       what=lambda: f"the new workers:\n{router.output()}")
            wait_until(lambda r=reload: sum(tunnel_owners(router).values()) == workers
                       and router.count_lines("Tunnel added") >= workers * (r + 1), 15,
                       what=lambda: f"the tunnels in the new workers:\n{router.output()}")
            wait_until(lambda b=before: load.count() >= b + 200, 30, what="requests served after the reload")
            waiting.join(30)
    finally:
        load.stopping.set()
        health.stopping.set()
        load.join(90)
        health.join(30)
    assert load.failures() == [], (load.failures()[:5], router.output())
    assert set(health.codes) == {200}, health.codes
    assert slow == [(200, b"done")] * 2
    assert load.count() >= 400
    assert backend.count_lines(r"Tunnel to .* lost") == 0
    assert backend.count_lines("the router asked for a new one") >= 2 * workers
    assert "Traceback" not in router.output()
    kind = ", TLS tunnels" if tls else ""
    print(f"\n{workers} worker(s){kind}: {load.count()} requests through 2 reloads, {load.resent} sent again on a "
          f"new connection after a kept-alive one closed")

