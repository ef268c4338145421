"""serve_wsgi prints its tunnel lines when the application set up no logging, and stays out of the way when it did."""

from __future__ import annotations

import signal

from tests.conftest import PYTHON, Process

SCRIPT = """
import logging, sys
from ptth_sync import serve_wsgi
from tests.apps import hello
if sys.argv[2] == "configured":
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="app: %(message)s")
serve_wsgi(sys.argv[1], hello)
"""


def test_serve_wsgi_logs_its_tunnel_lines_when_nothing_is_configured(router_process, processes):
    router = router_process()
    backend = Process([PYTHON, "-c", SCRIPT, router.tunnel_address, "bare"])
    processes.append(backend)
    backend.wait_for_line(r"\[INFO\] Dialing tcp://")
    backend.wait_for_line(r"\[INFO\] Tunnel to \S+ established")
    backend.signal(signal.SIGTERM)
    assert backend.wait() == 0


def test_serve_wsgi_keeps_the_applications_logging(router_process, processes):
    router = router_process()
    backend = Process([PYTHON, "-c", SCRIPT, router.tunnel_address, "configured"])
    processes.append(backend)
    router.wait_tunnels(1)
    backend.signal(signal.SIGTERM)
    assert backend.wait() == 0
    assert backend.count_lines("Dialing") == 0  # INFO, below the application's WARNING level
