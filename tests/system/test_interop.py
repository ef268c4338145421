"""Interoperability with nghttp2 peers we did not write.

h2load (an HTTP/2 client) drives our backend's HTTP/2 server role, and nghttpd
(an HTTP/2 server) stands in for a backend behind our router's HTTP/2 client
role. socat relays the reverse-dialled tunnel connections to them, over plain
TCP with prior knowledge (no TLS, no h2c upgrade).

Every socat address carries ``nodelay``: a relay that leaves Nagle's algorithm
on holds back each small frame (a WINDOW_UPDATE) until the previous segment is
acknowledged, and the peer delays that ACK by up to 40 ms, so transfers bounded
by small flow-control windows crawl at one window per ~40 ms. That is the
relay's doing, not the protocol's, and our own sockets already set TCP_NODELAY.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from tests.conftest import BackendProcess, Process, RouterProcess, require_tool, wait_until

KIB = 1024
MIB = 1024 * KIB

_REQUESTS = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, (?P<succeeded>\d+) succeeded, "
    r"(?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout"
)
_STATUS = re.compile(r"status codes: (?P<s2xx>\d+) 2xx, (?P<s3xx>\d+) 3xx, (?P<s4xx>\d+) 4xx, (?P<s5xx>\d+) 5xx")
_DATA = re.compile(r"traffic: .*\((?P<data>\d+)\) data")
_LOGGED_ERROR = r"Traceback|\[ERROR\]"


# -- helpers ---------------------------------------------------------------------


def _free_ports(count: int) -> List[int]:
    """``count`` distinct loopback ports that were free a moment ago (held together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _socat(processes: List[Process], first: str, second: str) -> Process:
    """socat relaying one connection between two addresses, logging its steps (``-d -d``)."""
    socat = Process([require_tool("socat"), "-d", "-d", f"{first},nodelay", f"{second},nodelay"])
    processes.append(socat)
    return socat


def _backend_behind_socat(processes: List[Process], app: str) -> Tuple[int, BackendProcess]:
    """Start our backend serving ``app`` and relay its tunnel to a loopback port; return that port.

    socat listens on A; once our backend has dialled A it listens on B, and the
    first client of B (h2load) talks HTTP/2 straight to our backend. We must not
    probe B with a connection of our own (socat would take the probe as the
    relay peer), so we wait for socat's own ``-d -d`` notice ``listening on
    ...:B``, which it logs right after ``listen()`` returns: a connection to B
    made after that line is queued by the kernel and accepted by socat.

    The backend gives a silent peer ``settings_timeout`` (10 s) to send its
    preface, counted from its connect to A, so the caller must start its client
    promptly after this returns.
    """
    port_a, port_b = _free_ports(2)
    socat = _socat(
        processes,
        f"TCP-LISTEN:{port_a},bind=127.0.0.1,reuseaddr",
        f"TCP-LISTEN:{port_b},bind=127.0.0.1,reuseaddr",
    )
    socat.wait_for_line(rf"listening on AF=2 127\.0\.0\.1:{port_a}$")
    backend = BackendProcess(app, f"127.0.0.1:{port_a}")
    processes.append(backend)
    socat.wait_for_line(rf"accepting connection from .* on AF=2 127\.0\.0\.1:{port_a}$")
    socat.wait_for_line(rf"listening on AF=2 127\.0\.0\.1:{port_b}$")
    return port_b, backend


def _h2load(*args: str) -> Tuple[Dict[str, int], str]:
    """Run h2load (bounded in time); return the counters of its summary, and its output for messages."""
    command = [require_tool("h2load"), "--connection-inactivity-timeout=30", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    output = f"$ {' '.join(command)}\nexit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, output
    assert "Application protocol: h2c" in result.stdout, output
    counters: Dict[str, int] = {}
    for pattern in (_REQUESTS, _STATUS, _DATA):
        match = pattern.search(result.stdout)
        assert match is not None, f"no {pattern.pattern!r} in h2load's summary:\n{output}"
        counters.update({key: int(value) for key, value in match.groupdict().items()})
    return counters, output


def _assert_all_succeeded(summary: Dict[str, int], output: str, requests: int, body_size: int) -> None:
    assert summary["total"] == requests, output
    assert summary["succeeded"] == requests, output
    assert (summary["failed"], summary["errored"], summary["timeout"]) == (0, 0, 0), output
    assert summary["s2xx"] == requests, output
    # Every response carried a body of the expected size: ``data`` counts DATA payload bytes.
    assert summary["data"] == requests * body_size, output


def _nghttpd_behind_router(
    processes: List[Process], router_process, docroot: Path, *options: str
) -> Tuple[RouterProcess, Process, Process]:
    """nghttpd on a loopback port, our router, and socat dialling the router's tunnel port to nghttpd."""
    (port,) = _free_ports(1)
    nghttpd = Process(
        [require_tool("nghttpd"), "--no-tls", "--address=127.0.0.1", f"--htdocs={docroot}", *options, str(port)]
    )
    processes.append(nghttpd)
    # nghttpd logs nothing when it is ready; a probe connection is harmless to it (it just closes).
    wait_until(lambda: _accepts_connections(port), timeout=15, what=f"nghttpd listening on port {port}")
    router = router_process()
    # socat dials the router's tunnel port (as our backend would), then nghttpd, and relays the two:
    # the router sends its client preface and nghttpd answers as the server.
    socat = _socat(processes, f"TCP:127.0.0.1:{router.tunnel_port}", f"TCP:127.0.0.1:{port}")
    router.wait_tunnels(1)
    return router, nghttpd, socat


def _assert_one_tunnel_throughout(router: RouterProcess, nghttpd: Process, socat: Process) -> None:
    assert router.count_lines("Tunnel added") == 1, router.output()
    assert router.count_lines("Tunnel removed") == 0, router.output()
    assert router.count_lines(_LOGGED_ERROR) == 0, router.output()
    assert socat.proc.poll() is None, socat.output()
    assert nghttpd.proc.poll() is None, nghttpd.output()


def _fetch(url: str, data: Optional[object] = None) -> Tuple[int, str, bytes]:
    """Status, Content-Length and body of a GET (or a POST of ``data``)."""
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:  # type: ignore[arg-type]
        return response.status, response.headers.get("Content-Length", ""), response.read()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- h2load, an HTTP/2 client, against our backend (HTTP/2 server role) ------------


def test_h2load_gets_from_our_backend_server(processes):
    """2000 GETs, 20 at a time on one connection, from h2load to our backend: all answered ``bar``."""
    require_tool("h2load")
    require_tool("socat")
    port, backend = _backend_behind_socat(processes, "tests.apps:hello")
    summary, output = _h2load("-n", "2000", "-c", "1", "-m", "20", f"http://127.0.0.1:{port}/foo")
    _assert_all_succeeded(summary, output, 2000, len(b"bar"))
    backend.wait_for_line(r"Tunnel to 127\.0\.0\.1:\d+ established", timeout=5)
    assert backend.count_lines(_LOGGED_ERROR) == 0, backend.output()


@pytest.mark.parametrize(
    ("body_size", "requests", "concurrency"),
    [
        pytest.param(100 * KIB, 500, 20, id="100KiB"),
        # Larger than our 2 MiB per-stream receive window: h2load must wait for our WINDOW_UPDATEs.
        pytest.param(5 * MIB, 20, 4, id="5MiB"),
    ],
)
def test_h2load_posts_bodies_to_our_backend_server(processes, tmp_path, body_size, requests, concurrency):
    """h2load POSTs bodies that ``tests.apps:count`` reads in full: flow control towards our backend holds."""
    require_tool("h2load")
    require_tool("socat")
    body = tmp_path / "body.bin"
    body.write_bytes(os.urandom(body_size))
    port, backend = _backend_behind_socat(processes, "tests.apps:count")
    summary, output = _h2load(
        "-n", str(requests), "-c", "1", "-m", str(concurrency), "-d", str(body), f"http://127.0.0.1:{port}/upload"
    )
    # ``count`` answers with the number of body bytes it read: the size's digits.
    _assert_all_succeeded(summary, output, requests, len(str(body_size)))
    assert backend.count_lines(_LOGGED_ERROR) == 0, backend.output()


def test_our_backend_server_honours_h2load_small_windows(processes):
    """h2load with 64 KiB stream and connection windows downloads 1 MiB bodies: we wait for its WINDOW_UPDATEs."""
    require_tool("h2load")
    require_tool("socat")
    port, backend = _backend_behind_socat(processes, "tests.apps:download")
    summary, output = _h2load(
        "-n", "50", "-c", "1", "-m", "16", "--window-bits=16", "--connection-window-bits=16",
        f"http://127.0.0.1:{port}/download?mib=1",
    )  # fmt: skip
    _assert_all_succeeded(summary, output, 50, MIB)
    assert backend.count_lines(_LOGGED_ERROR) == 0, backend.output()


# -- nghttpd, an HTTP/2 server, behind our router (HTTP/2 client role) -------------


def test_router_client_fetches_files_from_nghttpd(processes, router_process, tmp_path):
    """nghttpd serves files as a backend through our router: bytes intact, 404 passed on, parallel downloads intact."""
    require_tool("nghttpd")
    require_tool("socat")
    docroot = tmp_path / "htdocs"
    docroot.mkdir()
    small = b"hello from nghttpd\n"
    big = os.urandom(5 * MIB)  # many DATA frames, more than our 2 MiB stream window
    (docroot / "small.txt").write_bytes(small)
    (docroot / "big.bin").write_bytes(big)
    router, nghttpd, socat = _nghttpd_behind_router(processes, router_process, docroot)

    assert _fetch(router.url + "/small.txt") == (200, str(len(small)), small)

    status, length, data = _fetch(router.url + "/big.bin")
    assert (status, length, len(data)) == (200, str(len(big)), len(big))
    assert _sha256(data) == _sha256(big)

    with pytest.raises(urllib.error.HTTPError) as caught:
        _fetch(router.url + "/missing.txt")
    with caught.value:
        assert caught.value.code == 404
        assert b"404 Not Found" in caught.value.read()  # nghttpd's page, not one the router made up

    # Eight downloads of the big file, four at a time, multiplexed on the one tunnel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_fetch, [router.url + "/big.bin"] * 8, timeout=90))
    for status, length, data in results:
        assert (status, length, len(data)) == (200, str(len(big)), len(big))
        assert _sha256(data) == _sha256(big)

    _assert_one_tunnel_throughout(router, nghttpd, socat)


def _pieces(data: bytes, size: int = 100 * KIB) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_router_client_uploads_within_nghttpd_small_windows(processes, router_process, tmp_path):
    """Uploads through our router to nghttpd ``--echo-upload`` with 64 KiB windows come back intact.

    Our router must stop at nghttpd's stream and connection windows and resume
    on its WINDOW_UPDATEs, for a body with a Content-Length and a chunked one.
    """
    require_tool("nghttpd")
    require_tool("socat")
    docroot = tmp_path / "htdocs"
    docroot.mkdir()
    router, nghttpd, socat = _nghttpd_behind_router(
        processes, router_process, docroot, "--echo-upload", "--window-bits=16", "--connection-window-bits=16"
    )
    body = os.urandom(3 * MIB)

    status, length, data = _fetch(router.url + "/echo", body)
    assert (status, length, len(data)) == (200, str(len(body)), len(body))
    assert _sha256(data) == _sha256(body)

    # An iterable body without a Content-Length: urllib sends it chunked.
    status, _, data = _fetch(router.url + "/echo", _pieces(body))
    assert (status, len(data)) == (200, len(body))
    assert _sha256(data) == _sha256(body)

    # Two at once, so they compete for the one connection window.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: _fetch(router.url + "/echo", body), range(2), timeout=90))
    for status, _, data in results:
        assert (status, _sha256(data)) == (200, _sha256(body))

    _assert_one_tunnel_throughout(router, nghttpd, socat)
