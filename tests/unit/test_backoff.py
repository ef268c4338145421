from ptth_sync import Backend


def app(environ, start_response):  # pragma: no cover - never called
    start_response("200 OK", [])
    return [b""]


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    backend = Backend("127.0.0.1:9", app)
    for attempt in range(40):
        ceiling = min(backend.backoff_max, backend.backoff_initial * 2**attempt)
        delays = [backend._backoff(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert max(backend._backoff(100) for _ in range(50)) <= backend.backoff_max
    assert len({round(backend._backoff(5), 6) for _ in range(20)}) > 1  # jitter


def test_the_cap_is_5_seconds_by_default_and_a_keyword_sets_it():
    assert Backend("127.0.0.1:9", app).backoff_max == 5.0
    backend = Backend("127.0.0.1:9", app, backoff_max=1.5)
    assert max(backend._backoff(attempt) for attempt in range(20, 40)) <= 1.5
    assert min(backend._backoff(attempt) for attempt in range(20, 40)) >= 0.75
