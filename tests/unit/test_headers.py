"""Unit tests for ptth_sync.headers: WSGI <-> HTTP/2 header mapping for router and backend."""

from __future__ import annotations

import pytest

from ptth_sync.headers import (
    InvalidHeader,
    build_environ,
    encode_response_headers,
    request_headers,
    request_target,
    response_headers,
    response_status,
)

# -- helpers -------------------------------------------------------------------


def wsgi_environ(**extra):
    """A minimal environ as a WSGI server gives it to the router."""
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "router.example",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "example.com",
        "wsgi.url_scheme": "http",
    }
    environ.update(extra)
    return environ


def values(block, name):
    return [v for n, v in block if n == name]


def names(block):
    return [n for n, _ in block]


INPUT = object()
ERRORS = object()


def backend_environ(*headers, path=b"/", scheme=b"http", authority=b"example.com", method=b"GET", peer=None):
    """build_environ for a request block: pseudo-headers then ``headers``."""
    block = [(b":method", method), (b":scheme", scheme)]
    if authority is not None:
        block.append((b":authority", authority))
    block.append((b":path", path))
    block.extend(headers)
    return build_environ(block, wsgi_input=INPUT, errors=ERRORS, peer=peer)


# -- request_target --------------------------------------------------------------


@pytest.mark.parametrize("key", ["RAW_URI", "REQUEST_URI"])
def test_request_target_keeps_raw_uri_as_sent(key):
    environ = {key: "/a%2Fb/c%20d?x=%41&y", "PATH_INFO": "/a/b/c d", "QUERY_STRING": "x=%41&y"}
    assert request_target(environ) == "/a%2Fb/c%20d?x=%41&y"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://example.com/a/b?x=1", "/a/b?x=1"),
        ("https://example.com:8443/a", "/a"),
        ("http://example.com", "/"),
        ("http://example.com?x=1", "/?x=1"),
    ],
)
def test_request_target_reduces_absolute_form_to_path_and_query(raw, expected):
    assert request_target({"RAW_URI": raw}) == expected


def test_request_target_without_raw_uri_joins_script_name_path_info_and_query():
    environ = {"SCRIPT_NAME": "/app", "PATH_INFO": "/a b", "QUERY_STRING": "x=1&y=%20"}
    assert request_target(environ) == "/app/a%20b?x=1&y=%20"


def test_request_target_without_raw_uri_or_path_is_root():
    assert request_target({"SCRIPT_NAME": "", "PATH_INFO": ""}) == "/"


def test_request_target_without_raw_uri_omits_empty_query():
    assert request_target({"PATH_INFO": "/a", "QUERY_STRING": ""}) == "/a"


@pytest.mark.parametrize(("path_info", "expected"), [("/a?b", "/a%3Fb"), ("/a%b", "/a%25b"), ("/a#b", "/a%23b")])
def test_request_target_without_raw_uri_quotes_delimiters(path_info, expected):
    assert request_target({"PATH_INFO": path_info}) == expected


def test_request_target_without_raw_uri_quotes_latin1_path_info_as_its_bytes():
    # PEP 3333: PATH_INFO holds the decoded bytes as latin-1; "/café" in UTF-8 is "/caf\xc3\xa9".
    assert request_target({"PATH_INFO": "/caf\xc3\xa9"}) == "/caf%C3%A9"


# -- request_headers -------------------------------------------------------------


def test_request_headers_start_with_pseudo_headers_in_order():
    block = request_headers(wsgi_environ(HTTP_ACCEPT="*/*", RAW_URI="/x?y=1"))
    assert block[:4] == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"example.com"),
        (b":path", b"/x?y=1"),
    ]
    assert not any(name.startswith(b":") for name in names(block[4:]))


def test_request_headers_scheme_follows_url_scheme():
    block = request_headers(wsgi_environ(**{"wsgi.url_scheme": "https"}))
    assert values(block, b":scheme") == [b"https"]


