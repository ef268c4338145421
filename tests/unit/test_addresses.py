"""Unit tests for ptth_sync.addresses: HOST:PORT parsing and formatting."""

from __future__ import annotations

import pytest

from ptth_sync.addresses import format_address, parse_address, parse_addresses

# -- parse_address -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com:80", ("example.com", 80)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:0", ("localhost", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_address_host_and_port(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::1]:8080", ("::1", 8080)),
        ("[fe80::1:2]:443", ("fe80::1:2", 443)),
    ],
)
def test_parse_address_bracketed_ipv6(text, expected):
    assert parse_address(text) == expected


def test_parse_address_port_only_uses_default_host():
    assert parse_address(":9000") == ("127.0.0.1", 9000)


def test_parse_address_port_only_uses_given_default_host():
    assert parse_address(":9000", default_host="0.0.0.0") == ("0.0.0.0", 9000)


def test_parse_address_tuple_is_normalised():
    assert parse_address(("example.com", "81")) == ("example.com", 81)


def test_parse_address_tcp_prefix_is_removed():
    assert parse_address("tcp://example.com:81") == ("example.com", 81)


def test_parse_address_surrounding_whitespace_is_ignored():
    assert parse_address("  example.com:81 \n") == ("example.com", 81)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.com",
        "example.com:",
        "example.com:http",
        "example.com:-1",
        "example.com:65536",
        "[::1]",
        "tcp://",
    ],
)
def test_parse_address_rejects_bad_input(text):
    with pytest.raises(ValueError, match=r"address|port"):
        parse_address(text)


# -- parse_addresses -----------------------------------------------------------


def test_parse_addresses_single_string():
    assert parse_addresses("a:1") == [("a", 1)]


def test_parse_addresses_comma_separated_list():
    assert parse_addresses("a:1, b:2,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]


def test_parse_addresses_ignores_empty_items():
    assert parse_addresses("a:1,,b:2,") == [("a", 1), ("b", 2)]


def test_parse_addresses_list_of_mixed_strings_and_tuples():
    assert parse_addresses(["a:1", ("b", 2)]) == [("a", 1), ("b", 2)]


def test_parse_addresses_one_tuple_is_one_address():
    assert parse_addresses(("a", 1)) == [("a", 1)]


def test_parse_addresses_tuple_of_two_strings_is_two_addresses():
    assert parse_addresses(("a:1", "b:2")) == [("a", 1), ("b", 2)]


@pytest.mark.parametrize("value", ["", " , ", [], ()])
def test_parse_addresses_rejects_empty_input(value):
    with pytest.raises(ValueError, match="no address"):
        parse_addresses(value)


def test_parse_addresses_rejects_one_bad_item():
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_addresses("a:1,b")


# -- format_address ------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (("127.0.0.1", 80), "127.0.0.1:80"),
        (("example.com", 8080), "example.com:8080"),
        (("::1", 80), "[::1]:80"),
    ],
)
def test_format_address(address, expected):
    assert format_address(address) == expected


@pytest.mark.parametrize("address", [("127.0.0.1", 80), ("example.com", 1), ("::1", 65535), ("fe80::1", 0)])
def test_format_address_round_trips_through_parse_address(address):
    assert parse_address(format_address(address)) == address
