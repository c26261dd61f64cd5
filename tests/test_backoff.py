"""The backoff policy: full jitter, free failures under a known failure ratio, capped pauses."""

from __future__ import annotations

import math

import pytest

from per_buffer.backoff import Backoff


def top(initial: float = 0.5, maximum: float = 300.0) -> Backoff:
    return Backoff(initial, maximum, rng=lambda: 0.999999)


def test_ceiling_doubles_up_to_the_maximum() -> None:
    policy = top(0.5, 10.0)
    assert [round(policy.ceiling(n), 3) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_healthy_per_counts_every_failure() -> None:
    policy = top()
    assert policy.free_failures(0.0) == 0
    assert policy.retry_delay(4, 0.0) == pytest.approx(4.0, rel=1e-3)


def test_failures_the_ratio_explains_are_free() -> None:
    policy = top()
    # at 30 % failures, 7 in a row has a 0.02 % chance: still a quick retry
    assert policy.free_failures(0.3) == 7
    assert policy.retry_delay(7, 0.3) == pytest.approx(0.1, rel=1e-3)
    assert policy.retry_delay(8, 0.3) == pytest.approx(0.5, rel=1e-3)
    assert policy.retry_delay(10, 0.3) == pytest.approx(2.0, rel=1e-3)
    # an activity that always fails still fades out
    assert policy.retry_delay(40, 0.3) == pytest.approx(300.0, rel=1e-3)
    assert policy.free_failures(1.0) == 10


def test_delay_is_drawn_between_zero_and_the_ceiling() -> None:
    draws = iter([0.0, 0.5])
    policy = Backoff(1.0, 60.0, rng=lambda: next(draws))
    assert policy.retry_delay(3) == 0.0
    assert policy.retry_delay(3) == pytest.approx(2.0)


def test_server_delays_are_honoured_exactly_up_to_the_maximum() -> None:
    policy = top(0.5, 300.0)
    assert policy.cap(1.0) == 1.0
    assert policy.cap(86400.0) == 300.0
    assert policy.cap(-1.0) == 0.0
    assert policy.cap(math.nan) == 0.0


def test_pause_without_retry_after_grows_and_is_never_near_zero() -> None:
    policy = Backoff(0.5, 300.0, rng=lambda: 0.0)
    assert policy.pause(1) == pytest.approx(0.25)
    assert policy.pause(4) == pytest.approx(2.0)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
