"""``python -m ptth_sync.router``: the router on an embedded gunicorn server.

The master process binds the listeners (so ``:0`` works and a restarted
worker inherits them); the worker processes accept tunnels and serve HTTP
with :class:`~ptth_sync.router.worker.RouterWorker`, a threaded gunicorn
worker: gunicorn brings HTTP/1.1 parsing, keep-alive, timeouts, signals and
the access log. With ``--admin``, every worker also serves the admin
endpoints on the listener the master bound, answering for all of them
(see :mod:`ptth_sync.router.admin`).
"""

from __future__ import annotations

import argparse
import logging
import math
import socket
import ssl
from typing import Any, Dict, List, Optional

from gunicorn.app.base import BaseApplication

from ..access import TunnelAccess, load_tokens_file
from ..addresses import format_address, parse_address
from ..cli import (
    add_lifecycle_arguments,
    add_token_arguments,
    configure_logging,
    positive_float,
    positive_int,
    read_token,
    thread_count,
    worker_count,
)
from ..engine import ConnectionSettings
from ..tls import TLSConfigError, load_chain, server_context
from .admin import SharedMetrics, is_loopback
from .app import Router
from .fleet import WorkerFleet
from .limits import raise_open_file_limit
from .worker import RouterWorker

log = logging.getLogger("ptth_sync.router")