@pytest.mark.parametrize(
    ("scheme", "port", "authority"),
    [
        ("http", "80", b"router.example"),
        ("https", "443", b"router.example"),
        ("http", "8080", b"router.example:8080"),
        ("https", "80", b"router.example:80"),
    ],
)
def test_request_headers_authority_from_server_name_without_host(scheme, port, authority):
    environ = wsgi_environ(SERVER_PORT=port, **{"wsgi.url_scheme": scheme})
    del environ["HTTP_HOST"]
    assert values(request_headers(environ), b":authority") == [authority]


def test_request_headers_host_becomes_authority_only():
    block = request_headers(wsgi_environ(HTTP_HOST="example.com:8000"))
    assert values(block, b":authority") == [b"example.com:8000"]
    assert b"host" not in names(block)


def test_request_headers_forward_ordinary_headers():
    block = request_headers(wsgi_environ(HTTP_ACCEPT="text/html", HTTP_X_REQUEST_ID="abc"))
    assert values(block, b"accept") == [b"text/html"]
    assert values(block, b"x-request-id") == [b"abc"]


@pytest.mark.parametrize(
    "key",
    [
        "HTTP_CONNECTION",
        "HTTP_KEEP_ALIVE",
        "HTTP_PROXY_CONNECTION",
        "HTTP_TRANSFER_ENCODING",
        "HTTP_UPGRADE",
        "HTTP_HTTP2_SETTINGS",
    ],
)
def test_request_headers_drop_hop_by_hop_headers(key):
    block = request_headers(wsgi_environ(**{key: "x"}))
    assert key[5:].lower().replace("_", "-").encode() not in names(block)


def test_request_headers_drop_headers_named_in_connection():
    block = request_headers(wsgi_environ(HTTP_CONNECTION="close, X-Secret", HTTP_X_SECRET="s", HTTP_X_OTHER="o"))
    assert b"x-secret" not in names(block)
    assert values(block, b"x-other") == [b"o"]


@pytest.mark.parametrize("value", ["trailers", "Trailers", " trailers "])
def test_request_headers_keep_te_trailers(value):
    block = request_headers(wsgi_environ(HTTP_TE=value))
    assert values(block, b"te") == [b"trailers"]


@pytest.mark.parametrize("value", ["gzip", "trailers, deflate", "deflate;q=0.5"])
def test_request_headers_drop_other_te(value):
    block = request_headers(wsgi_environ(HTTP_TE=value))
    assert b"te" not in names(block)


def test_request_headers_x_forwarded_for_is_remote_addr():
    block = request_headers(wsgi_environ(REMOTE_ADDR="10.0.0.1"))
    assert values(block, b"x-forwarded-for") == [b"10.0.0.1"]


