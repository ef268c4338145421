"""A bounded soak: steady load through the router while backends restart at random.

    python benchmarks/soak.py [--duration 60] [--clients 8] [--seed N]

Starts ``python -m ptth_sync.router`` (with ``--tunnel-wait``) and two backend
processes on loopback, runs ``--clients`` keep-alive HTTP clients for
``--duration`` seconds (at most ``--max-requests`` requests in all), and
meanwhile restarts a random backend every few seconds: SIGTERM (a graceful
drain), then a fresh process. It prints requests ok/failed, the failures, and
the router worker's memory (VmRSS) and thread count before and after. Exit
status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps:multi"


class Child:
    """A child process with its output collected, for the log lines we wait on."""

    def __init__(self, args: List[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: List[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> List[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if regex.search(line)]
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise TimeoutError(f"no {count} lines matching {pattern!r}:\n" + "\n".join(self.lines[-20:]))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 40) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        return self.proc.returncode


def proc_status(pid: int) -> Dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=500_000, help="upper bound on requests")
    parser.add_argument("--restart-every", type=float, default=4.0, help="mean seconds between restarts")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    python = sys.executable

    router = Child([python, "-m", "ptth_sync.router", "--tunnels", "127.0.0.1:0", "--http", "127.0.0.1:0",
                    "--tunnel-wait", "10"])
    children: List[Child] = [router]
    try:
        tunnels = re.search(r"tcp://(\S+)", router.wait_for("Listening for reverse tunnels")[0]).group(1)
        http_address = re.search(r"http://(\S+)", router.wait_for("Listening for HTTP traffic")[0]).group(1)
        host, _, port = http_address.rpartition(":")

        def start_backend() -> Child:
            child = Child([python, "-m", "ptth_sync.backend", "--connect", tunnels, "--threads", "8", APP])
            children.append(child)
            return child

        backends = [start_backend(), start_backend()]
        router.wait_for("Tunnel added", count=2)
        worker = int(Path(f"/proc/{router.proc.pid}/task/{router.proc.pid}/children").read_text().split()[0])
        before = proc_status(worker)

        counts = {"ok": 0, "failed": 0}
        failures: List[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.duration

        def client() -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            while time.monotonic() < stop_at:
                with lock:
                    if counts["ok"] + counts["failed"] >= args.max_requests:
                        return
                try:
                    conn.request("GET", "/foo")
                    response = conn.getresponse()
                    ok = response.status == 200 and response.read() == b"bar"
                    detail = f"status {response.status}"
                except (OSError, http.client.HTTPException) as exc:
                    ok, detail = False, repr(exc)
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=30)
                with lock:
                    counts["ok" if ok else "failed"] += 1
                    if not ok and len(failures) < 20:
                        failures.append(detail)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        restarts = 0
        while time.monotonic() < stop_at - 2:
            time.sleep(min(rng.expovariate(1 / args.restart_every), max(stop_at - 2 - time.monotonic(), 0)))
            if time.monotonic() >= stop_at - 2:
                break
            index = rng.randrange(len(backends))
            added = len(router.wait_for("Tunnel added"))
            status = backends[index].stop()
            backends[index] = start_backend()
            router.wait_for("Tunnel added", count=added + 1)
            restarts += 1
            print(f"[{args.duration - (stop_at - time.monotonic()):5.1f}s] restarted backend {index} "
                  f"(exit {status}); ok={counts['ok']} failed={counts['failed']}", flush=True)
        for thread in threads:
            thread.join(60)
        after = proc_status(worker)
    finally:
        for child in reversed(children):
            child.stop()

    print()
    print(f"requests ok:      {counts['ok']}")
    print(f"requests failed:  {counts['failed']}")
    print(f"backend restarts: {restarts}")
    print(f"router worker RSS:     {before['VmRSS'] / 1024:.1f} MiB -> {after['VmRSS'] / 1024:.1f} MiB "
          f"(peak {after['VmHWM'] / 1024:.1f} MiB)")
    print(f"router worker threads: {before['Threads']} -> {after['Threads']} "
          f"(client connection threads stay parked up to 60 s for reuse)")
    for failure in failures:
        print("  failure:", failure)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
