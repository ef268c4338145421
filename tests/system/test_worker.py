"""``gunicorn -k ptth_sync.worker.TunnelWorker``: real gunicorn processes behind a real router process."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

import pytest

from tests.conftest import PYTHON, ROOT, Process, wait_until
from tests.system.test_router_workers import Load

DJANGO_DIR = ROOT / "examples" / "django_app"
EXAMPLE_CONFIG = ROOT / "examples" / "gunicorn.conf.py"
WORKER = "ptth_sync.worker.TunnelWorker"

HOOKS_CONFIG = '''
import sys

bind = []

def _say(*words):
    print("HOOK", *words, file=sys.stderr, flush=True)

def post_fork(server, worker):
    _say("post_fork", worker.pid)

def post_worker_init(worker):
    _say("post_worker_init", worker.pid)

def pre_request(worker, req):
    _say("pre_request", worker.pid, req.method, req.path, req.uri, dict(req.headers).get("X-MARK"))

def post_request(worker, req, environ, resp):
    _say("post_request", worker.pid, req.method, environ["PATH_INFO"], resp.status, resp.sent)

def worker_exit(server, worker):
    _say("worker_exit", worker.pid)
'''


def start_gunicorn(
    processes: List[Process], router, tmp_path: Path, *args: str, app: str = "tests.apps:multi",
    config: Union[str, Path] = "bind = []\n", env: Optional[Dict[str, str]] = None, cwd: Path = ROOT,
) -> Process:
    """gunicorn with the tunnel worker and no control socket; ``config`` is a file or its text."""
    if isinstance(config, Path):
        conf = config
    else:
        conf = tmp_path / "gunicorn_test_conf.py"
        conf.write_text(config)
    full_env = {"PTTH_CONNECT": router.tunnel_address if router is not None else "127.0.0.1:9"}
    full_env.update(env or {})
    command = [PYTHON, "-m", "gunicorn", "-k", WORKER, "--no-control-socket", "-c", str(conf), *args, app]
    process = Process(command, env=full_env, cwd=cwd)
    processes.append(process)
    return process


def wait_tunnels(router, server: Process, count: int, timeout: float = 30.0) -> None:
    """``router.wait_tunnels``, failing with both processes' output."""
    try:
        router.wait_tunnels(count, timeout)
    except pytest.fail.Exception:
        pytest.fail(f"no {count} tunnels in {timeout}s\nrouter:\n{router.output()}\ngunicorn:\n{server.output()}")


