"""What the command lines share: logging set-up and the token options."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

__all__ = ["add_lifecycle_arguments", "add_token_arguments", "configure_logging", "read_token"]

LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"


def configure_logging(level: str = "info") -> None:
    """Log to stderr with a time/level prefix, in gunicorn's style."""
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format=LOG_FORMAT,
        datefmt=LOG_DATE_FORMAT,
    )


def add_lifecycle_arguments(parser: argparse.ArgumentParser, on_dead_peer: str) -> None:
    """--graceful-timeout, --ping-interval and --ping-timeout, as both programs take them."""
    parser.add_argument("--graceful-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may take to finish (default: %(default)s)")
    parser.add_argument("--ping-interval", type=positive_float, default=15.0, metavar="SECONDS",
                        help="PING a tunnel after this long without traffic; 0 never (default: %(default)s)")
    parser.add_argument("--ping-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                        help=f"{on_dead_peer} when a PING goes unanswered this long (default: %(default)s)")


def add_token_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--token", default=None, help=f"{help_text} (or the environment variable PTTH_TOKEN)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="read the token from FILE (its first line), so it stays out of `ps`")


def read_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """The token from --token-file, --token or PTTH_TOKEN, in that order; None when none is set."""
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                token = file.readline().strip()
        except OSError as exc:
            parser.error(f"cannot read the token file: {exc.strerror}")
        if not token:
            parser.error(f"the token file {args.token_file} is empty")
        return token
    token = args.token if args.token is not None else os.environ.get("PTTH_TOKEN")
    return token or None


def positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        msg = f"must not be negative: {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be at least 1: {text}"
        raise argparse.ArgumentTypeError(msg)
    return value
