"""The coalescer: first key of each UTC-aligned window admitted, repeats refused, memory bounded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from per_buffer.coalesce import Coalescer


def test_first_in_window_admitted_repeats_refused() -> None:
    c = Coalescer(900)
    base = 900 * 1_000_000
    assert c.admit("k", base)
    assert not c.admit("k", base + 899.999)
    assert c.admit("other", base + 10)
    assert c.admit("k", base + 900)  # next window, aligned to UTC multiples of 900 s


def test_window_zero_disables() -> None:
    c = Coalescer(0)
    assert all(c.admit("k", 5.0) for _ in range(3))
    assert len(c) == 0


def test_memory_is_bounded_and_eviction_only_causes_resend() -> None:
    c = Coalescer(900, max_keys=100)
    for i in range(1000):
        assert c.admit(i, 1.0)
    assert len(c) <= 100
    assert c.evictions > 0
    assert c.admit(0, 1.0)  # evicted: sent again, which is harmless


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Coalescer(-1)
    with pytest.raises(ValueError):
        Coalescer(10, max_keys=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.floats(0, 10_000, allow_nan=False)), max_size=200).map(
        lambda xs: sorted(xs, key=lambda x: x[1])
    )
)
def test_admitted_are_exactly_first_of_each_key_window(events: list[tuple[int, float]]) -> None:
    c = Coalescer(900)
    admitted = [(k, t) for k, t in events if c.admit(k, t)]
    expected: dict[tuple[int, int], float] = {}
    for k, t in events:
        expected.setdefault((k, int(t // 900)), t)
    assert sorted(admitted, key=lambda x: x[1]) == sorted(
        ((k, t) for (k, _), t in expected.items()), key=lambda x: x[1]
    )
