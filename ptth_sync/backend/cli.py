"""``python -m ptth_sync.backend MODULE:APP``: serve a WSGI app through tunnels."""

from __future__ import annotations

import argparse
import inspect
import logging
import ssl
import sys
from typing import Any, List, Optional

from gunicorn.errors import AppImportError
from gunicorn.util import import_app

from ..addresses import parse_addresses
from ..cli import (
    MAX_BACKOFF_DEFAULT,
    MAX_THREADS,
    MAX_TUNNELS,
    add_lifecycle_arguments,
    add_token_arguments,
    backoff_seconds,
    check_routers,
    configure_logging,
    positive_float,
    read_token,
    thread_count,
    tunnel_count,
)
from ..handshake import HandshakeRefused
from ..origins import normalize_origin
from ..tls import TLSConfigError, client_context
from . import serve_wsgi

log = logging.getLogger("ptth_sync.backend")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ptth_sync.backend",
        description="Dial a ptth_sync router and serve a WSGI application through the tunnel.",
    )
    parser.add_argument("app", metavar="MODULE:APP", help="the WSGI application, as gunicorn takes it")
    parser.add_argument("--connect", default="127.0.0.1:8887", metavar="HOST:PORT[,HOST:PORT...]",
                        help="the router(s) to dial, at most 64 (default: %(default)s)")
    parser.add_argument("--threads", type=thread_count, default=16, metavar="N",
                        help=f"requests served at once per process, at most {MAX_THREADS} (default: %(default)s)")
    parser.add_argument("--tunnels", type=tunnel_count, default=1, metavar="N",
                        help=f"connections kept to each router, at most {MAX_TUNNELS} (default: %(default)s)")
    parser.add_argument("--max-backoff", type=backoff_seconds, default=MAX_BACKOFF_DEFAULT, metavar="SECONDS",
                        help="longest wait between two dials of a router that is down (default: %(default)s)")
    parser.add_argument("--origin", action="append", default=[], metavar="ORIGIN",
                        help="serve the requests for this origin (https://api.example.com) only; repeat it, or "
                             "separate with commas, for several (default: every host no other backend serves)")
    parser.add_argument("--resolve-interval", type=positive_float, default=30.0, metavar="SECONDS",
                        help="how often router names are resolved again, to dial routers added later "
                             "(default: %(default)s)")
    add_lifecycle_arguments(parser, "redial")
    add_token_arguments(parser, "shared secret to present to the router")
    parser.add_argument("--tls", action="store_true",
                        help="dial the router over TLS, verifying its certificate and name")
    parser.add_argument("--cafile", default=None, metavar="FILE",
                        help="trust these CAs for the router's certificate (implies --tls)")
    parser.add_argument("--certfile", default=None, metavar="FILE",
                        help="mutual TLS: present this client certificate (chain) in PEM (implies --tls)")
    parser.add_argument("--keyfile", default=None, metavar="FILE", help="the private key for --certfile")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="(default: %(default)s)")
    return parser


class AppLoadError(ValueError):
    """``MODULE:APP`` names no WSGI application; the message says why on one line."""


def load_app(spec: str) -> Any:
    """gunicorn's ``import_app``, with one-line errors (:class:`AppLoadError`) for what the spec gets wrong.

    Anything else the application's own code raises while it is imported or
    made (by a factory) propagates: its traceback is the useful part.
    """
    try:
        return import_app(spec)
    except (AppImportError, ImportError) as exc:
        msg = f"Cannot load {spec}: {exc}"
        raise AppLoadError(msg) from None
    except Exception:
        module, _, expression = spec.partition(":")
        name = expression.split("(", 1)[0].strip()
        if "(" in expression and name.isidentifier():
            try:
                target = import_app(f"{module}:{name}")
            except Exception:
                target = None
            if target is not None and not inspect.isroutine(target) and not inspect.isclass(target):
                msg = (f"Cannot load {spec}: {name} is the WSGI application itself, not a factory to call: "
                       f"give {module}:{name}")
                raise AppLoadError(msg) from None
        raise


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    token = read_token(parser, args)
    configure_logging(args.log_level)
    if args.keyfile and not args.certfile:
        parser.error("argument --keyfile: needs --certfile (the client certificate the key belongs to)")
    context = None
    if args.tls or args.cafile or args.certfile:
        try:
            context = client_context(args.cafile, args.certfile, args.keyfile)
        except (TLSConfigError, OSError, ssl.SSLError) as exc:
            parser.error(str(exc))
    try:
        addresses = parse_addresses(args.connect)
        check_routers(len(addresses))
    except ValueError as exc:
        parser.error(f"argument --connect: {exc}")
    try:
        origins = [normalize_origin(o) for text in args.origin for o in text.split(",") if o.strip()]
    except ValueError as exc:
        parser.error(f"argument --origin: {exc}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        app = load_app(args.app)
    except AppLoadError as exc:
        log.error("%s", exc)
        return 1
    except Exception:
        log.exception("Cannot load %s: the application raised while it was imported or made", args.app)
        return 1
    try:
        serve_wsgi(addresses, app, threads=args.threads, tunnels=args.tunnels, token=token, ssl_context=context,
                   graceful_timeout=args.graceful_timeout, origins=origins, resolve_interval=args.resolve_interval,
                   ping_interval=args.ping_interval, ping_timeout=args.ping_timeout, backoff_max=args.max_backoff)
    except HandshakeRefused:
        return 1  # the reason and the fix are logged already, on one line
    return 0

