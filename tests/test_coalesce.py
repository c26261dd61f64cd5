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


def test_a_copy_on_disk_or_in_flight_suppresses_nothing() -> None:
    """Its request may reach Per before the repeat is recorded, or fail while the
    repeat's own would have succeeded: only an acknowledgement stands for a repeat."""
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    c.take()
    assert c.admit("k", BASE + 500)
    assert not c.admit("k", BASE + 500.1)  # that new copy is unsent again


def test_a_taken_copy_is_stamped_with_the_latest_call_it_stood_for() -> None:
    """A copy stands for the repeats suppressed while it waited in memory: it must
    never ride on a request sent before the latest of them was recorded."""
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    assert c.admit("j", BASE + 100)
    assert not c.admit("k", BASE + 103)
    assert not c.admit("k", BASE + 102)  # the clock stepped back: the latest stays
    assert c.take() == {"k": BASE + 103}
    assert c.take() == {}  # each call is reported to one take only
    assert c.admit("k", BASE + 104)  # taken: on its way to the disk, it stands for nothing


def test_a_held_copy_stands_for_repeats_again() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    c.take()
    assert c.admit("k", BASE + 101)  # taken: a new copy
    c.take()
    c.held(["k"])  # the write failed; both copies wait in memory again
    assert not c.admit("k", BASE + 102)
    assert c.take() == {"k": BASE + 102}
    assert c.admit("k", BASE + 103)


def test_a_held_copy_never_grows_the_memory_past_its_bound() -> None:
    c = Coalescer(W, 0, max_keys=2)
    c.held(["a", "b", "c"])
    assert len(c) == 2


def test_an_acknowledgement_covers_the_safe_part_only() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    c.take()
    c.acknowledged("k", BASE + 100.5)  # sent after the start zone
    assert not c.admit("k", BASE + 500)
    assert not c.admit("k", BASE + W - 30.001)
    assert c.admit("k", BASE + W - 29.999)  # the end zone: Per may be in the next window


def test_an_acknowledgement_of_a_copy_sent_in_the_start_zone_covers_nothing() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 5)
    c.take()
    c.acknowledged("k", BASE + 5.5)  # it may have landed in Per's previous window
    assert c.admit("k", BASE + 40)
    c.take()
    c.acknowledged("k", BASE + 31)  # sent late, after the start zone
    assert not c.admit("k", BASE + 41)
    c.acknowledged("someone-elses", BASE + 50)  # delivered by this process's worker
    assert not c.admit("someone-elses", BASE + 60)


def test_an_acknowledgement_from_another_window_is_ignored() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    c.take()
    c.acknowledged("k", BASE - 100)  # the previous window
    assert c.admit("k", BASE + 200)


def test_a_copy_dropped_from_memory_is_forgotten_at_once() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    assert not c.admit("k", BASE + 101)
    c.failed("k")
    assert c.admit("k", BASE + 102)


def test_forget_drops_every_key() -> None:
    c = Coalescer(W, 30)
    for key in "abc":
        assert c.admit(key, BASE + 100)
    c.forget()
    assert all(c.admit(key, BASE + 101) for key in "abc")


def test_sync_mode_suppresses_only_acknowledged_copies() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100, batched=False)
    assert c.admit("k", BASE + 100.5, batched=False)  # the first write is still under way
    c.take()
    assert c.admit("k", BASE + 101, batched=False)  # on disk is not delivered
    c.acknowledged("k", BASE + 100.7)
    assert not c.admit("k", BASE + 101, batched=False)


def test_every_window_starts_empty_and_the_clock_going_back_too() -> None:
    c = Coalescer(W, 30)
    assert c.admit("k", BASE + 100)
    c.acknowledged("k", BASE + 100)
    assert c.admit("k", BASE + W + 100)  # next window
    assert c.admit("k", BASE + 100)  # back again: start afresh, never suppress on stale state


def test_no_safe_part_when_the_margins_cover_the_window() -> None:
    c = Coalescer(60, 30)
    assert c.admit("k", BASE + 10)
    c.take()
    c.acknowledged("k", BASE + 10)
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
    with pytest.raises(ValueError):
        DeliveredKeys(max_keys=0)


def test_delivered_keys_cover_only_in_the_safe_part_after_a_safe_send() -> None:
    d = DeliveredKeys()
    assert not d.covered("k", BASE + 100, W, 30)
    d.note("k", BASE + 10)  # sent in the start zone
    assert not d.covered("k", BASE + 100, W, 30)
    d.note("k", BASE + 100)
    assert d.covered("k", BASE + 200, W, 30)
    assert not d.covered("k", BASE + W - 10, W, 30)  # end zone
    assert not d.covered("k", BASE + W + 100, W, 30)  # next window
    assert not d.covered("k", BASE + 200, 0, 0)  # this entry's recorder coalesces nothing


def test_delivered_keys_judge_each_entry_under_its_own_window() -> None:
    """A drainer serves recorders with different settings: a 2 s window's entry is
    covered only by a copy sent inside its own 2 s window."""
    d = DeliveredKeys()
    d.note("k", BASE + 100.5)
    assert d.covered("k", BASE + 101.5, W, 30)  # a 900 s recorder's entry
    assert not d.covered("k", BASE + 102.5, 2.0, 0.2)  # sent in [100, 102): another window
    assert d.covered("k", BASE + 101.5, 2.0, 0.2)  # same 2 s window, both in its safe part
    assert not d.covered("k", BASE + 101.9, 2.0, 0.2)  # end zone of [100, 102)
    d.note("j", BASE + 100.1)  # the start zone of [100, 102): maybe Per's previous window
    assert not d.covered("j", BASE + 101.0, 2.0, 0.2)
    assert d.covered("j", BASE + 101.0, W, 30)


def test_delivered_keys_memory_is_bounded() -> None:
    d = DeliveredKeys(max_keys=100)
    for i in range(1000):
        d.note(i, BASE + i)
    assert len(d) <= 100
    d.note("k", BASE + 2000)
    assert d.covered("k", BASE + 2001, W, 30) is ((BASE + 2000) // W == (BASE + 2001) // W)
