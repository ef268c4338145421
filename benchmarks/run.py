"""Benchmark ptth_sync against plain gunicorn, on loopback, in one run.

Run from the repository root: ``.venv/bin/python benchmarks/run.py [--quick]``.

Two serving paths answer the same WSGI applications (``benchmarks/apps.py``):

(a) *direct*: ``gunicorn -k gthread -w 1 --threads 16`` serving the app;
(b) *tunnel*: ``python -m ptth_sync.router`` with one ``python -m ptth_sync.backend
    --threads 16`` dialled in; clients talk HTTP/1.1 to the router, which proxies
    every request over the backend's HTTP/2 tunnel.

Method
------
This machine is small (2 cores) and shared, so absolute numbers drift from run
to run. What is meant to be compared is the *ratio* tunnel/direct measured in
the same run: both paths are measured back to back, alternating (a, b, then
b, a in the next round, so a slow drift hits both equally), each measurement
is repeated ``--rounds`` times and the median of the rounds is reported. Each
path gets a short warm-up at each concurrency level before it is measured.
Each phase starts fresh server processes, so a phase's peak RSS is its own.

Phases:

1. Throughput and latency: ``hello world`` at each ``--concurrency``, for
   ``--duration`` seconds, with the load generator: ``wrk`` if installed
   (``wrk -t1 -cC -dDs --latency``; one wrk thread is plenty here and leaves the
   second core to the servers), else ``h2load --h1`` (p50/p99 computed from
   the per-request times of its ``--log-file``, since h2load itself only
   prints mean/sd/max), else a built-in threaded Python client (which holds
   the GIL and may well be the bottleneck: its numbers are a lower bound).
   Reported: requests/s, p50, p99 per path, and the requests/s ratio.
2. Bodies: a 64 MiB upload and a 64 MiB download per path on one ``http.client``
   connection, 1 MiB per read/write, timed around the transfer; MB/s (10^6
   bytes per second) and the ratio. One untimed transfer each way and path first.
3. Idle tunnels: a fresh router with one hello backend (p50 at c=1 and c=32,
   RSS and threads of its worker process), then ``--idle-tunnels`` more tunnels
   from extra backend processes (100 tunnels each, 4 threads): RSS and threads
   per tunnel, and p50 again. The extra tunnels register for an origin of
   their own (``IDLE_ORIGIN``), so they stay idle: the measured requests still
   go to the one hello backend, and the difference is what holding (and
   pinging) many tunnels costs the router.
4. Peak RSS (VmHWM) of the router worker, the backend and the gunicorn worker
   at the end of phases 1 and 2.

Results: a table on stdout, ``benchmarks/results/results.json`` (every number,
every round, machine info), ``benchmarks/results/throughput.png`` (if
matplotlib is installed) and the servers' logs in ``benchmarks/results/logs/``.
Nothing is installed by this script; it says which tools it found and used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import suppress
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "results.json"
HOST = "127.0.0.1"
MIB = 1024 * 1024

PATHS = ("direct", "tunnel")
PATH_LABELS = {"direct": "direct gunicorn (a)", "tunnel": "ptth_sync tunnel (b)"}
SERVER_THREADS = 16
WARMUP_S = 1
BODY_MIB = 64
IDLE_CONCURRENCIES = (1, 32)
IDLE_TUNNELS_PER_BACKEND = 100
IDLE_BACKEND_THREADS = 4
IDLE_CPU_WINDOW_S = 3.0

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
BODY_SOCKET_TIMEOUT_S = 120.0
PYTHON_CLIENT_MAX_REQUESTS = 1_000_000  # per connection: the built-in client's count bound

TUNNEL_ADDED = re.compile(r"Tunnel added: (\S+)")
TUNNEL_REMOVED = re.compile(r"Tunnel removed: (\S+?):")


class BenchmarkError(RuntimeError):
    """A phase could not be measured (a server did not start, a transfer failed...)."""


# -- small helpers -------------------------------------------------------------


def log(message: str) -> None:
    """Progress goes to stderr; stdout is kept for the result tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[Optional[float]]) -> Optional[float]:
    """Median of the values that exist; None if none does."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(sorted_values: Sequence[float], pct: float) -> Optional[float]:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return None
    rank = max(math.ceil(pct / 100 * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def wait_until(check: Callable[[], bool], timeout: float, what: str, watched: Sequence[Service] = ()) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` s or when a watched process exits."""
    deadline = time.monotonic() + timeout
    while not check():
        for service in watched:
            service.raise_if_exited(what)
        if time.monotonic() >= deadline:
            raise BenchmarkError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- /proc ---------------------------------------------------------------------


