"""The examples, run as a user would run them: router, backend and user scripts as real processes."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest

from tests.conftest import PYTHON, ROOT, Process, wait_until

EXAMPLES = ROOT / "examples"


@pytest.fixture
def example_router(processes):
    """``examples/router.py`` on ephemeral loopback ports: ``(process, tunnel address, http address)``."""
    router = Process([PYTHON, str(EXAMPLES / "router.py"), "--tunnels", "127.0.0.1:0", "--http", "127.0.0.1:0"])
    processes.append(router)
    tunnels = router.wait_for_line(r"Listening for reverse tunnels on tcp://(\S+)").group(1)
    http = router.wait_for_line(r"Listening for HTTP traffic on http://(\S+)").group(1)
    return router, tunnels, http


def wait_tunnel(router: Process) -> None:
    """Wait until the router logged a tunnel as added."""
    wait_until(lambda: router.count_lines(r"Tunnel added: ") >= 1, 15, what=lambda: f"a tunnel:\n{router.output()}")


def test_example_user_gets_ten_bars_from_the_example_backend(example_router, processes):
    """``user.py`` sends ten concurrent GETs through ``router.py`` to ``backend.py``: ten ``bar``s."""
    router, tunnels, http = example_router
    processes.append(Process([PYTHON, str(EXAMPLES / "backend.py"), tunnels]))
    wait_tunnel(router)
    result = subprocess.run(
        [PYTHON, str(EXAMPLES / "user.py"), f"http://{http}/foo"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    answers = [line for line in output.splitlines() if "< " in line]
    assert len(answers) == 10, output
    assert all(line.endswith('< 200 OK "bar"') for line in answers), output
    assert sum(1 for line in output.splitlines() if line.endswith(f"> GET http://{http}/foo")) == 10, output


def test_example_flask_app_answers_foo_through_the_backend_command(example_router, backend_process):
    """``python -m ptth_sync.backend examples.flask_app:app`` behind ``router.py``: ``/foo`` → ``bar``."""
    router, tunnels, http = example_router
    backend_process("examples.flask_app:app", tunnels)
    wait_tunnel(router)
    with urllib.request.urlopen(f"http://{http}/foo", timeout=10) as response:
        assert response.status == 200
        assert response.read() == b"bar"
