"""The coalescing rule, case by case (the model-based proof is test_coalesce_model.py)."""

from __future__ import annotations

import pytest

from per_buffer.coalesce import Coalescer, DeliveredKeys

W = 900.0
BASE = 900.0 * 1_000_000  # a window start


def test_an_unsent_copy_suppresses_repeats_anywhere_in_the_window() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 1)  # in the start zone
    assert not c.admit("k", BASE + 2)  # the first copy is still in the memory batch
    assert c.admit("other", BASE + 2)


def test_a_committed_copy_suppresses_repeats_in_the_safe_part_only() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    c.committed(["k"], BASE + 100.01)
    assert not c.admit("k", BASE + 500)
    assert not c.admit("k", BASE + W - 30.001)
    assert c.admit("k", BASE + W - 29.999)  # the end zone: Per may already be in the next window
    c.committed(["k"], BASE + W - 29.99)
    assert c.admit("k", BASE + W - 10)  # a copy in the end zone covers nothing for sure


def test_a_copy_committed_in_the_start_zone_covers_nothing_until_sent_after_it() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 5)
    c.committed(["k"], BASE + 5.01)
    assert c.admit("k", BASE + 40)  # committed at +5: it may land in Per's previous window
    c.committed(["k"], BASE + 40.01)
    assert not c.admit("k", BASE + 41)


def test_an_acknowledgement_sent_after_the_start_zone_covers_the_window() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 5)
    c.committed(["k"], BASE + 5.01)
    c.acknowledged("k", BASE + 31)  # the copy was sent late, after the start zone
    assert not c.admit("k", BASE + 40)
    c.acknowledged("someone-elses", BASE + 50)  # delivered by this process's worker
    assert not c.admit("someone-elses", BASE + 60)


def test_a_failed_copy_is_forgotten_at_once() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    c.committed(["k"], BASE + 100.01)
    assert not c.admit("k", BASE + 101)
    c.failed("k")
    assert c.admit("k", BASE + 102)


def test_forget_drops_every_key() -> None:
    c = Coalescer(W, 30)
    for key in "abc":
        assert c.admit(key, BASE + 100)
    c.forget()
    assert all(c.admit(key, BASE + 101) for key in "abc")


def test_sync_mode_suppresses_only_copies_on_disk() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100, batched=False)
    assert c.admit("k", BASE + 100.5, batched=False)  # the first write is still under way
    c.committed(["k"], BASE + 100.6)
    assert not c.admit("k", BASE + 101, batched=False)


def test_every_window_starts_empty_and_the_clock_going_back_too() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    c.committed(["k"], BASE + 100)
    assert c.admit("k", BASE + W + 100)  # next window
    assert c.admit("k", BASE + 100)  # back again: start afresh, never suppress on stale state


def test_no_safe_part_when_the_margins_cover_the_window() -> None:
    c = Coalescer(60, 30)
    assert c.admit("k", BASE + 10)
    c.committed(["k"], BASE + 10)
    assert c.admit("k", BASE + 20)


def test_window_zero_disables() -> None:
    c = Coalescer(0)
    assert all(c.admit("k", 5.0) for _ in range(3))
    assert len(c) == 0


def test_memory_is_bounded_and_eviction_only_causes_resend() -> None:
    c = Coalescer(W, 0, max_keys=100)
    for i in range(1000):
        assert c.admit(i, BASE + 1)
    assert len(c) <= 100
    assert c.evictions > 0
    assert c.admit(0, BASE + 1)  # evicted: sent again, which is harmless


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Coalescer(-1)
    with pytest.raises(ValueError):
        Coalescer(10, -1)
    with pytest.raises(ValueError):
        Coalescer(10, max_keys=0)


def test_delivered_keys_cover_only_in_the_safe_part_after_a_safe_send() -> None:
    d = DeliveredKeys(W, 30)
    assert not d.covered("k", BASE + 100)
    d.note("k", BASE + 10)  # sent in the start zone
    assert not d.covered("k", BASE + 100)
    d.note("k", BASE + 100)
    assert d.covered("k", BASE + 200)
    assert not d.covered("k", BASE + W - 10)  # end zone
    assert not d.covered("k", BASE + W + 100)  # next window
    assert not DeliveredKeys(0).covered("k", BASE)