def test_request_headers_x_forwarded_for_appends_remote_addr_to_client_value():
    block = request_headers(wsgi_environ(HTTP_X_FORWARDED_FOR="1.1.1.1, 2.2.2.2", REMOTE_ADDR="10.0.0.1"))
    assert values(block, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 10.0.0.1"]


def test_request_headers_x_forwarded_for_without_remote_addr_keeps_client_value():
    block = request_headers(wsgi_environ(HTTP_X_FORWARDED_FOR="1.1.1.1"))
    assert values(block, b"x-forwarded-for") == [b"1.1.1.1"]


def test_request_headers_no_x_forwarded_for_without_any_client():
    assert b"x-forwarded-for" not in names(request_headers(wsgi_environ()))


def test_request_headers_set_x_forwarded_proto_and_host():
    block = request_headers(wsgi_environ(HTTP_HOST="public.example", **{"wsgi.url_scheme": "https"}))
    assert values(block, b"x-forwarded-proto") == [b"https"]
    assert values(block, b"x-forwarded-host") == [b"public.example"]


def test_request_headers_override_client_x_forwarded_proto_and_host():
    block = request_headers(wsgi_environ(HTTP_X_FORWARDED_PROTO="https", HTTP_X_FORWARDED_HOST="evil.example"))
    assert values(block, b"x-forwarded-proto") == [b"http"]
    assert values(block, b"x-forwarded-host") == [b"example.com"]


def test_request_headers_map_content_type_and_length():
    block = request_headers(wsgi_environ(REQUEST_METHOD="POST", CONTENT_TYPE="text/plain", CONTENT_LENGTH="5"))
    assert values(block, b"content-type") == [b"text/plain"]
    assert values(block, b"content-length") == [b"5"]


def test_request_headers_skip_empty_content_type_and_length():
    block = request_headers(wsgi_environ(CONTENT_TYPE="", CONTENT_LENGTH=""))
    assert b"content-type" not in names(block)
    assert b"content-length" not in names(block)


def test_request_headers_ignore_non_header_environ_keys():
    block = request_headers(wsgi_environ(REMOTE_USER="bob", **{"wsgi.input": object()}))
    assert all(name.startswith(b":") or name.startswith(b"x-forwarded-") for name in names(block))


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00"], ids=["cr", "lf", "nul"])
@pytest.mark.parametrize("key", ["HTTP_X_FOO", "CONTENT_TYPE"])
def test_request_headers_reject_control_characters_in_values(key, bad):
    with pytest.raises(InvalidHeader):
        request_headers(wsgi_environ(**{key: f"a{bad}b"}))


@pytest.mark.parametrize("bad", ["\r\nX-Injected: 1", "\x00"], ids=["crlf", "nul"])
def test_request_headers_reject_control_characters_in_client_x_forwarded_for(bad):
    with pytest.raises(InvalidHeader):
        request_headers(wsgi_environ(HTTP_X_FORWARDED_FOR=f"1.1.1.1{bad}", REMOTE_ADDR="10.0.0.1"))


@pytest.mark.parametrize("bad", ["\r\nX-Injected: 1", "\x00"], ids=["crlf", "nul"])
def test_request_headers_reject_control_characters_in_host(bad):
    with pytest.raises(InvalidHeader):
        request_headers(wsgi_environ(HTTP_HOST=f"example.com{bad}"))


def test_request_headers_encode_values_as_latin1():
    block = request_headers(wsgi_environ(HTTP_X_NAME="caf\xe9"))
    assert values(block, b"x-name") == [b"caf\xe9"]


# -- response_status ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (b"200", (200, "200 OK")),
        (b"404", (404, "404 Not Found")),
        (b"503", (503, "503 Service Unavailable")),
        (b"599", (599, "599 Unknown")),
    ],
)
def test_response_status(status, expected):
    assert response_status([(b":status", status), (b"content-type", b"text/plain")]) == expected


def test_response_status_without_status_raises():
    with pytest.raises(InvalidHeader, match=":status"):
        response_status([(b"content-type", b"text/plain")])


# -- response_headers --------------------------------------------------------------


def test_response_headers_drop_pseudo_headers():
    assert response_headers([(b":status", b"200"), (b"content-type", b"text/plain")]) == [
        ("content-type", "text/plain")
    ]


@pytest.mark.parametrize("name", [b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te"])
def test_response_headers_refuse_connection_specific_headers(name):
    """RFC 9113 8.2.2: such a response is malformed (the router answers 502 and resets the stream)."""
    with pytest.raises(InvalidHeader, match="connection-specific"):
        response_headers([(b":status", b"200"), (name, b"x"), (b"x-kept", b"1")])


def test_response_headers_keep_repeated_headers_in_order():
    block = [(b":status", b"200"), (b"set-cookie", b"a=1"), (b"x-other", b"o"), (b"set-cookie", b"b=2")]
    assert response_headers(block) == [("set-cookie", "a=1"), ("x-other", "o"), ("set-cookie", "b=2")]


def test_response_headers_decode_values_as_latin1():
    assert response_headers([(b":status", b"200"), (b"x-name", b"caf\xe9")]) == [("x-name", "caf\xe9")]


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ((b"X-Upper", b"1"), "invalid response header name"),
        ((b"x bad", b"1"), "invalid response header name"),
        ((b"", b"1"), "invalid response header name"),
        ((b":path", b"/"), "pseudo-header"),
        ((b":status", b"200"), "pseudo-header"),
        ((b"x-split", b"a\r\nset-cookie: evil=1"), "CR, LF or NUL"),
        ((b"x-nul", b"a\x00b"), "CR, LF or NUL"),
        ((b"x-lf", b"a\nb"), "CR, LF or NUL"),
    ],
)
def test_response_headers_refuse_what_would_split_or_confuse_the_http1_response(header, reason):
    """The router does this check once, in place of h2's inbound validation."""
    with pytest.raises(InvalidHeader, match=reason):
        response_headers([(b":status", b"200"), header])


