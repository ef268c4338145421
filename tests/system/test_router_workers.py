"""Several router processes (--workers N) sharing the listeners, each with tunnels of its own."""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
from typing import Dict, List, Set
from urllib.parse import urlsplit

from tests.conftest import wait_until


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
