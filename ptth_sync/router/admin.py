"""The router's admin listener (``/metrics``, ``/status``, ``/healthz``) and its view over worker processes.

The admin endpoints run on a small threaded HTTP server of the standard
library, beside the proxy: they read counters under a lock for a moment and
never touch a tunnel or a client connection. A connection costs a thread, so
a process serves at most :data:`ADMIN_CONNECTIONS` at once (more are closed,
logged) and each for at most :data:`ADMIN_DEADLINE` seconds: a flood of slow
or silent clients on the admin port costs the worker a bounded number of
threads and descriptors, and a scrape gets through within that deadline.

With several router processes (gunicorn workers), each process counts its own
requests and holds its own tunnels. The admin socket is bound by the master
before it forks, and every worker serves it; the answer must cover all of
them. :class:`SharedMetrics` is a private directory made before the fork:
every worker writes a snapshot of its metrics and tunnels there (atomically,
about once a second, when it answers an admin request and when it exits),
and the worker that answers adds up its own fresh snapshot and the others'.
Gauges and tunnels come from live workers only; counters also include those
of workers that exited, which the master folds into one ``retired`` file as
it reaps them, so counters never go down while the router runs.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Mapping, Optional

from . import metrics

__all__ = [
    "ADMIN_CLOSE_WAIT", "ADMIN_CONNECTIONS", "ADMIN_DEADLINE", "PUBLISH_INTERVAL", "AdminServer", "SharedMetrics",
    "is_loopback",
]

log = logging.getLogger("ptth_sync.router")

#: Seconds between the snapshots a worker writes for the others.
PUBLISH_INTERVAL = 1.0
#: Admin connections one process serves at once (each on a thread of its own).
ADMIN_CONNECTIONS = 16
#: Seconds an admin connection may last, from its accept to its answer (Prometheus' scrape_timeout is 10 s).
ADMIN_DEADLINE = 10.0
#: How long a worker that stops waits for the admin requests it accepted to be answered (seconds).
ADMIN_CLOSE_WAIT = 1.0
#: Seconds between two lines about refused admin connections.
_REFUSAL_LOG_INTERVAL = 10.0

_RETIRED = "retired.json"
_FOLDED_KEPT = 256  # names of folded snapshot files remembered, so readers never count one twice


class SharedMetrics:
    """A directory where each router worker process leaves snapshots of its metrics.

    Made by the master before it forks (:meth:`create`), removed by it at exit
    (:meth:`remove`); workers :meth:`publish` and :meth:`collect`; the master
    :meth:`retire` s the snapshot of a worker that exited.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._owner = os.getpid()  # the master, which alone removes the directory
        self._lock = threading.Lock()
        self._pid = 0
        self._name = ""

    @classmethod
    def create(cls) -> SharedMetrics:
        return cls(tempfile.mkdtemp(prefix="ptth-router-metrics-"))

    def _own_name(self) -> str:
        pid = os.getpid()
        if pid != self._pid:  # a new worker: its own file, never one a dead worker's pid left
            self._pid = pid
            self._name = f"{pid}-{time.time_ns()}.json"
        return self._name

    def publish(self, snapshot: Mapping[str, Any]) -> None:
        """Replace this process's snapshot file with ``snapshot``, atomically."""
        with self._lock:
            name = self._own_name()
            _write_json(os.path.join(self.path, name), snapshot)

    def collect(self, own: Mapping[str, Any]) -> Dict[str, Any]:
        """``own`` (this process, fresh) added to the other workers' snapshots and the retired counters.

        ``own`` is published first: a value this answer shows is never more
        than what the next answer, from any worker, reads back.
        """
        self.publish(own)
        name = self._name
        others: List[tuple] = []
        try:
            names = os.listdir(self.path)
        except OSError:
            names = []
        for other in names:  # the workers' files first, then the retired file (see retire())
            if other in (name, _RETIRED) or not other.endswith(".json"):
                continue
            snapshot = _read_json(os.path.join(self.path, other))
            if snapshot is not None:
                others.append((other, snapshot))
        retired = _read_json(os.path.join(self.path, _RETIRED)) or {}
        folded = set(retired.get("folded", ()))
        counters: List[Mapping[str, Any]] = []
        live = [own]
        for other, snapshot in others:
            if other in folded:
                continue
            if _alive(snapshot.get("pid", 0)):
                live.append(snapshot)
            else:  # exited, not yet retired: its counters still count, its gauges no longer
                counters.append(snapshot.get("counters", {}))
        view = metrics.merge(live, retired.get("counters"))
        for more in counters:
            metrics.add_up(view["counters"], more)
        return view

    def retire(self, pid: int) -> None:
        """Master: fold the counters of the exited worker ``pid`` into the retired file, drop its snapshot."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        prefix = f"{pid}-"
        for name in names:
            path = os.path.join(self.path, name)
            if name.startswith(f".{prefix}"):  # a write it never finished
                _unlink(path)
            if not (name.startswith(prefix) and name.endswith(".json")):
                continue
            snapshot = _read_json(path)
            if snapshot is not None:
                retired = _read_json(os.path.join(self.path, _RETIRED)) or {}
                counters = dict(retired.get("counters", {}))
                metrics.add_up(counters, snapshot.get("counters", {}))
                folded = [*retired.get("folded", ()), name][-_FOLDED_KEPT:]
                _write_json(os.path.join(self.path, _RETIRED), {"counters": counters, "folded": folded})
            _unlink(path)  # after the retired file names it: a reader sees it in one place or the other

    def remove(self) -> None:
        """Master, at exit: delete the directory (a no-op in any other process)."""
        if os.getpid() == self._owner:
            shutil.rmtree(self.path, ignore_errors=True)


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(data, file, separators=(",", ":"))
        os.replace(temporary, path)
    except OSError as exc:
        log.debug("cannot write the metrics snapshot %s: %s", path, exc)
        _unlink(temporary)


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address, or ``localhost``) is reachable from this host only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ptth_sync-admin"
    timeout = 10  # a silent client loses its connection

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _not_allowed(self) -> None:
        self._send(405, "text/plain; charset=utf-8", b"405 Method Not Allowed: GET or HEAD\n", True,
                   [("Allow", "GET, HEAD")])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # any other method
            return self._not_allowed
        raise AttributeError(name)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = metrics.render(self.server.collect()).encode()
            self._send(200, metrics.CONTENT_TYPE, body, send_body)
        elif path == "/status":
            body = json.dumps(metrics.status(self.server.collect()), indent=2).encode() + b"\n"
            self._send(200, "application/json", body, send_body)
        elif path == "/healthz":
            live = len(self.server.collect()["tunnels"])
            if live or self.server.expecting_tunnels():  # (a worker stopped: its tunnels are on their way)
                self._send(200, "text/plain; charset=utf-8", b"ok\n", send_body)
            else:
                self._send(503, "text/plain; charset=utf-8", b"no live tunnel\n", send_body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"404 Not Found: try /metrics, /status or /healthz\n",
                       send_body)

    def _send(self, code: int, content_type: str, body: bytes, send_body: bool,
              headers: Optional[List[tuple]] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers or ():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin: %s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, collect: Callable[[], Mapping[str, Any]],
                 expecting_tunnels: Callable[[], bool]) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.collect = collect
        self.expecting_tunnels = expecting_tunnels
        self._lock = threading.Lock()
        self._served = threading.Condition(self._lock)  # notified as each connection's thread ends
        self._serving: Dict[socket.socket, float] = {}  # connection -> its deadline
        self._refused = 0
        self._refusals_logged_at = 0.0

    def process_request(self, request: Any, client_address: Any) -> None:
        """(The serving thread.) A thread for the connection, or the connection closed if there are enough."""
        now = time.monotonic()
        with self._lock:
            full = len(self._serving) >= ADMIN_CONNECTIONS
            if not full:
                self._serving[request] = now + ADMIN_DEADLINE
        if full:
            self._refuse(request, client_address, now)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._serving.pop(request, None)
                self._served.notify_all()

    def wait_served(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the connections being served to be answered."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._serving:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._served.wait(remaining)

    def service_actions(self) -> None:
        """(The serving thread, every poll interval.) Cut the connections past their deadline."""
        now = time.monotonic()
        with self._lock:
            late = [request for request, deadline in self._serving.items() if now >= deadline]
        for request in late:
            try:
                request.shutdown(socket.SHUT_RDWR)  # its thread's read or write ends at once
            except OSError:
                pass

    def _refuse(self, request: Any, client_address: Any, now: float) -> None:
        self._refused += 1
        if now - self._refusals_logged_at >= _REFUSAL_LOG_INTERVAL:
            self._refusals_logged_at = now
            log.warning("admin: %d connection(s) closed unanswered (latest from %s): %d are served at once, "
                        "each for at most %gs", self._refused, client_address[0] if client_address else "?",
                        ADMIN_CONNECTIONS, ADMIN_DEADLINE)
            self._refused = 0
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("admin: error answering %s", client_address)


class AdminServer:
    """Serve the admin endpoints on a listening socket, from a daemon thread.

    ``collect`` returns the merged view (:func:`metrics.merge`) to present;
    ``expecting_tunnels`` whether tunnels another worker handed over are
    on their way (``/healthz`` is then ``200`` with none yet: requests wait
    for them). The socket may be shared with other processes (it is made
    non-blocking: whichever process accepts a connection answers it).
    """

    def __init__(self, sock: socket.socket, collect: Callable[[], Mapping[str, Any]],
                 expecting_tunnels: Callable[[], bool] = lambda: False) -> None:
        sock.setblocking(False)
        self._server = _Server(sock, collect, expecting_tunnels)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="ptth-admin", daemon=True)

    def start(self) -> AdminServer:
        self._thread.start()
        return self

    def stop_accepting(self) -> None:
        """Take no more connections (the other processes take them); those accepted are still answered."""
        if self._thread.is_alive():
            self._server.shutdown()

    def close(self) -> None:
        """Stop serving, answer the connections accepted already (a second at most: a load balancer's check
        is not cut), and close this process's handle on the socket (other processes keep theirs)."""
        self.stop_accepting()
        self._server.wait_served(ADMIN_CLOSE_WAIT)
        self._server.server_close()
