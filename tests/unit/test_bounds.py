"""Upper bounds on the counts a user types: the command line, the gunicorn worker's environment, the API."""

from __future__ import annotations

import argparse
from unittest import mock

import pytest
from gunicorn.config import Config

from ptth_sync import Backend
from ptth_sync.backend.cli import build_parser, main
from ptth_sync.cli import (
    MAX_BACKOFF_DEFAULT,
    MAX_ROUTERS,
    MAX_THREADS,
    MAX_TUNNELS,
    MAX_WORKERS,
    backoff_seconds,
    thread_count,
    tunnel_count,
    worker_count,
)
from ptth_sync.router.server import build_parser as router_parser
from ptth_sync.worker import TunnelWorker, tunnel_backoff, tunnel_options, tunnel_threads
from tests import apps


def routers(count: int) -> str:
    return ",".join(f"127.0.0.1:{port}" for port in range(20000, 20000 + count))


def test_the_limits_are_the_documented_ones():
    assert (MAX_THREADS, MAX_TUNNELS, MAX_ROUTERS, MAX_WORKERS) == (10_000, 1_000, 64, 256)
    assert MAX_BACKOFF_DEFAULT == 5.0


# -- argparse types ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "limit", "unit"),
    [
        (thread_count, MAX_THREADS, "threads per process"),
        (tunnel_count, MAX_TUNNELS, "tunnels per router address"),
        (worker_count, MAX_WORKERS, "worker processes"),
    ],
)
def test_a_count_up_to_its_limit_is_taken_and_above_it_refused_naming_the_limit(parse, limit, unit):
    assert parse("1") == 1
    assert parse(str(limit)) == limit
    with pytest.raises(argparse.ArgumentTypeError, match=f"{limit + 1} is over the limit of {limit} {unit}: "):
        parse(str(limit + 1))
    with pytest.raises(argparse.ArgumentTypeError, match="must be at least 1"):
        parse("0")
    with pytest.raises(argparse.ArgumentTypeError, match="not a whole number"):
        parse("many")


def test_max_backoff_is_a_number_of_seconds_of_at_least_a_tenth():
    assert backoff_seconds("0.5") == 0.5
    for text in ("0", "0.05", "-1", "nan", "inf", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            backoff_seconds(text)


# -- python -m ptth_sync.backend -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "10001"], "argument --threads: 10001 is over the limit of 10000 threads per process: run more"),
        (["--tunnels", "1001"], "argument --tunnels: 1001 is over the limit of 1000 tunnels per router address: "),
        (["--connect", routers(65)], "argument --connect: 65 is over the limit of 64 router addresses: dial fewer"),
        (["--max-backoff", "0"], "argument --max-backoff: must be a number of seconds of at least 0.1"),
    ],
)
def test_the_backend_command_exits_2_with_one_error_line_above_a_limit(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "tests.apps:hello"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert message in errors[0]


def test_the_backend_command_takes_counts_at_their_limits_and_max_backoff():
    args = build_parser().parse_args(["--threads", "10000", "--tunnels", "1000", "--max-backoff", "2.5", "app:app"])
    assert (args.threads, args.tunnels, args.max_backoff) == (10000, 1000, 2.5)
    assert build_parser().parse_args(["app:app"]).max_backoff == MAX_BACKOFF_DEFAULT


def test_the_backend_command_passes_max_backoff_to_the_backend():
    with mock.patch("ptth_sync.backend.cli.serve_wsgi") as serve:
        assert main(["--max-backoff", "1.5", "--connect", routers(64), "tests.apps:hello"]) == 0
    assert serve.call_args.kwargs["backoff_max"] == 1.5


# -- the Backend constructor ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "options", "message"),
    [
        ("127.0.0.1:9", {"threads": 10001}, "threads: 10001 is over the limit of 10000"),
        ("127.0.0.1:9", {"threads": 0}, "threads: must be at least 1"),
        ("127.0.0.1:9", {"tunnels": 1001}, "tunnels: 1001 is over the limit of 1000"),
        ("127.0.0.1:9", {"tunnels": 0}, "tunnels: must be at least 1"),
        (routers(65), {}, "addr: 65 is over the limit of 64 router addresses"),
        ("127.0.0.1:9", {"backoff_max": 0}, "backoff_max: must be a number of seconds"),
    ],
)
def test_the_backend_refuses_a_count_above_its_limit(addr, options, message):
    with pytest.raises(ValueError, match=message):
        Backend(addr, apps.hello, **options)


def test_the_backend_takes_counts_at_their_limits():
    backend = Backend(routers(64), apps.hello, threads=10000, tunnels=1000, backoff_max=0.1)  # not started
    assert (backend.threads, backend.tunnels, len(backend.addresses), backend.backoff_max) == (10000, 1000, 64, 0.1)


# -- the gunicorn worker ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PTTH_TUNNELS": "1001"}, "PTTH_TUNNELS: 1001 is over the limit of 1000 tunnels per router address: "),
        ({"PTTH_CONNECT": routers(65)}, "PTTH_CONNECT: 65 is over the limit of 64 router addresses: "),
    ],
)
def test_the_worker_environment_is_bounded(environ, message):
    with pytest.raises(ValueError, match=message):
        tunnel_options(environ)


def test_the_worker_reads_max_backoff_from_the_environment():
    assert tunnel_backoff({}) == MAX_BACKOFF_DEFAULT
    assert tunnel_backoff({"PTTH_MAX_BACKOFF": "2"}) == 2.0
    for text in ("0", "soon", "nan"):
        reason = f"PTTH_MAX_BACKOFF must be a number of seconds of at least 0.1, not '{text}'"
        with pytest.raises(ValueError, match=reason):
            tunnel_backoff({"PTTH_MAX_BACKOFF": text})


def test_the_worker_threads_are_bounded():
    assert tunnel_threads(10000) == 10000
    with pytest.raises(ValueError, match="--threads: 10001 is over the limit of 10000 threads per process"):
        tunnel_threads(10001)


@pytest.mark.parametrize(
    ("setting", "env", "message"),
    [
        ({"threads": 20000}, {}, "--threads: 20000 is over the limit of 10000 threads per process"),
        ({}, {"PTTH_TUNNELS": "5000"}, "PTTH_TUNNELS: 5000 is over the limit of 1000"),
        ({}, {"PTTH_MAX_BACKOFF": "never"}, "PTTH_MAX_BACKOFF must be a number of seconds"),
    ],
)
def test_gunicorn_refuses_to_boot_above_a_limit(monkeypatch, setting, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = Config()
    for name, value in setting.items():
        cfg.set(name, value)
    with pytest.raises(RuntimeError, match=message):
        TunnelWorker.check_config(cfg, mock.Mock())


@pytest.mark.parametrize(("option", "value", "limit"), [("--threads", "10001", "10000"), ("--workers", "257", "256")])
def test_the_router_refuses_counts_over_their_limit_in_one_line(option, value, limit, capsys):
    with pytest.raises(SystemExit) as exit_info:
        router_parser().parse_args([option, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"over the limit of {limit}" in error