@pytest.mark.parametrize("status", [b"20", b"2000", b"abc", b"", b" 200"])
def test_response_status_refuses_a_status_that_is_not_three_digits(status):
    with pytest.raises(InvalidHeader, match="invalid :status"):
        response_status([(b":status", status)])


def test_response_status_must_come_first():
    with pytest.raises(InvalidHeader, match=":status"):
        response_status([(b"content-type", b"text/plain"), (b":status", b"200")])


# -- build_environ -----------------------------------------------------------------


def test_build_environ_request_method():
    assert backend_environ(method=b"PATCH")["REQUEST_METHOD"] == "PATCH"


@pytest.mark.parametrize(
    ("path", "path_info"),
    [
        (b"/plain", "/plain"),
        (b"/caf%C3%A9", "/caf\xc3\xa9"),
        (b"/a%20b", "/a b"),
        (b"/a%2Fb", "/a/b"),
        (b"/a%3Fb?c", "/a?b"),
    ],
)
def test_build_environ_path_info_is_percent_decoded_latin1(path, path_info):
    assert backend_environ(path=path)["PATH_INFO"] == path_info


@pytest.mark.parametrize(
    ("path", "query"),
    [(b"/a?x=%20y&z=%C3%A9", "x=%20y&z=%C3%A9"), (b"/a", ""), (b"/a?", ""), (b"/a?b?c", "b?c")],
)
def test_build_environ_query_string_is_kept_as_sent(path, query):
    assert backend_environ(path=path)["QUERY_STRING"] == query


def test_build_environ_raw_uri_is_the_path_as_sent():
    environ = backend_environ(path=b"/a%2Fb?x=1")
    assert environ["RAW_URI"] == "/a%2Fb?x=1"
    assert environ["REQUEST_URI"] == "/a%2Fb?x=1"


def test_build_environ_script_name_is_empty():
    assert backend_environ()["SCRIPT_NAME"] == ""


@pytest.mark.parametrize(
    ("authority", "scheme", "server_name", "server_port"),
    [
        (b"example.com:8080", b"http", "example.com", "8080"),
        (b"example.com", b"http", "example.com", "80"),
        (b"example.com", b"https", "example.com", "443"),
        (b"127.0.0.1:9000", b"http", "127.0.0.1", "9000"),
        (b"[::1]:8080", b"http", "::1", "8080"),
        (b"[::1]", b"http", "::1", "80"),
        (b"[::1]", b"https", "::1", "443"),
    ],
)
def test_build_environ_server_name_and_port_from_authority(authority, scheme, server_name, server_port):
    environ = backend_environ(authority=authority, scheme=scheme)
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == (server_name, server_port)


def test_build_environ_server_name_from_host_header_without_authority():
    environ = backend_environ((b"host", b"example.org:81"), authority=None)
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("example.org", "81")


def test_build_environ_server_name_defaults_to_localhost():
    environ = backend_environ(authority=None)
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("localhost", "80")


def test_build_environ_http_host_from_authority():
    assert backend_environ(authority=b"example.com:8080")["HTTP_HOST"] == "example.com:8080"


def test_build_environ_default_port_follows_forwarded_proto():
    environ = backend_environ((b"x-forwarded-proto", b"https"), authority=b"example.com", scheme=b"http")
    assert environ["SERVER_PORT"] == "443"


def test_build_environ_url_scheme_from_scheme_pseudo_header():
    assert backend_environ(scheme=b"https")["wsgi.url_scheme"] == "https"


def test_build_environ_url_scheme_defaults_to_http():
    assert backend_environ(scheme=b"")["wsgi.url_scheme"] == "http"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-forwarded-proto", b"https")], "https"),
        ([(b"x-forwarded-proto", b"HTTPS")], "https"),
        ([(b"x-forwarded-proto", b"https, http")], "http"),
        ([(b"x-forwarded-proto", b"http"), (b"x-forwarded-proto", b"https")], "https"),
    ],
)
def test_build_environ_url_scheme_from_last_x_forwarded_proto(headers, expected):
    assert backend_environ(*headers, scheme=b"http" if expected == "https" else b"https")["wsgi.url_scheme"] == expected


