"""Tokens and TLS through the command lines, with certificates made at test time."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.request

import pytest

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("certs")
    paths = {"ca": folder / "ca.pem", "server": folder / "server.pem", "client": folder / "client.pem"}
    ca.cert_pem.write_to_path(paths["ca"])
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(paths["server"])
    ca.issue_cert("backend.example").private_key_and_cert_chain_pem.write_to_path(paths["client"])
    return {name: str(path) for name, path in paths.items()}


def get(url: str, context=None) -> bytes:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.read()


def test_backend_with_the_right_token_serves(router_process, backend_process, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    router = router_process("--token-file", str(token_file))
    backend_process("tests.apps:hello", router.tunnel_address, "--token", "tok-123")
    router.wait_tunnels(1)
    assert get(router.url + "/foo") == b"bar"


def test_backend_with_a_wrong_token_exits_1_after_one_line_and_does_not_retry(router_process, backend_process):
    router = router_process("--token", "tok-123")
    backend = backend_process("tests.apps:hello", router.tunnel_address, "--token", "wrong-guess")
    assert backend.wait(15) == 1
    refusals = [line for line in backend.lines if "refused" in line]
    assert len(refusals) == 1
    assert "401" in refusals[0]
    assert "wrong-guess" not in backend.output()
    assert router.count_lines("Tunnel added") == 0
    router.wait_for_line("Tunnel from .* refused: wrong or missing token")


def test_token_router_refuses_a_plain_wire_backend(router_process, backend_process):
    router = router_process("--token", "tok-123")
    backend = backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_for_line("plain-wire tunnel refused")
    assert router.count_lines("Tunnel added") == 0
    assert backend.wait(15) == 1
    backend.wait_for_line("refused the tunnel: this router requires a token")


def test_tls_tunnel_with_mutual_tls_and_https_on_the_public_side(router_process, backend_process, certs):
    router = router_process(
        "--certfile", certs["server"], "--ca-certs", certs["ca"],
        "--http-certfile", certs["server"], "--http-keyfile", certs["server"],
    )  # fmt: skip
    backend_process("examples.flask_app:app", router.tunnel_address, "--cafile", certs["ca"],
                    "--certfile", certs["client"])
    router.wait_tunnels(1)
    client = ssl.create_default_context(cafile=certs["ca"])
    assert router.url.startswith("https://")  # the router says https:// for an HTTPS listener
    assert get(router.url + "/foo", client) == b"bar"
    assert json.loads(get(router.url + "/whoami", client))["scheme"] == "https"  # X-Forwarded-Proto
    with pytest.raises((ssl.SSLError, http.client.HTTPException, ConnectionError, OSError)):
        get(router.url.replace("https://", "http://") + "/foo")  # plain HTTP to an HTTPS listener


def test_mutual_tls_router_refuses_a_backend_without_a_client_certificate(router_process, backend_process, certs):
    router = router_process("--certfile", certs["server"], "--ca-certs", certs["ca"])
    backend = backend_process("tests.apps:hello", router.tunnel_address, "--cafile", certs["ca"])
    router.wait_for_line("failed the TLS handshake: the backend presented no client certificate")
    assert router.count_lines("Tunnel added") == 0
    assert backend.wait(15) == 1  # no redial can help: see tests/system/test_misconfiguration.py
    backend.wait_for_line("refused the tunnel: it requires a client certificate")
