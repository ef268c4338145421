"""The backend's limits as real processes see them: --max-backoff / PTTH_MAX_BACKOFF and the bounds on counts."""

from __future__ import annotations

import re
import socket
from typing import List

from tests.conftest import PYTHON, Process
from tests.system.test_worker import start_gunicorn

CAP = 0.5
RETRY = re.compile(r"retrying in (\d+\.\d)s \(attempt (\d+)\)")


def refusing_port() -> socket.socket:
    """A bound, not listening, loopback socket: connections to its port are refused until it closes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def retry_delays(process: Process) -> List[float]:
    return [float(m.group(1)) for line in process.output().splitlines() for m in [RETRY.search(line)] if m]


def test_max_backoff_caps_the_redial_delay_and_the_router_is_redialled_within_it(processes, router_process):
    holder = refusing_port()
    address = f"127.0.0.1:{holder.getsockname()[1]}"
    backend = Process([PYTHON, "-m", "ptth_sync.backend", "--connect", address, "--max-backoff", str(CAP),
                       "tests.apps:multi"])
    processes.append(backend)
    try:
        backend.wait_for_line(r"\(attempt 8\)", timeout=20)  # 0.1 s doubled: past the cap from the 4th
    finally:
        holder.close()
    delays = retry_delays(backend)
    assert delays
    assert max(delays) <= CAP, delays
    router = router_process(tunnels=address)
    router.wait_tunnels(1, timeout=CAP + 3)


def test_gunicorn_workers_take_max_backoff_from_the_environment(processes, tmp_path):
    holder = refusing_port()
    try:
        env = {"PTTH_CONNECT": f"127.0.0.1:{holder.getsockname()[1]}", "PTTH_MAX_BACKOFF": str(CAP)}
        server = start_gunicorn(processes, None, tmp_path, env=env)
        server.wait_for_line(r"\(attempt 8\)", timeout=30)
    finally:
        holder.close()
    delays = retry_delays(server)
    assert delays
    assert max(delays) <= CAP, delays


def test_the_backend_command_exits_2_above_a_limit(processes):
    backend = Process([PYTHON, "-m", "ptth_sync.backend", "--threads", "10001", "tests.apps:multi"])
    processes.append(backend)
    assert backend.wait(15) == 2
    backend.wait_for_line(r"error: argument --threads: 10001 is over the limit of 10000 threads per process: ")


def test_gunicorn_does_not_boot_above_a_limit(processes, tmp_path):
    threads = start_gunicorn(processes, None, tmp_path, "--threads", "20000")
    tunnels = start_gunicorn(processes, None, tmp_path, env={"PTTH_TUNNELS": "1001"})
    for server, reason in (
        (threads, r"Error: --threads: 20000 is over the limit of 10000 threads per process: "),
        (tunnels, r"Error: PTTH_TUNNELS: 1001 is over the limit of 1000 tunnels per router address: "),
    ):
        assert server.wait(30) != 0
        server.wait_for_line(reason)
