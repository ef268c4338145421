import argparse

import pytest

from ptth_sync.cli import add_token_arguments, read_token
from ptth_sync.router.admin import is_loopback


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("10.0.0.5", False), ("::", False), ("router.example", False),
])
def test_only_loopback_listeners_skip_the_no_token_warning(host, loopback):
    assert is_loopback(host) is loopback


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser()
    add_token_arguments(result, "secret")
    return result


def test_token_comes_from_the_file_then_the_option_then_the_environment(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\nignored second line\n")
    monkeypatch.setenv("PTTH_TOKEN", "from-env")
    p = parser()
    assert read_token(p, p.parse_args(["--token-file", str(token_file)])) == "from-file"
    assert read_token(p, p.parse_args(["--token", "from-option"])) == "from-option"
    assert read_token(p, p.parse_args([])) == "from-env"
    monkeypatch.delenv("PTTH_TOKEN")
    assert read_token(p, p.parse_args([])) is None


def test_an_unreadable_or_empty_token_file_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    p = parser()
    for path in (tmp_path / "missing", empty):
        with pytest.raises(SystemExit):
            read_token(p, p.parse_args(["--token-file", str(path)]))
