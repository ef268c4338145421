"""Unit tests for the router's TunnelPool, with fake tunnels instead of connections."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import List

import pytest

from ptth_sync.router.pool import TunnelPool

JOIN_TIMEOUT = 5.0


class FakeTunnel:
    """Stands in for a Connection: the pool only reads ``accepting_streams``."""

    def __init__(self, name: str, accepting: bool = True) -> None:
        self.name = name
        self.accepting_streams = accepting

    def __repr__(self) -> str:
        return f"FakeTunnel({self.name})"


class WatchedTunnel:
    """A tunnel that reports each time the pool looks at it (to know a chooser went past it)."""

    def __init__(self, name: str, accepting: bool = False) -> None:
        self.name = name
        self.accepting = accepting
        self.looked_at = threading.Event()

    @property
    def accepting_streams(self) -> bool:
        self.looked_at.set()
        return self.accepting

    def __repr__(self) -> str:
        return f"WatchedTunnel({self.name})"


def make_pool(*tunnels):
    pool = TunnelPool()
    for tunnel in tunnels:
        pool.add(tunnel)
    return pool


def choose_in_thread(pool, wait):
    """Start ``pool.choose(wait=wait)`` in a thread; returns (thread, result dict)."""
    result = {}

    def run():
        started = time.monotonic()
        result["tunnel"] = pool.choose(wait=wait)
        result["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_choose_is_exact_round_robin():
    a, b, c = FakeTunnel("a"), FakeTunnel("b"), FakeTunnel("c")
    pool = make_pool(a, b, c)
    chosen = [pool.choose() for _ in range(30)]
    assert chosen == [a, b, c] * 10


def test_choose_spreads_evenly():
    tunnels = [FakeTunnel("a"), FakeTunnel("b"), FakeTunnel("c")]
    pool = make_pool(*tunnels)
    counts = Counter(pool.choose() for _ in range(30))
    assert counts == {tunnel: 10 for tunnel in tunnels}


def test_choose_skips_tunnels_not_accepting_streams():
    a, b, c = FakeTunnel("a"), FakeTunnel("b", accepting=False), FakeTunnel("c")
    pool = make_pool(a, b, c)
    assert [pool.choose() for _ in range(6)] == [a, c, a, c, a, c]


def test_choose_uses_tunnel_again_once_it_accepts_streams():
    a, b = FakeTunnel("a"), FakeTunnel("b", accepting=False)
    pool = make_pool(a, b)
    assert pool.choose() is a
    b.accepting_streams = True
    assert pool.choose() is b


def test_choose_returns_none_when_no_tunnel_accepts_streams():
    pool = make_pool(FakeTunnel("a", accepting=False), FakeTunnel("b", accepting=False))
    assert pool.choose() is None


def test_choose_skips_excluded_tunnels():
    a, b, c = FakeTunnel("a"), FakeTunnel("b"), FakeTunnel("c")
    pool = make_pool(a, b, c)
    assert [pool.choose(exclude=[a]) for _ in range(4)] == [b, c, b, c]


def test_choose_returns_none_when_every_tunnel_is_excluded():
    a, b = FakeTunnel("a"), FakeTunnel("b")
    pool = make_pool(a, b)
    assert pool.choose(exclude={a, b}) is None


def test_choose_on_empty_pool_returns_none_without_wait():
    assert TunnelPool().choose() is None


def test_choose_on_empty_pool_returns_none_after_the_wait():
    pool = TunnelPool()
    started = time.monotonic()
    assert pool.choose(wait=0.05) is None
    assert time.monotonic() - started >= 0.05


@pytest.mark.parametrize("removed_index", [0, 1, 2])
@pytest.mark.parametrize("choices_before", [0, 1, 2, 3, 4])
def test_remove_keeps_rotation_fair(removed_index, choices_before):
    tunnels = [FakeTunnel("a"), FakeTunnel("b"), FakeTunnel("c")]
    pool = make_pool(*tunnels)
    before = [pool.choose() for _ in range(choices_before)]
    removed = tunnels[removed_index]
    assert pool.remove(removed)
    after = [pool.choose() for _ in range(6)]
    remaining = [t for t in tunnels if t is not removed]
    assert set(after) == set(remaining)
    sequence = before[-1:] + after
    repeats = [(x, y) for x, y in zip(sequence, sequence[1:]) if x is y]
    assert repeats == [], f"a tunnel was chosen twice in a row: {sequence}"


def test_remove_of_unknown_tunnel_returns_false():
    pool = make_pool(FakeTunnel("a"))
    assert pool.remove(FakeTunnel("b")) is False


def test_remove_forgets_the_tunnel():
    a, b = FakeTunnel("a"), FakeTunnel("b")
    pool = make_pool(a, b)
    pool.remove(a)
    assert pool.tunnels() == [b]
    assert len(pool) == 1


def test_remove_last_tunnel_empties_the_rotation():
    a = FakeTunnel("a")
    pool = make_pool(a)
    assert pool.choose() is a
    pool.remove(a)
    assert pool.choose() is None


def test_tunnels_is_a_snapshot_in_arrival_order():
    a, b = FakeTunnel("a"), FakeTunnel("b")
    pool = make_pool(a, b)
    snapshot = pool.tunnels()
    pool.remove(a)
    assert snapshot == [a, b]


def test_waiting_choose_is_woken_by_add_from_another_thread():
    busy = WatchedTunnel("busy", accepting=False)
    pool = make_pool(busy)
    thread, result = choose_in_thread(pool, wait=5)
    # The chooser looked at ``busy`` with the pool's lock held; add() can only
    # take that lock once the chooser released it by waiting.
    assert busy.looked_at.wait(JOIN_TIMEOUT)
    fresh = FakeTunnel("fresh")
    pool.add(fresh)
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    assert result["tunnel"] is fresh
    assert result["elapsed"] < 5


def test_waiting_choose_on_empty_pool_returns_tunnel_added_by_another_thread():
    pool = TunnelPool()
    thread, result = choose_in_thread(pool, wait=5)
    fresh = FakeTunnel("fresh")
    pool.add(fresh)
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    assert result["tunnel"] is fresh


def test_waiting_choose_is_woken_by_notify_when_a_tunnel_accepts_again():
    tunnel = WatchedTunnel("t", accepting=False)
    pool = make_pool(tunnel)
    thread, result = choose_in_thread(pool, wait=5)
    assert tunnel.looked_at.wait(JOIN_TIMEOUT)
    tunnel.accepting = True
    pool.notify()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    assert result["tunnel"] is tunnel
    assert result["elapsed"] < 5


def test_requests_waiting_for_a_tunnel_get_one_in_arrival_order():
    pool = TunnelPool()
    served: List[str] = []
    lock = threading.Lock()
    waiting = threading.Condition()

    def wait_for_tunnel(name: str) -> None:
        tunnel = pool.choose(wait=10)
        with lock:
            served.append(name if tunnel is not None else f"{name}: none")

    threads = []
    for index, name in enumerate("ABCDE"):
        thread = threading.Thread(target=wait_for_tunnel, args=(name,))
        thread.start()
        threads.append(thread)
        # Each is queued before the next starts: poll the pool's queue with a deadline.
        deadline = time.monotonic() + 5
        with waiting:
            while pool.waiting() < index + 1 and time.monotonic() < deadline:
                waiting.wait(0.005)
    pool.add(FakeTunnel("t"))
    for thread in threads:
        thread.join(5)
    assert served == list("ABCDE")
