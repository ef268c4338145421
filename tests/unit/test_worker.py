"""Unit tests for the gunicorn worker, constructed as the arbiter constructs it, over a fake stream."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from gunicorn.config import Config

from ptth_sync.worker import TunnelRequest, TunnelWorker, tunnel_options, tunnel_security
from tests import apps
from tests.unit.test_wsgi_response import FakeStream

REQUEST = [
    (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app.example.test"),
    (b":path", b"/foo?a=b"), (b"user-agent", b"ua/1"), (b"x-forwarded-for", b"10.0.0.7"),
]


def make_worker(**settings):
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    worker = TunnelWorker(age=1, ppid=os.getpid(), sockets=[], app=mock.Mock(), timeout=15, cfg=cfg, log=mock.Mock())
    worker.wsgi = apps.hello
    return worker


# -- tunnel_options ------------------------------------------------------------------


def test_tunnel_options_defaults():
    assert tunnel_options({}) == ([("127.0.0.1", 8887)], 1)


def test_tunnel_options_reads_connect_and_tunnels():
    environ = {"PTTH_CONNECT": "10.0.0.1:9000,[::1]:9001", "PTTH_TUNNELS": "3"}
    assert tunnel_options(environ) == ([("10.0.0.1", 9000), ("::1", 9001)], 3)


@pytest.mark.parametrize(
    ("environ", "reason"),
    [
        ({"PTTH_CONNECT": "nowhere"}, "PTTH_CONNECT: not a HOST:PORT address"),
        ({"PTTH_TUNNELS": "0"}, "PTTH_TUNNELS must be a whole number of at least 1"),
        ({"PTTH_TUNNELS": "two"}, "PTTH_TUNNELS must be a whole number of at least 1"),
    ],
)
def test_tunnel_options_refuses(environ, reason):
    with pytest.raises(ValueError, match=reason):
        tunnel_options(environ)


def test_check_config_turns_a_refusal_into_gunicorns_fatal_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PTTH_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="PTTH_TOKEN_FILE: cannot read"):
        TunnelWorker.check_config(Config(), mock.Mock())


def test_tunnel_security_reads_the_token_and_tls_settings(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    assert tunnel_security({}) == (None, None)
    assert tunnel_security({"PTTH_TOKEN": "t"})[0] == "t"
    assert tunnel_security({"PTTH_TOKEN": "t", "PTTH_TOKEN_FILE": str(token_file)})[0] == "from-a-file"
    _, context = tunnel_security({"PTTH_TLS": "1"})
    assert context is not None
    assert context.check_hostname


def test_check_config_explains_the_bound_socket(monkeypatch):
    monkeypatch.delenv("PTTH_TOKEN", raising=False)
    log = mock.Mock()
    TunnelWorker.check_config(Config(), log)
    messages = [call.args[0] % call.args[1:] for call in log.info.call_args_list]
    assert any("Also listening at 127.0.0.1:8000" in m and "bind = []" in m for m in messages), messages


# -- TunnelRequest -------------------------------------------------------------------


def test_request_has_gunicorns_names():
    req = TunnelRequest(REQUEST)
    assert (req.method, req.uri, req.path, req.query, req.scheme, req.version) == (
        "GET", "/foo?a=b", "/foo", "a=b", "http", (1, 1)
    )
    assert req.headers == [("HOST", "app.example.test"), ("USER-AGENT", "ua/1"), ("X-FORWARDED-FOR", "10.0.0.7")]


# -- handle_stream -------------------------------------------------------------------


def test_handle_stream_serves_and_logs_like_gthread():
    calls = []

    def pre_request(worker, req):
        calls.append(("pre", worker, req))

    def post_request(worker, req, environ, resp):
        calls.append(("post", worker, req, environ, resp))

    worker = make_worker(pre_request=pre_request, post_request=post_request, workers=3)
    stream = FakeStream(REQUEST)
    worker.handle_stream(stream)
    assert stream.sent_body() == b"bar"
    assert worker.nr == 1
    resp, req, environ, request_time = worker.log.access.call_args.args
    assert (req.method, req.path) == ("GET", "/foo")
    assert (resp.status, resp.sent) == ("200 OK", 3)
    assert environ["RAW_URI"] == "/foo?a=b"
    assert environ["wsgi.multiprocess"] is True
    assert environ["SERVER_SOFTWARE"].startswith("gunicorn/")
    assert request_time.total_seconds() >= 0
    assert calls == [("pre", worker, req), ("post", worker, req, environ, resp)]


def test_failing_pre_request_hook_is_answered_500_and_still_logged():
    def pre_request(worker, req):
        raise RuntimeError("hook")

    worker = make_worker(pre_request=pre_request)
    stream = FakeStream(REQUEST)
    worker.handle_stream(stream)
    assert stream.calls[0][1][0] == (b":status", b"500")
    resp = worker.log.access.call_args.args[0]
    assert (resp.status, resp.sent) == ("500 Internal Server Error", len(b"Internal Server Error\n"))


def test_max_requests_ends_the_worker_after_the_request_and_wakes_its_loop():
    worker = make_worker(max_requests=2)
    read_end, write_end = os.pipe()
    worker.PIPE = [read_end, write_end]
    try:
        worker.handle_stream(FakeStream(REQUEST))
        assert worker.alive
        worker.handle_stream(FakeStream(REQUEST))
        assert not worker.alive
        assert os.read(read_end, 10) == b"."
        worker.handle_stream(FakeStream(REQUEST))  # still served while the drain starts
        assert worker.nr == 3
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_stream_reset_while_it_waited_is_neither_served_nor_counted_nor_logged():
    calls = []

    def post_request(worker, req, environ, resp):
        calls.append("post")

    worker = make_worker(pre_request=lambda worker, req: calls.append("pre"), post_request=post_request)
    stream = FakeStream(REQUEST)
    stream.cancelled = True
    worker.handle_stream(stream)
    assert stream.names() == ["close"]
    assert (worker.nr, calls) == (0, [])
    worker.log.access.assert_not_called()
