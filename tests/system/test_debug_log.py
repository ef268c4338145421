"""``--log-level debug`` on both command lines: our and gunicorn's debug lines, not HPACK's trace of each header."""

from __future__ import annotations

import http.client

SECRETS = {"Authorization": "Bearer secret-token-4711", "Cookie": "session=secret-cookie-0815"}


def test_a_debug_log_holds_no_header_values(router_process, backend_process):
    router = router_process("--log-level", "debug")
    backend = backend_process("tests.apps:hello", router.tunnel_address, "--log-level", "debug")
    router.wait_tunnels(1)
    connection = http.client.HTTPConnection(router.http_host, router.http_port, timeout=10)
    try:
        for _ in range(2):  # the second time, from HPACK's table
            connection.request("GET", "/debug-probe", headers=SECRETS)
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b"hello")
    finally:
        connection.close()
    # Debug is on: gunicorn's default pre_request hook logs each request at debug.
    router.wait_for_line(r"\[DEBUG\] GET /debug-probe$")
    for process in (router, backend):
        output = process.output()
        assert "secret-" not in output
        for trace in ("Decoded", "Encoding", "to the header table"):  # hpack's per-header lines
            assert process.count_lines(trace) == 0, trace
