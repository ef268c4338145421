"""Benchmark WebSockets through the tunnel against the same flask-sock app under gunicorn's threaded worker.

Run from the repository root: ``.venv/bin/python benchmarks/websockets.py [--quick]``.

Two serving paths answer the same flask-sock echo application
(``benchmarks.ws_apps:app``):

(a) *direct*: ``gunicorn -k gthread -w 1 --threads 16``;
(b) *tunnel*: ``python -m ptth_sync.router`` with one ``python -m ptth_sync.backend
    --threads 16`` dialled in; clients open their WebSockets on the router.

Measurements, per path, alternating a and b from round to round (the median of
``--rounds`` is reported, as in ``benchmarks/run.py``):

1. Latency: one WebSocket, ``--messages`` 32-byte messages one after the
   other (send, wait for the echo): p50 and p99 of the round trip; the tunnel's
   *added latency* is its p50 minus direct's.
2. Throughput: ``--connections`` WebSockets at once (a client thread each),
   each keeping ``--window`` messages in flight, for ``--duration`` seconds:
   echoed messages per second, and the CPU per message (utime + stime) of the
   gunicorn worker, or of the router's worker and the backend. The client is
   Python (websocket-client) and shares the machine: its numbers are a lower
   bound, the same for both paths.

Every count and wait is bounded; every server started is stopped at the end.
Results: a table on stdout and ``benchmarks/results/websockets.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import websocket

from benchmarks.run import (
    HOST,
    PATHS,
    REPO,
    SERVER_THREADS,
    STARTUP_TIMEOUT_S,
    BenchmarkError,
    Endpoint,
    Processes,
    endpoint_processes,
    fmt,
    log,
    machine_info,
    median,
    only_child,
    path_order,
    percentile,
    positive_int,
    processes_cpu_seconds,
    python_module,
    ratio,
    start_backend,
    start_router,
    table,
    wait_http,
)

APP = "benchmarks.ws_apps:app"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "websockets.json"
MESSAGE = b"x" * 32
#: A client waits at most this long for one echo: past it the run fails rather than hangs.
RECV_TIMEOUT_S = 30.0


def start_direct(procs: Processes) -> Endpoint:
    argv = python_module("gunicorn", "-k", "gthread", "-w", "1", "--threads", str(SERVER_THREADS),
                         "--no-control-socket", "-b", f"{HOST}:0", APP)
    service = procs.start("gunicorn", argv)
    port = service.wait_for(re.compile(r"Listening at: http://[\d.]+:(\d+)"))[0].group(1)
    worker = only_child(service)
    base = f"http://{HOST}:{port}"
    wait_http(base + "/", STARTUP_TIMEOUT_S, [service])
    return Endpoint("direct", base, server_pid=worker)


def start_tunnel(procs: Processes) -> Endpoint:
    router = start_router(procs)
    backend = start_backend(procs, router, APP, "backend")
    router.wait_tunnels(1, STARTUP_TIMEOUT_S, [backend])
    wait_http(router.http_url + "/", STARTUP_TIMEOUT_S, [router.service, backend])
    return Endpoint("tunnel", router.http_url, server_pid=router.worker_pid, backend_pid=backend.pid)


def connect(endpoint: Endpoint) -> websocket.WebSocket:
    return websocket.create_connection(endpoint.base_url.replace("http://", "ws://") + "/echo",
                                       timeout=RECV_TIMEOUT_S)


def finish(ws: websocket.WebSocket) -> None:
    ws.close()
    ws.shutdown()


def measure_latency(endpoint: Endpoint, messages: int) -> Dict[str, Optional[float]]:
    """Round trips of one message at a time on one WebSocket: p50 and p99 in ms."""
    ws = connect(endpoint)
    try:
        for _ in range(min(messages, 200)):  # warm-up
            ws.send_binary(MESSAGE)
            ws.recv()
        times: List[float] = []
        for _ in range(messages):
            started = time.perf_counter()
            ws.send_binary(MESSAGE)
            if ws.recv() != MESSAGE:
                raise BenchmarkError("an echo came back changed")
            times.append((time.perf_counter() - started) * 1000)
    finally:
        finish(ws)
    times.sort()
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "mean_ms": statistics.fmean(times)}


def measure_throughput(endpoint: Endpoint, connections: int, window: int, duration: float) -> Dict[str, Any]:
    """``connections`` WebSockets, ``window`` messages in flight each, for ``duration`` s: echoes per second."""
    sockets = [connect(endpoint) for _ in range(connections)]
    counts = [0] * connections
    failures: List[str] = []
    stop = threading.Event()

    def client(index: int, ws: websocket.WebSocket) -> None:
        try:
            while not stop.is_set():
                for _ in range(window):
                    ws.send_binary(MESSAGE)
                for _ in range(window):
                    ws.recv()
                counts[index] += window
        except Exception as exc:  # reported, and the run fails
            failures.append(repr(exc))

    processes = endpoint_processes(endpoint)
    cpu_before = {role: processes_cpu_seconds(pids) for role, pids in processes.items()}
    threads = [threading.Thread(target=client, args=(i, ws), daemon=True) for i, ws in enumerate(sockets)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    stop.wait(duration)  # a measurement window, not a synchronisation
    stop.set()
    for thread in threads:
        thread.join(RECV_TIMEOUT_S)
    elapsed = time.monotonic() - started
    for ws in sockets:
        finish(ws)
    if failures:
        raise BenchmarkError(f"{len(failures)} client(s) failed: {failures[0]}")
    total = sum(counts)
    cpu = {role: (processes_cpu_seconds(pids) - cpu_before[role]) / max(total, 1) * 1e6
           for role, pids in processes.items()}
    return {"messages_per_s": total / elapsed, "messages": total, "cpu_us_per_message": cpu}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    log_dir = args.output.resolve().parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    latency: Dict[str, List[Dict[str, Any]]] = {name: [] for name in PATHS}
    throughput: Dict[str, List[Dict[str, Any]]] = {name: [] for name in PATHS}
    with Processes(log_dir, "websockets") as procs:
        endpoints = {"direct": start_direct(procs), "tunnel": start_tunnel(procs)}
        for index in range(args.rounds):
            for name in path_order(index):
                latency[name].append(measure_latency(endpoints[name], args.messages))
                throughput[name].append(measure_throughput(endpoints[name], args.connections, args.window,
                                                           args.duration))
                log(f"  round {index + 1}/{args.rounds} {name:<6} p50 {fmt(latency[name][-1]['p50_ms'], 3)} ms  "
                    f"{throughput[name][-1]['messages_per_s']:9.0f} msg/s  CPU us/msg " + " ".join(
                        f"{role} {value:.0f}" for role, value in throughput[name][-1]["cpu_us_per_message"].items()))
    summary: Dict[str, Any] = {}
    for name in PATHS:
        roles = throughput[name][0]["cpu_us_per_message"]
        summary[name] = {
            "p50_ms": median([r["p50_ms"] for r in latency[name]]),
            "p99_ms": median([r["p99_ms"] for r in latency[name]]),
            "messages_per_s": median([r["messages_per_s"] for r in throughput[name]]),
            "cpu_us_per_message": {role: median([r["cpu_us_per_message"][role] for r in throughput[name]])
                                   for role in roles},
            "rounds": {"latency": latency[name], "throughput": throughput[name]},
        }
    direct, tunnel = summary["direct"], summary["tunnel"]
    summary["ratio_messages_per_s"] = ratio(tunnel["messages_per_s"], direct["messages_per_s"])
    summary["added_latency_p50_ms"] = (None if tunnel["p50_ms"] is None or direct["p50_ms"] is None
                                       else tunnel["p50_ms"] - direct["p50_ms"])
    return summary


def report(summary: Dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for name in PATHS:
        data = summary[name]
        cpu = data["cpu_us_per_message"]
        rows.append([name, fmt(data["p50_ms"], 3), fmt(data["p99_ms"], 3), fmt(data["messages_per_s"], 0),
                     " + ".join(f"{role} {value:.0f}" for role, value in cpu.items())])
    lines = [
        f"WebSockets: flask-sock echo, {len(MESSAGE)}-byte messages; latency over {args.messages} round trips on one "
        f"WebSocket; throughput with {args.connections} WebSockets x {args.window} in flight for {args.duration:g}s; "
        f"median of {args.rounds} round(s)",
        table(["path", "p50 ms", "p99 ms", "msg/s", "CPU us/msg"], rows),
        f"tunnel/direct msg/s: {fmt(summary['ratio_messages_per_s'])}   "
        f"added latency (p50): {fmt(summary['added_latency_p50_ms'], 3)} ms",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="WebSockets through the tunnel against direct gunicorn gthread.")
    parser.add_argument("--messages", type=positive_int, default=None, help="round trips for the latency (2000)")
    parser.add_argument("--connections", type=positive_int, default=8, help="WebSockets for the throughput (8)")
    parser.add_argument("--window", type=positive_int, default=32, help="messages in flight per WebSocket (32)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of throughput per round (5)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="rounds, median reported (3)")
    parser.add_argument("--quick", action="store_true", help="500 round trips, 2 s, 1 round")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="FILE", help="JSON results")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.messages = args.messages or (500 if args.quick else 2000)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    log("WebSockets: direct gunicorn gthread (a) against the ptth_sync tunnel (b)")
    try:
        summary = run(args)
    except BenchmarkError as exc:
        log(f"FAILED: {exc}")
        return 1
    results = {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "output"},
               "websockets": summary}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(report(summary, args))
    print(f"\nResults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
