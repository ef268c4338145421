"""Interoperability with the wiring of the Go proof of concept (kevin-cantwell/ptth).

``tests/go/seedrouter`` and ``tests/go/seedbackend`` are two short Go programs
wired as the seed's router and backend are, on golang.org/x/net/http2:

- the router puts an ``httputil.ReverseProxy`` in front of each tunnel
  connection, with an ``http2.Transport`` (``AllowHTTP``) whose ``DialTLS``
  returns that same accepted connection every time it is called, and sends each
  public HTTP/1.1 request to a tunnel picked at random;
- the backend dials the router's tunnel port and runs ``http2.Server.ServeConn``
  on the connection: ``GET /foo`` is ``bar``, ``POST /echo`` streams its body
  back, ``GET /slow?ms=N`` answers ``slow`` after N milliseconds.

They are built once per session with the Go toolchain in GOPATH mode against
Debian's x/net sources (packages golang-go and golang-golang-x-net-dev), with
no downloads. Without those the tests are skipped, or fail under
PTTH_REQUIRE_TOOLS as CI sets.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT, Process, require_tool

GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages install Go sources
X_NET_HTTP2 = GOPATH / "src" / "golang.org" / "x" / "net" / "http2"
GO_SOURCES = ROOT / "tests" / "go"
KIB = 1024
MIB = 1024 * KIB
_LOGGED_ERROR = r"Traceback|\[ERROR\]"


class SeedPrograms(NamedTuple):
    router: Path
    backend: Path


def _missing(reason: str) -> None:
    """Skip the test for a missing tool, or fail it when CI requires every tool."""
    if os.environ.get("PTTH_REQUIRE_TOOLS"):
        pytest.fail(f"{reason} (PTTH_REQUIRE_TOOLS is set)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def seed_programs(tmp_path_factory) -> SeedPrograms:
    """The seed-style Go router and backend, built once per session into a temporary directory."""
    if shutil.which("go") is None and not os.environ.get("PTTH_REQUIRE_TOOLS"):
        pytest.skip("go is not installed (Debian packages golang-go golang-golang-x-net-dev)")
    go = require_tool("go")
    if not X_NET_HTTP2.is_dir():
        _missing(f"golang.org/x/net/http2 is not in {X_NET_HTTP2.parent} (Debian package golang-golang-x-net-dev)")
    out = tmp_path_factory.mktemp("seed-go")
    # GOPATH mode on Debian's sources; nothing is downloaded (no module proxy, no toolchain switch).
    env = dict(
        os.environ, GO111MODULE="off", GOPATH=str(GOPATH), GOFLAGS="", GOPROXY="off", GOTOOLCHAIN="local",
        GOCACHE=str(out / "cache"),
    )  # fmt: skip
    programs = SeedPrograms(out / "seedrouter", out / "seedbackend")
    for binary in programs:
        command = [go, "build", "-o", str(binary), f"./{binary.name}"]
        result = subprocess.run(
            command, cwd=GO_SOURCES, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, f"$ {' '.join(command)}\n{result.stdout}{result.stderr}"
    return programs


def _start_seed_router(processes: List[Process], binary: Path) -> Tuple[Process, str, str]:
    """The seed-style router on ephemeral loopback ports: the process, its tunnel address and its URL."""
    router = Process([str(binary), "-tunnels", "127.0.0.1:0", "-http", "127.0.0.1:0"])
    processes.append(router)
    tunnel_address = router.wait_for_line(r"Listening for reverse tunnels on tcp://(\S+)").group(1)
    http_address = router.wait_for_line(r"Listening for HTTP traffic on http://(\S+)").group(1)
    return router, tunnel_address, f"http://{http_address}"


class Job(NamedTuple):
    method: str
    path: str
    body: Optional[bytes]
    expected: bytes


class Outcome(NamedTuple):
    job: int
    status: int
    ok: bool
    detail: str


def _run_clients(url: str, jobs: List[Job], clients: int, deadline: float = 90.0) -> List[Outcome]:
    """``clients`` threads, each on its own keep-alive connection, share out ``jobs``.

    Every job is attempted once (a failed connection is replaced for the next
    job); none starts after ``deadline`` seconds, and those are reported as
    not sent. Returns one outcome per job, in job order.
    """
    parts = urlsplit(url)
    give_up = time.monotonic() + deadline
    outcomes: List[Optional[Outcome]] = [None] * len(jobs)
    next_job = iter(range(len(jobs)))
    lock = threading.Lock()

    def client() -> None:
        conn: Optional[http.client.HTTPConnection] = None
        try:
            while True:
                with lock:
                    index = next(next_job, None)
                if index is None:
                    return
                job = jobs[index]
                if time.monotonic() > give_up:
                    outcomes[index] = Outcome(index, 0, False, "not sent: deadline passed")
                    continue
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
                try:
                    conn.request(job.method, job.path, body=job.body)
                    response = conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    outcomes[index] = Outcome(index, 0, False, f"{job.method} {job.path}: {exc!r}")
                    conn.close()
                    conn = None
                    continue
                ok = response.status == 200 and data == job.expected
                detail = f"{job.method} {job.path}: {response.status}, {len(data)} bytes {data[:60]!r}"
                outcomes[index] = Outcome(index, response.status, ok, detail)
                if response.will_close:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, give_up - time.monotonic()) + 30)
    assert not any(thread.is_alive() for thread in threads), "client threads still running after the deadline"
    return [outcome or Outcome(i, 0, False, "no outcome") for i, outcome in enumerate(outcomes)]


def _assert_all_ok(outcomes: List[Outcome], context: str) -> None:
    failed = [outcome for outcome in outcomes if not outcome.ok]
    statuses = sorted({outcome.status for outcome in failed})
    examples = "\n".join(outcome.detail for outcome in failed[:10])
    assert not failed, (
        f"{len(failed)} of {len(outcomes)} requests failed (statuses {statuses}); first ones:\n{examples}\n{context}"
    )


def _pieces(data: bytes, size: int = 64 * KIB) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- our backend behind the seed-style Go router (http2.Transport as the client) ------


def test_our_backend_behind_the_seed_router_answers_400_requests_from_32_clients(
    seed_programs, processes, backend_process
):
    """Every one of 400 requests, 32 at a time, through one tunnel to a backend of 4 threads is answered.

    The Go transport opens as many streams as its peer's
    SETTINGS_MAX_CONCURRENT_STREAMS allows and, past that, "dials" a new
    connection, which the seed's wiring answers with the same socket: a second
    client preface in the middle of the connection. So the plain wire must
    advertise more streams than the threads (as Go's own server does) and queue
    the surplus; every request then succeeds on the one tunnel.
    """
    router, tunnel_address, url = _start_seed_router(processes, seed_programs.router)
    backend = backend_process("tests.apps:multi", tunnel_address, "--threads", "4")
    router.wait_for_line(r"Tunnel added: 127\.0\.0\.1:\d+")
    # The Go transport sends its client preface with the first request, not on accept: start at once.
    jobs: List[Job] = []
    for i in range(400):
        kind = i % 4
        if kind == 0:
            jobs.append(Job("GET", "/foo", None, b"bar"))
        elif kind == 1:
            jobs.append(Job("GET", "/sleep?s=0.05", None, b"done"))  # holds a thread: streams queue
        else:
            body = f"request {i};".encode() * (100 if kind == 2 else 3000)  # ~1 KiB or ~40 KiB
            jobs.append(Job("POST", "/echo", body, body))
    outcomes = _run_clients(url, jobs, clients=32)

    context = f"Go router:\n{router.output()}\nour backend:\n{backend.output()}"
    _assert_all_ok(outcomes, context)
    assert router.count_lines("proxy error|Tunnel removed") == 0, context
    assert backend.count_lines(r"Tunnel to \S+ established") == 1, context  # never redialled
    assert backend.count_lines(_LOGGED_ERROR) == 0, context
    assert router.proc.poll() is None, context
    assert backend.proc.poll() is None, context


def test_our_backend_keeps_an_idle_tunnel_to_the_seed_router_until_its_first_request(
    seed_programs, processes, backend_process
):
    """The Go transport sends its preface only with its first request: an idle tunnel must not time out.

    A SETTINGS deadline on the plain wire would drop the tunnel after 10 s
    and redial, while the seed's router keeps the dead one and answers 502.
    """
    router, tunnel_address, url = _start_seed_router(processes, seed_programs.router)
    backend = backend_process("tests.apps:multi", tunnel_address, "--threads", "4")
    router.wait_for_line(r"Tunnel added: 127\.0\.0\.1:\d+")
    time.sleep(11)  # the idle time under test (past the engine's 10 s SETTINGS deadline), not a synchronisation
    outcomes = _run_clients(url, [Job("GET", "/foo", None, b"bar")] * 20, clients=4)
    context = f"Go router:\n{router.output()}\nour backend:\n{backend.output()}"
    _assert_all_ok(outcomes, context)
    assert backend.count_lines("lost") == 0, context
    assert router.count_lines("proxy error|Tunnel removed") == 0, context


# -- the seed-style Go backend behind our router (http2.Server as the server) ---------


def seed_backend_behind_our_router(seed_programs, processes, router_process) -> Tuple[Any, Process]:
    """Our router with the seed's backend dialled in (its one tunnel up)."""
    router = router_process()
    backend = Process([str(seed_programs.backend), "-connect", router.tunnel_address])
    processes.append(backend)
    router.wait_tunnels(1)
    return router, backend


def test_seed_backend_behind_our_router_answers_gets_echoes_and_32_concurrent_clients(
    seed_programs, processes, router_process
):
    """GETs, 1 MiB POST echoes (with a Content-Length and chunked) and 32 concurrent clients, all intact."""
    router, backend = seed_backend_behind_our_router(seed_programs, processes, router_process)

    conn = http.client.HTTPConnection(router.http_host, router.http_port, timeout=30)
    try:
        conn.request("GET", "/foo")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"bar")

        body = os.urandom(MIB)
        conn.request("POST", "/echo", body=body)
        response = conn.getresponse()
        data = response.read()
        assert (response.status, len(data), _sha256(data)) == (200, MIB, _sha256(body))

        # An iterable body without a Content-Length: http.client sends it chunked.
        conn.request("POST", "/echo", body=_pieces(body), encode_chunked=True)
        response = conn.getresponse()
        data = response.read()
        assert (response.status, len(data), _sha256(data)) == (200, MIB, _sha256(body))
    finally:
        conn.close()

    jobs: List[Job] = []
    for i in range(160):
        kind = i % 4
        if kind == 0:
            jobs.append(Job("GET", "/foo", None, b"bar"))
        elif kind == 1:
            jobs.append(Job("GET", "/slow?ms=50", None, b"slow"))
        else:
            payload = os.urandom(64 * KIB if kind == 2 else MIB)
            jobs.append(Job("POST", "/echo", payload, payload))
    outcomes = _run_clients(router.url, jobs, clients=32)

    context = f"our router:\n{router.output()}\nGo backend:\n{backend.output()}"
    _assert_all_ok(outcomes, context)
    assert router.count_lines("Tunnel added") == 1, context
    assert router.count_lines("Tunnel removed") == 0, context
    assert router.count_lines(_LOGGED_ERROR) == 0, context
    assert backend.proc.poll() is None, context


def test_a_websocket_to_the_seed_backend_gets_501_and_the_tunnel_carries_on(seed_programs, processes,
                                                                            router_process):
    """The seed's backend does not announce SETTINGS_ENABLE_CONNECT_PROTOCOL: no extended CONNECT is sent."""
    router, backend = seed_backend_behind_our_router(seed_programs, processes, router_process)
    conn = http.client.HTTPConnection(router.http_host, router.http_port, timeout=30)
    try:
        conn.request("GET", "/foo", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        response = conn.getresponse()
        assert response.status == 501
        assert b"SETTINGS_ENABLE_CONNECT_PROTOCOL" in response.read()
        conn.request("GET", "/foo")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"bar")
    finally:
        conn.close()
    context = f"our router:\n{router.output()}\nGo backend:\n{backend.output()}"
    assert router.count_lines("Tunnel removed") == 0, context
    assert backend.proc.poll() is None, context
