"""What the command lines share: logging set-up and the token guard."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

__all__ = ["configure_logging", "reject_token"]

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


def reject_token(parser: argparse.ArgumentParser, token: Optional[str]) -> None:
    """Refuse to run without the protection the operator asked for."""
    if token or os.environ.get("PTTH_TOKEN"):
        parser.error("the token handshake is not available in this version; refusing to run without it")


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
