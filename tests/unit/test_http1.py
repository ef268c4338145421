"""The router's gunicorn request and response objects (router/http1.py) behave as gunicorn's own.

They differ only in what they remember between requests; these tests fail if
a gunicorn release changes what the originals do in a way the router's copies
would not follow.
"""

from __future__ import annotations

import io
import re
from unittest import mock

import gunicorn
import pytest
from gunicorn.config import Config
from gunicorn.http import get_parser
from gunicorn.http.wsgi import Response

from ptth_sync.router import http1
from ptth_sync.router.http1 import RouterRequest, RouterResponse, http_date, request_parser

_FORWARDED = (
    b"GET /x HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-Proto: https\r\n"
    b"X-Forwarded-For: 203.0.113.9\r\n\r\n"
)


class _Source:
    """A socket-like source of bytes for gunicorn's parser."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def recv(self, size: int) -> bytes:
        return self._data.read(size)


def _config(**settings):
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    return cfg


def _parse(parser_factory, cfg, peer, data=_FORWARDED):
    return next(parser_factory(cfg, _Source(data), peer))


@pytest.mark.parametrize("allow", ["127.0.0.1,::1", "10.0.0.0/8", "*", "203.0.113.0/24,127.0.0.1"])
@pytest.mark.parametrize("peer", [("127.0.0.1", 5000), ("10.1.2.3", 5000), ("203.0.113.7", 1), ("::1", 2, 0, 0)])
def test_the_request_trusts_forwarding_headers_exactly_as_gunicorns_does(allow, peer):
    cfg = _config(forwarded_allow_ips=allow)
    ours = _parse(request_parser, cfg, peer)
    theirs = _parse(get_parser, cfg, peer)
    assert type(ours) is RouterRequest
    assert (ours.scheme, ours.headers) == (theirs.scheme, theirs.headers)
    again = _parse(request_parser, cfg, peer)  # (from what it remembered)
    assert (again.scheme, again.headers) == (theirs.scheme, theirs.headers)


def test_what_is_remembered_follows_the_allow_list():
    peer = ("10.1.2.3", 5000)
    trusted = _parse(request_parser, _config(forwarded_allow_ips="10.0.0.0/8"), peer)
    untrusted = _parse(request_parser, _config(forwarded_allow_ips="127.0.0.1"), peer)
    assert trusted.scheme == "https"
    assert untrusted.scheme == "http"


def test_a_flood_of_peer_addresses_is_forgotten_not_hoarded():
    cfg = _config(forwarded_allow_ips="127.0.0.1")
    with mock.patch.dict(http1._trust, clear=True):
        for last in range(http1._TRUST_LIMIT + 10):
            _parse(request_parser, cfg, (f"10.0.{last // 256}.{last % 256}", 1))
        assert len(http1._trust) <= http1._TRUST_LIMIT


def _responses(method="GET", version=(1, 1), status="200 OK", headers=(), close=False, upgrade=False):
    request = _parse(get_parser, _config(), ("127.0.0.1", 1),
                     f"{method} / HTTP/{version[0]}.{version[1]}\r\nHost: x\r\n\r\n".encode())
    pair = []
    for cls in (Response, RouterResponse):
        response = cls(request, None, _config())
        response.start_response(status, list(headers))
        if close:
            response.force_close()
        response.upgrade = upgrade
        pair.append(response)
    return pair


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"headers": [("Content-Length", "5")]},
        {"version": (1, 0)},
        {"method": "HEAD"},
        {"status": "204 No Content"},
        {"status": "304 Not Modified", "headers": [("Content-Length", "5")]},
        {"close": True, "headers": [("Content-Length", "5")]},
        {"upgrade": True},
        {"status": "101 Switching Protocols"},
    ],
)
def test_the_response_head_is_gunicorns_own(case):
    theirs, ours = _responses(**case)
    with mock.patch("gunicorn.util.http_date", http_date):  # (the one thing that may differ: the second)
        assert ours.default_headers() == theirs.default_headers()


def test_the_date_is_gunicorns_format_and_changes_with_the_second():
    from gunicorn import util

    assert re.fullmatch(r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT", http_date())
    with mock.patch("time.time", return_value=1_800_000_000.7):
        first = http_date()
        assert first == util.http_date(1_800_000_000)
    with mock.patch("time.time", return_value=1_800_000_001.2):
        assert http_date() == util.http_date(1_800_000_001) != first


def test_gunicorn_still_has_what_the_request_overrides():
    from gunicorn.http.message import Request

    assert callable(getattr(Request, "_peer_is_trusted_proxy", None)), (
        f"gunicorn {gunicorn.__version__} no longer has Request._peer_is_trusted_proxy: "
        "ptth_sync/router/http1.py remembers nothing any more"
    )