def fetch(router, path: str, method: str = "GET", body: Optional[bytes] = None,
          headers: Optional[Dict[str, str]] = None, timeout: float = 30) -> Tuple[int, bytes]:
    connection = http.client.HTTPConnection(router.http_host, router.http_port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def workers_of(master: Process) -> Set[int]:
    text = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text()
    return {int(pid) for pid in text.split()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_background(function) -> Tuple[threading.Thread, dict]:
    """Run ``function`` on a thread; its result or exception lands in the returned dict."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except Exception as exc:  # reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# -- serving -------------------------------------------------------------------------


def test_two_workers_with_four_threads_share_200_requests_over_their_own_tunnels(router_process, processes, tmp_path):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, "--workers", "2", "--threads", "4", app="tests.apps:pid")
    wait_tunnels(router, server, 2)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: fetch(router, "/pid"), range(200)))
    assert [status for status, _ in results] == [200] * 200
    served_by = {int(body) for _, body in results}
    assert served_by == workers_of(server)
    assert len(served_by) == 2


@pytest.mark.parametrize(
    ("app", "cwd"),
    [("examples.flask_app:app", ROOT), ("mysite.wsgi:application", DJANGO_DIR)],
    ids=["flask", "django"],
)
def test_flask_and_django_apps_are_served_with_the_example_config(router_process, processes, tmp_path, app, cwd):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, app=app, cwd=cwd, config=EXAMPLE_CONFIG,
                            env={"PYTHONPATH": str(ROOT)})
    wait_tunnels(router, server, 2)  # the example runs two workers
    assert fetch(router, "/foo") == (200, b"bar")
    payload = os.urandom(300 * 1024)
    assert fetch(router, "/echo", "POST", payload, {"Content-Type": "application/octet-stream"}) == (200, payload)
    server.wait_for_line(r'"POST /echo HTTP/1\.1" 200 307200 ')
    assert "Listening at:  (" in server.output()  # bind = []: gunicorn listens on nothing


# -- signals and recycling -------------------------------------------------------------


def test_sigterm_lets_the_request_in_flight_finish_and_gunicorn_exits_0(router_process, processes, tmp_path):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, "--threads", "2", "--graceful-timeout", "10")
    wait_tunnels(router, server, 1)
    thread, outcome = in_background(lambda: fetch(router, "/sleep?s=1"))
    server.wait_for_line("sleeping in")
    server.signal(signal.SIGTERM)
    thread.join(15)
    assert outcome.get("result") == (200, b"done"), outcome
    assert server.wait(15) == 0
    router.wait_for_line(r"Tunnel removed: .*GOAWAY \(NO_ERROR\)")


def test_sigterm_cuts_a_request_that_outlasts_the_graceful_timeout(router_process, processes, tmp_path):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, "--threads", "2", "--graceful-timeout", "1")
    wait_tunnels(router, server, 1)
    thread, outcome = in_background(lambda: fetch(router, "/sleep?s=30"))
    server.wait_for_line("sleeping in")
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 5, f"gunicorn took {elapsed:.1f}s to stop"
    thread.join(15)
    assert outcome.get("result", (None,))[0] == 502, outcome


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_sigint_and_sigquit_stop_at_once_even_with_a_request_in_flight(router_process, processes, tmp_path, signum):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, "--threads", "2", "--graceful-timeout", "30")
    wait_tunnels(router, server, 1)
    thread, outcome = in_background(lambda: fetch(router, "/sleep?s=30"))
    server.wait_for_line("sleeping in")
    started = time.monotonic()
    server.signal(signum)
    assert server.wait(15) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"gunicorn took {elapsed:.1f}s to stop"
    thread.join(15)
    assert not thread.is_alive()
    # The tunnel died before the response started: the router answers 502.
    assert outcome.get("result", (None,))[0] == 502, outcome


def test_max_requests_with_jitter_recycles_workers_without_a_failed_request(router_process, processes, tmp_path):
    router = router_process("--tunnel-wait", "10")
    server = start_gunicorn(
        processes, router, tmp_path,
        "--workers", "2", "--threads", "2", "--max-requests", "20", "--max-requests-jitter", "5",
        app="tests.apps:pid",
    )
    wait_tunnels(router, server, 2)
    results = [fetch(router, "/pid") for _ in range(200)]
    failed = [result for result in results if result[0] != 200]
    assert not failed, failed
    served_by = {int(body) for _, body in results}
    # 200 requests, a restart after 20 to 25 each: 8 workers or more, but a worker that restarts
    # serves on until its successor has a tunnel (a few requests more on a busy machine).
    assert len(served_by) >= 6, served_by
    assert server.count_lines("Autorestarting worker after current request") >= 6


def test_sighup_starts_new_workers_and_drains_the_old_without_a_failed_request(router_process, processes, tmp_path):
    router = router_process("--tunnel-wait", "10")
    server = start_gunicorn(processes, router, tmp_path, "--workers", "2", "--threads", "2", app="tests.apps:pid")
    wait_tunnels(router, server, 2)
    old = workers_of(server)
    results: List[Tuple[int, bytes]] = []
    errors: List[Exception] = []
    stop = threading.Event()

    def keep_asking() -> None:
        deadline = time.monotonic() + 20  # bounded even if the test fails early
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                results.append(fetch(router, "/pid"))
            except Exception as exc:  # reported by the test
                errors.append(exc)

    clients = [threading.Thread(target=keep_asking, daemon=True) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: len(results) >= 20, what="requests before the reload")
        server.signal(signal.SIGHUP)
        wait_until(lambda: len({int(body) for status, body in results if status == 200} - old) >= 2,
                   timeout=10, what="requests served by the new workers")
        wait_until(lambda: not workers_of(server) & old, timeout=10, what="the old workers to exit")
    finally:
        stop.set()
        for client in clients:
            client.join(35)
    assert not errors, errors
    failed = [result for result in results if result[0] != 200]
    assert not failed, failed
    assert len(workers_of(server)) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_under_load_loses_no_request_with_the_routers_default_tunnel_wait(router_process, processes, tmp_path,
                                                                               workers):
    """Each old worker keeps serving until a new one has a tunnel, then drains: with ``--tunnel-wait 0`` no
    request gets a 503 through two reloads under 8-way load. When the whole master stops, nothing waits."""
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, "--workers", str(workers), "--threads", "4")
    wait_tunnels(router, server, workers)
    load = Load(router.url, clients=8)
    load.start()
    try:
        for _ in range(2):
            before = load.count()
            wait_until(lambda b=before: load.count() >= b + 100, 30, what="requests before the reload")
            old = workers_of(server)
            server.signal(signal.SIGHUP)
            wait_until(lambda o=old: not workers_of(server) & o and len(workers_of(server)) == workers, 30,
                       what=lambda: f"the old workers to exit:\n{server.output()}")
        before = load.count()
        wait_until(lambda b=before: load.count() >= b + 100, 30, what="requests after the reloads")
    finally:
        load.stopping.set()
        load.join(90)
    assert load.failures() == [], (load.failures()[:5], server.output())
    assert server.count_lines("Draining: a new worker has a tunnel") >= 2
    waits = server.count_lines("Serving until a new worker has a tunnel")
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert server.count_lines("Serving until a new worker has a tunnel") == waits


# -- gunicorn's logs, hooks and settings -------------------------------------------------


def test_access_log_and_error_log_use_gunicorns_formats(router_process, processes, tmp_path):
    router = router_process()
    log_format = '%(h)s "%(r)s" %(s)s %(b)s %(m)s %(U)s %(q)s %({user-agent}i)s %({content-type}o)s %(L)s %(p)s'
    server = start_gunicorn(
        processes, router, tmp_path, "--access-logfile", "-", "--access-logformat", log_format,
        app="tests.apps:failing",
    )
    wait_tunnels(router, server, 1)
    assert fetch(router, "/foo?x=1", headers={"User-Agent": "ptth-test/1"}) == (200, b"bar")
    assert fetch(router, "/boom", headers={"User-Agent": "ptth-test/1"})[0] == 500
    (worker,) = workers_of(server)
    server.wait_for_line(
        rf'^127\.0\.0\.1 "GET /foo\?x=1 HTTP/1\.1" 200 3 GET /foo x=1 ptth-test/1 text/plain \d+\.\d{{6}} <{worker}>$'
    )
    server.wait_for_line(r'^127\.0\.0\.1 "GET /boom HTTP/1\.1" 500 22 GET /boom  ptth-test/1 text/plain')
    # The application's exception lands in gunicorn's error log, in gunicorn's format.
    server.wait_for_line(rf"^\[[^]]+\] \[{worker}\] \[ERROR\] Error handling request GET /boom$")


def test_server_hooks_are_called_as_with_gthread(router_process, processes, tmp_path):
    router = router_process()
    server = start_gunicorn(processes, router, tmp_path, config=HOOKS_CONFIG)
    wait_tunnels(router, server, 1)
    (worker,) = workers_of(server)
    assert fetch(router, "/foo?a=b", headers={"X-Mark": "m1"}) == (200, b"bar")
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    hooks = [line.split(" ", 1)[1] for line in server.lines if line.startswith("HOOK ")]
    assert hooks == [
        f"post_fork {worker}",
        f"post_worker_init {worker}",
        f"pre_request {worker} GET /foo /foo?a=b m1",
        f"post_request {worker} GET /foo 200 OK 3",
        f"worker_exit {worker}",
    ]


def test_a_reload_takes_the_changed_config_file(router_process, processes, tmp_path):
    """Each worker reads its settings once (``SettingsSnapshot``): SIGHUP's new workers read the new ones."""
    router = router_process("--tunnel-wait", "10")
    conf = tmp_path / "reloaded_conf.py"
    hook = "bind = []\n\ndef pre_request(worker, req):\n    worker.log.info('HOOK %s %s', {!r}, req.path)\n"
    conf.write_text(hook.format("first"))
    server = start_gunicorn(processes, router, tmp_path, config=conf)
    wait_tunnels(router, server, 1)
    assert fetch(router, "/foo") == (200, b"bar")
    server.wait_for_line(r"HOOK first /foo$")
    conf.write_text(hook.format("second"))
    old = workers_of(server)
    server.signal(signal.SIGHUP)
    wait_until(lambda: workers_of(server) and not workers_of(server) & old, timeout=15,
               what="the new worker, and the old one gone")
    wait_until(lambda: fetch(router, "/foo") == (200, b"bar") and server.count_lines("HOOK second /foo") > 0,
               timeout=15, what="a request through the new worker, with the new hook")
    assert server.count_lines("HOOK first") == 1


def test_heartbeat_goes_on_while_redialling_and_during_a_request_longer_than_timeout(
    router_process, processes, tmp_path
):
    """``--timeout 2``: no worker is killed for a missing router, nor for a 3 s request (gthread's rule)."""
    router = router_process()
    missing = f"127.0.0.1:{free_port()}"  # a second router that never answers: redialled all along
    server = start_gunicorn(processes, router, tmp_path, "--timeout", "2", "--threads", "2",
                            env={"PTTH_CONNECT": f"{router.tunnel_address},{missing}"})
    wait_tunnels(router, server, 1)
    (worker,) = workers_of(server)
    assert fetch(router, "/sleep?s=3") == (200, b"done")
    assert server.count_lines(f"Connecting to {missing} failed") >= 3
    assert workers_of(server) == {worker}
    assert "WORKER TIMEOUT" not in server.output()


def test_bound_socket_answers_health_checks_with_the_tunnel_status(router_process, processes, tmp_path):
    router = router_process()
    port = free_port()
    server = start_gunicorn(processes, router, tmp_path, "--bind", f"127.0.0.1:{port}")
    server.wait_for_line("workers answer health checks there")

    def body_if(status: int) -> Optional[bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        return body if response.status == status else None

    body = wait_until(lambda: body_if(200), what="a healthy worker")
    assert re.fullmatch(rb"ptth_sync worker \d+: 1 of 1 tunnels up\n", body), body
    router.stop()
    body = wait_until(lambda: body_if(503), what="an unhealthy worker")
    assert body.endswith(b": 0 of 1 tunnels up\n")


def test_a_worker_with_the_right_token_serves_and_a_wrong_one_stops_gunicorn(processes, router_process, tmp_path):
    router = router_process("--token", "s3cret")
    good = start_gunicorn(processes, router, tmp_path, env={"PTTH_TOKEN": "s3cret"})
    wait_tunnels(router, good, 1)
    assert fetch(router, "/foo") == (200, b"bar")
    bad = start_gunicorn(processes, router, tmp_path, "--workers", "1", env={"PTTH_TOKEN": "guess"})
    assert bad.wait(30) != 0
    bad.wait_for_line(r"Router at .* refused the tunnel: 401")
    assert "guess" not in bad.output()
    assert "s3cret" not in router.output()
    router.wait_for_line(r"Tunnel from .* refused: wrong or missing token")
