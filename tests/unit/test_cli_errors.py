"""Configuration mistakes refused at start, each with one line that names the option, the file and the fix."""

from __future__ import annotations

import argparse

import pytest

from ptth_sync.addresses import parse_address
from ptth_sync.backend import cli as backend_cli
from ptth_sync.cli import positive_float, positive_int
from ptth_sync.handshake import (
    TLS_REQUIRED,
    WRONG_PORT,
    HandshakeRefused,
    goaway_refusal,
    looks_like_tls,
    plaintext_answer,
    refusal_preface,
    wrong_answer_refusal,
)
from ptth_sync.router import server as router_server
from ptth_sync.worker import tunnel_options, tunnel_security

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    """A certificate and its key apart, both in one file, a stray key, and the CA."""
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("pem")
    cert = ca.issue_cert("localhost")
    files = {name: folder / f"{name}.pem" for name in ("ca", "cert", "key", "both", "stray")}
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    cert.private_key_and_cert_chain_pem.write_to_path(files["both"])
    ca.issue_cert("other").private_key_pem.write_to_path(files["stray"])
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(autouse=True)
def no_logging_setup(monkeypatch):
    """The command lines set up logging for their process; in here they must not touch pytest's."""
    monkeypatch.setattr(backend_cli, "configure_logging", lambda *_: None)
    monkeypatch.setattr(router_server, "configure_logging", lambda *_: None)
    monkeypatch.delenv("PTTH_TOKEN", raising=False)