def test_build_environ_url_scheme_ignores_unknown_x_forwarded_proto():
    assert backend_environ((b"x-forwarded-proto", b"ftp"), scheme=b"https")["wsgi.url_scheme"] == "https"


@pytest.mark.parametrize(
    ("forwarded", "remote"),
    [(b"10.0.0.1", "10.0.0.1"), (b"1.1.1.1, 2.2.2.2,10.0.0.1", "10.0.0.1"), (b"1.1.1.1 , 10.0.0.1 ", "10.0.0.1")],
)
def test_build_environ_remote_addr_is_last_x_forwarded_for_hop(forwarded, remote):
    assert backend_environ((b"x-forwarded-for", forwarded), peer=("192.0.2.1", 5000))["REMOTE_ADDR"] == remote


def test_build_environ_remote_addr_from_last_of_repeated_x_forwarded_for():
    environ = backend_environ((b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"10.0.0.1"))
    assert environ["REMOTE_ADDR"] == "10.0.0.1"


def test_build_environ_remote_addr_falls_back_to_peer():
    assert backend_environ(peer=("192.0.2.1", 5000))["REMOTE_ADDR"] == "192.0.2.1"


def test_build_environ_remote_addr_empty_without_forwarded_for_or_peer():
    assert backend_environ()["REMOTE_ADDR"] == ""


def test_build_environ_maps_headers_to_http_keys():
    environ = backend_environ((b"accept", b"*/*"), (b"x-request-id", b"abc"))
    assert environ["HTTP_ACCEPT"] == "*/*"
    assert environ["HTTP_X_REQUEST_ID"] == "abc"


@pytest.mark.parametrize("order", ["underscore-first", "underscore-last"])
def test_build_environ_drops_header_names_with_underscore(order):
    headers = [(b"x_user", b"admin"), (b"x-user", b"guest")]
    if order == "underscore-last":
        headers.reverse()
    assert backend_environ(*headers)["HTTP_X_USER"] == "guest"


def test_build_environ_drops_lone_header_name_with_underscore():
    assert "HTTP_X_USER" not in backend_environ((b"x_user", b"admin"))


def test_build_environ_joins_repeated_cookie_headers_with_semicolon():
    environ = backend_environ((b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"cookie", b"c=3"))
    assert environ["HTTP_COOKIE"] == "a=1; b=2; c=3"


def test_build_environ_joins_other_repeated_headers_with_comma():
    environ = backend_environ((b"accept", b"text/html"), (b"accept", b"*/*"))
    assert environ["HTTP_ACCEPT"] == "text/html,*/*"


def test_build_environ_content_type_and_length_without_http_prefix():
    environ = backend_environ((b"content-type", b"application/json"), (b"content-length", b"12"), method=b"POST")
    assert environ["CONTENT_TYPE"] == "application/json"
    assert environ["CONTENT_LENGTH"] == "12"
    assert "HTTP_CONTENT_TYPE" not in environ
    assert "HTTP_CONTENT_LENGTH" not in environ


def test_build_environ_decodes_values_as_latin1():
    assert backend_environ((b"x-name", b"caf\xc3\xa9"))["HTTP_X_NAME"] == "caf\xc3\xa9"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("wsgi.version", (1, 0)),
        ("wsgi.multithread", True),
        ("wsgi.multiprocess", False),
        ("wsgi.run_once", False),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
    ],
)
def test_build_environ_fixed_keys(key, value):
    assert backend_environ()[key] == value


def test_build_environ_input_and_errors_are_the_objects_passed():
    environ = backend_environ()
    assert environ["wsgi.input"] is INPUT
    assert environ["wsgi.errors"] is ERRORS


def test_build_environ_has_required_cgi_keys_as_str():
    environ = backend_environ()
    required = ["REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME", "SERVER_PORT"]
    assert all(isinstance(environ[key], str) for key in required)