#: The HTTP listener's backlog (gunicorn's default).
HTTP_BACKLOG = 2048


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ptth_sync.router",
        description="Accept reverse HTTP/2 tunnels from backends and proxy public HTTP traffic through them.",
    )
    parser.add_argument("--tunnels", default="127.0.0.1:8887", metavar="HOST:PORT",
                        help="where backends dial in (default: %(default)s)")
    parser.add_argument("--http", default="127.0.0.1:8888", metavar="HOST:PORT",
                        help="where HTTP clients connect (default: %(default)s)")
    parser.add_argument("--workers", type=worker_count, default=1, metavar="N",
                        help="router processes; each needs tunnels of its own, so give backends "
                             "--tunnels N or more (default: %(default)s)")
    parser.add_argument("--threads", type=thread_count, default=1000, metavar="N",
                        help="requests proxied at once, each on a thread; waiting connections need none "
                             "(default: %(default)s)")
    parser.add_argument("--keep-alive", type=positive_float, default=5.0, metavar="SECONDS",
                        help="how long an idle client connection is kept open (default: %(default)s)")
    parser.add_argument("--timeout", type=positive_float, default=30.0, metavar="SECONDS",
                        help="how long to wait for a backend's response: 504 after (default: %(default)s)")
    parser.add_argument("--tunnel-wait", type=positive_float, default=0.0, metavar="SECONDS",
                        help="how long a request waits for a tunnel to appear: 503 after (default: %(default)s)")
    parser.add_argument("--header-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                        help="how long a client may take to send a request's line and headers (default: %(default)s)")
    parser.add_argument("--max-body-size", type=positive_int, default=None, metavar="BYTES",
                        help="largest request body forwarded; larger ones get 413 (default: no limit)")
    parser.add_argument("--websocket-idle-timeout", type=positive_float, default=300.0, metavar="SECONDS",
                        help="close a WebSocket after this long without a byte either way, 0 for never "
                             "(default: %(default)s)")
    add_lifecycle_arguments(parser, "drop the tunnel")
    add_token_arguments(parser, "shared secret every backend must present to open a tunnel")
    parser.add_argument("--tokens-file", default=None, metavar="FILE",
                        help="tokens and the origins each may register, a token per line: "
                             "TOKEN ORIGIN [ORIGIN...] ('*' for any); read again on SIGHUP")
    parser.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                        help="proxies whose X-Forwarded-Proto is trusted for the request's scheme, comma-separated "
                             "or '*' (gunicorn's setting; default: 127.0.0.1,::1)")
    parser.add_argument("--certfile", default=None, metavar="FILE",
                        help="serve tunnels over TLS with this certificate (chain) in PEM")
    parser.add_argument("--keyfile", default=None, metavar="FILE", help="the private key for --certfile")
    parser.add_argument("--ca-certs", default=None, metavar="FILE",
                        help="mutual TLS: require tunnel client certificates issued by these CAs")
    parser.add_argument("--http-certfile", default=None, metavar="FILE",
                        help="serve the public HTTP side as HTTPS with this certificate (chain)")
    parser.add_argument("--http-keyfile", default=None, metavar="FILE", help="the private key for --http-certfile")
    parser.add_argument("--admin", default=None, metavar="HOST:PORT",
                        help="serve Prometheus /metrics, a JSON /status and /healthz here (default: off; "
                             "keep it on loopback)")
    parser.add_argument("--access-logfile", default=None, metavar="FILE",
                        help="write gunicorn's access log to FILE ('-' for stdout)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="(default: %(default)s)")
    parser.add_argument("--cpu-affinity", default="none", choices=["none", "auto"],
                        help="auto: bind each worker process to one CPU, the k-th worker to the k-th CPU, as "
                             "nginx's worker_cpu_affinity auto (faster: see the docs' Performance page); "
                             "none: let the kernel move them (default: %(default)s)")
    return parser


class RouterServer(BaseApplication):  # type: ignore[misc]
    """gunicorn with one or more worker processes serving a :class:`Router`."""

    def __init__(self, router: Router, tunnel_listener: socket.socket, options: Dict[str, Any],
                 tokens_file: Optional[str] = None, admin_listener: Optional[socket.socket] = None) -> None:
        self.router = router
        self.tunnel_listener = tunnel_listener
        self.admin_listener = admin_listener
        self.options = options
        self.tokens_file = tokens_file
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        self.cfg.set("when_ready", self._when_ready)
        self.cfg.set("post_worker_init", self._post_worker_init)
        self.cfg.set("on_reload", self._on_reload)
        self.cfg.set("worker_exit", self._worker_exit)
        self.cfg.set("child_exit", self._child_exit)
        self.cfg.set("on_exit", self._on_exit)

    def load(self) -> Router:
        return self.router

    @staticmethod
    def _when_ready(server: Any) -> None:
        scheme = "https" if server.cfg.is_ssl else "http"
        for listener in server.LISTENERS:
            address = listener.sock.getsockname()[:2]
            log.info("Listening for HTTP traffic on %s://%s", scheme, format_address(address))

    def _post_worker_init(self, worker: Any) -> None:
        # Threads do not survive fork: accept tunnels only in the worker.
        if self.router.fleet is not None:
            self.router.fleet.join()
        self.router.serve_tunnels(self.tunnel_listener)
        if self.admin_listener is not None:
            self.router.serve_admin(self.admin_listener)

    def _on_reload(self, server: Any) -> None:
        """SIGHUP, in the master before it starts new workers: read the tokens file again."""
        self._reload_tokens()

    def _reload_tokens(self) -> None:
        """Read the tokens file again, for the workers forked from now on; a broken file keeps the old tokens."""
        path = self.tokens_file
        if not path:
            return
        try:
            tokens = load_tokens_file(path)
        except ValueError as exc:
            log.error("Keeping the previous tokens: %s", exc)
            return
        self.router.access = TunnelAccess(self.router.token, tokens)
        log.info("Read %d token(s) from %s", len(tokens), path)

    def _worker_exit(self, server: Any, worker: Any) -> None:
        self.router.close()

    def _child_exit(self, server: Any, worker: Any) -> None:
        # The master: keep the counters of the worker that exited, and free its place among the workers.
        if self.router.fleet is not None:
            self.router.fleet.retire(worker.pid)
        if self.router.shared_metrics is not None:
            self.router.shared_metrics.retire(worker.pid)

    def _on_exit(self, server: Any) -> None:
        if self.router.shared_metrics is not None:
            self.router.shared_metrics.remove()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    token = read_token(parser, args)
    configure_logging(args.log_level)
    addresses = {}
    for option, text in (("--http", args.http), ("--tunnels", args.tunnels), ("--admin", args.admin)):
        try:
            addresses[option] = parse_address(text) if text else None
        except ValueError as exc:
            parser.error(f"argument {option}: {exc}")
    http_address, tunnel_address, admin_address = addresses["--http"], addresses["--tunnels"], addresses["--admin"]
    if args.ca_certs and not args.certfile:
        parser.error("argument --ca-certs: needs --certfile: mutual TLS is TLS")
    if args.keyfile and not args.certfile:
        parser.error("argument --keyfile: needs --certfile (the tunnel certificate the key belongs to)")
    if bool(args.http_certfile) != bool(args.http_keyfile):
        parser.error("--http-certfile and --http-keyfile go together")
    tunnel_tls = None
    try:
        if args.certfile:
            tunnel_tls = server_context(args.certfile, args.keyfile, args.ca_certs)
        if args.http_certfile:  # loaded by each worker; checked here, so that a bad file stops the start
            load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), args.http_certfile, args.http_keyfile,
                       options=("--http-certfile", "--http-keyfile"))
    except (TLSConfigError, OSError, ssl.SSLError) as exc:
        parser.error(str(exc))
    tokens = None
    if args.tokens_file:
        try:
            tokens = load_tokens_file(args.tokens_file)
        except ValueError as exc:
            parser.error(str(exc))
    raise_open_file_limit()  # before the fork: the workers inherit it
    settings = ConnectionSettings(ping_interval=args.ping_interval, ping_timeout=args.ping_timeout)
    router = Router(timeout=args.timeout, tunnel_wait=args.tunnel_wait, settings=settings,
                    max_body_size=args.max_body_size, token=token, ssl_context=tunnel_tls, tokens=tokens,
                    websocket_idle_timeout=args.websocket_idle_timeout)
    # Before the fork: shared. (Also with one worker: a reload runs the old and the new one side by side.)
    router.fleet = WorkerFleet(slots=2 * args.workers + 2, spread=args.workers > 1)
    # Every listener is bound before anything says "Listening": one in use stops the start at once.
    bound = []
    for what, option, address, bind in (
        ("tunnels", "--tunnels", tunnel_address, Router.bind_tunnels),
        ("HTTP traffic", "--http", http_address, lambda a: Router.bind_tunnels(a, backlog=HTTP_BACKLOG)),
        ("the admin endpoints", "--admin", admin_address, Router.bind_admin),
    ):
        if address is None:
            bound.append(None)
            continue
        try:
            bound.append(bind(address))
        except OSError as exc:
            log.error("Cannot listen for %s on %s: %s: stop what holds it, or give %s another address",
                      what, format_address(address), exc.strerror or exc, option)
            for sock in bound:
                if sock is not None:
                    sock.close()
            return 1
    listener, http_listener, admin_listener = bound
    log.info("Listening for reverse tunnels on %s://%s", "tcp" if tunnel_tls is None else "tls",
             format_address(listener.getsockname()[:2]))
    if not router.access.required and tunnel_tls is None and not is_loopback(tunnel_address[0]):
        log.warning("The tunnel listener on %s is reachable beyond this host with neither --token nor "
                    "TLS: anyone who can connect can register as a backend and receive your traffic",
                    format_address(tunnel_address))
    if admin_listener is not None:
        log.info("Admin listening on http://%s", format_address(admin_listener.getsockname()[:2]))
        if not is_loopback(admin_address[0]):
            log.warning("The admin listener on %s is reachable beyond this host: it shows every tunnel's "
                        "address and the router's traffic to anyone who connects", format_address(admin_address))
        router.shared_metrics = SharedMetrics.create()  # before the fork: every worker answers for all
    options = {
        # gunicorn takes over the listener bound above (and closes this descriptor once it has its own).
        "bind": [f"fd://{http_listener.detach()}"],
        "workers": args.workers,
        "worker_class": type("RouterWorker", (RouterWorker,), {"header_timeout": args.header_timeout,
                                                               "cpu_affinity": args.cpu_affinity == "auto"}),
        "threads": args.threads,
        "keepalive": max(int(args.keep_alive), 1),
        # gunicorn's timeout bounds each read or write on a client socket in the worker (and the
        # heartbeat, which the worker's main loop beats every second): a client that stops
        # reading, or sending its body, is closed after --timeout like a backend that stops answering.
        "timeout": max(math.ceil(args.timeout), 1),
        "graceful_timeout": int(args.graceful_timeout),
        "control_socket_disable": True,
        "loglevel": args.log_level,
        "accesslog": args.access_logfile,
        "proc_name": "ptth_sync.router",
    }
    if args.forwarded_allow_ips is not None:
        options["forwarded_allow_ips"] = args.forwarded_allow_ips
    if args.http_certfile:
        options.update({"certfile": args.http_certfile, "keyfile": args.http_keyfile})
    try:
        RouterServer(router, listener, options, tokens_file=args.tokens_file, admin_listener=admin_listener).run()
    finally:
        if router.shared_metrics is not None:
            router.shared_metrics.remove()
    return 0

