"""Named origins through the command lines and the gunicorn worker: real processes over loopback."""

from __future__ import annotations

import http.client
import json
import signal
from typing import Dict, Optional, Tuple

from tests.conftest import wait_until
from tests.system.test_worker import start_gunicorn, wait_tunnels


def get(router, host: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes]:
    """GET /foo on the router with this ``Host`` (and ``headers``)."""
    connection = http.client.HTTPConnection(router.http_host, router.http_port, timeout=10)
    try:
        connection.request("GET", "/foo", headers={"Host": host, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_tokens_file_decides_who_serves_which_origin(router_process, backend_process, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("api-key  http://api.example.com\nany-key  *\n")
    router = router_process("--tokens-file", str(tokens))
    backend_process("tests.apps:hello", router.tunnel_address, "--token", "api-key",
                    "--origin", "http://api.example.com")
    backend_process("tests.apps:pid", router.tunnel_address, "--token", "any-key")
    router.wait_tunnels(2)
    assert get(router, "api.example.com") == (200, b"bar")
    status, body = get(router, "www.example.com")
    assert status == 200
    assert body.isdigit()

    intruder = backend_process("tests.apps:hello", router.tunnel_address, "--token", "api-key",
                               "--origin", "http://www.example.com")
    assert intruder.wait(15) == 1
    intruder.wait_for_line(r"refused the tunnel: 403")
    router.wait_for_line(r"Tunnel from .* refused: this token may not register origin http://www.example.com")
    assert "api-key" not in router.output()
    assert get(router, "api.example.com") == (200, b"bar")


def test_a_broken_tokens_file_stops_the_router_with_its_line(router_process, tmp_path):
    from tests.conftest import PYTHON, Process

    tokens = tmp_path / "tokens"
    tokens.write_text("lonely-token\n")
    router = Process([PYTHON, "-m", "ptth_sync.router", "--tunnels", "127.0.0.1:0", "--http", "127.0.0.1:0",
                      "--tokens-file", str(tokens)])
    try:
        assert router.wait(15) == 2
        router.wait_for_line(r"tokens:1: a token needs the origins")
    finally:
        router.stop()


def test_a_host_no_backend_serves_gets_421(router_process, backend_process):
    router = router_process()
    backend_process("tests.apps:hello", router.tunnel_address, "--origin", "http://api.example.com,http://api.test")
    router.wait_tunnels(2)
    assert get(router, "api.example.com") == (200, b"bar")
    assert get(router, "api.test") == (200, b"bar")
    status, body = get(router, "nobody.example.com")
    assert status == 421
    assert b"no backend serves the host 'nobody.example.com'" in body


def test_the_gunicorn_worker_registers_the_origins_of_ptth_origin(router_process, processes, tmp_path):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, env={"PTTH_ORIGIN": "http://api.example.com"})
    wait_tunnels(router, server, 1)
    assert get(router, "api.example.com") == (200, b"bar")
    assert get(router, "nobody.example.com")[0] == 421


def test_the_gunicorn_worker_refuses_to_start_with_an_origin_that_is_no_origin(router_process, processes, tmp_path):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, env={"PTTH_ORIGIN": "api.example.com"})
    assert server.wait(30) != 0
    server.wait_for_line(r"PTTH_ORIGIN: 'api.example.com' is not an origin")


def test_a_backend_given_a_name_dials_the_router_behind_it(router_process, backend_process):
    router = router_process()
    backend_process("tests.apps:hello", f"localhost:{router.tunnel_port}")
    router.wait_tunnels(1)
    assert get(router, "anything.example.com") == (200, b"bar")


def test_behind_a_trusted_proxy_that_ended_tls_an_https_origin_is_served(router_process, backend_process):
    router = router_process("--forwarded-allow-ips", "127.0.0.1")
    backend_process("tests.apps:environ_json", router.tunnel_address, "--origin", "https://api.example.com")
    router.wait_tunnels(1)
    status, body = get(router, "api.example.com", {"X-Forwarded-Proto": "https"})
    assert status == 200
    environ = json.loads(body)
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
    assert get(router, "api.example.com")[0] == 421  # plain http is another origin


def test_an_untrusted_proxy_cannot_claim_https(router_process, backend_process):
    router = router_process("--forwarded-allow-ips", "192.0.2.1")
    backend_process("tests.apps:hello", router.tunnel_address, "--origin", "https://api.example.com")
    router.wait_tunnels(1)
    assert get(router, "api.example.com", {"X-Forwarded-Proto": "https"})[0] == 421


def test_sighup_makes_the_router_read_its_tokens_file_again(router_process, backend_process, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("old-key  *\n")
    router = router_process("--tokens-file", str(tokens))
    refused = backend_process("tests.apps:hello", router.tunnel_address, "--token", "new-key")
    assert refused.wait(15) == 1

    def reload() -> None:
        """SIGHUP, and wait until the old worker has gone (it knew the old tokens)."""
        start = len(router.lines)
        router.signal(signal.SIGHUP)
        router.wait_for_line(r"Booting worker", start=start)
        router.wait_for_line(r"Worker exiting", start=start)

    tokens.write_text("old-key  *\nnew-key  http://api.example.com\n")
    reload()
    backend_process("tests.apps:hello", router.tunnel_address, "--token", "new-key", "--origin", "http://api.example.com")
    wait_until(lambda: router.count_lines("Tunnel added") == 1, what=lambda: f"the tunnel:\n{router.output()}")
    assert get(router, "api.example.com") == (200, b"bar")

    tokens.write_text("lonely-token\n")
    reload()
    router.wait_for_line(r"Keeping the previous tokens: .*tokens:1: a token needs the origins")
    # The backend redials into the new worker, which has the tokens the file had before.
    wait_until(lambda: router.count_lines("Tunnel added") == 2, 30,
               what=lambda: f"the tunnel again:\n{router.output()}")
    assert get(router, "api.example.com") == (200, b"bar")
