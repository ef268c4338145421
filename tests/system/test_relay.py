"""Requests the router serves without a thread (ptth_sync/router/relay.py), seen from a raw client.

A real router process and a real backend; the client is a plain socket, so
that keep-alive, pipelining, HEAD, small bodies, timeouts and aborted
responses are exercised exactly as sent. Throughout, the router worker's
thread count shows that no request thread was needed.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import socket
import time
from pathlib import Path
from typing import Any, List, Tuple

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame

from tests.conftest import RouterProcess, wait_until
from tests.system.test_slow_clients import connections, slow_clients_router, status, timed_get, trickle, worker_pid
from tests.system.test_tunnel_loop import hostile_tunnel


class _Reader(io.BufferedReader):
    """The connection's one buffered reader, kept open across responses (pipelined ones share it)."""

    def close(self) -> None:
        pass


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.reader = _Reader(socket.SocketIO(sock, "rb"))

    def makefile(self, mode: str) -> _Reader:
        return self.reader


def read_responses(sock: socket.socket, methods: List[str]) -> List[Tuple[int, Any, bytes]]:
    """Read one response per method from ``sock`` (HEAD responses have no body)."""
    connection = _Connection(sock)
    answers = []
    for method in methods:
        response = http.client.HTTPResponse(connection, method=method)  # type: ignore[arg-type]
        response.begin()
        answers.append((response.status, response.msg, response.read()))
    return answers


