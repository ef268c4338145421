"""WSGI applications the tests serve through tunnels (importable as ``tests.apps:NAME``)."""

from __future__ import annotations

import json
import os
import threading
import time

MIB = 1024 * 1024


def hello(environ, start_response):
    """``GET /foo`` → ``bar``; anything else → ``hello``."""
    body = b"bar" if environ["PATH_INFO"] == "/foo" else b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def pid(environ, start_response):
    """Answers with the serving process id (to tell backends apart)."""
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


def sleepy(environ, start_response):
    """Sleeps ``?s`` seconds (default 0.5) then answers ``done``."""
    query = environ.get("QUERY_STRING", "")
    seconds = float(query[2:]) if query.startswith("s=") else 0.5
    time.sleep(seconds)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]


def environ_json(environ, start_response):
    """The environ's plain values as JSON, plus what ``wsgi.input`` held."""
    body = environ["wsgi.input"].read()
    shown = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool, tuple))}
    shown["body"] = body.decode("latin-1")
    data = json.dumps(shown).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [data]


def echo(environ, start_response):
    """Streams the request body back as it arrives, and reports its size in a trailer-like header."""
    stream = environ["wsgi.input"]
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def body():
        while True:
            chunk = stream.read(256 * 1024)
            if not chunk:
                return
            yield chunk

    return body()


def count(environ, start_response):
    """Reads the whole body in pieces and answers with its length (memory stays bounded)."""
    stream = environ["wsgi.input"]
    total = 0
    while True:
        chunk = stream.read(256 * 1024)
        if not chunk:
            break
        total += len(chunk)
    body = str(total).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def download(environ, start_response):
    """``?mib=N`` MiB of bytes, generated 256 KiB at a time."""
    query = environ.get("QUERY_STRING", "")
    mib = int(query[4:]) if query.startswith("mib=") else 1
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(mib * MIB))])
    piece = bytes(range(256)) * 1024

    def body():
        for _ in range(mib * 4):
            yield piece

    return body()


_gate = threading.Event()


def slow_stream(environ, start_response):
    """Yields ``first``, then waits (up to 10 s) for ``/release`` before yielding ``second``."""
    if environ["PATH_INFO"] == "/release":
        _gate.set()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"released"]
    _gate.clear()
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        yield b"first\n"
        _gate.wait(10)
        yield b"second\n"

    return body()


def endless(environ, start_response):
    """Streams 64 KiB pieces until the client goes away (at most about 60 s)."""
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def body():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            yield b"x" * 65536
            time.sleep(0.01)

    return body()


def big_headers(environ, start_response):
    """A response with an ``X-Big`` header of ``?bytes=N`` bytes (default 1000)."""
    query = environ.get("QUERY_STRING", "")
    size = int(query[6:]) if query.startswith("bytes=") else 1000
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2"), ("X-Big", "b" * size)])
    return [b"ok"]


def multi(environ, start_response):
    """Routes by path to the apps above; every response names the serving process."""
    path = environ["PATH_INFO"]
    routes = {"/foo": hello, "/pid": pid, "/sleep": sleepy, "/count": count, "/download": download,
              "/endless": endless, "/echo": echo, "/big-headers": big_headers}
    app = routes.get(path, hello)
    if path == "/sleep":
        environ["wsgi.errors"].write(f"sleeping in {os.getpid()}\n")
        environ["wsgi.errors"].flush()

    def start_with_pid(status, headers, exc_info=None):
        return start_response(status, [*headers, ("X-Backend-Pid", str(os.getpid()))], exc_info)

    return app(environ, start_with_pid)


def failing(environ, start_response):
    """``multi``, plus ``/boom``, which raises before it responds (a 500 for the access log)."""
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("boom")
    return multi(environ, start_response)


def fails_mid_body(environ, start_response):
    """Starts a response, sends a piece of it, then raises: the tunnel must abort the client's response."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"partial"
    raise RuntimeError("fails mid-body")