def proc_status(pid: int) -> Dict[str, str]:
    """The fields of /proc/PID/status."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def memory_snapshot(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM in KiB and the thread count of a process."""
    status = proc_status(pid)
    return {
        "rss_kib": int(status["VmRSS"].split()[0]),
        "hwm_kib": int(status["VmHWM"].split()[0]),
        "threads": int(status["Threads"]),
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
        fields = stat.read().rpartition(")")[2].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_percent(pid: int, window: float = IDLE_CPU_WINDOW_S) -> float:
    """CPU a process uses while nobody sends it requests, in % of one core, over ``window`` seconds."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(window)  # a measurement window, not a synchronisation
    return (cpu_seconds(pid) - before) / (time.monotonic() - started) * 100


def children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="utf-8") as listing:
            return [int(p) for p in listing.read().split()]
    except FileNotFoundError:
        return []


def only_child(service: Service, count: int = 1) -> int:
    """The pid of a gunicorn master's (first) worker process, once all ``count`` are there."""
    return worker_processes(service, count)[0]


def worker_processes(service: Service, count: int) -> List[int]:
    """The pids of a gunicorn master's ``count`` worker processes, once all are there."""
    found: List[int] = []

    def check() -> bool:
        found[:] = sorted(children(service.pid))
        return len(found) == count

    wait_until(check, STARTUP_TIMEOUT_S, f"{service.name}'s worker process", [service])
    return found


# -- processes -----------------------------------------------------------------


class Service:
    """A server subprocess in its own session; its output is kept and mirrored to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._lines: List[str] = []
        self._scans: Dict[str, Tuple[int, List[re.Match]]] = {}
        self._lock = threading.Lock()
        self._log = log_path.open("w", encoding="utf-8")
        self._log.write("$ " + " ".join(self.argv) + "\n")
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # Ctrl-C reaches only us; we stop the servers in order
            )
        except OSError:
            self._log.close()
            raise
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, name=f"read {name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            with self._lock:
                self._lines.append(line.rstrip("\n"))
        self._log.close()

    def matches(self, pattern: re.Pattern) -> List[re.Match]:
        """Every match of ``pattern`` in the output so far (scanned incrementally)."""
        with self._lock:
            scanned, found = self._scans.get(pattern.pattern, (0, []))
            for line in self._lines[scanned:]:
                match = pattern.search(line)
                if match:
                    found.append(match)
            self._scans[pattern.pattern] = (len(self._lines), found)
            return list(found)

    def wait_for(self, pattern: re.Pattern, count: int = 1, timeout: float = STARTUP_TIMEOUT_S) -> List[re.Match]:
        """Wait until the output holds ``count`` matches of ``pattern``; returns them."""
        what = f"{pattern.pattern!r} from {self.name}"
        wait_until(lambda: len(self.matches(pattern)) >= count, timeout, what, [self])
        return self.matches(pattern)

    def tail(self, lines: int = 15) -> str:
        with self._lock:
            return "\n".join(self._lines[-lines:])

    def raise_if_exited(self, what: str) -> None:
        code = self.process.poll()
        if code is not None:
            raise BenchmarkError(
                f"{self.name} exited with status {code} while waiting for {what}; last output:\n{self.tail()}"
            )

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def kill_group(self) -> None:
        """SIGKILL whatever is left of this service's process group (a gunicorn worker, say)."""
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class Processes:
    """The servers of one phase; leaving the ``with`` block stops them all: SIGTERM, then SIGKILL.

    They stop in waves: first the servers clients talk to (gunicorn, routers), then the backends. A
    backend stopping gracefully drains each tunnel through its router; a backend whose router is gone
    has nothing to drain and stops at once (and 1,000 tunnels draining together into a live router
    took 5 to 17 s here, against 2 s for router first).
    """

    def __init__(self, log_dir: Path, phase: str) -> None:
        self.log_dir = log_dir
        self.phase = phase
        self.services: List[Tuple[int, Service]] = []

    def start(self, name: str, argv: Sequence[str], stop_wave: int = 0) -> Service:
        service = Service(name, argv, self.log_dir / f"{self.phase}-{name}.log")
        self.services.append((stop_wave, service))
        return service

    def stop_all(self) -> None:
        for wave in sorted({wave for wave, _ in self.services}):
            self._stop([service for w, service in self.services if w == wave])
        self.services.clear()

    @staticmethod
    def _stop(services: Sequence[Service]) -> None:
        for service in services:
            service.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for service in services:
            try:
                service.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log(f"{service.name} did not stop within {STOP_TIMEOUT_S:.0f}s of SIGTERM: killing it")
            service.kill_group()
            with suppress(subprocess.TimeoutExpired):
                service.process.wait(5)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop_all()


# -- the servers ---------------------------------------------------------------


@dataclass
class Endpoint:
    """Where a serving path answers, and the processes whose memory we watch."""

    name: str
    base_url: str
    server_pid: int  # the gunicorn worker, or the router's (first) worker
    backend_pid: Optional[int] = None
    #: Every router worker (``--router-workers``): the router's CPU is theirs together.
    router_pids: Tuple[int, ...] = ()

    def url(self, path: str = "/") -> str:
        return self.base_url + path


@dataclass
class RouterHandle:
    service: Service
    tunnel_address: str
    http_url: str
    worker_pid: int
    #: All its workers (``worker_pid`` is the first).
    worker_pids: Tuple[int, ...] = ()

    def live_tunnels(self) -> int:
        return len(self.service.matches(TUNNEL_ADDED)) - len(self.service.matches(TUNNEL_REMOVED))

    def wait_tunnels(self, count: int, timeout: float, watched: Sequence[Service] = ()) -> None:
        wait_until(
            lambda: self.live_tunnels() >= count,
            timeout,
            f"{count} live tunnels on {self.service.name} (have {self.live_tunnels()})",
            [self.service, *watched],
        )


def python_module(module: str, *args: str) -> List[str]:
    return [sys.executable, "-m", module, *args]


def wait_http(url: str, timeout: float, watched: Sequence[Service], status: Optional[int] = 200) -> None:
    """Poll ``url`` until it answers ``status`` (any status when None)."""

    def answered() -> bool:
        try:
            got, _ = http_get(url, timeout=2.0)
        except (OSError, http.client.HTTPException):
            return False
        return status is None or got == status

    wait_until(answered, timeout, f"{status or 'an answer'} from {url}", watched)


def http_get(url: str, timeout: float) -> Tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_direct(procs: Processes, app: str, ready_path: str) -> Endpoint:
    """gunicorn gthread, one worker, 16 threads, on an ephemeral port; ready when ``ready_path`` answers 200."""
    argv = python_module(
        "gunicorn", "-k", "gthread", "-w", "1", "--threads", str(SERVER_THREADS),
        "--no-control-socket", "-b", f"{HOST}:0", app,
    )
    service = procs.start("gunicorn", argv)
    port = service.wait_for(re.compile(r"Listening at: http://[\d.]+:(\d+)"))[0].group(1)
    worker = only_child(service)
    base_url = f"http://{HOST}:{port}"
    wait_http(base_url + ready_path, STARTUP_TIMEOUT_S, [service])
    return Endpoint("direct", base_url, server_pid=worker)


#: Router processes (``--router-workers``); the tunnel path's backend then keeps as many tunnels.
ROUTER_WORKERS = 1
#: More options for the router (``--router-option``, e.g. ``--cpu-affinity=auto``).
ROUTER_OPTIONS: List[str] = []


def start_router(procs: Processes, name: str = "router", workers: int = 1) -> RouterHandle:
    """A router with no tunnel yet; ready when its worker answers HTTP (a 503, without tunnels)."""
    argv = python_module("ptth_sync.router", "--tunnels", f"{HOST}:0", "--http", f"{HOST}:0",
                         "--workers", str(workers), *ROUTER_OPTIONS)
    service = procs.start(name, argv)
    tunnels = service.wait_for(re.compile(r"Listening for reverse tunnels on tcp://(\S+)"))[0].group(1)
    http_url = service.wait_for(re.compile(r"Listening for HTTP traffic on (http://\S+)"))[0].group(1)
    workers_pids = worker_processes(service, workers)
    wait_http(http_url + "/", STARTUP_TIMEOUT_S, [service], status=None)
    return RouterHandle(service, tunnels, http_url, workers_pids[0], tuple(workers_pids))


def start_backend(
    procs: Processes, router: RouterHandle, app: str, name: str, threads: int = SERVER_THREADS, tunnels: int = 1,
    origin: Optional[str] = None,
) -> Service:
    argv = python_module(
        "ptth_sync.backend", "--threads", str(threads), "--tunnels", str(tunnels),
        "--connect", router.tunnel_address, *(["--origin", origin] if origin else []), app,
    )
    return procs.start(name, argv, stop_wave=1)


def start_tunnel(procs: Processes, app: str, ready_path: str) -> Endpoint:
    """A router and one backend serving ``app``; ready when the router lists the tunnel and ``ready_path`` is 200."""
    router = start_router(procs, workers=ROUTER_WORKERS)
    backend = start_backend(procs, router, app, "backend", tunnels=ROUTER_WORKERS)
    router.wait_tunnels(ROUTER_WORKERS, STARTUP_TIMEOUT_S, [backend])
    wait_http(router.http_url + ready_path, STARTUP_TIMEOUT_S, [router.service, backend])
    return Endpoint("tunnel", router.http_url, server_pid=router.worker_pid, backend_pid=backend.pid,
                    router_pids=router.worker_pids)


def start_both(procs: Processes, app: str, ready_path: str = "/") -> Dict[str, Endpoint]:
    return {"direct": start_direct(procs, app, ready_path), "tunnel": start_tunnel(procs, app, ready_path)}


def memory_of(endpoints: Dict[str, Endpoint]) -> Dict[str, Dict[str, int]]:
    """RSS, peak RSS and threads of the gunicorn worker, the router worker and the backend."""
    result = {
        "gunicorn_worker": memory_snapshot(endpoints["direct"].server_pid),
        "router_worker": memory_snapshot(endpoints["tunnel"].server_pid),
    }
    backend = endpoints["tunnel"].backend_pid
    if backend is not None:
        result["backend"] = memory_snapshot(backend)
    return result


# -- load generators -----------------------------------------------------------


@dataclass
class LoadResult:
    """One measurement: ``concurrency`` connections for ``duration_s`` seconds."""

    requests_per_s: float
    p50_ms: Optional[float]
    p99_ms: Optional[float]
    requests: int
    errors: int
    duration_s: float
    detail: str = ""


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class LoadGenerator:
    """Runs ``concurrency`` keep-alive HTTP/1.1 connections against a URL for a while."""

    name = "?"
    version = ""
    note = ""

    def run(self, url: str, concurrency: int, duration: int) -> LoadResult:
        raise NotImplementedError

    def describe(self) -> Dict[str, str]:
        return {"name": self.name, "version": self.version, "note": self.note}


def _tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


class Wrk(LoadGenerator):
    name = "wrk"
    note = "wrk -t1 (one thread: on 2 cores the other core is left to the servers); p50/p99 from --latency"
    _RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
    _PCT = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
    _COUNT = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
    _NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
    _SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")

    def __init__(self, path: str) -> None:
        self.path = path
        self.version = " ".join(_tool_version([path, "-v"]).split()[:2])

    def run(self, url: str, concurrency: int, duration: int) -> LoadResult:
        argv = [self.path, "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s", "--latency", url]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
        return self.parse(out.stdout + out.stderr)

    @classmethod
    def parse(cls, text: str) -> LoadResult:
        rps = cls._RPS.search(text)
        count = cls._COUNT.search(text)
        if rps is None or count is None:
            raise BenchmarkError(f"cannot parse wrk's output:\n{text}")
        pct = {m.group(1): float(m.group(2)) * _UNIT_MS[m.group(3)] for m in cls._PCT.finditer(text)}
        errors, details = 0, []
        non_2xx = cls._NON_2XX.search(text)
        if non_2xx:
            errors += int(non_2xx.group(1))
            details.append(non_2xx.group(0))
        socket_errors = cls._SOCKET.search(text)
        if socket_errors and any(int(g) for g in socket_errors.groups()):
            errors += sum(int(g) for g in socket_errors.groups())
            details.append(socket_errors.group(0))
        return LoadResult(
            requests_per_s=float(rps.group(1)),
            p50_ms=pct.get("50"),
            p99_ms=pct.get("99"),
            requests=int(count.group(1)),
            errors=errors,
            duration_s=float(count.group(2)) * _UNIT_MS[count.group(3)] / 1000,
            detail="; ".join(details),
        )


class H2load(LoadGenerator):
    name = "h2load"
    note = "h2load --h1 -t1 -m1; p50/p99 computed from the per-request times of --log-file"
    _FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s|m|h), ([\d.]+) req/s")
    _REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed")
    _STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")

    def __init__(self, path: str) -> None:
        self.path = path
        self.version = _tool_version([path, "--version"])

    def run(self, url: str, concurrency: int, duration: int) -> LoadResult:
        with tempfile.NamedTemporaryFile("r", prefix="h2load-", suffix=".log") as log_file:
            argv = [
                self.path, "--h1", "-t1", "-m1", f"-c{concurrency}", f"-D{duration}",
                "--log-file", log_file.name, url,
            ]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
            latencies = sorted(self._latencies_ms(log_file))
        return self.parse(out.stdout + out.stderr, latencies)

    @staticmethod
    def _latencies_ms(log_file: Any) -> Iterator[float]:
        """Third column of h2load's log: microseconds from request start to end of response."""
        for line in log_file:
            columns = line.split()
            if len(columns) >= 3:
                yield int(columns[2]) / 1000

    @classmethod
    def parse(cls, text: str, sorted_latencies_ms: Sequence[float]) -> LoadResult:
        finished = cls._FINISHED.search(text)
        requests = cls._REQUESTS.search(text)
        status = cls._STATUS.search(text)
        if finished is None or requests is None or status is None:
            raise BenchmarkError(f"cannot parse h2load's output:\n{text}")
        done = int(requests.group(3))
        # "failed" covers errored and timed-out requests; a 4xx/5xx answer counts as "succeeded" for h2load.
        errors = int(requests.group(5)) + int(status.group(3)) + int(status.group(4))
        return LoadResult(
            requests_per_s=float(finished.group(3)),
            p50_ms=percentile(sorted_latencies_ms, 50),
            p99_ms=percentile(sorted_latencies_ms, 99),
            requests=done,
            errors=errors,
            duration_s=float(finished.group(1)) * _UNIT_MS[finished.group(2)] / 1000,
            detail=f"{requests.group(0)}; {status.group(0)}" if errors else "",
        )