def test_build_environ_headers_cannot_override_cgi_keys():
    environ = backend_environ((b"request-method", b"DELETE"), (b"path-info", b"/admin"))
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["PATH_INFO"] == "/"


# -- encode_response_headers -------------------------------------------------------


def test_encode_response_headers_returns_code_and_block_with_status_first():
    assert encode_response_headers("200 OK", [("Content-Type", "text/plain")]) == (
        200,
        [(b":status", b"200"), (b"content-type", b"text/plain")],
    )


@pytest.mark.parametrize(("status", "code"), [("404 Not Found", 404), ("299 Whatever", 299), ("500", 500)])
def test_encode_response_headers_takes_code_from_status_line(status, code):
    assert encode_response_headers(status, [])[0] == code


@pytest.mark.parametrize("status", ["", "OK", "20 OK", "2000 OK", "abc OK", " 200 OK", "2x0 OK"])
def test_encode_response_headers_reject_invalid_status(status):
    with pytest.raises(InvalidHeader, match="status"):
        encode_response_headers(status, [])


def test_encode_response_headers_reject_non_ascii_digits_in_status():
    # Three FULLWIDTH DIGITs: str.isdigit() is true, yet not an HTTP status code.
    with pytest.raises(InvalidHeader):
        encode_response_headers("\uff12\uff10\uff10 OK", [])


@pytest.mark.parametrize("status", ["100 Continue", "101 Switching Protocols", "103 Early Hints"])
def test_encode_response_headers_reject_informational_status(status):
    with pytest.raises(InvalidHeader, match="informational"):
        encode_response_headers(status, [])


def test_encode_response_headers_lowercase_names():
    _, block = encode_response_headers("200 OK", [("X-Request-ID", "abc"), ("ETAG", '"1"')])
    assert block[1:] == [(b"x-request-id", b"abc"), (b"etag", b'"1"')]


def test_encode_response_headers_keep_repeated_headers_in_order():
    _, block = encode_response_headers("200 OK", [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    assert block[1:] == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]


def test_encode_response_headers_strip_surrounding_whitespace_from_values():
    _, block = encode_response_headers("200 OK", [("X-A", "  v \t")])
    assert block[1:] == [(b"x-a", b"v")]


def test_encode_response_headers_encode_values_as_latin1():
    _, block = encode_response_headers("200 OK", [("X-Name", "caf\xe9")])
    assert block[1:] == [(b"x-name", b"caf\xe9")]


@pytest.mark.parametrize("name", ["Bad Name", "X:Y", "", "X-Caf\xe9", "X(1)", "X\tY"])
def test_encode_response_headers_reject_non_token_names(name):
    with pytest.raises(InvalidHeader, match="name"):
        encode_response_headers("200 OK", [(name, "v")])


def test_encode_response_headers_reject_non_latin1_name():
    with pytest.raises(InvalidHeader):
        encode_response_headers("200 OK", [("X-\u20ac", "v")])


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nX-Injected: 1", "a\x00b"], ids=["cr", "lf", "crlf", "nul"])
def test_encode_response_headers_reject_control_characters_in_values(value):
    with pytest.raises(InvalidHeader, match="CR, LF or NUL"):
        encode_response_headers("200 OK", [("X-A", value)])


def test_encode_response_headers_reject_non_latin1_values():
    with pytest.raises(InvalidHeader, match="latin-1"):
        encode_response_headers("200 OK", [("X-A", "\u20ac")])


@pytest.mark.parametrize(
    "header",
    [(b"X-A", "v"), ("X-A", b"v"), ("X-A", 1), ("X-A", None)],
    ids=["bytes-name", "bytes-value", "int", "none"],
)
def test_encode_response_headers_reject_non_str(header):
    with pytest.raises(InvalidHeader, match="must be str"):
        encode_response_headers("200 OK", [header])


@pytest.mark.parametrize(
    "name", ["Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade", "TE", "HTTP2-Settings"]
)
def test_encode_response_headers_drop_hop_by_hop_headers(name):
    _, block = encode_response_headers("200 OK", [(name, "x"), ("X-Kept", "1")])
    assert block == [(b":status", b"200"), (b"x-kept", b"1")]
