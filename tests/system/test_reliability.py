"""Reliability with real processes: rolling restarts lose nothing, a tunnel may come late."""

from __future__ import annotations

import http.client
import signal
import threading
import time
from typing import Dict, List
from urllib.parse import urlsplit

from tests.conftest import BackendProcess, wait_until


def test_rolling_restart_of_two_backends_under_load_fails_no_request(router_process, processes):
    router = router_process("--tunnel-wait", "5")

    def start_backend() -> BackendProcess:
        backend = BackendProcess("tests.apps:multi", router.tunnel_address, "--threads", "8")
        processes.append(backend)
        return backend

    backends = [start_backend(), start_backend()]
    router.wait_tunnels(2)
    parts = urlsplit(router.url)
    outcome: Dict[str, int] = {"ok": 0, "failed": 0}
    failures: List[str] = []
    lock = threading.Lock()
    remaining = [2000]
    deadline = time.monotonic() + 120

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            try:
                conn.request("GET", "/sleep?s=0.002")
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and body == b"done"
                detail = f"{response.status} {body[:80]!r}"
            except (OSError, http.client.HTTPException) as exc:
                ok, detail = False, repr(exc)
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            with lock:
                outcome["ok" if ok else "failed"] += 1
                if not ok:
                    failures.append(detail)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    # Restart each backend in turn while the load runs: SIGTERM, wait for its
    # clean exit, start a replacement, wait for its tunnel.
    for index in range(2):
        target = 300 * (index + 1)
        wait_until(lambda target=target: outcome["ok"] >= target, 60, what="requests flowing")
        old = backends[index]
        old.signal(signal.SIGTERM)
        assert old.wait(30) == 0
        added = router.count_lines("Tunnel added")
        backends[index] = start_backend()
        wait_until(lambda added=added: router.count_lines("Tunnel added") > added, 30, what="the new tunnel")
    for thread in clients:
        thread.join(150)
    assert outcome == {"ok": 2000, "failed": 0}, failures[:5]


def test_a_request_sent_before_any_backend_started_is_served_with_tunnel_wait(router_process, backend_process):
    router = router_process("--tunnel-wait", "20")
    parts = urlsplit(router.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/foo")  # sent: the router holds it, no tunnel exists yet
    assert router.count_lines("Tunnel added") == 0
    backend_process("tests.apps:hello", router.tunnel_address)
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"bar")