def test_pipelined_keep_alive_requests_are_answered_in_order_without_a_thread(router_process, backend_process):
    router = router_process()
    backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    worker = worker_pid(router.pid)
    threads = status(worker, "Threads")
    with socket.create_connection((router.http_host, router.http_port), timeout=10) as sock:
        sock.sendall(
            b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /download?mib=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /download?mib=3 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answers = read_responses(sock, ["GET", "HEAD", "POST", "GET", "GET"])
        for _ in range(200):  # and keep-alive, one at a time
            sock.sendall(b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_responses(sock, ["GET"])[0][2] == b"bar"
    expected = hashlib.sha256(bytes(range(256)) * 1024 * 12).hexdigest()
    assert [code for code, _, _ in answers] == [200] * 5
    assert answers[0][2] == b"bar"
    assert answers[1][1]["Content-Length"] == str(1024 * 1024)
    assert answers[1][2] == b""
    assert answers[2][2] == b"hello"  # no Content-Length from the app: chunked to the client
    assert answers[2][1]["Transfer-Encoding"] == "chunked"
    assert hashlib.sha256(answers[3][2]).hexdigest() == expected
    assert answers[4][2].isdigit()
    assert status(worker, "Threads") == threads
    assert router.count_lines("Tunnel removed") == 0


def test_a_request_sent_while_the_last_response_is_still_coming_is_answered_after_it(
    router_process, backend_process
):
    """The connection stays in the router's selector while its request is relayed; bytes that come meanwhile
    wait until the response is complete, then are served."""
    router = router_process()
    backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    expected = hashlib.sha256(bytes(range(256)) * 1024 * 12).hexdigest()
    with socket.create_connection((router.http_host, router.http_port), timeout=10) as sock:
        for _ in range(5):
            sock.sendall(b"GET /download?mib=3 HTTP/1.1\r\nHost: x\r\n\r\n")
            head = sock.recv(65536)  # the response has begun: the next request arrives mid-response
            assert head.startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n")
            connection = _Connection(sock)
            connection.reader = _Reader(_Prefixed(head, socket.SocketIO(sock, "rb")))
            answers = []
            for _ in range(2):
                response = http.client.HTTPResponse(connection, method="GET")  # type: ignore[arg-type]
                response.begin()
                answers.append(response.read())
            assert hashlib.sha256(answers[0]).hexdigest() == expected
            assert answers[1] == b"bar"
    assert router.count_lines("Traceback") == 0


def test_slow_chunked_uploads_cost_no_thread_and_arrive_whole(router_process, backend_process):
    """200 uploads with ``Transfer-Encoding: chunked`` send a 1 KiB chunk a second: the router decodes
    them as they come, on no thread (each held two before); a normal GET is answered within a second
    throughout. Then each ends its body (trailers too) and sends a second request on the connection:
    every body arrives whole, and every connection carries on."""
    router, worker, threads_before, rss_before = slow_clients_router(router_process, backend_process)
    slowest = 0.0
    with connections(router.http_host, router.http_port, 200) as uploads:
        assert len(uploads) == 200
        trickle(uploads, b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for second in range(4):  # bounded: four rounds at the uploaders' pace of a second
            trickle(uploads, b"400;round=%d\r\n" % second + b"x" * 1024 + b"\r\n")
            slowest = max(slowest, timed_get(router.url))
            time.sleep(1)  # the uploaders' pace, not a synchronisation
        threads_during = status(worker, "Threads")
        rss_during = status(worker, "VmRSS") * 1024
        trickle(uploads, b"0\r\nX-Checksum: 4096\r\n\r\nGET /foo HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [read_responses(sock, ["POST", "GET"]) for sock in uploads]
    print(f"threads {threads_before} before, {threads_during} with 200 slow chunked uploads; slowest GET "
          f"{slowest * 1000:.0f} ms; router memory {(rss_during - rss_before) / 200 / 1024:.1f} KiB per upload")
    assert [(post[0], post[2], get[0], get[2]) for post, get in answers] == [(200, b"4096", 200, b"bar")] * 200
    assert slowest < 1.0
    assert threads_during <= threads_before
    assert router.count_lines("Traceback") == 0


@pytest.mark.parametrize(("body", "answer"), [
    (b"5\r\nhello\r\nzz\r\n", b"400 Bad Request: the client's body is malformed: Invalid chunk size"),
    (b"5\r\nhelloXX", b"400 Bad Request: the client's body is malformed: Invalid chunk terminator"),
    (b"5\r\nhel", b"400 Bad Request: the client's chunked body ended early, after 3 bytes of data"),
    (b"3e8\r\n" + b"x" * 1000 + b"\r\n", b"413 Content Too Large: the request body exceeds 999 bytes"),
])
def test_a_bad_chunked_body_ends_its_request_only(router_process, backend_process, body, answer):
    """Malformed, cut short or over --max-body-size after its stream opened: the client gets the router's
    400 or 413 with the reason and the connection closes; the backend sees the stream reset, never
    ended as if the body were whole; the tunnel and the router carry on."""
    router = router_process("--max-body-size", "999")
    backend_process("tests.apps:multi", router.tunnel_address)  # (answers the GETs in between)
    backend = hostile_tunnel(router, origin="chunks.example")  # (shows the frames the request makes)
    router.wait_tunnels(2)
    for _ in range(3):
        with socket.create_connection((router.http_host, router.http_port), timeout=10) as sock:
            sock.sendall(b"POST /count HTTP/1.1\r\nHost: chunks.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + body)
            if body.endswith(b"hel"):
                sock.shutdown(socket.SHUT_WR)
            sid = backend.read_until(lambda frame: isinstance(frame, HeadersFrame), timeout=5).stream_id
            backend.read_until(lambda frame, sid=sid: isinstance(frame, RstStreamFrame) and frame.stream_id == sid,
                               timeout=5)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert not [frame for frame in backend.received
                    if frame.stream_id == sid and "END_STREAM" in frame.flags], "the body passed off as whole"
        assert received.startswith(b"HTTP/1.1 " + answer[:3]), received
        assert answer in received
        assert b"Connection: close" in received
        assert timed_get(router.url) < 1.0
    assert router.count_lines(f"POST /count: {answer[:3].decode()}, ") == 3  # each with its reason
    assert router.count_lines("Tunnel removed") == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_client_still_uploading_when_answered_gets_the_answer(router_process, backend_process, chunked):
    """The app answers without reading a 32 MB upload (as an auth check or a 413 does): the router closes the
    connection, but reads and discards what the client still sends for a while first, so a client that
    sends its whole body before it reads (http.client, requests) gets the answer instead of a broken pipe."""
    router = router_process()
    backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    block = b"x" * (1024 * 1024)
    for _ in range(3):
        conn = http.client.HTTPConnection(router.http_host, router.http_port, timeout=10)
        try:
            if chunked:
                conn.request("POST", "/foo", body=iter([block] * 32), encode_chunked=True)
            else:
                conn.request("POST", "/foo", body=block * 32)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"bar")
        finally:
            conn.close()
    assert timed_get(router.url) < 1.0
    assert router.count_lines("Traceback") == 0


def test_connections_that_pass_between_threads_and_the_selector_are_closed_cleanly(router_process, backend_process):
    """A relayed request, then one gunicorn's parser refuses (a thread answers it 400 and closes the
    connection): 100 times in a row, the descriptors the threads closed are reused by new connections
    without a hitch."""
    router = router_process()
    backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    for _ in range(100):
        with socket.create_connection((router.http_host, router.http_port), timeout=10) as sock:
            sock.sendall(b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_responses(sock, ["GET"])[0][2] == b"bar"
            sock.sendall(b"GET /foo HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
            assert read_responses(sock, ["GET"])[0][0] == 400
            assert sock.recv(1) == b""  # closed by the router after the response
    assert timed_get(router.url) < 1.0
    assert router.count_lines("Traceback") == 0
    assert router.count_lines("Error") == 0


class _Prefixed(io.RawIOBase):
    """A raw stream that yields ``prefix`` first, then what ``raw`` reads."""

    def __init__(self, prefix: bytes, raw: Any) -> None:
        self.prefix = prefix
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.prefix:
            size = min(len(buffer), len(self.prefix))
            buffer[:size] = self.prefix[:size]
            self.prefix = self.prefix[size:]
            return size
        return self.raw.readinto(buffer)


def test_a_backend_that_does_not_answer_in_time_gets_the_client_a_504(router_process, backend_process):
    router = router_process("--timeout", "1")
    backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    conn = http.client.HTTPConnection(router.http_host, router.http_port, timeout=10)
    conn.request("GET", "/sleep?s=3")
    response = conn.getresponse()
    assert response.status == 504
    assert b"did not answer in time" in response.read()
    router.wait_for_line(r"GET /sleep\?s=3: 504, tunnel \S+ sent no response within 1s")  # not silent
    conn.request("GET", "/foo")  # the same connection carries on
    assert conn.getresponse().read() == b"bar"
    conn.close()
    assert router.count_lines("Tunnel removed") == 0


def test_a_client_that_goes_away_mid_response_resets_only_its_stream(router_process, backend_process):
    router = router_process()
    backend = backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    for _ in range(20):
        with socket.create_connection((router.http_host, router.http_port), timeout=10) as sock:
            sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            received = 0
            while received < 256 * 1024:
                received += len(sock.recv(65536))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    wait_until(lambda: backend.count_lines("reset by peer") >= 20, 30,
               what=lambda: f"the backend to see the 20 streams reset:\n{backend.output()[-3000:]}")
    assert timed_get(router.url) < 1.0
    assert router.count_lines("Tunnel removed") == 0
    assert router.count_lines("Traceback") == 0


@pytest.mark.parametrize("path", ["relayed", "on a thread"])
@pytest.mark.parametrize(("framing", "body"), [
    ((b"content-length", b"100"), b"short"),  # 95 bytes short
    ((b"content-type", b"text/plain"), b"partial"),  # chunked to the client, with no last chunk
])
def test_a_response_that_breaks_off_reaches_the_client_as_far_as_it_came(router_process, framing, body, path):
    # A backend's HEADERS, DATA and RST_STREAM read together (as when an app
    # fails right after its first piece): the client sees the response begin,
    # then the cut, as from gunicorn itself; never an empty reply. On a thread:
    # the backend refuses the request's first stream, and the router retries
    # it from a thread.
    router = router_process()
    backend = hostile_tunnel(router, origin="broken.example")
    router.wait_tunnels(1)
    for round_ in range(3):
        with socket.create_connection((router.http_host, router.http_port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: broken.example\r\n\r\n")
            request = backend.read_until(lambda frame: isinstance(frame, HeadersFrame), timeout=5)
            sid = request.stream_id
            if path == "on a thread":
                backend.send_raw(RstStreamFrame(sid, error_code=ErrorCodes.REFUSED_STREAM).serialize())
                request = backend.read_until(lambda frame: isinstance(frame, HeadersFrame), timeout=5)
                sid = request.stream_id
            backend.send_raw(
                backend.headers(sid, [(":status", "200"), framing]).serialize()
                + DataFrame(sid, body).serialize()
                + RstStreamFrame(sid, error_code=2).serialize()
            )
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), received
        assert b"%s: %s" % framing in head.lower()
        expected = body if framing[0] == b"content-length" else b"%x\r\n%s\r\n" % (len(body), body)
        assert rest == expected  # and no more: the client can tell it broke off
        wait_until(lambda cuts=round_ + 1: router.count_lines("failed mid-response") == cuts, 10,
                   what="the cut to be logged")
    assert router.count_lines(": retrying") == (3 if path == "on a thread" else 0)
    assert router.count_lines("Tunnel removed") == 0


def test_requests_beyond_the_tunnels_streams_wait_in_line_without_a_thread(router_process, backend_process):
    """A backend of 2 threads takes 2 streams at once (the upgrade wire advertises its threads):
    40 concurrent requests wait for a stream in the router's line, in order, at the cost of a
    socket each, and all succeed."""
    router = router_process("--token", "tok")
    backend_process("tests.apps:multi", router.tunnel_address, "--threads", "2", "--token", "tok")
    router.wait_tunnels(1)
    worker = worker_pid(router.pid)
    threads = status(worker, "Threads")
    socks = [socket.create_connection((router.http_host, router.http_port), timeout=20) for _ in range(40)]
    try:
        for sock in socks:
            sock.sendall(b"GET /sleep?s=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
        threads_during = status(worker, "Threads")
        answers = [read_responses(sock, ["GET"])[0] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert [(code, body) for code, _, body in answers] == [(200, b"done")] * 40
    assert threads_during == threads
    assert status(worker, "Threads") == threads


def test_a_small_body_behind_expect_100_continue_is_asked_for_once(router_process, backend_process):
    router = router_process()
    backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    with socket.create_connection((router.http_host, router.http_port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):  # the client sends its body only once asked (timeout=5)
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):  # the echo comes back chunked
            rest += sock.recv(65536)
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # and no second 100 Continue
    assert b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n" in rest


def _probe_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _collected_after_now(path: Path) -> int:
    """What the worker's collector has freed, as of a collection that started after this call."""
    seen = _probe_report(path).get("reports", 0)
    wait_until(lambda: _probe_report(path).get("reports", 0) >= seen + 2, 10, what="a report from the probe")
    return int(_probe_report(path)["freed"])


def test_a_relayed_request_leaves_nothing_to_the_garbage_collector(processes, backend_process, tmp_path):
    """Each request's objects are freed as it ends: none wait in reference cycles for the collector,
    which would otherwise run every few dozen requests and hold their memory meanwhile."""
    probe = tmp_path / "gc.json"
    router = RouterProcess(module="tests.system.gc_probe", env={"PTTH_GC_PROBE": str(probe)})
    processes.append(router)
    backend_process("tests.apps:multi", router.tunnel_address)
    router.wait_tunnels(1)
    address = (router.http_host, router.http_port)

    def requests(count: int) -> None:
        with socket.create_connection(address, timeout=10) as sock:
            for _ in range(count):
                sock.sendall(b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_responses(sock, ["GET"])[0][2] == b"bar"
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            assert read_responses(sock, ["POST"])[0][2] == b"hello"

    requests(20)  # (what the first requests create once stays)
    before = _collected_after_now(probe)
    for _ in range(10):
        requests(30)
    freed = _collected_after_now(probe) - before
    print(f"objects freed by the collector over 310 relayed requests: {freed}")
    assert freed < 31, f"{freed} objects in reference cycles for 310 requests"