class PythonClient(LoadGenerator):
    name = "python"
    version = platform.python_version()
    note = (
        "built-in threaded http.client client, the last resort without wrk or h2load: its threads share one "
        "GIL, so the client itself may be the bottleneck and its numbers are lower bounds"
    )

    def run(self, url: str, concurrency: int, duration: int) -> LoadResult:
        parts = urlsplit(url)
        deadline = time.monotonic() + duration
        latencies: List[List[float]] = [[] for _ in range(concurrency)]
        errors = [0] * concurrency

        def connection_loop(slot: int) -> None:
            conn: Optional[http.client.HTTPConnection] = None
            for _ in range(PYTHON_CLIENT_MAX_REQUESTS):
                if time.monotonic() >= deadline:
                    break
                started = time.perf_counter()
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                    conn.request("GET", parts.path or "/")
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    errors[slot] += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                if 200 <= response.status < 400:
                    latencies[slot].append((time.perf_counter() - started) * 1000)
                else:
                    errors[slot] += 1
            if conn is not None:
                conn.close()

        began = time.monotonic()
        threads = [threading.Thread(target=connection_loop, args=(i,), daemon=True) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(duration + 30)
        elapsed = time.monotonic() - began
        merged = sorted(x for per_thread in latencies for x in per_thread)
        return LoadResult(
            requests_per_s=len(merged) / elapsed,
            p50_ms=percentile(merged, 50),
            p99_ms=percentile(merged, 99),
            requests=len(merged) + sum(errors),
            errors=sum(errors),
            duration_s=elapsed,
        )


def pick_generator(preference: str) -> LoadGenerator:
    """wrk, else h2load, else the built-in client (or the one asked for)."""
    candidates = ("wrk", "h2load", "python") if preference == "auto" else (preference,)
    for name in candidates:
        if name == "python":
            return PythonClient()
        path = shutil.which(name)
        if path:
            return Wrk(path) if name == "wrk" else H2load(path)
        if preference != "auto":
            raise BenchmarkError(f"--generator {name}: {name} is not installed")
    raise AssertionError("unreachable")


# -- phase 1: throughput and latency --------------------------------------------


def path_order(round_index: int) -> Tuple[str, ...]:
    """a, b in even rounds and b, a in odd ones: a drift in machine speed hits both paths alike."""
    return PATHS if round_index % 2 == 0 else PATHS[::-1]


def summarise(rounds: List[LoadResult]) -> Dict[str, Any]:
    return {
        "requests_per_s": median([r.requests_per_s for r in rounds]),
        "p50_ms": median([r.p50_ms for r in rounds]),
        "p99_ms": median([r.p99_ms for r in rounds]),
        "errors": sum(r.errors for r in rounds),
        "rounds": [asdict(r) for r in rounds],
    }


def endpoint_processes(endpoint: Endpoint) -> Dict[str, Tuple[int, ...]]:
    """The processes whose CPU a request of this path costs, by role (every router worker for "router")."""
    if endpoint.backend_pid is None:
        return {"gunicorn": (endpoint.server_pid,)}
    return {"router": endpoint.router_pids or (endpoint.server_pid,), "backend": (endpoint.backend_pid,)}


def processes_cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time the processes ``pids`` have used so far, together."""
    return sum(cpu_seconds(pid) for pid in pids)


def measure_level(
    generator: LoadGenerator, endpoints: Dict[str, Endpoint], concurrency: int, duration: int, rounds: int
) -> Dict[str, Any]:
    """One concurrency level: warm both paths up, then alternate them for ``rounds`` rounds."""
    for name in PATHS:
        generator.run(endpoints[name].url(), concurrency, WARMUP_S)
    results: Dict[str, List[LoadResult]] = {name: [] for name in PATHS}
    cpu: Dict[str, List[Dict[str, float]]] = {name: [] for name in PATHS}
    for index in range(rounds):
        for name in path_order(index):
            processes = endpoint_processes(endpoints[name])
            before = {role: processes_cpu_seconds(pids) for role, pids in processes.items()}
            result = generator.run(endpoints[name].url(), concurrency, duration)
            # CPU per request: what each process used during the run (utime + stime) over the requests served.
            requests = max(result.requests_per_s * duration, 1.0)
            used = {role: (processes_cpu_seconds(pids) - before[role]) / requests * 1e6
                    for role, pids in processes.items()}
            results[name].append(result)
            cpu[name].append(used)
            log(
                f"  c={concurrency:<4} round {index + 1}/{rounds} {name:<6} {result.requests_per_s:9.0f} req/s"
                f"  p50 {fmt(result.p50_ms)} ms  p99 {fmt(result.p99_ms)} ms  CPU us/req "
                + " ".join(f"{role} {value:.0f}" for role, value in used.items())
                + (f"  ERRORS {result.errors} ({result.detail})" if result.errors else "")
            )
    level: Dict[str, Any] = {"concurrency": concurrency}
    for name in PATHS:
        level[name] = summarise(results[name])
        level[name]["cpu_us_per_request"] = {
            role: median([round_cpu[role] for round_cpu in cpu[name]]) for role in cpu[name][0]
        }
    level["ratio_requests_per_s"] = ratio(level["tunnel"]["requests_per_s"], level["direct"]["requests_per_s"])
    return level


def run_throughput(
    generator: LoadGenerator, concurrencies: Sequence[int], duration: int, rounds: int, log_dir: Path
) -> Dict[str, Any]:
    log(f"Phase 1: throughput and latency with {generator.name} ({generator.version})")
    with Processes(log_dir, "throughput") as procs:
        endpoints = start_both(procs, "benchmarks.apps:hello")
        memory_start = memory_of(endpoints)
        levels = [measure_level(generator, endpoints, c, duration, rounds) for c in concurrencies]
        memory_end = memory_of(endpoints)
    return {
        "generator": generator.describe(),
        "duration_s": duration,
        "rounds": rounds,
        "warmup_s": WARMUP_S,
        "levels": levels,
        "memory_at_start": memory_start,
        "memory_at_end": memory_end,
    }


# -- phase 2: bodies --------------------------------------------------------------


def upload(url: str, mib: int) -> float:
    """POST ``mib`` MiB, 1 MiB per write, on one connection; returns the seconds it took."""
    parts = urlsplit(url)
    chunk = b"\x5a" * MIB
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=BODY_SOCKET_TIMEOUT_S)
    try:
        conn.connect()
        started = time.perf_counter()
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(mib * MIB))
        conn.endheaders()
        for _ in range(mib):
            conn.send(chunk)
        response = conn.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    if response.status != 200 or answer.strip() != str(mib * MIB).encode():
        raise BenchmarkError(f"upload to {url}: {response.status} {answer[:200]!r}, expected {mib * MIB} bytes")
    return elapsed


def download(url: str, mib: int) -> float:
    """GET ``mib`` MiB, 1 MiB per read, on one connection; returns the seconds it took."""
    parts = urlsplit(url)
    buffer = memoryview(bytearray(MIB))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=BODY_SOCKET_TIMEOUT_S)
    received = 0
    try:
        conn.connect()
        started = time.perf_counter()
        conn.request("GET", f"{parts.path}?mib={mib}")
        response = conn.getresponse()
        for _ in range(mib * 2 + 2):  # bounded: short reads are rare
            n = response.readinto(buffer)
            if not n:
                break
            received += n
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    if response.status != 200 or received != mib * MIB:
        raise BenchmarkError(f"download from {url}: status {response.status}, {received} of {mib * MIB} bytes")
    return elapsed


def run_bodies(rounds: int, log_dir: Path) -> Dict[str, Any]:
    log(f"Phase 2: {BODY_MIB} MiB upload and download, {rounds} round(s)")
    transfers = {"upload": (upload, "/upload"), "download": (download, "/download")}
    times: Dict[str, Dict[str, List[float]]] = {t: {p: [] for p in PATHS} for t in transfers}
    with Processes(log_dir, "bodies") as procs:
        endpoints = start_both(procs, "benchmarks.apps:bodies", "/download?mib=0")
        memory_start = memory_of(endpoints)
        for name in PATHS:  # warm-up, not timed: first-transfer effects (buffers, page faults) hit neither path
            for move, path in transfers.values():
                move(endpoints[name].url(path), BODY_MIB)
        for index in range(rounds):
            for transfer, (move, path) in transfers.items():
                for name in path_order(index):
                    seconds = move(endpoints[name].url(path), BODY_MIB)
                    times[transfer][name].append(seconds)
                    rate = BODY_MIB * MIB / seconds / 1e6
                    log(f"  round {index + 1}/{rounds} {transfer:<8} {name:<6} {rate:8.1f} MB/s")
        memory_end = memory_of(endpoints)
    result: Dict[str, Any] = {"size_mib": BODY_MIB, "rounds": rounds}
    for transfer, per_path in times.items():
        entry: Dict[str, Any] = {}
        for name, seconds in per_path.items():
            rates = [BODY_MIB * MIB / s / 1e6 for s in seconds]
            entry[name] = {"mb_per_s": median(rates), "rounds_mb_per_s": rates, "rounds_seconds": seconds}
        entry["ratio"] = ratio(entry["tunnel"]["mb_per_s"], entry["direct"]["mb_per_s"])
        result[transfer] = entry
    result["memory_at_start"] = memory_start
    result["memory_at_end"] = memory_end
    return result


# -- phase 3: idle tunnels ---------------------------------------------------------


def measure_p50(
    generator: LoadGenerator, url: str, duration: int, rounds: int, label: str
) -> Dict[str, Dict[str, Any]]:
    """p50 (and the rest) at each of IDLE_CONCURRENCIES, median of ``rounds``, after a warm-up."""
    result = {}
    for concurrency in IDLE_CONCURRENCIES:
        generator.run(url, concurrency, WARMUP_S)
        measured = [generator.run(url, concurrency, duration) for _ in range(rounds)]
        result[str(concurrency)] = summarise(measured)
        log(f"  {label} c={concurrency}: p50 {fmt(result[str(concurrency)]['p50_ms'])} ms")
    return result


#: The origin the idle tunnels of phase 3 register for: no measured request asks for it.
IDLE_ORIGIN = "http://idle.invalid"


def start_idle_backends(procs: Processes, router: RouterHandle, count: int) -> List[Service]:
    """Backends holding ``count`` tunnels in all, IDLE_TUNNELS_PER_BACKEND each.

    They register for an origin of their own, so they carry none of the
    measured requests: the router holds them, pings them and keeps their
    threads, and that is what is measured.
    """
    backends = []
    for index, start in enumerate(range(0, count, IDLE_TUNNELS_PER_BACKEND)):
        tunnels = min(IDLE_TUNNELS_PER_BACKEND, count - start)
        name = f"extra-backend-{index}"
        backends.append(
            start_backend(procs, router, "benchmarks.apps:hello", name, threads=IDLE_BACKEND_THREADS, tunnels=tunnels,
                          origin=IDLE_ORIGIN)
        )
    return backends


def run_idle(generator: LoadGenerator, idle_tunnels: int, duration: int, rounds: int, log_dir: Path) -> Dict[str, Any]:
    log(f"Phase 3: {idle_tunnels} idle tunnels on one router")
    with Processes(log_dir, "idle") as procs:
        router = start_router(procs)
        at_start = memory_snapshot(router.worker_pid)
        backend = start_backend(procs, router, "benchmarks.apps:hello", "backend")
        router.wait_tunnels(1, STARTUP_TIMEOUT_S, [backend])
        wait_http(router.http_url + "/", STARTUP_TIMEOUT_S, [router.service, backend])
        one_tunnel_idle = memory_snapshot(router.worker_pid)
        before = measure_p50(generator, router.http_url + "/", duration, rounds, "1 tunnel")
        one_tunnel = memory_snapshot(router.worker_pid)
        one_tunnel_cpu = idle_cpu_percent(router.worker_pid)
        began = time.monotonic()
        backends = start_idle_backends(procs, router, idle_tunnels)
        router.wait_tunnels(idle_tunnels + 1, STARTUP_TIMEOUT_S + idle_tunnels / 10, backends)
        setup_s = time.monotonic() - began
        log(f"  {idle_tunnels + 1} tunnels live after {setup_s:.1f}s ({len(backends)} extra backend processes)")
        many_tunnels = memory_snapshot(router.worker_pid)
        many_tunnels_cpu = idle_cpu_percent(router.worker_pid)
        after = measure_p50(generator, router.http_url + "/", duration, rounds, f"{idle_tunnels + 1} tunnels")
        after_load = memory_snapshot(router.worker_pid)
    return {
        "idle_tunnels": idle_tunnels,
        "backend_processes": len(backends),
        "tunnels_per_backend": IDLE_TUNNELS_PER_BACKEND,
        "threads_per_backend": IDLE_BACKEND_THREADS,
        "setup_s": setup_s,
        "router_worker": {
            "no_tunnel": at_start,
            "one_tunnel_idle": one_tunnel_idle,
            "one_tunnel_after_load": one_tunnel,
            "with_idle_tunnels": many_tunnels,
            "with_idle_tunnels_after_load": after_load,
        },
        "idle_cpu_percent_one_tunnel": one_tunnel_cpu,
        "idle_cpu_percent_with_idle_tunnels": many_tunnels_cpu,
        "idle_cpu_window_s": IDLE_CPU_WINDOW_S,
        "rss_per_tunnel_kib": (many_tunnels["rss_kib"] - one_tunnel["rss_kib"]) / idle_tunnels,
        "threads_per_tunnel": (many_tunnels["threads"] - one_tunnel["threads"]) / idle_tunnels,
        "latency_one_tunnel": before,
        "latency_with_idle_tunnels": after,
        "p50_increase_pct": {
            c: pct_change(after[c]["p50_ms"], before[c]["p50_ms"]) for c in before
        },
    }


def pct_change(new: Optional[float], old: Optional[float]) -> Optional[float]:
    if new is None or not old:
        return None
    return (new / old - 1) * 100


# -- machine info -----------------------------------------------------------------


def cpu_model() -> str:
    with suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "ptth_sync"], cwd=REPO, capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes in ptth_sync/" if dirty else "")


def machine_info() -> Dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "versions": {
            "gunicorn": package_version("gunicorn"),
            "h2": package_version("h2"),
            "ptth_sync": package_version("ptth_sync"),
            "ptth_sync_git": git_revision(),
        },
    }


# -- output -------------------------------------------------------------------------


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_signed_pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns (the first left-aligned), with a rule under the headers."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        return "  ".join([first, *(str(c).rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def cpu_cells(level: Dict[str, Any]) -> List[str]:
    """CPU microseconds per request: direct gunicorn's worker, the router's worker, the backend; router/direct
    and (router + backend)/direct."""
    direct = level["direct"].get("cpu_us_per_request", {}).get("gunicorn")
    tunnel = level["tunnel"].get("cpu_us_per_request", {})
    router, backend = tunnel.get("router"), tunnel.get("backend")
    both = router + backend if router is not None and backend is not None else None
    return [fmt(direct, 0), fmt(router, 0), fmt(backend, 0), fmt(ratio(router, direct)), fmt(ratio(both, direct))]


def throughput_section(data: Dict[str, Any]) -> str:
    gen = data["generator"]
    rows = []
    for level in data["levels"]:
        a, b = level["direct"], level["tunnel"]
        errors = a["errors"] + b["errors"]
        rows.append([
            str(level["concurrency"]),
            fmt(a["requests_per_s"], 0), fmt(a["p50_ms"]), fmt(a["p99_ms"]),
            fmt(b["requests_per_s"], 0), fmt(b["p50_ms"]), fmt(b["p99_ms"]),
            fmt(level["ratio_requests_per_s"]),
            *cpu_cells(level),
            str(errors),
        ])
    headers = ["conc", "a req/s", "a p50 ms", "a p99 ms", "b req/s", "b p50 ms", "b p99 ms", "b/a req/s",
               "a CPU us/req", "router us/req", "backend us/req", "router/a", "(router+backend)/a", "errors"]
    options = "".join(f" {option}" for option in ROUTER_OPTIONS)
    return "\n".join([
        f"== 1. Throughput and latency: hello world, {data['duration_s']} s x {data['rounds']} round(s), "
        f"median of rounds ==",
        f"load generator: {gen['name']} ({gen['version']}): {gen['note']}",
        "a = direct gunicorn gthread (1 worker, 16 threads); b = ptth_sync router "
        f"({ROUTER_WORKERS} process(es){options}) + 1 backend (16 threads, {ROUTER_WORKERS} tunnel(s))",
        table(headers, rows),
    ])


def bodies_section(data: Dict[str, Any]) -> str:
    rows = [
        [f"{t} {data['size_mib']} MiB", fmt(data[t]["direct"]["mb_per_s"], 1), fmt(data[t]["tunnel"]["mb_per_s"], 1),
         fmt(data[t]["ratio"])]
        for t in ("upload", "download")
    ]
    return "\n".join([
        f"== 2. Bodies: http.client, one connection, 1 MiB reads/writes, median of {data['rounds']} round(s) ==",
        table(["transfer", "a MB/s", "b MB/s", "b/a"], rows),
    ])


def idle_section(data: Dict[str, Any]) -> str:
    n = data["idle_tunnels"]
    worker = data["router_worker"]
    before, many = worker["one_tunnel_after_load"], worker["with_idle_tunnels"]
    rows = [
        ["router worker RSS (MiB)", fmt(before["rss_kib"] / 1024, 1), fmt(many["rss_kib"] / 1024, 1),
         f"{fmt(data['rss_per_tunnel_kib'], 1)} KiB/tunnel"],
        ["router worker threads", str(before["threads"]), str(many["threads"]),
         f"{fmt(data['threads_per_tunnel'])} threads/tunnel"],
        [f"router worker CPU, no requests ({data['idle_cpu_window_s']:g} s)",
         f"{fmt(data['idle_cpu_percent_one_tunnel'], 1)}%", f"{fmt(data['idle_cpu_percent_with_idle_tunnels'], 1)}%",
         ""],
    ]
    for c in data["latency_one_tunnel"]:
        rows.append([
            f"p50 at c={c} (ms)",
            fmt(data["latency_one_tunnel"][c]["p50_ms"]),
            fmt(data["latency_with_idle_tunnels"][c]["p50_ms"]),
            fmt_signed_pct(data["p50_increase_pct"][c]),
        ])
    return "\n".join([
        f"== 3. Idle tunnels: {n} extra tunnels from {data['backend_processes']} backend process(es) "
        f"({data['tunnels_per_backend']} tunnels, {data['threads_per_backend']} threads each); "
        f"all up in {data['setup_s']:.1f} s ==",
        table(["", "1 tunnel", f"{n + 1} tunnels", "change"], rows),
        f"(router worker with no tunnel at start: {fmt(worker['no_tunnel']['rss_kib'] / 1024, 1)} MiB, "
        f"threads: {worker['no_tunnel']['threads']}; '1 tunnel' is measured after its load runs, so that both columns "
        "include the request-serving threads)",
    ])


def memory_section(results: Dict[str, Any]) -> str:
    phases = [(p, results[p]) for p in ("throughput", "bodies") if isinstance(results.get(p), dict)
              and "memory_at_end" in results[p]]
    labels = {"gunicorn_worker": "direct gunicorn worker (a)", "router_worker": "router worker (b)",
              "backend": "backend (b)"}
    rows = []
    for key, label in labels.items():
        row = [label]
        for _, data in phases:
            start, end = data["memory_at_start"].get(key), data["memory_at_end"].get(key)
            row.append(fmt(start["rss_kib"] / 1024, 1) if start else "n/a")
            row.append(fmt(end["hwm_kib"] / 1024, 1) if end else "n/a")
        rows.append(row)
    headers = ["process (MiB)"]
    for name, _ in phases:
        headers += [f"{name}: RSS at start", f"{name}: peak (VmHWM)"]
    return "\n".join(["== 4. Peak RSS under load (VmHWM at the end of each phase; fresh processes per phase) ==",
                      table(headers, rows)])


def report(results: Dict[str, Any]) -> str:
    machine = results["machine"]
    versions = machine["versions"]
    sections = [
        f"Machine: {machine['nproc']} CPU(s), {machine['cpu_model']}, Python {machine['python']}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in machine['loadavg_at_start'])}\n"
        f"Versions: gunicorn {versions['gunicorn']}, h2 {versions['h2']}, ptth_sync {versions['ptth_sync']} "
        f"({versions['ptth_sync_git']})",
    ]
    builders = {"throughput": throughput_section, "bodies": bodies_section, "idle": idle_section}
    for phase, build in builders.items():
        data = results.get(phase)
        if data is None:
            continue
        if "error" in data:
            sections.append(f"== {phase}: FAILED ==\n{data['error']}")
        elif "skipped" in data:
            sections.append(f"== {phase}: skipped ({data['skipped']}) ==")
        else:
            sections.append(build(data))
    if any(isinstance(results.get(p), dict) and "memory_at_end" in results[p] for p in ("throughput", "bodies")):
        sections.append(memory_section(results))
    sections.append(f"Total time: {results['total_s']:.0f} s")
    return "\n\n".join(sections)


def write_chart(throughput: Dict[str, Any], path: Path) -> str:
    """requests/s and p99 against concurrency for both paths; returns what happened."""
    try:
        import matplotlib
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install matplotlib to get it)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = throughput["levels"]
    concurrency = [level["concurrency"] for level in levels]
    figure, (rps_axis, p99_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in PATHS:
        rps_axis.plot(concurrency, [level[name]["requests_per_s"] for level in levels], "o-", label=PATH_LABELS[name])
        p99 = [level[name]["p99_ms"] for level in levels]
        p99_axis.plot(concurrency, [math.nan if v is None else v for v in p99], "o-", label=PATH_LABELS[name])
    for axis, title in ((rps_axis, "requests/s (median)"), (p99_axis, "p99 latency, ms (median)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrency)
        axis.set_xticklabels([str(c) for c in concurrency])
        axis.set_xlabel("concurrent connections")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    rps_axis.set_ylim(bottom=0)
    p99_axis.set_yscale("log")
    figure.suptitle(f"hello world, {throughput['generator']['name']}, loopback")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"chart written to {path}"


# -- main --------------------------------------------------------------------------------


def parse_concurrency(text: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be at least 1: {text}")
    return values


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the ptth_sync tunnel against direct gunicorn on loopback (see benchmarks/README.md).",
    )
    parser.add_argument("--duration", type=positive_int, default=None, metavar="SECONDS",
                        help="length of each load measurement (default 5; 2 with --quick)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="repetitions of each measurement, median reported (default 3; 1 with --quick)")
    parser.add_argument("--concurrency", type=parse_concurrency, default=[1, 16, 32, 64, 256], metavar="C,C,...",
                        help="connection counts for phase 1 (default 1,16,32,64,256)")
    parser.add_argument("--idle-tunnels", type=positive_int, default=1000, metavar="N",
                        help="idle tunnels added in phase 3 (default %(default)s)")
    parser.add_argument("--skip-bodies", action="store_true", help="skip phase 2 (64 MiB bodies)")
    parser.add_argument("--skip-idle", action="store_true", help="skip phase 3 (idle tunnels)")
    parser.add_argument("--quick", action="store_true", help="fast sanity run: --duration 2 --rounds 1")
    parser.add_argument("--router-workers", type=positive_int, default=1, metavar="N",
                        help="router processes for the tunnel path; its backend keeps N tunnels (default: 1)")
    parser.add_argument("--router-option", action="append", default=[], metavar="OPTION",
                        help="pass OPTION to the tunnel path's router, e.g. --router-option=--cpu-affinity=auto "
                             "(repeatable)")
    parser.add_argument("--generator", choices=["auto", "wrk", "h2load", "python"], default="auto",
                        help="load generator (default: wrk, else h2load, else the built-in Python client)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="FILE",
                        help="JSON results; the chart and logs go next to it (default benchmarks/results/results.json)")
    return parser


def run_phase(results: Dict[str, Any], name: str, phase: Callable[[], Dict[str, Any]]) -> None:
    """Run one phase; a failure is recorded and reported, and the next phases still run."""
    try:
        results[name] = phase()
    except (BenchmarkError, OSError, subprocess.SubprocessError, http.client.HTTPException) as exc:
        log(f"Phase {name} FAILED:\n{traceback.format_exc()}")
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}


def raise_system_exit(signum: int, _frame: Any) -> None:
    """SIGTERM/SIGHUP end the run like Ctrl-C: through the finally blocks that stop the servers."""
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    global ROUTER_WORKERS, ROUTER_OPTIONS
    ROUTER_WORKERS = args.router_workers
    ROUTER_OPTIONS = list(args.router_option)
    duration = args.duration or (2 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    output: Path = args.output.resolve()
    log_dir = output.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for old_log in log_dir.glob("*.log"):
        old_log.unlink()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_system_exit)

    began = time.monotonic()
    generator = pick_generator(args.generator)
    log(f"Load generator: {generator.name} ({generator.version}). {generator.note}")
    results: Dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "duration_s": duration, "rounds": rounds, "concurrency": args.concurrency,
            "idle_tunnels": args.idle_tunnels, "warmup_s": WARMUP_S, "body_mib": BODY_MIB,
            "router_workers": ROUTER_WORKERS, "router_options": ROUTER_OPTIONS,
        },
    }
    run_phase(results, "throughput", lambda: run_throughput(generator, args.concurrency, duration, rounds, log_dir))
    if args.skip_bodies:
        results["bodies"] = {"skipped": "--skip-bodies"}
    else:
        run_phase(results, "bodies", lambda: run_bodies(rounds, log_dir))
    if args.skip_idle:
        results["idle"] = {"skipped": "--skip-idle"}
    else:
        run_phase(results, "idle", lambda: run_idle(generator, args.idle_tunnels, duration, rounds, log_dir))
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["total_s"] = time.monotonic() - began

    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    throughput = results["throughput"]
    chart = "chart skipped: phase 1 failed" if "error" in throughput else write_chart(
        throughput, output.with_name("throughput.png")
    )
    print(report(results))
    print(f"\nResults written to {output}; {chart}; server logs in {log_dir}")
    failed = [name for name in ("throughput", "bodies", "idle") if "error" in results[name]]
    return 1 if failed else 0


def interruptible_main() -> int:
    """main(), reporting an interruption (after the servers have been stopped) rather than a traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        log("Interrupted: every server started was stopped; no results written")
        return 130
    except SystemExit as exc:
        if isinstance(exc.code, int) and exc.code > 128:
            log(f"Stopped by signal {exc.code - 128}: every server started was stopped; no results written")
        raise


if __name__ == "__main__":
    sys.exit(interruptible_main())
