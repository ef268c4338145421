"""The settings snapshot a worker hands to gunicorn's per-request code in place of its ``Config``."""

from __future__ import annotations

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi

from ptth_sync.gunicorn_base import SettingsSnapshot
from ptth_sync.router.http1 import RouterResponse, request_parser
from ptth_sync.router.relay import ResponseSink


def _hook(worker, req):
    return None


def _configured() -> Config:
    cfg = Config()
    cfg.set("limit_request_line", 1234)
    cfg.set("limit_request_fields", 17)
    cfg.set("forwarded_allow_ips", "10.0.0.1,127.0.0.1")
    cfg.set("keepalive", 7)
    cfg.set("workers", 3)
    cfg.set("pre_request", _hook)
    cfg.set("strip_header_spaces", True)
    return cfg


def test_every_setting_reads_the_same_through_the_snapshot() -> None:
    cfg = _configured()
    snapshot = SettingsSnapshot(cfg)
    for name in sorted(cfg.settings):
        assert getattr(snapshot, name) == getattr(cfg, name), name
        assert getattr(snapshot, name) == getattr(cfg, name), name  # (the kept value too)
    for name in ("is_ssl", "worker_class_str", "address", "uid", "gid", "proc_name", "logger_class", "env"):
        assert getattr(snapshot, name) == getattr(cfg, name), name
    assert snapshot.pre_request is _hook


def test_each_setting_is_looked_up_once() -> None:
    lookups = []

    class CountingConfig(Config):
        def __getattr__(self, name: str):
            lookups.append(name)
            return super().__getattr__(name)

    snapshot = SettingsSnapshot(CountingConfig())
    for _ in range(5):
        assert snapshot.keepalive == 2
        assert snapshot.limit_request_fields == 100
    assert lookups == ["keepalive", "limit_request_fields"]


def test_an_unknown_name_is_an_attribute_error_as_with_config() -> None:
    snapshot = SettingsSnapshot(Config())
    with pytest.raises(AttributeError):
        snapshot.no_such_setting  # noqa: B018
    assert getattr(snapshot, "no_such_setting", "default") == "default"


class _NoMoreBytes:
    @staticmethod
    def recv(size: int) -> bytes:
        return b""


@pytest.mark.parametrize("peer", [("127.0.0.1", 5000), ("127.0.0.9", 5000)])
def test_a_request_parses_and_its_environ_is_the_same_with_the_snapshot(peer: tuple) -> None:
    head = (b"POST /a/b?x=1 HTTP/1.1\r\nHost: example.test:8080\r\nX-Forwarded-Proto: https\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 3\r\nAccept: a\r\nAccept: b\r\n\r\nabc")
    seen = []
    for settings in (_configured(), SettingsSnapshot(_configured())):
        parser = request_parser(settings, _NoMoreBytes, peer)
        parser.unreader.unread(head)
        req = next(parser)
        resp, environ = wsgi.create(req, ResponseSink(), peer, ("127.0.0.1", 7080), settings,
                                    response_class=RouterResponse)
        resp.start_response("200 OK", [("Content-Length", "2")])
        resp.write(b"ok")
        head_out = b"".join(resp.sock.take()).split(b"\r\nDate: ")[0]
        plain = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool, tuple))}
        seen.append((req.method, req.uri, req.scheme, req.headers, req.body.read(), plain, head_out,
                     resp.should_close()))
    assert seen[0] == seen[1]
    assert seen[0][2] == ("https" if peer[0] == "127.0.0.1" else "http")  # a trusted proxy's header believed
