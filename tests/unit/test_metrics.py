"""The router's metrics: accounting, reason categories, merging and the text exposition format."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, List

import pytest

from ptth_sync.router import metrics
from ptth_sync.router.admin import SharedMetrics
from ptth_sync.router.metrics import (
    DROP_REASONS,
    DURATION_BUCKETS,
    REFUSAL_REASONS,
    RouterMetrics,
    drop_reason,
    escape_label_value,
    merge,
    opening_failure_reason,
    parse,
    render,
    status,
)

SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? '
    r"(-?[0-9.e+-]+|[+-]Inf|NaN)$"
)


class FakeConnection:
    def __init__(self, name: str, streams: int = 0, accepting: bool = True) -> None:
        self.name = name
        self.active_streams = streams
        self.accepting_streams = accepting


def snapshot(pid: int, requests: Dict[str, int], tunnels: int = 0, origin: str = "*") -> Dict[str, Any]:
    counted = RouterMetrics()
    for code, count in requests.items():
        for _ in range(count):
            counted.request_done(int(code))
    for index in range(tunnels):
        counted.tunnel_added(FakeConnection(f"10.0.0.{index}:1000"), origin)  # type: ignore[arg-type]
    return {"pid": pid, "counters": counted.counters(), "origins": {origin: tunnels}, "waiting": 0,
            "tunnels": counted.tunnels(pid)}


def value(text: str, name: str, **labels: str) -> float:
    return parse(text)[(name, tuple(labels.items()))]


# -- reasons --------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "category"), [
    ("peer sent GOAWAY (NO_ERROR)", "goaway"),
    ("peer sent GOAWAY (ENHANCE_YOUR_CALM): 'peer closed the connection'", "goaway"),
    ("peer closed the connection", "peer_closed"),
    ("no answer to PING within 10s", "ping_timeout"),
    ("read failed: [Errno 104] Connection reset by peer", "network"),
    ("write failed: [Errno 32] Broken pipe", "network"),
    ("read failed: [SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed", "tls"),
    ("protocol error from peer: frame on stream 3, which is closed", "protocol_error"),
    ("peer sent over 500 PING/SETTINGS frames in a second", "flood"),
    ("peer reset over 2000 streams in a second", "flood"),
    ("peer sent a header block over 262144 bytes", "flood"),
    ("peer does not read what we send", "flood"),
    ("router closed", "router_closed"),
    ("stream IDs exhausted", "other"),
    ("internal error: ValueError()", "other"),
])
def test_close_reasons_fall_into_a_fixed_set_of_drop_categories(reason, category):
    assert drop_reason(reason) == category
    assert category in DROP_REASONS


@pytest.mark.parametrize(("reason", "category"), [
    ("peer sent no HTTP/2 SETTINGS within 10s", "timeout"),
    ("peer closed the connection", "network"),
    ("read failed: [Errno 104] Connection reset by peer", "network"),
    ("protocol error from peer: Invalid HTTP/2 preamble.", "protocol_error"),
    ("peer sent over 500 PING/SETTINGS frames in a second", "protocol_error"),
    ("router closed", "other"),
])
def test_a_tunnel_closed_before_it_was_ready_counts_as_a_refusal_category(reason, category):
    assert opening_failure_reason(reason) == category
    assert category in REFUSAL_REASONS


# -- accounting -----------------------------------------------------------------------


def test_a_request_is_counted_by_code_duration_bytes_and_tunnel():
    counted = RouterMetrics()
    tunnel = FakeConnection("127.0.0.1:5000", streams=2)
    counted.tunnel_added(tunnel, "*")  # type: ignore[arg-type]
    counted.request_done(200, time.monotonic(), sent=10, received=20, tunnel=tunnel)  # type: ignore[arg-type]
    counted.request_done(200, time.monotonic() - 100, sent=1, received=2, tunnel=tunnel, broken=True)  # type: ignore[arg-type]
    counted.request_done(503)
    counters = counted.counters()
    assert counters["requests"] == {"200": 2, "503": 1}
    assert counters["duration_buckets"][-1] == 1  # over 30 s: only in +Inf
    assert sum(counters["duration_buckets"]) == 2  # the 503 never reached a tunnel
    assert counters["duration_sum"] >= 100
    assert (counters["request_bytes"], counters["response_bytes"], counters["responses_broken"]) == (11, 22, 1)
    [listed] = counted.tunnels(pid=42)
    assert listed["requests_served"] == 2
    assert (listed["peer"], listed["origin"], listed["active_streams"], listed["worker_pid"]) == (
        "127.0.0.1:5000", "*", 2, 42)
    assert listed["draining"] is False


def test_tunnels_coming_and_going_are_counted_by_origin_and_reason():
    counted = RouterMetrics()
    one, two = FakeConnection("a:1"), FakeConnection("b:2")
    counted.tunnel_added(one, "https://api.example.com")  # type: ignore[arg-type]
    counted.tunnel_added(two, "*")  # type: ignore[arg-type]
    counted.tunnel_dropped(one, "no answer to PING within 10s")  # type: ignore[arg-type]
    counted.opening_failed("unauthorized")
    counted.opening_failed("something new")
    counters = counted.counters()
    assert counters["connects"] == {"https://api.example.com": 1, "*": 1}
    assert counters["drops"]["ping_timeout"] == 1
    assert counters["refusals"]["unauthorized"] == 1
    assert counters["refusals"]["other"] == 1
    assert [tunnel["peer"] for tunnel in counted.tunnels(pid=1)] == ["b:2"]


@pytest.mark.parametrize(("started", "bucket"), [(1.0, 0), (0.5, 8), (0.0, 9), (-29.0, 13), (-31.0, 14)])
def test_a_duration_on_a_bucket_bound_is_counted_in_that_bucket(monkeypatch, started, bucket):
    monkeypatch.setattr(metrics.time, "monotonic", lambda: 1.0)  # durations exact in binary: 0, 0.5, 1, 30, 32
    counted = RouterMetrics()
    counted.request_done(200, started)
    assert counted.counters()["duration_buckets"].index(1) == bucket


# -- merging --------------------------------------------------------------------------


def test_merge_adds_counters_and_gauges_and_lists_every_tunnel():
    one = snapshot(1, {"200": 3, "503": 1}, tunnels=2)
    two = snapshot(2, {"200": 4}, tunnels=1)
    retired = snapshot(3, {"200": 5, "502": 1})["counters"]
    view = merge([one, two], retired)
    assert view["counters"]["requests"] == {"200": 12, "503": 1, "502": 1}
    assert view["counters"]["connects"] == {"*": 3}
    assert view["origins"] == {"*": 3}
    assert len(view["tunnels"]) == 3
    assert view["workers"] == [1, 2]
    assert len(view["counters"]["duration_buckets"]) == len(DURATION_BUCKETS) + 1


def test_status_lists_tunnels_with_their_age():
    view = merge([snapshot(7, {"200": 2}, tunnels=1, origin="http://api.example.com")])
    connected_at = view["tunnels"][0]["connected_at"]
    shown = status(view, now=connected_at + 12.5)
    assert shown["live_tunnels"] == 1
    assert shown["requests_total"] == 2
    assert shown["origins"] == {"http://api.example.com": 1}
    assert shown["workers"] == [7]
    assert shown["tunnels"] == [{
        "peer": "10.0.0.0:1000", "origin": "http://api.example.com", "age_seconds": 12.5, "active_streams": 0,
        "requests_served": 0, "draining": False, "worker_pid": 7,
    }]


# -- the exposition format ------------------------------------------------------------


def test_label_values_are_escaped_as_the_text_format_requires():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_every_line_is_a_comment_or_a_well_formed_sample_of_a_declared_family():
    view = merge([snapshot(1, {"200": 2, "503": 1}, tunnels=1, origin='http://we"ird\\\n.example')])
    text = render(view)
    assert text.endswith("\n")
    declared: Dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in declared
            declared[name] = ""
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram")
            declared[name] = kind
        else:
            assert SAMPLE.match(line), line
            name = line.split("{")[0].split()[0]
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in declared else name
            assert family in declared, line
            assert declared[family], f"{family} has no TYPE line"
    assert value(text, "ptth_router_tunnels", origin='http://we"ird\\\n.example') == 1
    for name, kind in declared.items():
        assert name.startswith("ptth_router_")
        assert name.endswith("_total") == (kind == "counter")


def test_the_histogram_is_cumulative_and_ends_with_inf_equal_to_its_count():
    counted = RouterMetrics()
    for seconds in (0.0005, 0.003, 0.003, 0.7, 45.0):
        counted.request_done(200, time.monotonic() - seconds)
    text = render(merge([{"pid": 1, "counters": counted.counters()}]))
    samples = parse(text)
    name = "ptth_router_request_duration_seconds_bucket"
    buckets: List[float] = [samples[(name, (("le", le),))] for le in
                            [repr(float(bound)) for bound in DURATION_BUCKETS] + ["+Inf"]]
    assert buckets == sorted(buckets)
    assert buckets[-1] == 5 == value(text, "ptth_router_request_duration_seconds_count")
    assert buckets[-2] == 4  # 45 s is over the last bound
    assert value(text, "ptth_router_request_duration_seconds_bucket", le="0.001") >= 1
    assert value(text, "ptth_router_request_duration_seconds_sum") >= 45.7
    assert "# TYPE ptth_router_request_duration_seconds histogram" in text


def test_counters_by_label_are_all_shown_even_at_zero():
    text = render(merge([snapshot(1, {})]))
    for reason in DROP_REASONS:
        assert value(text, "ptth_router_tunnel_drops_total", reason=reason) == 0
    for reason in REFUSAL_REASONS:
        assert value(text, "ptth_router_tunnel_refusals_total", reason=reason) == 0
    assert value(text, "ptth_router_tunnels", origin="*") == 0
    assert value(text, "ptth_router_workers") == 1


def test_numbers_are_written_as_the_format_wants():
    assert metrics._number(3) == "3"
    assert metrics._number(0.25) == "0.25"
    assert metrics._number(float("inf")) == "+Inf"
    assert metrics._number(float("nan")) == "NaN"


# -- several processes ----------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_collect_adds_other_live_workers_and_only_the_counters_of_dead_ones(tmp_path):
    shared = SharedMetrics(str(tmp_path))
    gone = dead_pid()
    parent = os.getppid()  # alive, and not us
    metrics_of = {parent: snapshot(parent, {"200": 2}, tunnels=1), gone: snapshot(gone, {"200": 5}, tunnels=3)}
    for pid, snap in metrics_of.items():
        (tmp_path / f"{pid}-1.json").write_text(json.dumps(snap))
    view = shared.collect(snapshot(os.getpid(), {"200": 1, "503": 1}, tunnels=1))
    assert view["counters"]["requests"] == {"200": 8, "503": 1}
    assert len(view["tunnels"]) == 2  # ours and the live worker's
    assert sorted(view["workers"]) == sorted([os.getpid(), parent])
    assert any(name.startswith(f"{os.getpid()}-") for name in os.listdir(tmp_path))  # ours, published


def test_a_retired_worker_keeps_its_counters_exactly_once(tmp_path):
    shared = SharedMetrics(str(tmp_path))
    gone = dead_pid()
    (tmp_path / f"{gone}-1.json").write_text(json.dumps(snapshot(gone, {"200": 5}, tunnels=1)))
    own = snapshot(os.getpid(), {"200": 1})
    before = shared.collect(own)["counters"]["requests"]
    shared.retire(gone)
    assert not (tmp_path / f"{gone}-1.json").exists()
    after = shared.collect(own)
    assert before == after["counters"]["requests"] == {"200": 6}
    shared.retire(gone)  # nothing left to fold: no change
    assert shared.collect(own)["counters"]["requests"] == {"200": 6}
    assert after["tunnels"] == []


def test_a_snapshot_read_before_its_worker_was_retired_is_not_counted_twice(tmp_path):
    shared = SharedMetrics(str(tmp_path))
    gone = dead_pid()
    path = tmp_path / f"{gone}-1.json"
    content = json.dumps(snapshot(gone, {"200": 5}))
    path.write_text(content)
    shared.retire(gone)
    path.write_text(content)  # as a reader that listed it before the master removed it would see it
    assert shared.collect(snapshot(os.getpid(), {}))["counters"]["requests"] == {"200": 5}


def test_only_the_process_that_made_the_directory_removes_it(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    shared = SharedMetrics(str(directory))
    shared._owner = -1
    shared.remove()
    assert directory.exists()
    shared._owner = os.getpid()
    shared.remove()
    assert not directory.exists()
