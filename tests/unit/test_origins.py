"""Origins in normal form, the router's access rule and the tokens file."""

from __future__ import annotations

import pytest

from ptth_sync.access import TunnelAccess, load_tokens_file
from ptth_sync.handshake import encode_origin
from ptth_sync.origins import normalize_origin, request_origin


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("https://api.example.com", "https://api.example.com"),
        ("HTTPS://API.Example.COM:443", "https://api.example.com"),
        ("https://api.example.com/", "https://api.example.com"),
        ("http://api.example.com:80", "http://api.example.com"),
        ("http://api.example.com:8080", "http://api.example.com:8080"),
        ("https://api.example.com:80", "https://api.example.com:80"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("http://127.0.0.1", "http://127.0.0.1"),
        ("*", "*"),
        (" https://a.example ", "https://a.example"),
    ],
)
def test_origins_are_compared_in_one_normal_form(text, normal):
    assert normalize_origin(text) == normal


@pytest.mark.parametrize(
    "text",
    ["api.example.com", "ftp://api.example.com", "https://", "https://api.example.com/v1",
     "https://user@api.example.com", "https://api.example.com?x=1", "https://api.example.com:99999", ""],
)
def test_what_is_not_an_origin_is_refused_with_a_reason(text):
    with pytest.raises(ValueError, match="not an origin"):
        normalize_origin(text)


@pytest.mark.parametrize(
    ("scheme", "host", "origin"),
    [
        ("http", "api.example.com", "http://api.example.com"),
        ("https", "API.example.com:443", "https://api.example.com"),
        ("http", "api.example.com:8888", "http://api.example.com:8888"),
        ("http", "[::1]:80", "http://[::1]"),
        ("http", "", None),
        ("http", "a b", None),
        ("http", "api.example.com:port", None),
        ("gopher", "api.example.com", None),
        ("http", "user@api.example.com", None),
    ],
)
def test_a_request_asks_for_the_origin_of_its_scheme_and_host(scheme, host, origin):
    assert request_origin(scheme, host) == origin


def test_an_origin_travels_percent_encoded_in_the_upgrade_path():
    assert encode_origin("https://api.example.com") == "https%3A%2F%2Fapi.example.com"


def test_without_tokens_anyone_may_register_any_origin():
    access = TunnelAccess()
    assert not access.required
    assert access.check("", "https://api.example.com") is None
    assert access.check("", "*") is None


def test_the_shared_token_may_register_any_origin_and_others_are_refused_401():
    access = TunnelAccess(token="shared")
    assert access.required
    assert access.check("Bearer shared", "https://api.example.com") is None
    assert access.check("Bearer shared", "*") is None
    assert access.check("Bearer other", "*")[0] == 401
    assert access.check("Basic shared", "*")[0] == 401
    assert access.check("", "*")[0] == 401


def test_a_token_restricted_to_origins_gets_403_elsewhere_and_in_the_default_pool():
    access = TunnelAccess(tokens={"api-key": ["https://API.example.com:443"], "any-key": ["*"]})
    assert access.check("Bearer api-key", "https://api.example.com") is None
    status, why = access.check("Bearer api-key", "https://www.example.com")
    assert status == 403
    assert "https://www.example.com" in why
    status, why = access.check("Bearer api-key", "*")
    assert status == 403
    assert "default pool" in why
    assert access.check("Bearer any-key", "https://www.example.com") is None
    assert access.check("Bearer nobody", "https://api.example.com")[0] == 401


def test_a_tokens_file_maps_each_token_to_its_origins(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(
        "# token  origins\n"
        "\n"
        "k1  https://api.example.com   # the API\n"
        "k2  https://www.example.com http://www.example.com:8080\n"
        "k3  *\n"
    )
    assert load_tokens_file(str(path)) == {
        "k1": frozenset({"https://api.example.com"}),
        "k2": frozenset({"https://www.example.com", "http://www.example.com:8080"}),
        "k3": frozenset({"*"}),
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("k1\n", r":1: a token needs the origins"),
        ("k1 https://a.example\nk1 https://b.example\n", r":2: this token is listed twice"),
        ("k1 a.example\n", r":1: 'a.example' is not an origin"),
        ("# nothing\n", r"lists no token"),
    ],
)
def test_a_broken_tokens_file_names_its_file_and_line(tmp_path, content, message):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tokens_file(str(path))


def test_a_missing_tokens_file_says_so(tmp_path):
    with pytest.raises(ValueError, match="cannot read the tokens file"):
        load_tokens_file(str(tmp_path / "absent"))
