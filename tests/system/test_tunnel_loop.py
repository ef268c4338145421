"""A router worker reads its plain tunnels in its front loop, without a reader thread each.

What a tunnel's reader thread guarded, tested from a hostile backend's side
against a real router process: the loop never blocks on a tunnel (a peer that
stops reading, a peer that floods), the peer's timers still run (a silent peer
is PINGed and dropped), and every other tunnel and client carries on. The
hostile peer registers its own origin, so that the good origin's requests
never reach it and their times measure the loop alone.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import Dict, List, Optional

import pytest
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, WindowUpdateFrame

from ptth_sync.handshake import dial_upgrade
from ptth_sync.origins import normalize_origin
from tests.conftest import RouterProcess, wait_until
from tests.h2peer import H2Peer
from tests.system.test_security import certs  # noqa: F401  (the module's certificates fixture)
from tests.system.test_slow_clients import served_once, status, worker_pid

GOOD = "good.example"
EVIL = "evil.example"
#: A GET to the good origin while the hostile tunnel does its worst: the loop must answer it within this.
PROMPT = 1.0


def get(router: RouterProcess, host: str = GOOD, path: str = "/foo", timeout: float = 10) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(router.http_host, router.http_port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


def timed_good_get(router: RouterProcess) -> float:
    started = time.monotonic()
    response = get(router)
    assert response.status == 200, router.output()[-3000:]
    return time.monotonic() - started


def hostile_tunnel(router: RouterProcess, origin: str = EVIL, window: int = 0, rcvbuf: int = 0,
                   ca: Optional[str] = None) -> H2Peer:
    """A fake backend: a PTTH upgrade for ``origin``, then HTTP/2 frames as the test writes them.

    ``window``: the flow-control window it grants, for each stream and the connection; ``rcvbuf``:
    its socket's receive buffer (small: the router's side fills sooner); ``ca``: dial over TLS,
    trusting this CA file.
    """
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect((router.tunnel_host, router.tunnel_port))
    if ca is not None:
        context = ssl.create_default_context(cafile=ca)
        context.set_alpn_protocols(["h2"])
        sock = context.wrap_socket(sock, server_hostname=router.tunnel_host)
    early = dial_upgrade(sock, router.tunnel_address, None, normalize_origin(f"http://{origin}"))
    peer = H2Peer(sock, initial=early)  # (the router's preface may come with its answer)
    peer.server_handshake({SettingCodes.INITIAL_WINDOW_SIZE: window} if window else None)
    if window:
        peer.send(WindowUpdateFrame(0, window_increment=window))
    return peer


def unread(local_port: int, remote_port: int) -> int:
    """Bytes waiting to be read on the loopback TCP socket ``local_port`` -> ``remote_port`` (/proc/net/tcp)."""
    wanted = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    with open("/proc/net/tcp", encoding="ascii") as file:
        for line in file.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == wanted:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no socket {wanted} in /proc/net/tcp")


def threads(pid: int) -> int:
    return status(pid, "Threads")


@pytest.fixture(params=["plain", "tls"])
def tunnel_tls(request, certs) -> Dict[str, Optional[str]]:  # noqa: F811
    """Plain tunnels, or TLS ones: the router's and the backends' options, and the CA a hostile peer trusts."""
    if request.param == "plain":
        return {"router": None, "ca": None}
    return {"router": certs["server"], "ca": certs["ca"]}


def tls_options(tunnel_tls: Dict[str, Optional[str]]) -> Dict[str, List[str]]:
    server, ca = tunnel_tls["router"], tunnel_tls["ca"]
    if server is None or ca is None:
        return {"router": [], "backend": []}
    return {"router": ["--certfile", server], "backend": ["--cafile", ca]}


@pytest.fixture
def two_origins(router_process, backend_process, tunnel_tls):
    """A router whose good origin is served by a real backend; returns (router, worker pid)."""
    options = tls_options(tunnel_tls)
    router = router_process("--timeout", "3", *options["router"])
    served_once(router)
    backend_process("tests.apps:hello", router.tunnel_address, "--origin", f"http://{GOOD}", *options["backend"])
    router.wait_tunnels(1)
    assert timed_good_get(router) < 5
    return router, worker_pid(router.proc.pid)


def test_a_tunnel_costs_the_worker_no_thread(router_process, backend_process, tunnel_tls):
    options = tls_options(tunnel_tls)
    router = router_process(*options["router"])
    served_once(router)
    worker = worker_pid(router.proc.pid)
    before = threads(worker)
    backend_process("tests.apps:hello", router.tunnel_address, "--tunnels", "4", *options["backend"])
    router.wait_tunnels(4)
    for _ in range(8):
        assert get(router, host="any.example").status == 200
    assert threads(worker) == before, f"{threads(worker)} threads, {before} before 4 tunnels joined"


def test_a_tunnel_that_floods_control_frames_is_cut_off_while_the_loop_serves(two_origins, tunnel_tls):
    router, _ = two_origins
    peer = hostile_tunnel(router, ca=tunnel_tls["ca"])
    name = peer.local_name
    router.wait_tunnels(2)
    flood = b"".join(PingFrame(0, i.to_bytes(8, "big")).serialize() for i in range(20_000))
    peer.try_send(flood[: len(flood) // 2])
    slowest = timed_good_get(router)
    peer.try_send(flood[len(flood) // 2 :])
    slowest = max(slowest, timed_good_get(router))
    router.wait_for_line(rf"Tunnel removed: {name}: peer sent over 500 PING/SETTINGS frames in a second")
    for _ in range(5):
        slowest = max(slowest, timed_good_get(router))
    assert slowest < PROMPT, f"a GET to the good origin took {slowest:.2f}s during the flood"
    peer.close()


def test_a_tunnel_that_stops_reading_never_stalls_the_loop(two_origins, tunnel_tls):
    """Requests with 60 KiB bodies to a peer that reads nothing fill the tunnel's socket: the tunnel's
    writer thread waits on it, the loop does not. Each of those requests ends at --timeout (504)."""
    router, worker = two_origins
    peer = hostile_tunnel(router, ca=tunnel_tls["ca"])  # (it never reads again)
    router.wait_tunnels(2)
    before = threads(worker)
    body = b"x" * (60 * 1024)
    head = (f"POST /upload HTTP/1.1\r\nHost: {EVIL}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    clients: List[socket.socket] = []
    try:
        for _ in range(120):  # 7 MiB for a peer that takes none of it
            sock = socket.create_connection((router.http_host, router.http_port), timeout=5)
            sock.setblocking(False)
            try:
                sock.send(head + body)
            except BlockingIOError:
                pass
            clients.append(sock)
        slowest = max(timed_good_get(router) for _ in range(10))
        assert slowest < PROMPT, f"a GET to the good origin took {slowest:.2f}s beside a tunnel that stopped reading"
        assert threads(worker) <= before + 2, f"{threads(worker)} worker threads, {before} before"
        # Each hostile request ends: a 504 from the router, or its connection cut (a body it could not send).
        wait_until(lambda: router.count_lines("504, tunnel") + router.count_lines("Closing connection") > 0, 15,
                   what=lambda: f"the requests to the stalled tunnel to end:\n{router.output()[-3000:]}")
        slowest = max(timed_good_get(router) for _ in range(5))
        assert slowest < PROMPT, f"a GET to the good origin took {slowest:.2f}s after the timeouts"
    finally:
        for sock in clients:
            sock.close()
        peer.close()


def test_a_silent_tunnel_is_pinged_and_dropped_by_the_loop(router_process, backend_process, tunnel_tls):
    options = tls_options(tunnel_tls)
    router = router_process("--ping-interval", "0.5", "--ping-timeout", "0.5", *options["router"])
    served_once(router)
    backend_process("tests.apps:hello", router.tunnel_address, "--origin", f"http://{GOOD}", *options["backend"])
    router.wait_tunnels(1)
    peer = hostile_tunnel(router, ca=tunnel_tls["ca"])  # reads, but answers nothing
    name = peer.local_name
    router.wait_tunnels(2)
    router.wait_for_line(rf"Tunnel removed: {name}: no answer to PING within 0.5s", timeout=10)
    assert peer.wait_closed(5)
    assert timed_good_get(router) < PROMPT
    assert router.count_lines("Tunnel removed") == 1, router.output()  # the real backend answers its PINGs
    peer.close()


def test_what_a_tunnel_had_no_room_for_is_sent_once_it_reads_again(two_origins, tunnel_tls):
    """A 24 MiB upload to a tunnel that grants the window for all of it but reads nothing at first: the
    socket fills, and the rest waits in the worker's loop (no writer thread) until the socket has room."""
    router, _ = two_origins
    size = 24 * 1024 * 1024
    peer = hostile_tunnel(router, window=32 * 1024 * 1024, rcvbuf=64 * 1024, ca=tunnel_tls["ca"])  # (~4 MiB held)
    router.wait_tunnels(2)
    sent: Dict[str, object] = {}

    def upload() -> None:
        conn = http.client.HTTPConnection(router.http_host, router.http_port, timeout=30)
        try:
            conn.connect()
            sent["port"] = conn.sock.getsockname()[1]
            conn.request("POST", "/upload", body=b"u" * size, headers={"Host": EVIL})
            sent["body"] = True
            response = conn.getresponse()
            sent["response"] = (response.status, response.read())
        except Exception as exc:
            sent["error"] = exc
        finally:
            conn.close()

    client = threading.Thread(target=upload, daemon=True)
    client.start()
    try:
        headers = peer.read_until(lambda f: isinstance(f, HeadersFrame), 10)
        stream_id = headers.stream_id
        wait_until(lambda: "body" in sent or not client.is_alive(), 20, what="the client to hand over its body")
        wait_until(lambda: unread(router.http_port, sent["port"]) == 0, 20, what="the router to read the body")
        # Only now does the tunnel read: everything the router queued meanwhile must arrive.
        peer.read_until(lambda f: isinstance(f, DataFrame) and f.stream_id == stream_id and "END_STREAM" in f.flags,
                        30)
        received = sum(len(f.data) for f in peer.received if isinstance(f, DataFrame) and f.stream_id == stream_id)
        assert received == size
        peer.send(peer.headers(stream_id, [(":status", "200"), ("content-length", "2")]),
                  DataFrame(stream_id, b"ok", flags=["END_STREAM"]))
        client.join(10)
        assert sent.get("response") == (200, b"ok"), sent
        assert timed_good_get(router) < PROMPT
    finally:
        peer.close()
        client.join(10)
