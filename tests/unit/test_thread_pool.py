"""Unit tests for the backend's request thread pool."""

from __future__ import annotations

import threading

import pytest

from ptth_sync.backend.pool import ThreadPool


def test_tasks_run_on_the_pool_threads_with_their_arguments():
    pool = ThreadPool(3)
    pool.start()
    done = []
    finished = threading.Semaphore(0)

    def task(value: int) -> None:
        done.append((value, threading.current_thread().name))
        finished.release()

    for value in range(50):
        pool.submit(task, value)
    for _ in range(50):
        assert finished.acquire(timeout=5)
    pool.stop(5)
    assert sorted(value for value, _ in done) == list(range(50))
    assert {name for _, name in done} <= {f"ptth-request-{i}" for i in range(3)}


def test_tasks_wait_in_arrival_order_while_every_thread_is_busy():
    pool = ThreadPool(1)
    pool.start()
    gate = threading.Event()
    order = []
    pool.submit(gate.wait, 5)
    for value in range(10):
        pool.submit(order.append, value)
    gate.set()
    pool.stop(5)
    assert order == list(range(10))


def test_an_idle_thread_takes_a_new_task_at_once_while_others_are_busy():
    pool = ThreadPool(2)
    pool.start()
    busy = threading.Event()
    ran = threading.Event()
    pool.submit(busy.wait, 5)
    pool.submit(ran.set)
    assert ran.wait(5)
    busy.set()
    pool.stop(5)


def test_stop_lets_queued_tasks_finish_and_ends_every_thread():
    pool = ThreadPool(4)
    pool.start()
    done = []
    for value in range(20):
        pool.submit(done.append, value)
    pool.stop(5)
    assert sorted(done) == list(range(20))
    assert pool._threads == []


def test_a_task_that_raises_is_logged_and_the_thread_carries_on(caplog):
    pool = ThreadPool(1)
    pool.start()
    ran = threading.Event()

    def fail() -> None:
        raise RuntimeError("boom")

    pool.submit(fail)
    pool.submit(ran.set)
    assert ran.wait(5)
    pool.stop(5)
    assert "unexpected error in a request thread" in caplog.text


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError, match="at least one thread"):
        ThreadPool(0)