def usage_error(main, argv, capsys) -> str:
    """The ``error:`` line of a command line that refuses ``argv`` with exit status 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1
    return lines[0].split("error: ", 1)[1]


# -- both command lines --------------------------------------------------------------------------


@pytest.mark.parametrize("main", [backend_cli.main, router_server.main], ids=["backend", "router"])
def test_token_and_token_file_exclude_each_other(main, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text("t\n")
    argv = ["--token", "x", "--token-file", str(token_file), "tests.apps:hello"]
    if main is router_server.main:
        argv.pop()
    assert usage_error(main, argv, capsys) == "argument --token-file: not allowed with argument --token"


@pytest.mark.parametrize("main", [backend_cli.main, router_server.main], ids=["backend", "router"])
def test_a_missing_token_file_is_named(main, tmp_path, capsys):
    missing = tmp_path / "missing"
    argv = ["--token-file", str(missing)] + (["tests.apps:hello"] if main is backend_cli.main else [])
    assert usage_error(main, argv, capsys) == (
        f"argument --token-file: cannot read {missing}: No such file or directory")


def test_an_empty_token_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert usage_error(router_server.main, ["--token-file", str(empty)], capsys) == (
        f"argument --token-file: {empty} is empty: its first line is the token")


@pytest.mark.parametrize(("parse", "text", "reason"), [
    (positive_int, "abc", "not a whole number: 'abc'"),
    (positive_int, "0", "must be at least 1, not 0"),
    (positive_float, "abc", "not a number of seconds: 'abc'"),
    (positive_float, "-1", "must be a number of seconds, 0 or more, not -1"),
    (positive_float, "nan", "must be a number of seconds, 0 or more, not nan"),
])
def test_numbers_are_refused_in_words(parse, text, reason):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{reason}$"):
        parse(text)


def test_the_router_names_the_option_of_a_bad_number(capsys):
    assert usage_error(router_server.main, ["--max-body-size", "abc"], capsys) == (
        "argument --max-body-size: not a whole number: 'abc'")


# -- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "reason"), [
    ("http://127.0.0.1:8887", "'http://127.0.0.1:8887' is a URL, not a HOST:PORT address: give 127.0.0.1:8887"),
    ("https://router.example/", "'https://router.example/' is a URL, not a HOST:PORT address: give HOST:PORT"),
    ("tls://r.example:8887", "'tls://r.example:8887' is a URL, not a HOST:PORT address: give r.example:8887, "
                             "with --tls on the backend (--certfile on the router)"),
])
def test_a_url_is_no_address_and_the_error_says_what_to_give(text, reason):
    with pytest.raises(ValueError, match="is a URL") as info:
        parse_address(text)
    assert str(info.value) == reason


def test_a_port_alone_is_no_address_and_the_error_says_how_to_write_it(capsys):
    assert usage_error(router_server.main, ["--http", "8888"], capsys) == (
        "argument --http: not a HOST:PORT address: '8888': for port 8888 on 127.0.0.1, give :8888")


def test_the_backend_names_connect_for_a_url(capsys):
    assert usage_error(backend_cli.main, ["--connect", "http://127.0.0.1:8887", "tests.apps:hello"], capsys) == (
        "argument --connect: 'http://127.0.0.1:8887' is a URL, not a HOST:PORT address: give 127.0.0.1:8887")


def test_the_router_names_the_listener_of_a_bad_address(capsys):
    assert usage_error(router_server.main, ["--http", "http://0.0.0.0:80"], capsys) == (
        "argument --http: 'http://0.0.0.0:80' is a URL, not a HOST:PORT address: give 0.0.0.0:80")


def test_gunicorn_names_ptth_connect_for_a_url():
    with pytest.raises(ValueError, match=r"^PTTH_CONNECT: 'http://r:1' is a URL, not a HOST:PORT address: give r:1$"):
        tunnel_options({"PTTH_CONNECT": "http://r:1"})


# -- certificates ----------------------------------------------------------------------------------


def test_the_router_names_a_certificate_without_its_key(pem, capsys):
    assert usage_error(router_server.main, ["--certfile", pem["cert"]], capsys) == (
        f"--certfile {pem['cert']} holds no usable private key: give --keyfile FILE, "
        "or one PEM file holding the certificate and its key")


@pytest.mark.parametrize(("argv", "reason"), [
    (["--keyfile", "{key}"], "argument --keyfile: needs --certfile (the tunnel certificate the key belongs to)"),
    (["--certfile", "{cert}", "--keyfile", "{stray}"],
     "--keyfile {stray} does not match the certificate in --certfile {cert}"),
    (["--certfile", "{key}"], "--certfile {key} holds no PEM certificate"),
    (["--certfile", "{both}", "--ca-certs", "{key}"], "--ca-certs {key} holds no PEM certificate"),
    (["--certfile", "{both}", "--ca-certs", "{ca}.missing"], "--ca-certs {ca}.missing: No such file or directory"),
    (["--http-certfile", "{cert}", "--http-keyfile", "{cert}"],
     "--http-keyfile {cert} holds no usable PEM private key"),
    (["--http-certfile", "{ca}.missing", "--http-keyfile", "{key}"],
     "--http-certfile {ca}.missing: No such file or directory"),
])
def test_the_router_names_each_unusable_tls_file(pem, capsys, argv, reason):
    argv = [arg.format(**pem) for arg in argv]
    assert usage_error(router_server.main, argv, capsys) == reason.format(**pem)


@pytest.mark.parametrize(("argv", "reason"), [
    (["--keyfile", "{key}"], "argument --keyfile: needs --certfile (the client certificate the key belongs to)"),
    (["--certfile", "{cert}"], "--certfile {cert} holds no usable private key: give --keyfile FILE, "
                               "or one PEM file holding the certificate and its key"),
    (["--cafile", "{ca}.missing"], "--cafile {ca}.missing: No such file or directory"),
])
def test_the_backend_names_each_unusable_tls_file(pem, capsys, argv, reason):
    argv = [arg.format(**pem) for arg in argv] + ["tests.apps:hello"]
    assert usage_error(backend_cli.main, argv, capsys) == reason.format(**pem)


def test_gunicorn_names_the_ptth_variables_of_unusable_tls_files(pem):
    with pytest.raises(ValueError, match=r"^PTTH_KEYFILE needs PTTH_CERTFILE"):
        tunnel_security({"PTTH_KEYFILE": pem["key"]})
    with pytest.raises(ValueError, match=r"^PTTH_CERTFILE \S+ holds no usable private key: give PTTH_KEYFILE FILE"):
        tunnel_security({"PTTH_CERTFILE": pem["cert"]})
    with pytest.raises(ValueError, match=r"^PTTH_CAFILE \S+: No such file or directory$"):
        tunnel_security({"PTTH_TLS": "1", "PTTH_CAFILE": pem["ca"] + ".missing"})


def test_gunicorn_takes_a_client_certificate_as_asking_for_tls(pem):
    _, context = tunnel_security({"PTTH_CERTFILE": pem["cert"], "PTTH_KEYFILE": pem["key"]})
    assert context is not None


# -- the application -------------------------------------------------------------------------------


def test_calling_an_application_that_is_no_factory_is_one_line():
    with pytest.raises(backend_cli.AppLoadError) as info:
        backend_cli.load_app("examples.flask_app:app()")
    assert str(info.value) == ("Cannot load examples.flask_app:app(): app is the WSGI application itself, "
                               "not a factory to call: give examples.flask_app:app")


def test_a_missing_module_or_attribute_is_one_line():
    with pytest.raises(backend_cli.AppLoadError, match=r"^Cannot load nowhere_at_all:app: No module named"):
        backend_cli.load_app("nowhere_at_all:app")
    with pytest.raises(backend_cli.AppLoadError, match=r"^Cannot load tests.apps:nope: Failed to find attribute"):
        backend_cli.load_app("tests.apps:nope")


# -- what the backend makes of a peer's answer ------------------------------------------------------


@pytest.mark.parametrize(("first", "status"), [
    (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n", 400),
    (b"HTTP/1.0 404 Not Found\r\n", 404),
    (b"HTTP/1.1 200 OK\r\nContent-Le", 200),
])
def test_an_http1_answer_on_the_plain_wire_is_the_wrong_port(first, status):
    refusal = wrong_answer_refusal(first)
    assert isinstance(refusal, HandshakeRefused)
    assert (refusal.status, refusal.fix) == (status, WRONG_PORT)


@pytest.mark.parametrize("first", [b"HTTP/1.1 503 Service Unavailable\r\n\r\n", b"HTTP/1.1 502 Bad Gateway\r\n\r\n",
                                   b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x00\x00\x12\x04\x00", b""])
def test_answers_that_a_redial_may_change_are_no_refusal(first):
    assert wrong_answer_refusal(first) is None


def test_a_tls_record_on_the_plain_wire_says_use_tls():
    assert looks_like_tls(b"\x15\x03\x03\x00\x02\x02\x28")
    assert not looks_like_tls(b"\x00\x00\x12\x04")
    refusal = wrong_answer_refusal(b"\x15\x03\x03\x00\x02\x02\x28")
    assert refusal is not None
    assert "--tls" in refusal.fix
    assert wrong_answer_refusal(b"\x15\x03\x03\x00\x02\x02\x28", tls=True) is None


def test_only_a_goaway_inadequate_security_is_a_refusal_and_its_text_is_kept_printable():
    assert goaway_refusal(0, b"drained") is None
    assert goaway_refusal(1, b"protocol error") is None
    refusal = goaway_refusal(12, b"need a token\n\x1b[31m")
    assert refusal is not None
    assert refusal.detail == "need a token??[31m"
    assert goaway_refusal(12, b"").detail == "GOAWAY (INADEQUATE_SECURITY)"


def test_the_refusal_preface_is_a_client_preface_and_a_goaway():
    data = refusal_preface("why")
    assert data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert data.endswith(b"\x00\x00\x00\x0cwhy")  # INADEQUATE_SECURITY, then the debug data


def test_a_plain_peer_of_a_tls_listener_is_answered_in_its_own_protocol():
    http1, reason = plaintext_answer(b"GET /.well-known/ptth/*/ HTTP/1.1\r\n")
    assert http1.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert "--tls" in reason
    http2, reason = plaintext_answer(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")
    assert http2 == refusal_preface(TLS_REQUIRED)
    assert "--tls" in reason


def test_a_refusal_names_its_router_once_the_backend_knows_it():
    refusal = HandshakeRefused(401, "Unauthorized", "check the token")
    assert str(refusal) == "router refused the tunnel: 401 Unauthorized; check the token"
    refusal.router = "r.example:8887"
    assert str(refusal) == "Router at r.example:8887 refused the tunnel: 401 Unauthorized; check the token"
