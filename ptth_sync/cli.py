"""What the command lines share: logging set-up, the token options and the bounds on counts.

Every count a user types has an upper bound, so that a typo (``--threads
100000``) fails at once with the limit and the fix instead of exhausting the
machine later:

- :data:`MAX_THREADS` request threads per process (``--threads``): a thread
  reserves a stack and a kernel task (Linux's default ``pid_max`` is 32768 for
  the whole machine), and with the GIL more threads only help requests that
  wait; past this, more processes serve better;
- :data:`MAX_TUNNELS` tunnels per router address (``--tunnels``,
  ``PTTH_TUNNELS``): each tunnel costs a connection and three threads, and one
  tunnel already carries many requests at once;
- :data:`MAX_ROUTERS` router addresses per backend (``--connect``,
  ``PTTH_CONNECT``);
- :data:`MAX_WORKERS` router processes (``--workers``): one or two per core
  is what helps a router, which spends CPU, not waits.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Callable, Optional

__all__ = [
    "MAX_BACKOFF_DEFAULT",
    "MAX_ROUTERS",
    "MAX_THREADS",
    "MAX_TUNNELS",
    "MAX_WORKERS",
    "MIN_BACKOFF_MAX",
    "add_lifecycle_arguments",
    "add_token_arguments",
    "backoff_seconds",
    "check_backoff_max",
    "check_routers",
    "check_threads",
    "check_tunnels",
    "check_workers",
    "configure_logging",
    "read_token",
    "thread_count",
    "tunnel_count",
    "worker_count",
]

#: Request threads one process may run.
MAX_THREADS = 10_000
#: Tunnels one backend process keeps to one router address (for each origin).
MAX_TUNNELS = 1_000
#: Router addresses one backend dials.
MAX_ROUTERS = 64
#: Router worker processes.
MAX_WORKERS = 256
#: The cap on the delay between two dials of a tunnel, in seconds: by default, and the smallest allowed.
MAX_BACKOFF_DEFAULT = 5.0
MIN_BACKOFF_MAX = 0.1

LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"


#: Libraries whose DEBUG lines trace every header they code, values included (credentials, cookies):
#: ``--log-level debug`` leaves them out.
_HEADER_TRACING_LOGGERS = ("hpack",)


def configure_logging(level: str = "info") -> None:
    """Log to stderr with a time/level prefix, in gunicorn's style.

    ``debug`` is ptth_sync's and gunicorn's debug lines, not HPACK's trace of
    each header (about 30 lines a request, with the values of ``Authorization``
    and ``Cookie``): what a debug log shows should be safe to share.
    """
    threshold = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=threshold, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
    for name in _HEADER_TRACING_LOGGERS:
        logging.getLogger(name).setLevel(max(threshold, logging.INFO))


def add_lifecycle_arguments(parser: argparse.ArgumentParser, on_dead_peer: str) -> None:
    """--graceful-timeout, --ping-interval and --ping-timeout, as both programs take them."""
    parser.add_argument("--graceful-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may take to finish (default: %(default)s)")
    parser.add_argument("--ping-interval", type=positive_float, default=15.0, metavar="SECONDS",
                        help="PING a tunnel after this long without traffic; 0 never (default: %(default)s)")
    parser.add_argument("--ping-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                        help=f"{on_dead_peer} when a PING goes unanswered this long (default: %(default)s)")


def add_token_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--token and --token-file, which exclude each other (argparse refuses both at once)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--token", default=None, help=f"{help_text} (or the environment variable PTTH_TOKEN)")
    group.add_argument("--token-file", default=None, metavar="FILE",
                       help="read the token from FILE (its first line), so it stays out of `ps`")


def read_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """The token from --token-file, --token or PTTH_TOKEN, in that order; None when none is set."""
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                token = file.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            parser.error(f"argument --token-file: cannot read {args.token_file}: {why}")
        if not token:
            parser.error(f"argument --token-file: {args.token_file} is empty: its first line is the token")
        return token
    token = args.token if args.token is not None else os.environ.get("PTTH_TOKEN")
    return token or None


def positive_float(text: str) -> float:
    """argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        msg = f"not a number of seconds: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not math.isfinite(value) or value < 0:
        msg = f"must be a number of seconds, 0 or more, not {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        msg = f"not a whole number: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"must be at least 1, not {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


# -- bounds on counts ------------------------------------------------------------


def _bounded(value: int, limit: int, unit: str, fix: str) -> int:
    """``value`` when it is between 1 and ``limit``; else ValueError with the limit and the fix."""
    if value < 1:
        msg = f"must be at least 1, not {value}"
        raise ValueError(msg)
    if value > limit:
        msg = f"{value} is over the limit of {limit} {unit}: {fix}"
        raise ValueError(msg)
    return value


def check_threads(value: int) -> int:
    """Request threads per process: 1 to :data:`MAX_THREADS`."""
    return _bounded(value, MAX_THREADS, "threads per process",
                    "run more processes (--workers) to serve more at once")


def check_tunnels(value: int) -> int:
    """Tunnels per router address: 1 to :data:`MAX_TUNNELS`."""
    return _bounded(value, MAX_TUNNELS, "tunnels per router address",
                    "one tunnel carries many requests at once, so run more backend processes instead")


def check_routers(count: int) -> int:
    """Router addresses to dial: 1 to :data:`MAX_ROUTERS`."""
    return _bounded(count, MAX_ROUTERS, "router addresses",
                    "dial fewer, or one DNS name that resolves to each router")


def check_workers(value: int) -> int:
    """Router worker processes: 1 to :data:`MAX_WORKERS`."""
    return _bounded(value, MAX_WORKERS, "worker processes",
                    "one or two per CPU core serve best, so run routers on more hosts instead")


def check_backoff_max(value: float) -> float:
    """The cap on the redial delay, in seconds: a finite number of at least :data:`MIN_BACKOFF_MAX`."""
    if not math.isfinite(value) or value < MIN_BACKOFF_MAX:
        msg = f"must be a number of seconds of at least {MIN_BACKOFF_MAX:g}, not {value:g}"
        raise ValueError(msg)
    return value


def _argument_type(check: Callable[[int], int], name: str) -> Callable[[str], int]:
    """An argparse ``type``: a whole number, then ``check`` (its reason becomes argparse's error line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            msg = f"not a whole number: {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


#: argparse types for ``--threads``, ``--tunnels`` and ``--workers``.
thread_count = _argument_type(check_threads, "thread_count")
tunnel_count = _argument_type(check_tunnels, "tunnel_count")
worker_count = _argument_type(check_workers, "worker_count")


def backoff_seconds(text: str) -> float:
    """argparse type for ``--max-backoff``."""
    try:
        value = float(text)
    except ValueError:
        msg = f"not a number of seconds: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    try:
        return check_backoff_max(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
